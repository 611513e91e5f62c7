"""Training metrics: a CSV file always, TensorBoard when ``tensorboard`` is installed (rank 0 only)."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

FIELDS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "seconds")


class MetricsLog:
    """``output_path/logs/metrics.csv`` (+ ``logs/tensorboard``). Resuming drops rows past the resume step."""

    def __init__(self, output_path: Path, resume_step: int = 0, tensorboard: bool = True):
        self.path = output_path / "logs" / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = self._rows_up_to(resume_step) if self.path.is_file() else []
        with self.path.open("w", newline="") as f:  # rewrite: steps after the resume point are redone
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows(kept)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info("tensorboard is not installed; metrics go to %s only", self.path)
            else:
                self.writer = SummaryWriter(
                    str(output_path / "logs" / "tensorboard"), purge_step=resume_step + 1
                )

    def _rows_up_to(self, resume_step: int) -> list[dict[str, str]]:
        """The earlier run's rows up to the resume step; an unreadable file is set aside, never fatal."""
        try:
            rows = read_metrics(self.path)
            return [r for r in rows if int(r["step"]) <= resume_step]
        except (UnicodeDecodeError, csv.Error, ValueError, KeyError, TypeError) as e:
            aside = self.path.with_name(self.path.name + ".unreadable")
            logger.warning(
                "%s is unreadable (%s); moved to %s, metrics start afresh", self.path, e, aside.name
            )
            os.replace(self.path, aside)
            return []

    def log(
        self,
        step: int,
        epoch: int,
        loss: float,
        learning_rate: float,
        grad_norm: float | None,
        seconds: float,
    ) -> None:
        row = {
            "step": step,
            "epoch": epoch,
            "loss": f"{loss:.8g}",
            "learning_rate": f"{learning_rate:.8g}",
            "grad_norm": "" if grad_norm is None else f"{grad_norm:.6g}",
            "seconds": f"{seconds:.4f}",
        }
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow(row)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/learning_rate", learning_rate, step)
            if grad_norm is not None:
                self.writer.add_scalar("train/grad_norm", grad_norm, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
