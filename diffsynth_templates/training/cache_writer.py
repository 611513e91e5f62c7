"""Writing the feature cache (stage I): shards per rank, leftovers of killed runs, the merged index.

Layout and guarantees: see ``feature_cache``.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import Tensor

from ..loading import save_safetensors_atomic, write_json_atomic
from ..loading.write_safety import MARKER, is_ours
from .cache_index import (
    FAULT_ENV,
    FORMAT_VERSION,
    INDEX,
    SHARD_FORMAT,
    FeatureCacheError,
    check_cache_root,
    check_index,
    check_skipped,
    fingerprint_digest,
    inside_cache,
    load_cache_json,
    read_shard_entries,
)
from .features import SampleFeatures, flatten_features

logger = logging.getLogger(__name__)


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


def scan_shards(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Committed shards (relative path -> sample entries). Unreadable ones are set aside, never used.

    A shard (or the shards folder) that is a symlink out of the cache is an error: it is neither read
    nor moved.
    """
    root = check_cache_root(root)
    folder = inside_cache(root, "shards", "the feature cache's shards folder")
    shards = {}
    for path in sorted(folder.glob("*.safetensors")):
        name = f"shards/{path.name}"
        inside_cache(root, name, "feature shard")
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
    for leftover in inside_cache(root, "shards", "the feature cache's shards folder").glob(".*.tmp-*"):
        leftover.unlink(missing_ok=True)
    for old in inside_cache(root, "skipped", "the feature cache's skipped folder").glob("*.json"):
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
    skipped_folder = inside_cache(root, "skipped", "the feature cache's skipped folder")
    for path in sorted(skipped_folder.glob("*.json")):
        inside_cache(root, f"skipped/{path.name}", "skipped-samples file")
        try:
            records = load_cache_json(path.read_bytes(), str(path))
        except OSError as e:
            raise FeatureCacheError(f"cannot read {path} ({e}); rerun --task data_process") from e
        for record in check_skipped(records, str(path)):
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
        load_cache_json(json.dumps(index), "the new index"), root
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
