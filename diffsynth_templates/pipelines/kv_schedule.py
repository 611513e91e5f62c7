"""KV caches that apply only over part of the denoising steps (like ControlNet's guidance start/end).

A ``ScheduledKVCache`` holds entries ``(cache, start, end)``; at step ``i`` of ``n`` the entries whose
window contains ``i / n`` are concatenated. The concatenation is memoized per set of active
entries, so a step pays nothing unless a window opens or closes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..backbones.attention import KVCache, KVCacheError


def broadcast_cat(tensors: Sequence[Tensor], dim: int) -> Tensor:
    """Concatenate along ``dim`` after broadcasting batch-1 entries to the common batch."""
    batch = max(t.shape[0] for t in tensors)
    return torch.cat([t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t for t in tensors], dim=dim)


def merge_kv_caches(
    caches: Sequence[Mapping[str, tuple[Tensor, Tensor]]],
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per block, concatenate the extra tokens of every cache that has that block (DESIGN.md 4.1)."""
    names = list(dict.fromkeys(n for c in caches for n in c))
    merged = {}
    for name in names:
        pairs = [c[name] for c in caches if name in c]
        if len(pairs) == 1:
            merged[name] = pairs[0]
        else:
            merged[name] = (
                broadcast_cat([k for k, _ in pairs], 1),
                broadcast_cat([v for _, v in pairs], 1),
            )
    return merged


@dataclass
class ScheduledKVCache:
    entries: list[tuple[KVCache, float, float]]
    _memo: dict[tuple[int, ...], KVCache | None] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for _, start, end in self.entries:
            if not 0.0 <= start < end <= 1.0:
                raise KVCacheError(
                    f"a KV step window must satisfy 0 <= step_start < step_end <= 1, got ({start}, {end})"
                )

    def active(self, step: int, num_steps: int) -> tuple[int, ...]:
        progress = step / num_steps
        return tuple(i for i, (_, start, end) in enumerate(self.entries) if start <= progress < end)

    def at(self, step: int, num_steps: int) -> KVCache | None:
        key = self.active(step, num_steps)
        if key not in self._memo:
            self._memo[key] = merge_kv_caches([self.entries[i][0] for i in key]) if key else None
        return self._memo[key]

    def caches(self) -> list[KVCache]:
        return [cache for cache, _, _ in self.entries]
