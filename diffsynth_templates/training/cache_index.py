"""The feature cache's index and shard headers: constants, errors, and the validation every read goes through.

``check_index`` and ``read_shard_entries`` check every entry and file name the cache holds, so nothing
downstream meets a raw ``KeyError``/``TypeError`` or a path outside the cache (layout: ``feature_cache``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from ..errors import DiffSynthTemplatesError
from ..loading.finite import NonFiniteError
from ..loading.paths import PathContainmentError, resolve_inside
from ..loading.write_safety import check_not_protected

FORMAT_VERSION = 1
INDEX = "index.json"
SHARD_FORMAT = "diffsynth-templates-feature-shard"
# test hook: a stage-I process exits abruptly (as if killed) after this many samples
FAULT_ENV = "DIFFSYNTH_TEMPLATES_FAULT_AFTER_SAMPLES"


REBUILD = "delete the cache folder and rerun --task data_process to rebuild it"
# content keys are sha256 hex digests (features.content_key); kinds are "text" and "latents"
CONTENT_KEY = re.compile(r"[0-9a-f]{2,128}")
STORE_KIND = re.compile(r"[a-z][a-z_]{0,31}")
_MAX_SIDE = 1 << 20  # image sides in pixels; anything larger is a damaged entry, not an image


class FeatureCacheError(DiffSynthTemplatesError, RuntimeError):
    """The cache is missing, incomplete, corrupt or was made from different inputs."""


class NonFiniteCacheError(FeatureCacheError, NonFiniteError):
    """A cached tensor holds NaN or inf values."""


def inside_cache(root: Path, entry: object, what: str) -> Path:
    """``resolve_inside`` for a file named by the cache, as a ``FeatureCacheError``."""
    try:
        return resolve_inside(root, entry, what)
    except PathContainmentError as e:
        raise FeatureCacheError(
            f"{e}; the feature cache {root} is damaged or was tampered with: {REBUILD}"
        ) from e


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def describe_mismatch(cached: dict[str, Any], current: dict[str, Any], parts: Iterable[str]) -> list[str]:
    """The fingerprint parts that differ, each as a line saying what changed."""
    lines = []
    for part in parts:
        old, new = cached.get(part), current.get(part)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            details = ", ".join(f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in keys)
            lines.append(f"{part} ({details})")
        else:
            lines.append(f"{part}: {_short(old)} -> {_short(new)}")
    return lines


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 160 else text[:78] + "..." + text[-78:]


# --------------------------------------------------------------------------------------------------
# validation: every file and entry the cache names is checked here, on every read
# --------------------------------------------------------------------------------------------------


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:38] + "..." + text[-38:]


def _is_int(value: Any, low: int = 0, high: int = 2**63 - 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 1000


def _is_key(value: Any) -> bool:
    return isinstance(value, str) and CONTENT_KEY.fullmatch(value) is not None


def _is_size(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_int(v, 1, _MAX_SIDE) for v in value)


def _is_shape(rank: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and len(v) == rank and all(_is_int(d, 1, 2**31) for d in v)


def _field(entry: dict[str, Any], key: str, where: str, check: Callable[[Any], bool], expected: str) -> Any:
    """``entry[key]`` after checking it; the error names the entry, the key and what is expected."""
    if key not in entry:
        raise FeatureCacheError(f"{where} lacks {key!r} ({expected}); {REBUILD}")
    value = entry[key]
    if not check(value):
        raise FeatureCacheError(
            f"{where}: {key!r} must be {expected}, got {short_repr(value)} ({type(value).__name__}); {REBUILD}"
        )
    return value


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FeatureCacheError(
            f"{where} must be a JSON object, got {short_repr(value)} ({type(value).__name__}); {REBUILD}"
        )
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def load_cache_json(text: str | bytes, where: str) -> Any:
    """Strict JSON (no NaN/Infinity); any decoding problem is a ``FeatureCacheError`` naming ``where``."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise FeatureCacheError(f"{where} is not UTF-8 text ({e}); {REBUILD}") from e
    except (ValueError, RecursionError) as e:
        raise FeatureCacheError(f"{where} is not valid JSON ({e}); {REBUILD}") from e


def _check_shapes(value: Any, where: str, num_edit: int | None) -> dict[str, Any]:
    """The tensor shapes stage I recorded for a sample: latents [C, h, w], text [L, D], edit [[C, h, w]...]."""
    at = f"{where} 'shapes'"
    shapes = _object(value, at)
    _field(shapes, "latents", at, _is_shape(3), "a latents shape [channels, height, width]")
    _field(shapes, "text", at, _is_shape(2), "a text embeddings shape [tokens, dim]")
    count = "" if num_edit is None else f"{num_edit} "
    edit = _field(shapes, "edit", at, lambda v: isinstance(v, list) and all(map(_is_shape(3), v)),
                  f"a list of {count}edit latents shapes [channels, height, width]")  # fmt: skip
    if num_edit is not None and len(edit) != num_edit:
        raise FeatureCacheError(
            f"{at}: 'edit' lists {len(edit)} shapes for {num_edit} edit images; {REBUILD}"
        )
    return shapes


_STRUCTURE_KINDS = ("tensor", "dict", "list", "tuple", "value")


def _check_structure(value: Any, names: set[str], where: str, depth: int = 0) -> None:
    """A template feature tree as ``flatten_features`` writes it; its tensors must be in the shard."""
    if depth > 64:
        raise FeatureCacheError(f"{where} is nested more than 64 levels deep; {REBUILD}")
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in _STRUCTURE_KINDS:
        raise FeatureCacheError(
            f"{where} must be an object with one key of {list(_STRUCTURE_KINDS)}, got {short_repr(value)}; "
            f"{REBUILD}"
        )
    ((kind, inner),) = value.items()
    if kind == "tensor":
        if not isinstance(inner, str) or inner not in names:
            raise FeatureCacheError(
                f"{where} names tensor {short_repr(inner)}, which the shard lacks; {REBUILD}"
            )
    elif kind == "dict":
        for k, v in _object(inner, where).items():
            _check_structure(v, names, f"{where}[{k!r}]", depth + 1)
    elif kind in ("list", "tuple"):
        if not isinstance(inner, list):
            raise FeatureCacheError(f"{where} must hold a list, got {short_repr(inner)}; {REBUILD}")
        for i, v in enumerate(inner):
            _check_structure(v, names, f"{where}[{i}]", depth + 1)
    elif not (inner is None or isinstance(inner, (bool, int, float, str))):
        raise FeatureCacheError(f"{where} must hold a JSON scalar, got {short_repr(inner)}; {REBUILD}")


def _check_shard_entry(value: Any, names: set[str], where: str) -> dict[str, Any]:
    entry = _object(value, where)
    sample_id = _field(entry, "id", where, _is_text, "a sample id (a non-empty string)")
    where = f"{where} (sample {sample_id})"
    _field(entry, "order", where, _is_int, "a row position (an integer >= 0)")
    _field(entry, "line", where, _is_int, "a metadata line (an integer >= 0)")
    _field(entry, "size", where, _is_size, f"[width, height] in pixels (integers 1..{_MAX_SIDE})")
    _field(entry, "text", where, _is_key, "a content key (lowercase hex)")
    _field(entry, "latents", where, _is_key, "a content key (lowercase hex)")
    edit = _field(entry, "edit", where, lambda v: isinstance(v, list) and all(map(_is_key, v)),
                  "a list of content keys (lowercase hex)")  # fmt: skip
    if "template" not in entry:
        raise FeatureCacheError(f"{where} lacks 'template' (the template features); {REBUILD}")
    _check_structure(entry["template"], names, f"{where} 'template'")
    if entry.get("shapes") is not None:
        _check_shapes(entry["shapes"], where, len(edit))
    return entry


def check_skipped(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise FeatureCacheError(
            f"{where} must be a list of skipped samples, got {short_repr(value)}; {REBUILD}"
        )
    for i, record in enumerate(value):
        record = _object(record, f"{where}[{i}]")
        _field(record, "id", f"{where}[{i}]", _is_text, "a sample id (a non-empty string)")
        _field(record, "line", f"{where}[{i}]", _is_int, "a metadata line (an integer >= 0)")
        _field(record, "reason", f"{where}[{i}]", lambda v: isinstance(v, str), "a string")
    return value


def check_index(index: Any, root: str | os.PathLike, where: str | None = None) -> dict[str, Any]:
    """Validate a parsed ``index.json`` of the cache at ``root``; return it unchanged.

    Types, file names (inside the cache), shard membership, duplicate and unknown sample ids, and the
    recorded tensor shapes (one channel count and text width for the whole cache) are all checked, so
    nothing downstream meets a raw ``KeyError``/``TypeError`` or a path outside the cache.
    """
    root = Path(root)
    where = where or str(root / INDEX)
    index = _object(index, where)
    version = _field(index, "format_version", where, _is_int, "an integer")
    if version > FORMAT_VERSION:
        raise FeatureCacheError(f"{where} has format_version {version}; upgrade diffsynth_templates")
    _field(index, "fingerprint", where, lambda v: isinstance(v, dict), "an object")
    if "fingerprint_digest" in index:
        _field(index, "fingerprint_digest", where, lambda v: isinstance(v, str), "a string")
    store = _field(index, "store", where, _is_text, "the content store folder (a string)")
    if not Path(store).is_absolute():  # absolute: a --shared_feature_cache the user named
        inside_cache(root, store, f"{where} 'store'")
    _field(index, "complete", where, lambda v: isinstance(v, bool), "true or false")
    shards = _field(index, "shards", where, lambda v: isinstance(v, list), "a list of shards")
    members: dict[str, set[str]] = {}
    for i, shard in enumerate(shards):
        at = f"{where} shards[{i}]"
        shard = _object(shard, at)
        file = _field(shard, "file", at, _is_text, "a shard file relative to the cache (a string)")
        inside_cache(root, file, f"{at} 'file'")
        ids = _field(shard, "samples", at, lambda v: isinstance(v, list) and all(map(_is_text, v)),
                     "a list of sample ids")  # fmt: skip
        if file in members:
            raise FeatureCacheError(
                f"{at}: shard {file!r} is listed twice; each shard must appear once; {REBUILD}"
            )
        members[file] = set(ids)
    samples = _field(index, "samples", where, lambda v: isinstance(v, list), "a list of samples")
    seen: dict[str, int] = {}
    reference: tuple[tuple[int, int], str] | None = None  # (latent channels, text width), first sample id
    for i, sample in enumerate(samples):
        at = f"{where} samples[{i}]"
        sample = _object(sample, at)
        sample_id = _field(sample, "id", at, _is_text, "a sample id (a non-empty string)")
        at = f"{at} (sample {sample_id})"
        if sample_id in seen:
            raise FeatureCacheError(
                f"{at} repeats samples[{seen[sample_id]}]; each sample must be listed once (it would be "
                f"trained twice); {REBUILD}"
            )
        seen[sample_id] = i
        _field(sample, "order", at, _is_int, "a row position (an integer >= 0)")
        _field(sample, "size", at, _is_size, f"[width, height] in pixels (integers 1..{_MAX_SIDE})")
        shard = _field(sample, "shard", at, _is_text, "a shard file named in 'shards'")
        if shard not in members:
            raise FeatureCacheError(f"{at} names shard {shard!r}, which is not in 'shards'; {REBUILD}")
        if sample_id not in members[shard]:
            raise FeatureCacheError(f"{at} is not among the samples of shard {shard!r}; {REBUILD}")
        if sample.get("shapes") is not None:
            shapes = _check_shapes(sample["shapes"], at, None)
            channels = {shapes["latents"][0], *(e[0] for e in shapes["edit"])}
            layout = (shapes["latents"][0], shapes["text"][1])
            if len(channels) > 1 or (reference is not None and layout != reference[0]):
                expected = reference[0] if reference else (shapes["latents"][0], shapes["text"][1])
                raise FeatureCacheError(
                    f"{at} has latents/edit channels {sorted(channels)} and text width {layout[1]}, but the "
                    f"cache holds {expected[0]} channels and text width {expected[1]}"
                    + (f" (sample {reference[1]})" if reference else "")
                    + f"; {REBUILD}"
                )
            reference = reference or (layout, sample_id)
    _field(index, "num_samples", where, lambda v: v == len(samples) and _is_int(v),
           f"the number of samples ({len(samples)})")  # fmt: skip
    check_skipped(
        _field(index, "skipped", where, lambda v: isinstance(v, list), "a list"), f"{where} 'skipped'"
    )
    return index


def check_cache_root(root: str | os.PathLike, store: str | os.PathLike | None = None) -> Path:
    """Refuse ``/``, the home or current directory (or a parent of one) as a cache or store folder."""
    check_not_protected(root, "feature cache folder (--cache_path)")
    if store is not None:
        check_not_protected(store, "feature store folder (--shared_feature_cache)")
    return Path(root)


def read_shard_entries(path: Path) -> list[dict[str, Any]]:
    """A shard's sample entries from its header, validated (types, tensors present, no duplicate ids)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
    except (SafetensorError, OSError) as e:
        raise FeatureCacheError(
            f"feature shard {path} is missing or corrupt ({e}); rerun --task data_process"
        ) from e
    if meta.get("format") != SHARD_FORMAT:
        raise FeatureCacheError(f"{path} is not a feature-cache shard")
    version = meta.get("format_version", "0")
    if not re.fullmatch(r"[0-9]{1,9}", version):
        raise FeatureCacheError(f"{path}: format_version {short_repr(version)} is not an integer; {REBUILD}")
    if int(version) > FORMAT_VERSION:
        raise FeatureCacheError(f"{path} has format_version {version}; upgrade diffsynth_templates")
    if "samples" not in meta:
        raise FeatureCacheError(f"{path} lists no samples in its header; {REBUILD}")
    entries = load_cache_json(meta["samples"], f"the sample list in the header of {path}")
    if not isinstance(entries, list):
        raise FeatureCacheError(f"{path}: the header's sample list is not a list; {REBUILD}")
    seen = set()
    for i, entry in enumerate(entries):
        entry = _check_shard_entry(entry, names, f"{path} sample entry {i}")
        if entry["id"] in seen:
            raise FeatureCacheError(f"{path} holds sample {entry['id']} twice; {REBUILD}")
        seen.add(entry["id"])
    return entries


def read_index(root: str | os.PathLike) -> dict[str, Any] | None:
    """The cache's validated ``index.json`` (see ``check_index``), or None when there is none.

    The one reader every consumer goes through: anything malformed is a ``FeatureCacheError`` naming
    the file and the entry.
    """
    root = Path(root)
    path = root / INDEX
    if not path.is_file() and not path.is_symlink():
        return None
    inside_cache(root, INDEX, "the feature cache's index")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FeatureCacheError(f"cannot read {path} ({e})") from e
    return check_index(load_cache_json(data, str(path)), root, str(path))


def check_fingerprint(
    index: dict[str, Any], current: dict[str, Any], parts: Iterable[str], root: Path, action: str
) -> None:
    """Raise when the cache was made from different inputs (never reuse a stale cache silently)."""
    differences = describe_mismatch(index["fingerprint"], current, parts)
    if differences:
        raise FeatureCacheError(
            f"the feature cache {root} was made from different inputs than this run: "
            + "; ".join(differences)
            + f". {action}"
        )
