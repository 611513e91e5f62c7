"""Pinned weights: ``template.json`` records the sha256 of each weight file; loading checks them.

``package_template`` writes ``"sha256": {"model.safetensors": "<hex>", ...}`` into ``template.json``.
``verify_sha256(folder)`` recomputes the digests and raises ``IntegrityError`` naming every file that
differs, so a truncated download or an edited file never loads silently. A folder without recorded
hashes is accepted as is (nothing to check). Revision pinning happens at download time
(``resolve_model_path(..., revision=...)`` puts each revision in its own snapshot folder).

This module depends only on the standard library and ``loading`` so the template loader can call it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from .paths import PathContainmentError, resolve_inside
from .safetensors_io import CheckpointError

SHA256_KEY = "sha256"
TEMPLATE_JSON = "template.json"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 8 << 20

# digests already computed in this process, keyed by (path, size, mtime): re-loading is free
_DIGESTS: dict[tuple[str, int, int], str] = {}


class IntegrityError(CheckpointError):
    """A file's content does not match the sha256 recorded for it."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks (memoized per path, size and mtime)."""
    path = Path(path)
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _DIGESTS:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
            _DIGESTS[key] = digest.hexdigest()
    except OSError as e:
        raise CheckpointError(f"cannot read {str(path)!r} to check its sha256: {e.strerror or e}") from e
    return _DIGESTS[key]


def compute_sha256(folder: str | os.PathLike, files: Iterable[str]) -> dict[str, str]:
    """``{relative name: hex sha256}`` for ``files`` inside ``folder``."""
    folder = Path(folder)
    return {name: file_sha256(folder / _safe_name(name, folder)) for name in files}


def recorded_sha256(folder: str | os.PathLike) -> dict[str, str]:
    """The hashes ``folder/template.json`` records ({} when it records none)."""
    path = Path(folder) / TEMPLATE_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{str(path)!r} is not valid JSON ({e})") from e
    except OSError as e:
        raise IntegrityError(f"cannot read {str(path)!r}: {e.strerror or e}") from e
    return _check_mapping(data.get(SHA256_KEY) if isinstance(data, dict) else None, str(path))


def verify_sha256(folder: str | os.PathLike, expected: Mapping[str, str] | None = None) -> dict[str, str]:
    """Check the files of ``folder`` against ``expected`` (default: what its template.json records).

    Returns the verified ``{name: sha256}`` ({} when nothing is recorded). Raises ``IntegrityError``
    listing every missing or mismatched file, with what to do about it.
    """
    folder = Path(folder)
    expected = recorded_sha256(folder) if expected is None else _check_mapping(dict(expected), "expected")
    problems = []
    for name, want in expected.items():
        path = folder / _safe_name(name, folder)
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        got = file_sha256(path)
        if got != want:
            problems.append(f"{name}: sha256 {got[:12]}... but {TEMPLATE_JSON} records {want[:12]}...")
    if problems:
        raise IntegrityError(
            f"template folder {str(folder)!r} failed its integrity check: {'; '.join(problems)}. The download "
            "is incomplete or corrupt, or the files were edited after packaging: delete the folder (for a "
            "ModelScope id, its snapshot in the download cache) and download it again; if you changed the "
            "weights on purpose, package them again with package_template"
        )
    return dict(expected)


def _check_mapping(value, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _HEX64.match(v) for k, v in value.items()
    ):
        raise IntegrityError(
            f"{where}: {SHA256_KEY!r} must map file names to lowercase hex sha256 digests, got {value!r}"
        )
    return dict(value)


def _safe_name(name: str, folder: Path) -> str:
    """Refuse names that leave the folder (absolute paths, '..', symlinks out): the shared resolver decides."""
    try:
        resolve_inside(folder, name, f"{str(folder / TEMPLATE_JSON)!r} {SHA256_KEY!r} entry")
    except PathContainmentError as e:
        raise IntegrityError(str(e)) from e
    return name
