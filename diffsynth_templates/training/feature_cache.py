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

This module reads the cache for stage II (``CachedFeatures``, ``open_cache``); the index and its
validation live in ``cache_index``, the content store in ``content_store``, writing in
``cache_writer``. Their public names are re-exported here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..loading.finite import nonfinite_names
from .cache_index import (
    FAULT_ENV,
    FORMAT_VERSION,
    INDEX,
    REBUILD,
    SHARD_FORMAT,
    FeatureCacheError,
    NonFiniteCacheError,
    check_cache_root,
    check_fingerprint,
    check_index,
    describe_mismatch,
    fingerprint_digest,
    inside_cache,
    read_index,
    read_shard_entries,
)
from .cache_writer import (
    ShardWriter,
    clear_leftovers,
    merge_index,
    scan_shards,
    store_reference,
    write_initial_index,
)
from .content_store import ContentStore
from .features import SampleFeatures, unflatten_features

__all__ = [
    "FAULT_ENV",
    "FORMAT_VERSION",
    "INDEX",
    "REBUILD",
    "SHARD_FORMAT",
    "CachedFeatures",
    "ContentStore",
    "FeatureCacheError",
    "NonFiniteCacheError",
    "ShardWriter",
    "check_cache_root",
    "check_fingerprint",
    "check_index",
    "clear_leftovers",
    "describe_mismatch",
    "fingerprint_digest",
    "merge_index",
    "open_cache",
    "read_index",
    "read_shard_entries",
    "scan_shards",
    "store_reference",
    "write_initial_index",
]


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
            store if store.is_absolute() else inside_cache(self.root, index["store"], "store")
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
            path = inside_cache(self.root, shard, f"{self.root / INDEX} shard")
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
