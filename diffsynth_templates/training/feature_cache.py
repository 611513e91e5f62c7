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
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..errors import DiffSynthTemplatesError
from ..loading import save_safetensors_atomic, write_json_atomic
from .features import SampleFeatures, flatten_features, unflatten_features

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX = "index.json"
SHARD_FORMAT = "diffsynth-templates-feature-shard"
# test hook: a stage-I process exits abruptly (as if killed) after this many samples
FAULT_ENV = "DIFFSYNTH_TEMPLATES_FAULT_AFTER_SAMPLES"


class FeatureCacheError(DiffSynthTemplatesError, RuntimeError):
    """The cache is missing, incomplete, corrupt or was made from different inputs."""


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
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def has(self, kind: str, key: str) -> bool:
        return self.path(kind, key).is_file()

    def put(self, kind: str, key: str, tensor: Tensor) -> None:
        save_safetensors_atomic({"tensor": tensor}, self.path(kind, key))

    def get(self, kind: str, key: str) -> Tensor:
        path = self.path(kind, key)
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor("tensor")
        except (SafetensorError, OSError) as e:
            raise FeatureCacheError(
                f"feature store file {path} is missing or corrupt ({e}); rerun --task data_process to rebuild it"
            ) from e


# --------------------------------------------------------------------------------------------------
# writing (stage I)
# --------------------------------------------------------------------------------------------------


def _sample_entry(features: SampleFeatures, tensors: dict[str, Tensor]) -> dict[str, Any]:
    return {
        "id": features.id,
        "order": features.order,
        "line": features.line,
        "size": list(features.size),
        "text": features.keys["text"],
        "latents": features.keys["latents"],
        "edit": list(features.keys["edit"]),
        "template": flatten_features(features.template, tensors, f"{features.id}/"),
    }


def read_shard_entries(path: Path) -> list[dict[str, Any]]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != SHARD_FORMAT:
        raise FeatureCacheError(f"{path} is not a feature-cache shard")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise FeatureCacheError(
            f"{path} has format_version {meta['format_version']}; upgrade diffsynth_templates"
        )
    return json.loads(meta["samples"])


def scan_shards(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Committed shards (relative path -> sample entries). Unreadable ones are set aside, never used."""
    shards = {}
    for path in sorted((root / "shards").glob("*.safetensors")):
        try:
            shards[f"shards/{path.name}"] = read_shard_entries(path)
        except (SafetensorError, OSError, ValueError, KeyError, FeatureCacheError) as e:
            bad = path.with_name(path.name + ".corrupt")
            logger.warning(
                "feature shard %s is unreadable (%s); moved to %s, its samples will be redone",
                path,
                e,
                bad.name,
            )
            os.replace(path, bad)
    return shards


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
            samples.append(
                {"id": entry["id"], "order": entry["order"], "size": entry["size"], "shard": shard}
            )
        shard_list.append({"file": shard, "samples": kept})
    skipped: dict[str, dict[str, Any]] = {}
    for path in sorted((root / "skipped").glob("*.json")):
        for record in json.loads(path.read_text()):
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
    write_json_atomic(index, root / INDEX)
    return index


def store_reference(root: Path, store: Path) -> str:
    """How ``index.json`` names the content store: relative when inside the cache, else absolute."""
    try:
        return store.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(store.resolve())


def write_initial_index(root: Path, fingerprint: dict[str, Any], store: Path) -> None:
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
    write_json_atomic(index, root / INDEX)


def read_index(root: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(root) / INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FeatureCacheError(
            f"{path} is not valid JSON ({e}); delete the cache folder and rerun stage I"
        ) from e
    if index.get("format_version", 0) > FORMAT_VERSION:
        raise FeatureCacheError(
            f"{path} has format_version {index['format_version']}; upgrade diffsynth_templates"
        )
    return index


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
    """

    def __init__(self, root: str | os.PathLike, index: dict[str, Any]):
        self.root = Path(root)
        store = Path(index["store"])
        self.store = ContentStore(store if store.is_absolute() else self.root / store)
        self.samples = index["samples"]
        self.sizes = [tuple(s["size"]) for s in self.samples]
        self._entries: dict[str, dict[str, dict[str, Any]]] = {}
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _shard(self, shard: str):
        if shard not in self._handles:
            path = self.root / shard
            try:
                self._handles[shard] = safe_open(str(path), framework="pt")
                self._entries[shard] = {e["id"]: e for e in read_shard_entries(path)}
            except (SafetensorError, OSError) as e:
                raise FeatureCacheError(
                    f"feature shard {path} is missing or corrupt ({e}); rerun --task data_process"
                ) from e
        return self._handles[shard], self._entries[shard]

    def __getitem__(self, i: int) -> SampleFeatures:
        sample = self.samples[i]
        handle, entries = self._shard(sample["shard"])
        entry = entries[sample["id"]]
        return SampleFeatures(
            id=entry["id"],
            order=entry["order"],
            line=entry["line"],
            size=tuple(entry["size"]),
            latents=self.store.get("latents", entry["latents"]),
            prompt_embeds=self.store.get("text", entry["text"]),
            edit_latents=[self.store.get("latents", k) for k in entry["edit"]],
            template=unflatten_features(entry["template"], handle.get_tensor),
            keys={"text": entry["text"], "latents": entry["latents"], "edit": entry["edit"]},
        )

    def __getstate__(self) -> dict[str, Any]:  # open handles stay in the process that opened them
        return {**self.__dict__, "_handles": {}, "_entries": {}}


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
