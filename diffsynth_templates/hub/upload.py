"""Uploading a packaged template to ModelScope with the ``modelscope`` SDK.

The flow, with the SDK (``modelscope.hub.api.HubApi``, backed by ``modelscope_hub``) calls it makes:

1. ``HubApi(endpoint=..., token=...)``: every request carries the token (``Authorization: Bearer``
   plus the ``m_session_id`` cookie), so no ``login()`` is needed; ``login()`` would also write the
   token under ``~/.modelscope/credentials``, which publishing has no reason to do.
2. ``whoami()`` (``GET /openapi/v1/users/me``): a bad token fails here, before anything is created.
3. ``repo_exists()`` / ``create_repo(visibility=...)`` (``GET /openapi/v1/models/{id}``,
   ``GET /api/v1/models/{id}``, ``POST /api/v1/models``).
4. ``upload_folder()``: LFS pre-sign (``POST /api/v1/repos/models/{id}/info/lfs/objects/batch``),
   blob ``PUT`` to the returned URL, then ``POST /api/v1/repos/models/{id}/commit/{revision}``.
   Weights and samples go first, ``template.json`` / ``README.md`` last, so the repository never
   shows a template whose weights are missing. Resume state lives beside the package (never in
   it), so an interrupted upload is retried by running the same command again.

The endpoint is ``https://modelscope.cn`` unless ``endpoint=`` or ``MODELSCOPE_ENDPOINT`` (or the
deprecated ``MODELSCOPE_DOMAIN``) says otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DiffSynthTemplatesError
from ..loading.integrity import TEMPLATE_JSON, verify_sha256
from ..loading.resolve import OFFLINE_ENV, is_offline

logger = logging.getLogger(__name__)

TOKEN_ENV = "MODELSCOPE_API_TOKEN"
ENDPOINT_ENVS = ("MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN")
DEFAULT_ENDPOINT = "https://modelscope.cn"
TOKEN_URL = "https://modelscope.cn/my/myaccesstoken"
DEFAULT_COMMIT_MESSAGE = "Upload template with diffsynth-templates"
#: files committed last: together they make the folder a loadable template
METADATA_FILES = (TEMPLATE_JSON, "README.md", "configuration.json")
HIDDEN_FILES = (".*", "*/.*")  # never uploaded (package_files lists the same set)

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^{_PART}/{_PART}$")


class PublishError(DiffSynthTemplatesError, RuntimeError):
    """Publishing a template failed; the message says what to do."""


class InvalidRepoIdError(PublishError, ValueError):
    pass


class MissingTokenError(PublishError):
    pass


class HubAuthError(PublishError):
    pass


class HubUnreachableError(PublishError):
    pass


class UploadInterruptedError(PublishError):
    pass


class OfflineError(PublishError):
    """Offline mode is on, and uploading needs the network."""


def check_online(offline: bool | None = None) -> None:
    """Raise ``OfflineError`` when offline mode is on: ``offline=True`` (CLI ``--offline``), or, when
    ``offline`` is None, ``$DIFFSYNTH_TEMPLATES_OFFLINE`` (the same switch ``resolve_model_path`` reads)."""
    if offline or (offline is None and is_offline()):
        why = "--offline / offline=True" if offline else f"{OFFLINE_ENV}={os.environ.get(OFFLINE_ENV)}"
        raise OfflineError(
            f"offline mode is on ({why}), so nothing is uploaded and no connection is made: use --dry-run "
            f"(Python: package_template + verify_package) to build and check the package, or unset "
            f"{OFFLINE_ENV} / drop --offline to upload"
        )


@dataclass
class UploadResult:
    repo_id: str
    url: str
    private: bool | None  # None: the repository existed and kept its visibility
    created: bool  # the repository was created by this upload
    files: list[tuple[str, int]] = field(default_factory=list)
    username: str | None = None


def validate_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` if it is a valid ModelScope ``OWNER/NAME``; raise ``InvalidRepoIdError`` otherwise."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise InvalidRepoIdError(
            f"invalid repository id {repo_id!r}: expected OWNER/NAME, each part made of letters, digits, "
            "'-', '_' and '.', starting and ending with a letter or digit (e.g. alice/Template-Brightness)"
        )
    return repo_id


def resolve_token(token: str | None = None) -> str:
    """``token``, else ``$MODELSCOPE_API_TOKEN``; neither gives ``MissingTokenError`` saying how to get one."""
    token = (token or os.environ.get(TOKEN_ENV) or "").strip()
    if not token:
        raise MissingTokenError(
            f"publishing needs a ModelScope access token: create one with write permission at {TOKEN_URL}, "
            f"then pass --token TOKEN or export {TOKEN_ENV}=TOKEN. Use --dry-run to build and check the "
            "package without uploading."
        )
    return token


def resolve_endpoint(endpoint: str | None = None) -> str:
    for value in (endpoint, *(os.environ.get(e) for e in ENDPOINT_ENVS)):
        if value and value.strip():
            value = value.strip().rstrip("/")
            return value if value.startswith(("http://", "https://")) else f"https://{value}"
    return DEFAULT_ENDPOINT


def package_files(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """``(path inside the package, size in bytes)`` of every file, sorted; hidden files are not uploaded."""
    folder = Path(folder)
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            out.append((rel, path.stat().st_size))
    return out


def upload_package(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = True,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    endpoint: str | None = None,
    api: Any = None,
    *,
    revision: str = "master",
    progress: bool = True,
    offline: bool | None = None,
) -> UploadResult:
    """Upload a package folder (from ``package_template``) to the model repository ``repo_id``.

    The repository is created (private unless ``private=False``) when missing; an existing one keeps its
    visibility. ``api`` replaces the SDK client (tests). The local folder is never modified; on failure
    the error says how to retry. In offline mode (``offline=True`` or ``$DIFFSYNTH_TEMPLATES_OFFLINE``)
    it refuses before any connection (``OfflineError``).
    """
    repo_id = validate_repo_id(repo_id)
    check_online(offline)
    folder = Path(folder)
    files = _check_package(folder)
    token = resolve_token(token)
    endpoint = resolve_endpoint(endpoint)
    if api is None:
        _check_reachable(endpoint, folder)
        api = _make_api(endpoint, token)
    license_ = _package_license(folder)
    tracker = folder.parent / f".{folder.name}.upload-{repo_id.replace('/', '--')}"
    retry = (
        f"The package at {str(folder)!r} is intact; run the same command again to retry "
        "(files already committed are skipped)."
    )

    with _translated_errors(repo_id, endpoint, retry):
        user = api.whoami()
        username = getattr(user, "username", None) or (
            user.get("username") if isinstance(user, dict) else None
        )
        logger.info("authenticated to %s as %s", endpoint, username or "(unknown user)")
        created = not api.repo_exists(repo_id, repo_type="model", re_raise=True)
        if created:
            logger.info("creating %s model repository %s", "private" if private else "public", repo_id)
            api.create_repo(
                repo_id,
                repo_type="model",
                visibility="private" if private else "public",
                license=license_,
                exist_ok=True,
            )
        else:
            logger.info("repository %s exists; its visibility is left as it is", repo_id)
        common = dict(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            tracker_path=str(tracker),
            disable_tqdm=not progress,
        )
        # weights (and samples) first, then the files that make the folder a template
        api.upload_folder(
            commit_message=f"{commit_message} (weights)",
            ignore_patterns=[*METADATA_FILES, *HIDDEN_FILES],
            **common,
        )
        api.upload_folder(commit_message=commit_message, allow_patterns=list(METADATA_FILES), **common)
    tracker.unlink(missing_ok=True)
    url = f"{endpoint}/models/{repo_id}"
    logger.info("uploaded %d file(s) to %s", len(files), url)
    return UploadResult(repo_id, url, private if created else None, created, files, username)


def _check_package(folder: Path) -> list[tuple[str, int]]:
    if not (folder / TEMPLATE_JSON).is_file():
        raise PublishError(
            f"{str(folder)!r} is not a template package (no {TEMPLATE_JSON}); build one with "
            "package_template or `python -m diffsynth_templates publish CHECKPOINT --repo OWNER/NAME --dry-run`"
        )
    if not verify_sha256(folder):
        logger.warning("%s records no sha256 of its weights; downloads of it cannot be checked", folder)
    return package_files(folder)


def _package_license(folder: Path) -> str | None:
    try:
        return json.loads((folder / TEMPLATE_JSON).read_text()).get("license")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _make_api(endpoint: str, token: str):
    try:
        from modelscope.hub.api import HubApi
    except ImportError as e:  # pragma: no cover - modelscope is a runtime dependency
        raise PublishError("uploading needs the 'modelscope' package: pip install modelscope") from e
    return HubApi(endpoint=endpoint, token=token)


def _check_reachable(endpoint: str, folder: Path) -> None:
    """One quick request (proxies honoured, no retries) so a dead network fails fast and clearly."""
    import requests

    try:
        requests.head(endpoint, timeout=10, allow_redirects=False)
    except requests.RequestException as e:
        raise HubUnreachableError(
            f"cannot reach ModelScope at {endpoint} ({type(e).__name__}): check your network or proxy, or "
            f"set MODELSCOPE_ENDPOINT if you publish to another site. Nothing was uploaded; the package at "
            f"{str(folder)!r} is ready to upload when the network is back."
        ) from e


class _translated_errors:
    """Turn SDK and transport exceptions into ``PublishError`` subclasses that say what to do."""

    def __init__(self, repo_id: str, endpoint: str, retry: str):
        self.repo_id, self.endpoint, self.retry = repo_id, endpoint, retry

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, PublishError) or not isinstance(exc, Exception):
            return False
        raise self._translate(exc) from exc

    def _translate(self, exc: Exception) -> PublishError:
        kind = {cls.__name__ for cls in type(exc).__mro__}
        detail = f"{type(exc).__name__}: {exc}"
        if "AuthenticationError" in kind:
            return HubAuthError(
                f"ModelScope at {self.endpoint} rejected the token ({detail}). Check it at {TOKEN_URL} "
                f"(it needs write permission) and pass it with --token or ${TOKEN_ENV}."
            )
        if "PermissionDeniedError" in kind:
            owner = self.repo_id.split("/")[0]
            return HubAuthError(
                f"the token may not write to {self.repo_id} ({detail}): publish under your own user name or "
                f"an organization you belong to (owner {owner!r}), with a token that has write permission."
            )
        if "QuotaExceededError" in kind:
            return UploadInterruptedError(
                f"ModelScope refused the upload: quota exceeded ({detail}). {self.retry}"
            )
        if kind & {"ConnectionError", "Timeout", "TimeoutError", "NetworkError"}:
            return HubUnreachableError(
                f"lost the connection to ModelScope at {self.endpoint} ({detail}): check your network or "
                f"proxy. {self.retry}"
            )
        return UploadInterruptedError(f"uploading to {self.repo_id} failed ({detail}). {self.retry}")
