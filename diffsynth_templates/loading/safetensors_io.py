"""Reading safetensors checkpoints laid out as diffusers / transformers publish them.

A component folder holds either one ``{stem}.safetensors`` file or shards
``{stem}-0000k-of-0000N.safetensors`` listed by ``{stem}.safetensors.index.json``.
Everything here is safetensors-only: no pickle is ever read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

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
    try:
        present = sorted(p.name for p in folder.iterdir())
    except OSError as e:
        raise CheckpointError(f"cannot list {str(folder)!r}: {e.strerror or e}") from e
    if any(name.endswith((".bin", ".pt", ".pth", ".ckpt")) for name in present):
        raise CheckpointError(
            f"{str(folder)!r} holds only pickle weights ({present}); diffsynth_templates reads safetensors only. "
            "Convert them with safetensors.torch.save_file first."
        )
    wanted = ", ".join(f"{s}.safetensors[.index.json]" for s in stems)
    raise CheckpointError(f"no weights in {str(folder)!r}: expected {wanted}; found {present}")


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"index {str(index)!r} is not a valid safetensors index ({e!r})") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"index {str(index)!r}: 'weight_map' must map tensor names to shard file names, got {weight_map!r:.200}"
        )
    shards = list(dict.fromkeys(weight_map.values()))  # keep first-seen order, drop repeats
    paths = [_shard_path(index, name) for name in shards]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"index {str(index)!r} lists shard(s) {missing} that are not in the folder; "
            "the download is incomplete: download the missing shard(s) again"
        )
    return paths


def _shard_path(index: Path, name: str) -> Path:
    """A shard named by an index: a plain relative name inside the index's folder (no '..', not absolute).

    Symlinked shards are allowed: download caches keep the real bytes in a blob store outside the folder.
    """
    pure = PurePosixPath(name.replace("\\", "/"))
    if not name or pure.is_absolute() or ".." in pure.parts or "\x00" in name:
        raise CheckpointError(
            f"index {str(index)!r} names shard {name!r}; shards must be file names inside {str(index.parent)!r}"
        )
    return index.parent / pure


def _read_error(path: Path, e: Exception) -> CheckpointError:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return CheckpointError(
        f"cannot read {str(path)!r}: {reason}. The file is truncated or corrupt (or unreadable): "
        "download or write it again"
    )


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` whose errors name the file (``CheckpointError``, cause kept)."""
    path = Path(path)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as e:
        raise _read_error(path, e) from e


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file's header (``{}`` when it has none); errors name the file."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise _read_error(path, e) from e


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
            raise _read_error(path, e) from e


def read_header_keys(files: list[Path]) -> dict[str, Path]:
    """Map every tensor key to the file that holds it (reads headers only)."""
    out: dict[str, Path] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    out[key] = path
        except (SafetensorError, OSError) as e:
            raise _read_error(path, e) from e
    return out


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file through a temp file and a rename, so a crash never leaves half a file."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _write_atomic(Path(path), lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def write_json_atomic(obj: object, path: str | os.PathLike) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    _write_atomic(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` then rename to ``path``; an error (disk full, permission) names ``path``, no temp left."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (SafetensorError, OSError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CheckpointError(
            f"cannot write {str(path)!r}: {reason}; free space or fix permissions there"
        ) from e
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the folder itself is gone or unwritable: nothing more to clean
            pass
