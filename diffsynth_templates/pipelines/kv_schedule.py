"""KV caches that apply only over part of the denoising steps (like ControlNet's guidance start/end).

A ``ScheduledKVCache`` holds entries ``(cache, start, end)``; at step ``i`` of ``n`` the entries whose
window contains ``i / n`` are concatenated. The concatenation is memoized per set of active
entries, so a step pays nothing unless a window opens or closes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..backbones.attention import KVCache, KVCacheError


def broadcast_cat(tensors: Sequence[Tensor], dim: int) -> Tensor:
    """Concatenate along ``dim`` after broadcasting batch-1 entries to the common batch."""
    batch = max(t.shape[0] for t in tensors)
    return torch.cat([t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t for t in tensors], dim=dim)


def merge_kv_caches(caches: Sequence[KVCache]) -> dict[str, tuple[Tensor, ...]]:
    """Per block, concatenate the extra tokens of every cache that has that block (DESIGN.md 4.1).

    An entry may carry a third, float entry: the log-strength bias of each of its tokens (see
    ``with_log_strength``). When any entry of a block has one, the merged block carries the bias of
    every token (0 for entries without one), so each template keeps its own strength.
    """
    names = list(dict.fromkeys(n for c in caches for n in c))
    merged = {}
    for name in names:
        entries = [c[name] for c in caches if name in c]
        if len(entries) == 1:
            merged[name] = entries[0]
            continue
        k = broadcast_cat([e[0] for e in entries], 1)
        v = broadcast_cat([e[1] for e in entries], 1)
        if any(len(e) > 2 for e in entries):
            merged[name] = (k, v, broadcast_cat([token_bias(e) for e in entries], 1))
        else:
            merged[name] = (k, v)
    return merged


def token_bias(entry: tuple[Tensor, ...]) -> Tensor:
    """The log-strength bias ``[1 or B, L]`` of a KV entry's tokens: its third entry, else zeros."""
    if len(entry) > 2:
        if entry[2].dtype == torch.bool:
            raise KVCacheError(
                "a KV entry with a bool third entry (CFG sides stacked for one DiT call) cannot be merged "
                "again; merge the caches of each side first"
            )
        return entry[2]
    return torch.zeros(1, entry[0].shape[1], dtype=torch.float32, device=entry[0].device)


def with_log_strength(kv_cache: KVCache, strength: float) -> dict[str, tuple[Tensor, ...]]:
    """Every block of ``kv_cache`` with ``log(strength)`` added to its tokens' logit bias (DESIGN.md
    4.7): attention then gives those tokens ``strength`` times the mass. ``strength > 0``; 0 means
    dropping the cache, which callers do instead (exp(-inf) would still cost the tokens' compute)."""
    if not strength > 0:
        raise KVCacheError(f"with_log_strength needs strength > 0 (drop the cache for 0), got {strength!r}")
    shift = math.log(strength)
    return {name: (e[0], e[1], token_bias(e).float() + shift) for name, e in kv_cache.items()}


def stacked_side_bias(
    entries: Sequence[tuple[Tensor, ...] | None], valid: Tensor, batch: int
) -> Tensor | None:
    """The logit bias ``[2 * batch, L]`` of two stacked CFG sides (positive rows first): each side's
    own bias on its tokens and ``-inf`` on its padding (``valid`` False); None when no side has a bias,
    so the caller keeps the bool ``valid`` mask as before."""
    if not any(e is not None and len(e) > 2 for e in entries):
        return None
    bias = torch.full(valid.shape, float("-inf"), dtype=torch.float32, device=valid.device)
    for side, entry in enumerate(entries):
        if entry is not None:
            length = entry[0].shape[1]
            bias[side * batch : (side + 1) * batch, :length] = token_bias(entry).float().to(valid.device)
    return bias


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
