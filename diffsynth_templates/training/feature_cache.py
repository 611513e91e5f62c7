"""The stage-I feature cache on disk (DESIGN.md 4.5): written by every rank, merged by rank 0, read by stage II.

Layout::

    cache/
      index.json                    format_version, fingerprint, complete, shards, samples, skipped
      shards/r{rank}-{run}-{n}.safetensors
                                    per-sample template features; the header metadata lists the
                                    samples it holds, their sizes, content keys and feature structure
      store/text/ab/<key>.safetensors     text embeddings, keyed by content (prompt + encoder)
      store/latents/ab/<key>.safetensors  VAE latents, keyed by content (pixels + size + VAE)
      skipped/r{rank}-{run}.json    samples a rank could not use in the last run (merged into the index)

Every file is written to a temporary name and renamed into place, so a shard either exists whole
or not at all. A rank commits a shard every ``chunk_size`` samples; a killed run loses only the
samples of its uncommitted chunks, and a rerun skips every sample that a committed shard holds.
Stage II reads tensors memory-mapped (``safe_open``) from DataLoader workers. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..errors import DiffSynthTemplatesError
from ..loading import save_safetensors_atomic, write_json_atomic
from ..loading.finite import NonFiniteError, nonfinite_names
from ..loading.paths import PathContainmentError, resolve_inside
from ..loading.write_safety import MARKER, check_not_protected, is_ours
from .features import SampleFeatures, flatten_features, unflatten_features

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX = "index.json"
SHARD_FORMAT = "diffsynth-templates-feature-shard"
# test hook: a stage-I process exits abruptly (as if killed) after this many samples
FAULT_ENV = "DIFFSYNTH_TEMPLATES_FAULT_AFTER_SAMPLES"


REBUILD = "delete the cache folder and rerun --task data_process to rebuild it"
# content keys are sha256 hex digests (features.content_key); kinds are "text" and "latents"
_KEY = re.compile(r"[0-9a-f]{2,128}")
_KIND = re.compile(r"[a-z][a-z_]{0,31}")
_MAX_SIDE = 1 << 20  # image sides in pixels; anything larger is a damaged entry, not an image


class FeatureCacheError(DiffSynthTemplatesError, RuntimeError):
    """The cache is missing, incomplete, corrupt or was made from different inputs."""


class NonFiniteCacheError(FeatureCacheError, NonFiniteError):
    """A cached tensor holds NaN or inf values."""


def _inside(root: Path, entry: object, what: str) -> Path:
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
# the content store
# --------------------------------------------------------------------------------------------------


class ContentStore:
    """Tensors addressed by content key: ``root/{kind}/{key[:2]}/{key}.safetensors``.

    Safe to share between ranks and concurrent trainings: identical keys mean identical content, and
    each file appears by an atomic rename.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        """The file of ``key``; a key that is not a content hash (e.g. ``../../evil``) is refused."""
        if not isinstance(kind, str) or not _KIND.fullmatch(kind):
            raise FeatureCacheError(
                f"feature store kind {kind!r} is not a plain lowercase word like 'latents'"
            )
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise FeatureCacheError(
                f"feature store {kind} key {_short_repr(key)} is not a content hash (lowercase hex digits); "
                f"the cache that named it is damaged: {REBUILD}"
            )
        return _inside(self.root, f"{kind}/{key[:2]}/{key}.safetensors", f"feature store {kind} key")

    def shape(self, kind: str, key: str) -> list[int]:
        """The stored tensor's shape, read from the file header only."""
        path = self.path(kind, key)
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.get_slice("tensor").get_shape())
        except (SafetensorError, OSError) as e:
            raise FeatureCacheError(
                f"feature store file {path} is missing or corrupt ({e}); rerun --task data_process to rebuild it"
            ) from e

    def has(self, kind: str, key: str) -> bool:
        return self.path(kind, key).is_file()

    def put(self, kind: str, key: str, tensor: Tensor) -> None:
        save_safetensors_atomic({"tensor": tensor}, self.path(kind, key))

    def get(self, kind: str, key: str) -> Tensor:
        path = self.path(kind, key)
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor("tensor")
        except (SafetensorError, OSError, KeyError) as e:
            raise FeatureCacheError(
                f"feature store file {path} is missing or corrupt ({e}); rerun --task data_process to rebuild it"
            ) from e


# --------------------------------------------------------------------------------------------------
# validation: every file and entry the cache names is checked here, on every read
# --------------------------------------------------------------------------------------------------


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:38] + "..." + text[-38:]


def _is_int(value: Any, low: int = 0, high: int = 2**63 - 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 1000


def _is_key(value: Any) -> bool:
    return isinstance(value, str) and _KEY.fullmatch(value) is not None


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
            f"{where}: {key!r} must be {expected}, got {_short_repr(value)} ({type(value).__name__}); {REBUILD}"
        )
    return value


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FeatureCacheError(
            f"{where} must be a JSON object, got {_short_repr(value)} ({type(value).__name__}); {REBUILD}"
        )
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _load_json(text: str | bytes, where: str) -> Any:
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
            f"{where} must be an object with one key of {list(_STRUCTURE_KINDS)}, got {_short_repr(value)}; "
            f"{REBUILD}"
        )
    ((kind, inner),) = value.items()
    if kind == "tensor":
        if not isinstance(inner, str) or inner not in names:
            raise FeatureCacheError(
                f"{where} names tensor {_short_repr(inner)}, which the shard lacks; {REBUILD}"
            )
    elif kind == "dict":
        for k, v in _object(inner, where).items():
            _check_structure(v, names, f"{where}[{k!r}]", depth + 1)
    elif kind in ("list", "tuple"):
        if not isinstance(inner, list):
            raise FeatureCacheError(f"{where} must hold a list, got {_short_repr(inner)}; {REBUILD}")
        for i, v in enumerate(inner):
            _check_structure(v, names, f"{where}[{i}]", depth + 1)
    elif not (inner is None or isinstance(inner, (bool, int, float, str))):
        raise FeatureCacheError(f"{where} must hold a JSON scalar, got {_short_repr(inner)}; {REBUILD}")


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


def _check_skipped(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise FeatureCacheError(
            f"{where} must be a list of skipped samples, got {_short_repr(value)}; {REBUILD}"
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
        _inside(root, store, f"{where} 'store'")
    _field(index, "complete", where, lambda v: isinstance(v, bool), "true or false")
    shards = _field(index, "shards", where, lambda v: isinstance(v, list), "a list of shards")
    members: dict[str, set[str]] = {}
    for i, shard in enumerate(shards):
        at = f"{where} shards[{i}]"
        shard = _object(shard, at)
        file = _field(shard, "file", at, _is_text, "a shard file relative to the cache (a string)")
        _inside(root, file, f"{at} 'file'")
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
    _check_skipped(
        _field(index, "skipped", where, lambda v: isinstance(v, list), "a list"), f"{where} 'skipped'"
    )
    return index


def check_cache_root(root: str | os.PathLike, store: str | os.PathLike | None = None) -> Path:
    """Refuse ``/``, the home or current directory (or a parent of one) as a cache or store folder."""
    check_not_protected(root, "feature cache folder (--cache_path)")
    if store is not None:
        check_not_protected(store, "feature store folder (--shared_feature_cache)")
    return Path(root)


# --------------------------------------------------------------------------------------------------
# writing (stage I)
# --------------------------------------------------------------------------------------------------


def _sample_entry(features: SampleFeatures, tensors: dict[str, Tensor]) -> dict[str, Any]:
    entry = {
        "id": features.id,
        "order": features.order,
        "line": features.line,
        "size": list(features.size),
        "text": features.keys["text"],
        "latents": features.keys["latents"],
        "edit": list(features.keys["edit"]),
        "template": flatten_features(features.template, tensors, f"{features.id}/"),
    }
    if features.shapes:  # checked against the tensors when stage II reads them
        entry["shapes"] = features.shapes
    return entry


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
        raise FeatureCacheError(f"{path}: format_version {_short_repr(version)} is not an integer; {REBUILD}")
    if int(version) > FORMAT_VERSION:
        raise FeatureCacheError(f"{path} has format_version {version}; upgrade diffsynth_templates")
    if "samples" not in meta:
        raise FeatureCacheError(f"{path} lists no samples in its header; {REBUILD}")
    entries = _load_json(meta["samples"], f"the sample list in the header of {path}")
    if not isinstance(entries, list):
        raise FeatureCacheError(f"{path}: the header's sample list is not a list; {REBUILD}")
    seen = set()
    for i, entry in enumerate(entries):
        entry = _check_shard_entry(entry, names, f"{path} sample entry {i}")
        if entry["id"] in seen:
            raise FeatureCacheError(f"{path} holds sample {entry['id']} twice; {REBUILD}")
        seen.add(entry["id"])
    return entries


def scan_shards(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Committed shards (relative path -> sample entries). Unreadable ones are set aside, never used.

    A shard (or the shards folder) that is a symlink out of the cache is an error: it is neither read
    nor moved.
    """
    root = check_cache_root(root)
    folder = _inside(root, "shards", "the feature cache's shards folder")
    shards = {}
    for path in sorted(folder.glob("*.safetensors")):
        name = f"shards/{path.name}"
        _inside(root, name, "feature shard")
        try:
            shards[name] = read_shard_entries(path)
        except (SafetensorError, OSError, ValueError, KeyError, FeatureCacheError) as e:
            bad = path.with_name(path.name + ".corrupt")  # same folder: the rename stays inside the cache
            logger.warning(
                "feature shard %s is unreadable (%s); moved to %s, its samples will be redone",
                path,
                e,
                bad.name,
            )
            os.replace(path, bad)
    return shards


def clear_leftovers(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Rank 0 before a stage-I (re)run: delete the half-written shards of a killed run and the last run's
    skipped lists, set unreadable shards aside; return the committed shards (as ``scan_shards``).

    Only cache files are touched, only inside the cache (its ``shards``/``skipped`` folders must not be
    symlinks out of it), only in a folder that holds an ``index.json``.
    """
    root = check_cache_root(root)
    if not (root / INDEX).is_file():
        raise FeatureCacheError(f"{root} holds no {INDEX}; it is not a feature cache, nothing was removed")
    for leftover in _inside(root, "shards", "the feature cache's shards folder").glob(".*.tmp-*"):
        leftover.unlink(missing_ok=True)
    for old in _inside(root, "skipped", "the feature cache's skipped folder").glob("*.json"):
        old.unlink()  # this run retries every skipped sample
    return scan_shards(root)


class ShardWriter:
    """One rank's writer: buffers samples and commits a shard every ``chunk_size`` of them."""

    def __init__(self, root: str | os.PathLike, rank: int, chunk_size: int):
        self.root, self.rank, self.chunk_size = Path(root), rank, chunk_size
        self.run = uuid.uuid4().hex[:8]  # shard names never collide with an earlier run's
        self.pending: list[SampleFeatures] = []
        self.skipped: list[dict[str, Any]] = []
        self.num_shards = self.num_samples = 0
        fault = os.environ.get(FAULT_ENV)
        self.fault_after = int(fault) if fault else None

    def add(self, features: SampleFeatures) -> None:
        self.pending.append(features)
        self.num_samples += 1
        if len(self.pending) >= self.chunk_size:
            self.commit()
        if self.fault_after is not None and self.num_samples >= self.fault_after:
            logger.error("%s=%d: exiting abruptly (test hook)", FAULT_ENV, self.fault_after)
            os._exit(17)

    def skip(self, sample_id: str, line: int, reason: str) -> None:
        logger.warning("skipping sample %s (metadata line %d): %s", sample_id, line, reason)
        self.skipped.append({"id": sample_id, "line": line, "reason": reason})

    def commit(self) -> None:
        if not self.pending:
            return
        tensors: dict[str, Tensor] = {}
        entries = [_sample_entry(f, tensors) for f in self.pending]
        name = f"r{self.rank:03d}-{self.run}-{self.num_shards:05d}.safetensors"
        metadata = {
            "format": SHARD_FORMAT,
            "format_version": str(FORMAT_VERSION),
            "samples": json.dumps(entries),
        }
        save_safetensors_atomic(tensors, self.root / "shards" / name, metadata=metadata)
        self.num_shards += 1
        self.pending = []

    def close(self) -> None:
        self.commit()
        write_json_atomic(self.skipped, self.root / "skipped" / f"r{self.rank:03d}-{self.run}.json")


def merge_index(
    root: Path, fingerprint: dict[str, Any], store: Path, expected_ids: Iterable[str]
) -> dict[str, Any]:
    """Rank 0, after every rank finished: list the committed shards and samples in ``index.json``."""
    root = check_cache_root(root, store)
    shards = scan_shards(root)
    samples, shard_list, seen = [], [], set()
    for shard, entries in shards.items():
        kept = []
        for entry in entries:
            if entry["id"] in seen:  # cannot happen with the skip rule; never let it reach training
                logger.warning("sample %s appears in more than one shard; keeping the first", entry["id"])
                continue
            seen.add(entry["id"])
            kept.append(entry["id"])
            sample = {"id": entry["id"], "order": entry["order"], "size": entry["size"], "shard": shard}
            if entry.get("shapes") is not None:
                sample["shapes"] = entry["shapes"]
            samples.append(sample)
        shard_list.append({"file": shard, "samples": kept})
    skipped: dict[str, dict[str, Any]] = {}
    skipped_folder = _inside(root, "skipped", "the feature cache's skipped folder")
    for path in sorted(skipped_folder.glob("*.json")):
        _inside(root, f"skipped/{path.name}", "skipped-samples file")
        try:
            records = _load_json(path.read_bytes(), str(path))
        except OSError as e:
            raise FeatureCacheError(f"cannot read {path} ({e}); rerun --task data_process") from e
        for record in _check_skipped(records, str(path)):
            if record["id"] not in seen:
                skipped[record["id"]] = record
    expected = set(expected_ids)
    missing = sorted(expected - seen - set(skipped))
    samples.sort(key=lambda s: s["order"])
    index = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "fingerprint_digest": fingerprint_digest(fingerprint),
        "store": store_reference(root, store),
        "complete": not missing,
        "num_samples": len(samples),
        "shards": shard_list,
        "samples": samples,
        "skipped": sorted(skipped.values(), key=lambda r: r["line"]),
    }
    check_index(
        _load_json(json.dumps(index), "the new index"), root
    )  # never write an index that the reader refuses
    _write_marker(root)
    write_json_atomic(index, root / INDEX)
    return index


def store_reference(root: Path, store: Path) -> str:
    """How ``index.json`` names the content store: relative when inside the cache, else absolute."""
    try:
        return store.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(store.resolve())


def _write_marker(root: Path) -> None:
    """The write-safety marker: a later tool can tell this folder is a cache we wrote."""
    if not is_ours(root):
        write_json_atomic({"written_by": "diffsynth_templates", "kind": "feature_cache"}, root / MARKER)


def write_initial_index(root: Path, fingerprint: dict[str, Any], store: Path) -> None:
    """Start a new cache in ``root``: a new or empty folder (or one of ours), never ``/``, home or cwd."""
    root = check_cache_root(root, store)
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        raise FeatureCacheError(f"--cache_path {str(root)!r} exists and is not a folder; choose a new folder")
    if root.is_dir() and not is_ours(root) and any(root.iterdir()):
        raise FeatureCacheError(
            f"--cache_path {str(root)!r} is not empty and holds no feature cache ({INDEX} is missing); "
            "choose a new or empty folder, so that no file of yours is mixed with (or removed as) cache "
            "files (nothing was changed)"
        )
    index = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "fingerprint_digest": fingerprint_digest(fingerprint),
        "store": store_reference(root, store),
        "complete": False,
        "num_samples": 0,
        "shards": [],
        "samples": [],
        "skipped": [],
    }
    root.mkdir(parents=True, exist_ok=True)
    _write_marker(root)
    write_json_atomic(index, root / INDEX)


def read_index(root: str | os.PathLike) -> dict[str, Any] | None:
    """The cache's validated ``index.json`` (see ``check_index``), or None when there is none.

    The one reader every consumer goes through: anything malformed is a ``FeatureCacheError`` naming
    the file and the entry.
    """
    root = Path(root)
    path = root / INDEX
    if not path.is_file() and not path.is_symlink():
        return None
    _inside(root, INDEX, "the feature cache's index")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FeatureCacheError(f"cannot read {path} ({e})") from e
    return check_index(_load_json(data, str(path)), root, str(path))


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


# --------------------------------------------------------------------------------------------------
# reading (stage II)
# --------------------------------------------------------------------------------------------------


class CachedFeatures(torch.utils.data.Dataset):
    """The cache's samples, in dataset order, as ``SampleFeatures`` with tensors (for a DataLoader).

    File handles are opened lazily in whichever process reads (so each DataLoader worker has its own).
    Every tensor is checked as it is read: floating point, the rank (and, for caches that record them,
    the shape) stage I wrote, finite values; an error names the file, the key and the sample.
    """

    def __init__(self, root: str | os.PathLike, index: dict[str, Any]):
        self.root = Path(root)
        check_index(index, self.root)
        store = Path(index["store"])
        self.store = ContentStore(
            store if store.is_absolute() else _inside(self.root, index["store"], "store")
        )
        self.samples = index["samples"]
        self.sizes = [tuple(s["size"]) for s in self.samples]
        self._entries: dict[str, dict[str, dict[str, Any]]] = {}
        self._handles: dict[str, Any] = {}
        self._paths: dict[str, Path] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _shard(self, shard: str):
        if shard not in self._handles:
            path = _inside(self.root, shard, f"{self.root / INDEX} shard")
            entries = {e["id"]: e for e in read_shard_entries(path)}
            try:
                self._handles[shard] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise FeatureCacheError(
                    f"feature shard {path} is missing or corrupt ({e}); rerun --task data_process"
                ) from e
            self._entries[shard], self._paths[shard] = entries, path
        return self._handles[shard], self._entries[shard], self._paths[shard]

    def _read(self, kind: str, key: str, sample_id: str, rank: int, recorded: list[int] | None) -> Tensor:
        """One store tensor, checked: floating point, ``rank`` dims, the recorded shape, finite."""
        path = self.store.path(kind, key)
        tensor = self.store.get(kind, key)
        what = f"{'latents' if kind == 'latents' else 'text embeddings'} of sample {sample_id}"
        if not tensor.is_floating_point():
            raise FeatureCacheError(
                f"feature store file {path} (key {key}, {what}) holds {tensor.dtype} values; cached "
                f"features must be floating point. {REBUILD}"
            )
        if tensor.dim() != rank or (recorded is not None and list(tensor.shape) != recorded):
            expected = recorded if recorded is not None else f"{rank} dimensions"
            raise FeatureCacheError(
                f"feature store file {path} (key {key}, {what}) has shape {list(tensor.shape)}, expected "
                f"{expected}; {REBUILD}"
            )
        if nonfinite_names([("tensor", tensor)]):
            raise NonFiniteCacheError(
                f"feature store file {path} (key {key}, {what}) holds NaN or inf values; {REBUILD}"
            )
        return tensor

    def __getitem__(self, i: int) -> SampleFeatures:
        sample = self.samples[i]
        sample_id = sample["id"]
        handle, entries, path = self._shard(sample["shard"])
        entry = entries.get(sample_id)
        if entry is None:
            raise FeatureCacheError(
                f"{self.root / INDEX} lists sample {sample_id} in {path}, which does not hold it; {REBUILD}"
            )
        if entry["size"] != sample["size"]:
            raise FeatureCacheError(
                f"{path}: sample {sample_id} has size {entry['size']} but {self.root / INDEX} says "
                f"{sample['size']}; {REBUILD}"
            )
        if sample.get("shapes") is not None and entry.get("shapes") not in (None, sample["shapes"]):
            raise FeatureCacheError(
                f"{self.root / INDEX} records shapes {sample['shapes']} for sample {sample_id}, but {path} "
                f"records {entry['shapes']}; {REBUILD}"
            )
        shapes = sample.get("shapes") or entry.get("shapes") or {}
        edit_shapes = shapes.get("edit", [None] * len(entry["edit"]))
        if len(edit_shapes) != len(entry["edit"]):
            raise FeatureCacheError(
                f"{self.root / INDEX} records {len(edit_shapes)} edit latents shapes for sample {sample_id}, but "
                f"{path} lists {len(entry['edit'])} edit images; {REBUILD}"
            )
        latents = self._read("latents", entry["latents"], sample_id, 3, shapes.get("latents"))
        edit_latents = [
            self._read("latents", k, sample_id, 3, s) for k, s in zip(entry["edit"], edit_shapes, strict=True)
        ]
        bad = [list(e.shape) for e in edit_latents if e.shape[0] != latents.shape[0]]
        if bad:
            raise FeatureCacheError(
                f"sample {sample_id} ({path}): edit latents of shapes {bad} do not have the "
                f"{latents.shape[0]} channels of its latents; {REBUILD}"
            )
        try:
            template = unflatten_features(entry["template"], handle.get_tensor)
        except SafetensorError as e:
            raise FeatureCacheError(f"feature shard {path} is corrupt ({e}); {REBUILD}") from e
        return SampleFeatures(
            id=entry["id"],
            order=entry["order"],
            line=entry["line"],
            size=tuple(entry["size"]),
            latents=latents,
            prompt_embeds=self._read("text", entry["text"], sample_id, 2, shapes.get("text")),
            edit_latents=edit_latents,
            template=template,
            keys={"text": entry["text"], "latents": entry["latents"], "edit": entry["edit"]},
        )

    def __getstate__(self) -> dict[str, Any]:  # open handles stay in the process that opened them
        return {**self.__dict__, "_handles": {}, "_entries": {}, "_paths": {}}


def open_cache(root: str | os.PathLike) -> tuple[dict[str, Any], CachedFeatures]:
    root = Path(root)
    index = read_index(root)
    if index is None:
        raise FeatureCacheError(
            f"{root} holds no feature cache ({INDEX} is missing); run --task data_process first"
        )
    if not index["complete"]:
        raise FeatureCacheError(
            f"the feature cache {root} is incomplete (stage I was interrupted); rerun the same --task data_process "
            "command: it skips what is done and finishes the rest"
        )
    if not index["samples"]:
        raise FeatureCacheError(
            f"the feature cache {root} holds no samples (all {len(index['skipped'])} were skipped)"
        )
    return index, CachedFeatures(root, index)
