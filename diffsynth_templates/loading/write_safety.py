"""Write-safety: the one way any command of this project writes (or replaces) a whole folder.

A folder is built in a new temporary sibling and renamed into place, so readers never see half of it
and a crash leaves the old one intact. An existing folder is replaced only when (1) this project wrote
it (its marker file, or a layout the caller recognises) and (2) the user asked for it (``overwrite``,
``--overwrite`` on the command line). Some targets are never written: ``/``, the home directory, the
current directory, any of their parents, and the source being converted (or anything inside it or
above it). Every command that writes a folder (convert, publish, checkpoints, feature caches, the toy
builders) goes through here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import DiffSynthTemplatesError

MARKER = ".diffsynth_templates.json"  # written into every folder this project writes


class UnsafeOutputError(DiffSynthTemplatesError, ValueError):
    """An output folder that must not be written or replaced."""


def is_ours(folder: str | os.PathLike) -> bool:
    """True when ``folder`` carries the marker file this project writes into its folders."""
    return (Path(folder) / MARKER).is_file()


def _is_within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_not_protected(out: str | os.PathLike, what: str = "output folder") -> Path:
    """Raise ``UnsafeOutputError`` if ``out`` is ``/``, the home or current directory, or a parent of one.

    For folders written incrementally (feature caches), where ``check_output_folder``'s replace rules do
    not apply; returns ``out`` resolved.
    """
    target = Path(out).resolve()
    protected = {"/": Path("/").resolve(), "the current directory": Path.cwd().resolve()}
    try:
        protected["the home directory"] = Path.home().resolve()
    except RuntimeError:  # no home directory (some containers)
        pass
    for name, path in protected.items():
        if _is_within(path, target):  # the target is that folder or one of its parents
            raise UnsafeOutputError(
                f"refusing to write {what} {str(out)!r}: it is {name} or contains it ({str(path)!r}); "
                "choose a new folder, e.g. a subfolder that does not exist yet"
            )
    return target


def check_output_folder(
    out: str | os.PathLike,
    *,
    sources: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
    recognise: Callable[[Path], bool] | None = None,
    what: str = "output folder",
) -> Path:
    """Raise ``UnsafeOutputError`` unless ``out`` may be (re)written; return it as a ``Path``.

    ``recognise(folder)`` may accept folders written by an older version without the marker.
    """
    out = Path(out)
    if not out.name or out.name in (".", ".."):
        raise UnsafeOutputError(
            f"{what} {str(out)!r} names no new folder; give a path such as {str(out.resolve() / 'converted')!r}"
        )
    target = check_not_protected(out, what)
    for source in sources:
        src = Path(source).resolve()
        if _is_within(target, src) or _is_within(src, target):
            raise UnsafeOutputError(
                f"refusing to write {what} {str(out)!r}: it is, is inside, or contains the source "
                f"{str(source)!r}; choose a folder outside the source"
            )
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UnsafeOutputError(f"{what} {str(out)!r} exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()):
        ours = is_ours(out) or (recognise is not None and recognise(out))
        if not ours:
            raise UnsafeOutputError(
                f"refusing to replace {what} {str(out)!r}: it is not empty and was not written by "
                "diffsynth_templates; choose a new or empty folder (nothing was changed)"
            )
        if not overwrite:
            raise UnsafeOutputError(
                f"{what} {str(out)!r} already exists; pass --overwrite (Python: overwrite=True) to replace "
                "it, or choose another folder"
            )
    return out


def new_staging_folder(out: str | os.PathLike) -> Path:
    """A new empty temporary sibling of ``out`` to build the folder in (same filesystem: rename is atomic)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def commit_folder(staging: str | os.PathLike, out: str | os.PathLike, kind: str = "folder") -> Path:
    """Mark ``staging`` as ours, give it umask permissions and rename it to ``out`` (replacing it).

    Call ``check_output_folder`` first (``write_folder`` does both).
    """
    staging, out = Path(staging), Path(out)
    (staging / MARKER).write_text(json.dumps({"written_by": "diffsynth_templates", "kind": kind}) + "\n")
    _make_readable(staging)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)
    return out


@contextmanager
def write_folder(
    out: str | os.PathLike,
    *,
    sources: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
    recognise: Callable[[Path], bool] | None = None,
    kind: str = "folder",
    what: str = "output folder",
) -> Iterator[Path]:
    """``with write_folder(out, overwrite=...) as tmp:`` write into ``tmp``; on success it becomes ``out``.

    On an error the temporary folder is removed and ``out`` is left exactly as it was.
    """
    out = check_output_folder(out, sources=sources, overwrite=overwrite, recognise=recognise, what=what)
    staging = new_staging_folder(out)
    try:
        yield staging
        commit_folder(staging, out, kind)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def remove_our_folder(folder: str | os.PathLike, recognise: Callable[[Path], bool] | None = None) -> bool:
    """Delete ``folder`` only if this project wrote it; return whether it was deleted."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    if not (is_ours(folder) or (recognise is not None and recognise(folder))):
        return False
    shutil.rmtree(folder)
    return True


def _make_readable(folder: Path) -> None:
    """mkdtemp and safetensors create owner-only entries; give the folder the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
