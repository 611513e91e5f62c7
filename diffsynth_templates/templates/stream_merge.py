"""Merging template KV as the outputs arrive, into buffers sized once, instead of after all have run.

With the output memo off nothing keeps a template's output after the merge, so each one is copied
into its block's merged buffer as soon as it is produced and then dropped: the next template's
outputs reuse the same host memory instead of every output of the call living (and being paged in
fresh) until one concatenation at the end. The result is the same tensors ``merge_kv_caches`` makes:
per block, the tokens of every full-window output in canonical order (``TemplatePipeline`` produces
them in that order), batch-1 entries broadcast to the batch. Windowed KV and every other cache key
are left to the ordinary merge. With the memo on, a call that computed outputs feeds them all in
after running (they stay in the memo), for the reused memory below.

A template model that declares ``writes_kv_out`` is handed a ``KVOut`` and writes its KV straight
into its rows of the buffers (``BlockBuffer.add`` then finds it in place and copies nothing): its
outputs are never materialized elsewhere. On the CPU the buffers' memory is kept for the next call
(``ReusedArena``) and reused once nothing outside holds the previous call's result: fresh memory is
paged in (zero-filled by the kernel) on every call otherwise, which cost as much as running the
templates.
"""

from __future__ import annotations

import threading
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
        # each entry's log-strength bias (``token_bias``), or its token count where it has none (zeros,
        # made only if another entry has a bias)
        self.biases: list[Tensor | int] = []
        self.any_bias = False

    def next_rows(self, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor | None:
        """The rows an entry of ``shape`` would be copied into (``index`` 0: k, 1: v), or None where
        it would not land as it is (another dtype or batch, more tokens than are left)."""
        target = self.k if index == 0 else self.v
        batch, tokens, *rest = shape
        if dtype != target.dtype or batch != target.shape[0] or list(rest) != list(target.shape[2:]):
            return None
        if self.filled + tokens > target.shape[1]:
            return None
        return target[:, self.filled : self.filled + tokens]

    def add(self, entry: tuple[Tensor, ...], spare: int) -> None:
        """Append an entry ``(k, v[, bias])``; ``spare``: tokens still expected after it (to size a
        regrowth once). An entry already written in place (``KVOut``) is not copied."""
        k, v = entry[0], entry[1]
        self.biases.append(token_bias(entry) if len(entry) > 2 else k.shape[1])
        self.any_bias |= len(entry) > 2
        batch, need = max(self.k.shape[0], k.shape[0]), self.filled + k.shape[1]
        if batch != self.k.shape[0] or need > self.k.shape[1]:
            self._grow(batch, max(need + spare, self.k.shape[1]))
        end = self.filled + k.shape[1]
        for source, target in ((k, self.k[:, self.filled : end]), (v, self.v[:, self.filled : end])):
            if not _same_view(source, target):
                target.copy_(source.expand(batch, -1, -1, -1))
        self.filled = end

    def _grow(self, batch: int, capacity: int) -> None:
        old_k, old_v = self.k[:, : self.filled], self.v[:, : self.filled]
        shape = (batch, capacity, *self.k.shape[2:])
        self.k, self.v = (torch.empty(shape, dtype=t.dtype, device=t.device) for t in (old_k, old_v))
        self.k[:, : self.filled].copy_(old_k.expand(batch, -1, -1, -1))
        self.v[:, : self.filled].copy_(old_v.expand(batch, -1, -1, -1))

    def result(self) -> tuple[Tensor, ...]:
        k, v = self.k[:, : self.filled], self.v[:, : self.filled]
        if self.filled != self.k.shape[1] and k.shape[0] > 1:  # sized too large: a compact copy, since
            k, v = k.clone(), v.clone()  # a batch's rows would be strided (batch 1: the views are)
        if not self.any_bias:
            return k, v
        biases = [b if isinstance(b, Tensor) else k.new_zeros(1, b, dtype=torch.float32) for b in self.biases]
        return k, v, broadcast_cat(biases, 1)


def _same_view(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same memory seen the same way (an entry written in place)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


class KVOut:
    """What a ``writes_kv_out`` template model is given: where each of its KV entries will be merged.

    ``rows(block, index, shape, dtype)`` (``index`` 0: k, 1: v) is that memory, or None (no buffer
    for the block yet, or the entry would not land there as it is): the model then makes a tensor of
    its own as usual. Writing into the rows and returning them saves the merge its copy; the result is
    the same either way. Under autograd nothing is offered (a written-into tensor has no gradient)."""

    def __init__(self, blocks: dict[str, BlockBuffer]):
        self.blocks = blocks

    def rows(self, block: str, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor | None:
        buffer = self.blocks.get(block)
        if buffer is None or torch.is_grad_enabled():  # writes into memory are for inference only
            return None
        return buffer.next_rows(index, tuple(shape), dtype)


class ReusedArena:
    """The host memory one call's merge buffers are carved from, kept for the next call.

    ``take`` hands the kept memory out again only when nothing but this object references it (the
    previous result and every view of it are gone: a caller still holding a result never sees it
    overwritten); otherwise it allocates anew and keeps that. Off the CPU nothing is kept: the device's
    caching allocator already reuses memory without paging it in, and kept device memory would be
    unavailable to the denoiser."""

    def __init__(self) -> None:
        self.kept: Tensor | None = None
        self.reuses = 0  # how many calls were served from kept memory (tests and benchmarks read it)
        self._lock = threading.Lock()  # shared by pipelines: checking and handing out are one step

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        with self._lock:
            kept = self.kept
            if (
                kept is not None
                and (kept.dtype, kept.device) == (dtype, torch.device(device))
                and kept.numel() >= numel
                and _unreferenced(kept)
            ):
                self.reuses += 1
                return kept[:numel]  # the view is a reference: the next check sees it in use
            arena = torch.empty(numel, dtype=dtype, device=device)
            self.kept = arena if arena.device.type == "cpu" else None
        prefault(arena)  # every byte of it is written: page it in at once, not fault by fault
        return arena


def merge_arenas() -> dict[str, ReusedArena]:
    """One arena per CFG side (both sides' results live through the same denoising call)."""
    return {side: ReusedArena() for side in ("positive", "negative")}


#: the merge memory of every template pipeline of this process (like the host store): what is kept
#: between calls is one call's merged KV per side, however many pipelines there are
MERGE_ARENAS = merge_arenas()


def _unreferenced(tensor: Tensor) -> bool:
    """Whether ``tensor`` is the only holder of its memory (no view of it lives anywhere)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:  # a torch without the counter: never reuse
        return False
    # references: ``tensor`` itself and the temporary storage object made to ask
    return use_count(tensor.untyped_storage()._cdata) <= 2


def _new_buffers(kv: dict, known: dict, outputs: int, arena: ReusedArena) -> dict[str, BlockBuffer]:
    """Buffers for the blocks of ``kv`` not in ``known``, room for ``outputs`` outputs like this one,
    carved from one allocation (``arena``): freed as one, it never leaves holes in the host heap that
    keep the process's resident memory up after the call."""
    new = {name: entry[0] for name, entry in kv.items() if name not in known}
    if not new:
        return {}
    first = next(iter(new.values()))
    if known or any(k.dtype != first.dtype or k.device != first.device for k in new.values()):
        return {name: BlockBuffer(k, k.shape[1] * outputs) for name, k in new.items()}
    sizes = {name: k[:, :1].numel() * k.shape[1] * outputs for name, k in new.items()}
    arena = arena.take(2 * sum(sizes.values()), first.dtype, first.device)
    buffers, offset = {}, 0
    for name, k in new.items():
        n = sizes[name]
        storage = (arena[offset : offset + n], arena[offset + n : offset + 2 * n])
        buffers[name] = BlockBuffer(k, k.shape[1] * outputs, storage)
        offset += 2 * n
    return buffers


class StreamedKV:
    """The full-window KV of one call's outputs, merged per CFG side as they arrive."""

    def __init__(
        self,
        counts: dict[str, int],
        validate: Callable[[str, TemplateOutput], None],
        arenas: dict[str, ReusedArena] | None = None,
    ):
        self.remaining = dict(counts)  # outputs still to come per side (sizes the buffers)
        self.validate = validate  # checks an output against the pipeline before it is merged
        self.blocks: dict[str, dict[str, BlockBuffer]] = {side: {} for side in counts}
        self.arenas = arenas if arenas is not None else merge_arenas()

    def kv_out(self, side: str) -> KVOut:
        """Where the next output of ``side`` will be merged (for models that write there)."""
        return KVOut(self.blocks[side])

    def add(self, side: str, out: TemplateOutput) -> TemplateOutput:
        """Merge ``out``'s full-window KV at its strength; returns the rest of ``out``, its strength
        applied already (the ordinary merge takes it from there)."""
        self.validate(side, out)
        self.remaining[side] -= 1
        if not out.cache.get("kv_cache") or (out.step_start, out.step_end) != FULL_WINDOW:
            return out
        applied = apply_strength(out)
        # what is returned is no longer the output its memo key names (its KV went into the buffers)
        if applied is None:  # strength 0: nothing of it is merged
            return replace(out, cache={}, strength=1.0, key=None)
        kv = applied.cache["kv_cache"]
        blocks = self.blocks[side]
        blocks.update(_new_buffers(kv, blocks, 1 + self.remaining[side], self.arenas[side]))
        for name, entry in kv.items():
            blocks[name].add(entry, entry[0].shape[1] * self.remaining[side])
        rest = {key: value for key, value in applied.cache.items() if key != "kv_cache"}
        return replace(applied, cache=rest, strength=1.0, key=None)

    def outputs(self, side: str, outputs: list[TemplateOutput]) -> list[TemplateOutput]:
        """``outputs`` (their full-window KV taken out; those left empty dropped) led by one output
        holding the merged KV."""
        blocks = self.blocks[side]
        if not blocks:
            return outputs
        merged = {name: buffer.result() for name, buffer in blocks.items()}
        rest = [out for out in outputs if out.cache]
        return [TemplateOutput("(merged templates)", {"kv_cache": merged}), *rest]
