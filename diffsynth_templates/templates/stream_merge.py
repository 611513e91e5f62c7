"""Merging template KV as the outputs arrive, into buffers sized once, instead of after all have run.

With the output memo off nothing keeps a template's output after the merge, so each one is copied
into its block's merged buffer as soon as it is produced and then dropped: the next template's
outputs reuse the same host memory instead of every output of the call living (and being paged in
fresh) until one concatenation at the end. The result is the same tensors ``merge_kv_caches`` makes:
per block, the tokens of every full-window output in canonical order (``TemplatePipeline`` produces
them in that order), batch-1 entries broadcast to the batch. Windowed KV and every other cache key
are left to the ordinary merge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from ..loading.mapped import prefault
from ..pipelines.kv_schedule import broadcast_cat, token_bias
from .cache import TemplateOutput, apply_strength

FULL_WINDOW = (0.0, 1.0)


class BlockBuffer:
    """One block's merged ``k`` and ``v``: ``[batch, capacity, heads, head_dim]``, filled from the left."""

    def __init__(self, k: Tensor, capacity: int, storage: tuple[Tensor, Tensor] | None = None):
        shape = (k.shape[0], capacity, *k.shape[2:])
        if storage is None:
            storage = tuple(torch.empty(shape, dtype=k.dtype, device=k.device) for _ in "kv")
        self.k, self.v = (t.view(shape) for t in storage)
        self.filled = 0
        self.biases: list[Tensor] = []  # each entry's log-strength bias (``token_bias``): tiny, kept as is
        self.any_bias = False

    def add(self, entry: tuple[Tensor, ...], spare: int) -> None:
        """Append an entry ``(k, v[, bias])``; ``spare``: tokens still expected after it (to size a
        regrowth once)."""
        k, v = entry[0], entry[1]
        self.biases.append(token_bias(entry))
        self.any_bias |= len(entry) > 2
        batch, need = max(self.k.shape[0], k.shape[0]), self.filled + k.shape[1]
        if batch != self.k.shape[0] or need > self.k.shape[1]:
            self._grow(batch, max(need + spare, self.k.shape[1]))
        end = self.filled + k.shape[1]
        self.k[:, self.filled : end].copy_(k.expand(batch, -1, -1, -1))
        self.v[:, self.filled : end].copy_(v.expand(batch, -1, -1, -1))
        self.filled = end

    def _grow(self, batch: int, capacity: int) -> None:
        old_k, old_v = self.k[:, : self.filled], self.v[:, : self.filled]
        shape = (batch, capacity, *self.k.shape[2:])
        self.k, self.v = (torch.empty(shape, dtype=t.dtype, device=t.device) for t in (old_k, old_v))
        self.k[:, : self.filled].copy_(old_k.expand(batch, -1, -1, -1))
        self.v[:, : self.filled].copy_(old_v.expand(batch, -1, -1, -1))

    def result(self) -> tuple[Tensor, ...]:
        k, v = self.k, self.v
        if self.filled != k.shape[1]:  # sized too large
            k, v = k[:, : self.filled].clone(), v[:, : self.filled].clone()
        return (k, v, broadcast_cat(self.biases, 1)) if self.any_bias else (k, v)


def _new_buffers(kv: dict, known: dict, outputs: int) -> dict[str, BlockBuffer]:
    """Buffers for the blocks of ``kv`` not in ``known``, room for ``outputs`` outputs like this one,
    carved from one allocation: freed as one, it never leaves holes in the host heap that keep the
    process's resident memory up after the call."""
    new = {name: entry[0] for name, entry in kv.items() if name not in known}
    if not new:
        return {}
    first = next(iter(new.values()))
    if any(k.dtype != first.dtype or k.device != first.device for k in new.values()):
        return {name: BlockBuffer(k, k.shape[1] * outputs) for name, k in new.items()}
    sizes = {name: k[:, :1].numel() * k.shape[1] * outputs for name, k in new.items()}
    arena = torch.empty(2 * sum(sizes.values()), dtype=first.dtype, device=first.device)
    prefault(arena)  # every byte of it is written: page it in at once, not fault by fault
    buffers, offset = {}, 0
    for name, k in new.items():
        n = sizes[name]
        storage = (arena[offset : offset + n], arena[offset + n : offset + 2 * n])
        buffers[name] = BlockBuffer(k, k.shape[1] * outputs, storage)
        offset += 2 * n
    return buffers


class StreamedKV:
    """The full-window KV of one call's outputs, merged per CFG side as they arrive."""

    def __init__(self, counts: dict[str, int], validate: Callable[[str, TemplateOutput], None]):
        self.remaining = dict(counts)  # outputs still to come per side (sizes the buffers)
        self.validate = validate  # checks an output against the pipeline before it is merged
        self.blocks: dict[str, dict[str, BlockBuffer]] = {side: {} for side in counts}

    def add(self, side: str, out: TemplateOutput) -> TemplateOutput:
        """Merge ``out``'s full-window KV at its strength; returns the rest of ``out``, its strength
        applied already (the ordinary merge takes it from there)."""
        self.validate(side, out)
        self.remaining[side] -= 1
        if not out.cache.get("kv_cache") or (out.step_start, out.step_end) != FULL_WINDOW:
            return out
        applied = apply_strength(out)
        if applied is None:  # strength 0: nothing of it is merged
            return replace(out, cache={}, strength=1.0)
        kv = applied.cache["kv_cache"]
        blocks = self.blocks[side]
        blocks.update(_new_buffers(kv, blocks, 1 + self.remaining[side]))
        for name, entry in kv.items():
            blocks[name].add(entry, entry[0].shape[1] * self.remaining[side])
        rest = {key: value for key, value in applied.cache.items() if key != "kv_cache"}
        return replace(applied, cache=rest, strength=1.0)

    def outputs(self, side: str, outputs: list[TemplateOutput]) -> list[TemplateOutput]:
        """``outputs`` (their full-window KV taken out; those left empty dropped) led by one output
        holding the merged KV."""
        blocks = self.blocks[side]
        if not blocks:
            return outputs
        merged = {name: buffer.result() for name, buffer in blocks.items()}
        rest = [out for out in outputs if out.cache]
        return [TemplateOutput("(merged templates)", {"kv_cache": merged}), *rest]
