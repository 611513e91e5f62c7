"""Reading safetensors checkpoints laid out as diffusers / transformers publish them.

A component folder holds either one ``{stem}.safetensors`` file or shards
``{stem}-0000k-of-0000N.safetensors`` listed by ``{stem}.safetensors.index.json``.
Everything here is safetensors-only: no pickle is ever read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import DiffSynthTemplatesError

# Stems in the order they are tried when the caller does not name one.
KNOWN_STEMS = ("diffusion_pytorch_model", "model")


class CheckpointError(DiffSynthTemplatesError, RuntimeError):
    """A checkpoint folder is missing files, is corrupt, or does not match the model."""


def find_weight_files(folder: str | os.PathLike, stem: str | None = None) -> list[Path]:
    """Return the safetensors files of a component folder, shards in index order.

    Raises ``CheckpointError`` naming the folder and what was looked for when nothing fits,
    or naming the shard when the index lists one that is not on disk.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {str(folder)!r} does not exist or is not a directory")
    stems = (stem,) if stem else KNOWN_STEMS
    for s in stems:
        index = folder / f"{s}.safetensors.index.json"
        if index.is_file():
            return _shards_from_index(index)
        single = folder / f"{s}.safetensors"
        if single.is_file():
            return [single]
    present = sorted(p.name for p in folder.iterdir())
    if any(name.endswith((".bin", ".pt", ".pth", ".ckpt")) for name in present):
        raise CheckpointError(
            f"{str(folder)!r} holds only pickle weights ({present}); diffsynth_templates reads safetensors only. "
            "Convert them with safetensors.torch.save_file first."
        )
    wanted = ", ".join(f"{s}.safetensors[.index.json]" for s in stems)
    raise CheckpointError(f"no weights in {str(folder)!r}: expected {wanted}; found {present}")


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"index {str(index)!r} is not a valid safetensors index ({e})") from e
    shards = list(dict.fromkeys(weight_map.values()))  # keep first-seen order, drop repeats
    paths = [index.parent / name for name in shards]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"index {str(index)!r} lists shard(s) {missing} that are not in the folder; "
            "the download is incomplete: download the missing shard(s) again"
        )
    return paths


def iter_tensors(
    files: list[Path], device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` one at a time, so peak memory is one tensor beyond the model itself."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    yield key, t
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"cannot read {str(path)!r}: {e}. The file is truncated or corrupt: download it again"
            ) from e


def read_header_keys(files: list[Path]) -> dict[str, Path]:
    """Map every tensor key to the file that holds it (reads headers only)."""
    out: dict[str, Path] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    out[key] = path
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"cannot read {str(path)!r}: {e}. The file is truncated or corrupt: download it again"
            ) from e
    return out


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file through a temp file and a rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(contiguous, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def write_json_atomic(obj: object, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
