"""Turn a model source (a local folder or a ModelScope id) into a local folder.

Every ``from_pretrained`` goes through ``resolve_model_path`` so downloads, caching and offline mode
behave the same everywhere. ``DIFFSYNTH_TEMPLATES_OFFLINE=1`` never touches the network and fails
with a clear message when something is not cached yet.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import DiffSynthTemplatesError

logger = logging.getLogger(__name__)

OFFLINE_ENV = "DIFFSYNTH_TEMPLATES_OFFLINE"
CACHE_ENV = "DIFFSYNTH_TEMPLATES_CACHE"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ModelNotFoundError(DiffSynthTemplatesError, FileNotFoundError):
    """A source is neither a local folder nor something that can be downloaded (or is not cached offline)."""


def is_offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def default_cache_dir() -> Path:
    """``$DIFFSYNTH_TEMPLATES_CACHE`` or ``models/downloads`` under the current directory."""
    return Path(os.environ.get(CACHE_ENV) or Path.cwd() / "models" / "downloads")


def resolve_model_path(
    source: str | os.PathLike,
    *,
    allow_patterns: Sequence[str] | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
) -> Path:
    """Return a local folder for ``source``.

    A path that exists is used as is. Otherwise ``source`` must be a ModelScope id ``owner/name``,
    downloaded with ``modelscope.snapshot_download`` (only ``allow_patterns`` files, pinned to
    ``revision`` when given) into ``cache_dir``.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{str(source)!r} is a file; expected a model folder")
        return path
    source = str(source)
    if not _REPO_ID.match(source):
        raise ModelNotFoundError(
            f"{source!r} is not an existing folder and not a ModelScope id of the form 'owner/name'"
        )
    offline = is_offline() if offline is None else offline
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        from modelscope import snapshot_download
    except ImportError as e:  # pragma: no cover - modelscope is a runtime dependency
        raise ModelNotFoundError(
            f"downloading {source!r} needs the 'modelscope' package: pip install modelscope"
        ) from e
    try:
        local = snapshot_download(
            source,
            revision=revision,
            cache_dir=str(cache_dir),
            allow_patterns=list(allow_patterns) if allow_patterns else None,
            local_files_only=offline,
        )
    except Exception as e:  # modelscope raises many types; name the source and the way out
        if offline:
            raise ModelNotFoundError(
                f"{source!r} is not in the local cache {str(cache_dir)!r} and offline mode is on "
                f"({OFFLINE_ENV}=1): download it once with network access, or pass a local folder"
            ) from e
        raise ModelNotFoundError(
            f"could not download {source!r} from ModelScope ({type(e).__name__}: {e}); check the id and your "
            f"network, or pass a local folder"
        ) from e
    logger.info("resolved %s to %s", source, local)
    return Path(local)
