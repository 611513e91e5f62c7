"""Shared pieces of the trainer tests: datasets on disk and command lines."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [
    "a photo of a red circle",
    "a blue square on the left",
    "a green triangle at the top",
    "a yellow circle in the center",
    "a white square at the bottom",
    "a black triangle on the right",
]
# tiny everywhere: 32x32 images (2x2 latent tokens), 24 prompt tokens (chat template included)
SMALL = ["--max_pixels", "1024", "--max_sequence_length", "24", "--import_modules", "tests.training.archs"]
MASKED_KV = ["--architecture", "test_masked_kv", "--data_processor", "inpaint",
             "--data_processor_config", '{"coverage": [0.2, 0.6], "tolerance": 0.2}']  # fmt: skip


def write_dataset(root: Path, size: int = 32, prompts: list[str] = PROMPTS) -> Path:
    """Blurred random-color images (something learnable) and their ``metadata.jsonl``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, prompt in enumerate(prompts):
        coarse = rng.random((4, 4, 3)) * 255
        image = Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
        image.save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "prompt": prompt})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "metadata.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(
    args: list[str], env: dict[str, str] | None = None, launcher: list[str] | None = None, timeout: int = 240
):
    """``python train.py ARGS`` (or under ``launcher``) in a subprocess, one intra-op thread per process."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    command = [*(launcher or [sys.executable]), str(REPO / "train.py"), *args]
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
