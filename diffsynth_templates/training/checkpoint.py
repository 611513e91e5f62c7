"""Checkpoints: the trained weights in their usable formats, plus everything needed to resume exactly.

``checkpoint-{step}/`` holds only what was trained:

* a template: the declarative template folder itself (``template.json`` with the base model and its
  ``base_backbone``, ``model.safetensors``, ``README.md``), so
  ``TemplatePipeline.from_pretrained("…/checkpoint-500")`` loads it directly;
* full DiT fine-tuning: ``transformer/`` in the official diffusers layout (``Flux2DiT`` /
  ``ZImageDiT.from_pretrained``);
* a DiT LoRA: ``dit_lora.safetensors`` in the LoRA-cache format (a pipeline's ``lora=`` argument);

and ``training_args.json`` plus ``training_state/``: ``state.json`` (step, data position, the LR
schedule is a pure function of the step), ``optimizer.safetensors`` + the optimizer's non-tensor
state in ``state.json``, raw LoRA parameters, and per-rank RNG states (torch, CUDA, numpy, python)
as safetensors + JSON. Nothing is pickled. The folder is assembled under a temporary name and
renamed into place once complete; ``latest.json`` then points at it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from ..errors import DiffSynthTemplatesError
from ..loading import save_safetensors_atomic, write_json_atomic
from ..templates.folder import TemplateSpec, save_template_folder
from .components import TemplateHandle
from .config import TrainConfig

logger = logging.getLogger(__name__)

STATE_DIR = "training_state"
LATEST = "latest.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# arguments that must not change between a run and its resumption (the result would not be the same run)
RESUME_KEYS = (
    "trainable_models",
    "architecture",
    "architecture_config",
    "template",
    "lora_rank",
    "lora_alpha",
    "lora_target_modules",
    "batch_size",
    "gradient_accumulation_steps",
    "seed",
    "max_pixels",
    "max_sequence_length",
    "mixed_precision",
)


class ResumeError(DiffSynthTemplatesError, RuntimeError):
    """A checkpoint cannot be resumed from (missing, incomplete, or from a different configuration)."""


@dataclass
class TrainingState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epoch of the next micro-batch
    batch_in_epoch: int = 0  # micro-batches of that epoch already consumed (per rank)
    num_processes: int = 1


class _Weights:
    """A state dict posing as a module for ``save_template_folder`` (weights may come gathered from ZeRO-3)."""

    def __init__(self, state_dict: dict[str, Tensor]):
        self._state_dict = state_dict

    def state_dict(self) -> dict[str, Tensor]:
        return self._state_dict


# --------------------------------------------------------------------------------------------------
# non-pickled optimizer and RNG state
# --------------------------------------------------------------------------------------------------


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for param_id, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"state/{param_id}/{key}"] = value
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, param_id, key = name.split("/", 2)
        state.setdefault(int(param_id), {})[key] = value
    for param_id, entries in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(entries)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = state
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss = random.getstate()
    meta = {
        "numpy": [name, int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [
        tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k[5:]))
    ]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------------


def _split(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def save_checkpoint(
    accelerator,
    model,
    optimizer,
    output_path: Path,
    state: TrainingState,
    config: TrainConfig,
    template: TemplateHandle | None,
    dit_config: dict[str, Any],
    save_optimizer: bool = True,
) -> Path:
    """Write ``checkpoint-{step}`` (every rank calls this; rank 0 writes the shared files)."""
    final = output_path / f"checkpoint-{state.step}"
    staging = output_path / f".checkpoint-{state.step}.partial"
    full = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; a plain state_dict otherwise
    optimizer_state = optimizer.state_dict() if save_optimizer else None
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        if "template" in config.trainable_models and template is not None:
            save_template_folder(staging, _Weights(_split(full, "template.")), copy_spec(template))
        staging.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    tensors, meta = rng_state()  # each rank's own generators
    rank = accelerator.process_index
    save_safetensors_atomic(tensors, staging / STATE_DIR / f"rng-rank{rank}.safetensors")
    write_json_atomic(meta, staging / STATE_DIR / f"rng-rank{rank}.json")

    if main:
        if "dit" in config.trainable_models:
            save_safetensors_atomic(
                _split(full, "dit."), staging / "transformer" / "diffusion_pytorch_model.safetensors"
            )
            write_json_atomic(dit_config, staging / "transformer" / "config.json")
        if "dit_lora" in config.trainable_models:
            raw = _split(full, "dit_lora.")
            unwrapped = accelerator.unwrap_model(model)
            save_safetensors_atomic(raw, staging / STATE_DIR / "dit_lora_raw.safetensors")
            lora = {k: v.detach() for k, v in _lora_cache(unwrapped.dit_lora, raw).items()}
            save_safetensors_atomic(lora, staging / "dit_lora.safetensors", metadata={"format": "lora-cache"})
        extra: dict[str, Any] = {}
        if optimizer_state is not None:
            opt_tensors, extra = _flatten_optimizer(optimizer_state)
            save_safetensors_atomic(opt_tensors, staging / STATE_DIR / "optimizer.safetensors")
        write_json_atomic({**asdict(state), "optimizer": extra or None}, staging / STATE_DIR / "state.json")
        write_json_atomic(config.to_json(), staging / "training_args.json")
    accelerator.wait_for_everyone()

    if main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        write_json_atomic({"checkpoint": final.name, "step": state.step}, output_path / LATEST)
        _prune(output_path, config.save_total_limit)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def copy_spec(template: TemplateHandle) -> TemplateSpec:
    return copy.deepcopy(template.spec)  # save_template_folder edits the spec it is given


def _lora_cache(dit_lora, raw: dict[str, Tensor]) -> dict[str, Tensor]:
    """The LoRA-cache dict (alpha / rank folded into B) from raw ``lora_A.x`` / ``lora_B.x`` parameters."""
    out = {}
    for name in dit_lora.module_names:
        key = name.replace(".", "__")
        out[f"{name}.lora_A.weight"] = raw[f"lora_A.{key}"]
        out[f"{name}.lora_B.weight"] = raw[f"lora_B.{key}"] * dit_lora.scale
    return out


def list_checkpoints(output_path: Path) -> list[tuple[int, Path]]:
    found = []
    for path in output_path.glob("checkpoint-*"):
        match = _CHECKPOINT.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _prune(output_path: Path, limit: int | None) -> None:
    if not limit:
        return
    for _, path in list_checkpoints(output_path)[:-limit]:
        shutil.rmtree(path, ignore_errors=True)
        logger.info("removed old checkpoint %s (--save_total_limit %d)", path, limit)


# --------------------------------------------------------------------------------------------------
# resuming
# --------------------------------------------------------------------------------------------------


def find_resume_checkpoint(config: TrainConfig) -> Path | None:
    """``--resume auto``: the newest complete checkpoint under ``--output_path`` (None: start fresh)."""
    if config.resume is None:
        return None
    if config.resume != "auto":
        path = Path(config.resume)
        if not (path / STATE_DIR / "state.json").is_file():
            raise ResumeError(f"--resume {path} is not a checkpoint folder with a {STATE_DIR}/state.json")
        return path
    found = [
        p for _, p in list_checkpoints(Path(config.output_path)) if (p / STATE_DIR / "state.json").is_file()
    ]
    if not found:
        logger.info("--resume auto: no checkpoint under %s yet, starting from scratch", config.output_path)
        return None
    return found[-1]


def check_resume_config(folder: Path, config: TrainConfig) -> None:
    saved = json.loads((folder / "training_args.json").read_text())
    changed = [
        f"{k}: {saved.get(k)!r} -> {getattr(config, k)!r}"
        for k in RESUME_KEYS
        if saved.get(k) != getattr(config, k)
    ]
    if changed:
        raise ResumeError(
            f"cannot resume {folder}: these arguments differ from the run that wrote it: {'; '.join(changed)}. "
            "Use the original values, or start a new run with a different --output_path."
        )


def load_checkpoint(folder: Path, accelerator, model, optimizer, config: TrainConfig) -> TrainingState:
    """Restore weights, optimizer, data position and this rank's RNG from ``folder``."""
    check_resume_config(folder, config)
    unwrapped = accelerator.unwrap_model(model)
    with torch.no_grad():
        if "template" in config.trainable_models:
            unwrapped.template.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
        if "dit" in config.trainable_models:
            weights = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
            unwrapped.dit.load_state_dict(weights, strict=True)
        if "dit_lora" in config.trainable_models:
            unwrapped.dit_lora.load_state_dict(
                load_file(str(folder / STATE_DIR / "dit_lora_raw.safetensors")), strict=True
            )
    saved = json.loads((folder / STATE_DIR / "state.json").read_text())
    if saved.get("optimizer") is None:
        raise ResumeError(
            f"{folder} has no optimizer state (written under DeepSpeed?); it cannot be resumed exactly"
        )
    tensors = load_file(str(folder / STATE_DIR / "optimizer.safetensors"))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, saved["optimizer"]))
    state = TrainingState(**{k: saved[k] for k in ("step", "epoch", "batch_in_epoch", "num_processes")})
    if state.num_processes != accelerator.num_processes:
        logger.warning(
            "resuming a %d-process run with %d processes: data order and RNG streams differ from an uninterrupted run",
            state.num_processes,
            accelerator.num_processes,
        )
    rank_file = folder / STATE_DIR / f"rng-rank{accelerator.process_index}"
    if rank_file.with_suffix(".json").is_file():
        set_rng_state(
            load_file(str(rank_file.with_suffix(".safetensors"))),
            json.loads(rank_file.with_suffix(".json").read_text()),
        )
    logger.info(
        "resumed from %s at step %d (epoch %d, batch %d)",
        folder,
        state.step,
        state.epoch,
        state.batch_in_epoch,
    )
    return state
