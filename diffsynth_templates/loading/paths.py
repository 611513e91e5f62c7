"""Path containment: the one resolver for every file named *inside* a folder we read.

Template folders (``template.json`` weights, ``TEMPLATE_MODEL_PATH``), feature caches (``index.json``
shards, latent keys) and packages name files relative to their own folder. Such an entry must be a
relative path without ``..`` and must still lie inside the folder once symlinks are resolved; otherwise a
downloaded folder could make us read (or package, or overwrite) any file on the machine.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import DiffSynthTemplatesError


class PathContainmentError(DiffSynthTemplatesError, ValueError):
    """A file named inside a folder points outside it (absolute, ``..``, or a symlink out)."""


def resolve_inside(folder: str | os.PathLike, entry: object, what: str = "file") -> Path:
    """Return ``folder / entry`` after checking that it stays inside ``folder``.

    ``entry`` comes from a file we read (JSON, a module attribute), so its type is checked too. ``what``
    names the entry in the error, e.g. ``"template.json 'weights' entry"``.
    """
    folder = Path(folder)
    if not isinstance(entry, (str, os.PathLike)) or isinstance(entry, bytes):
        raise PathContainmentError(
            f"{what} must be a relative file name (a string), got {entry!r} ({type(entry).__name__})"
        )
    text = os.fspath(entry)
    if not text or text.strip() != text or "\x00" in text:
        raise PathContainmentError(f"{what} {text!r} is not a valid relative file name")
    pure = PurePosixPath(text.replace("\\", "/"))
    if pure.is_absolute() or PureWindowsPath(text).is_absolute() or PureWindowsPath(text).drive:
        raise PathContainmentError(
            f"{what} {text!r} is an absolute path; it must name a file inside {str(folder)!r}, relative to it"
        )
    if ".." in pure.parts:
        raise PathContainmentError(
            f"{what} {text!r} contains '..'; it must name a file inside {str(folder)!r}, relative to it"
        )
    path = folder / pure
    root = folder.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise PathContainmentError(
            f"{what} {text!r} resolves to {str(resolved)!r}, outside {str(root)!r} (a symlink out of the "
            "folder?); copy the file into the folder instead"
        )
    return path
