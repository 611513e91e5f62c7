"""Block-level offload: run a module whose blocks do not all fit a device memory budget.

The module's blocks are the children of its top-level ``nn.ModuleList``s (a DiT's double/single
blocks, a text encoder's layers). Everything else (embedders, modulation, heads) and as many blocks as
the budget allows stay on the device; the other blocks, in groups, live in host memory (pinned on
CUDA) and are copied in just before use. While group ``j`` runs, the next ``prefetch`` groups are
copied on a side CUDA stream; when ``j`` ends, its device copies are dropped. The order of groups is
learnt as they run (the last group of a call is followed by the first of the next; registration order
until then), so any forward order works and is prefetched.

CUDA correctness, by construction:
- copies are issued on ``self.stream`` from pinned host tensors (``non_blocking``) and followed by an
  event; a group's first use makes the compute stream wait on that event;
- each device copy is marked ``record_stream(compute stream)`` at first use, so the caching allocator
  does not hand its memory to the side stream's next copy before the compute that reads it finishes;
- a group is released by pointing its tensors back at empty placeholders (same device and dtype), so
  ``layer.weight.device`` still names the device (runtime LoRA branches are placed there) while the
  memory goes back to the allocator; at most ``prefetch + 1`` groups are loaded at any time.

On a CPU "device" the same code runs: copies are plain host copies, there is no stream, and the
result is bit-identical to running without offload (the values are the same tensors' copies).
Inference only: a forward that needs gradients is refused (its saved weights would be released).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import DiffSynthTemplatesError

logger = logging.getLogger(__name__)

GiB = 2**30


class OffloadError(DiffSynthTemplatesError, ValueError):
    """Block offload cannot run as asked (a limit too small for the largest block, training, ...)."""


def find_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The children of every ``nn.ModuleList`` not nested inside another one, in registration order."""
    blocks: list[tuple[str, nn.Module]] = []
    taken: list[str] = []
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.ModuleList) or any(name.startswith(t + ".") for t in taken):
            continue
        taken.append(name)
        blocks += [(f"{name}.{i}", child) for i, child in enumerate(sub)]
    return blocks


def _slots(module: nn.Module) -> Iterator[Tensor]:
    """Every parameter and buffer tensor object of ``module`` (each once)."""
    seen: set[int] = set()
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for t in store.values():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    yield t


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class _Group:
    index: int
    names: list[str]
    modules: list[nn.Module]
    tensors: list[Tensor]  # the module's own Parameter/buffer objects: their .data is swapped
    masters: list[Tensor] = field(default_factory=list)  # host copies (pinned on CUDA)
    placeholders: list[Tensor] = field(default_factory=list)
    nbytes: int = 0
    loaded: bool = False
    event: object = None  # a torch.cuda.Event while the copy may still be in flight


@dataclass(frozen=True)
class OffloadPlan:
    """What stays on the device and what streams, in bytes."""

    limit: int
    fixed: int  # parameters outside the blocks (always on the device)
    resident_blocks: tuple[str, ...]
    resident_bytes: int  # fixed + resident blocks
    streamed_groups: tuple[tuple[str, ...], ...]
    largest_group: int
    window: int  # (prefetch + 1) * largest streamed group: the most streamed bytes on the device

    @property
    def peak_weight_bytes(self) -> int:
        return self.resident_bytes + self.window


def plan_offload(
    module: nn.Module, limit: int, prefetch: int = 1, blocks_per_group: int = 1
) -> tuple[OffloadPlan, list[list[tuple[str, nn.Module]]]]:
    """Keep the non-block weights and the first blocks that fit; stream the rest in groups."""
    blocks = find_blocks(module)
    if not blocks:
        raise OffloadError(f"{type(module).__name__} has no nn.ModuleList of blocks to offload")
    in_blocks = {id(t) for _, b in blocks for t in _slots(b)}
    fixed = _nbytes(t for t in _slots(module) if id(t) not in in_blocks)
    groups = [blocks[i : i + blocks_per_group] for i in range(0, len(blocks), blocks_per_group)]
    sizes = [_nbytes(t for _, b in g for t in _slots(b)) for g in groups]
    total = fixed + sum(sizes)
    largest = max(sizes)
    window = (prefetch + 1) * largest
    if total <= limit:
        plan = OffloadPlan(limit, fixed, tuple(n for n, _ in blocks), total, (), 0, 0)
        return plan, []
    if fixed + window > limit:
        need = _round_up((fixed + window) / GiB)
        raise OffloadError(
            f"vram_limit_gb={limit / GiB:.3g} is too small: {type(module).__name__} keeps "
            f"{fixed / GiB:.3g} GiB outside its blocks on the device and streams {prefetch + 1} group(s) "
            f"of up to {largest / GiB:.3g} GiB (the largest block group, prefetch={prefetch}); "
            f"pass vram_limit_gb >= {need:.3g}, a smaller prefetch, or store the weights in FP8 first"
        )
    keep, used = 0, fixed + window
    while keep < len(groups) and used + sizes[keep] <= limit:
        used += sizes[keep]
        keep += 1
    resident = [n for g in groups[:keep] for n, _ in g]
    streamed = groups[keep:]
    plan = OffloadPlan(
        limit, fixed, tuple(resident), fixed + sum(sizes[:keep]),
        tuple(tuple(n for n, _ in g) for g in streamed), max(sizes[keep:]), (prefetch + 1) * max(sizes[keep:]),
    )  # fmt: skip
    return plan, streamed


def _round_up(gib: float) -> float:
    """``gib`` to 3 significant digits, never below it (the limit the message suggests must work)."""
    shown = float(f"{gib:.3g}")
    step = 10 ** (math.floor(math.log10(gib)) - 2)
    return shown if shown >= gib else float(f"{shown + step:.3g}")


class BlockOffload:
    """Hooks on ``module``'s streamed blocks that keep at most ``prefetch + 1`` groups on ``device``.

    ``remove()`` takes the hooks off and leaves every streamed tensor on the host (call ``.to()`` after).
    """

    def __init__(
        self,
        module: nn.Module,
        device: torch.device | str,
        limit_bytes: int,
        prefetch: int = 1,
        blocks_per_group: int = 1,
    ):
        for name, value, least in (("prefetch", prefetch, 0), ("blocks_per_group", blocks_per_group, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise OffloadError(f"{name} must be an integer >= {least}, got {value!r}")
        self.module, self.device, self.prefetch = module, torch.device(device), prefetch
        self.cuda = self.device.type == "cuda"
        self.plan, streamed = plan_offload(module, limit_bytes, prefetch, blocks_per_group)
        self.stream = torch.cuda.Stream(self.device) if self.cuda and streamed else None
        self.groups: list[_Group] = []
        self.next_of: dict[int, int] = {}
        self._last: int | None = None
        self.max_loaded = 0  # the most groups ever on the device at once (checked by the tests)
        self.loads = 0
        self._handles = []
        for index, members in enumerate(streamed):
            modules = [m for _, m in members]
            tensors = [t for m in modules for t in _slots(m)]
            group = _Group(index, [n for n, _ in members], modules, tensors, nbytes=_nbytes(tensors))
            self._to_host(group)
            self.groups.append(group)
            # every member makes sure its group is there (members may run apart); the last releases it
            self._handles += [m.register_forward_pre_hook(self._pre_hook(group)) for m in modules]
            self._handles.append(modules[-1].register_forward_hook(self._post_hook(group)))
        # until a call shows the real order, guess registration order (right for FLUX.2 and Z-Image), so
        # the first call is prefetched too; a wrong guess only costs a copy (evicted, loaded again)
        self.next_of = {i: (i + 1) % len(self.groups) for i in range(len(self.groups))}
        module.to(self.device)  # the resident part; streamed tensors are device placeholders already
        logger.info(
            "block offload: %.2f GiB resident (%d blocks), %d group(s) streamed, window %.2f GiB, limit %.2f GiB",
            self.plan.resident_bytes / GiB, len(self.plan.resident_blocks), len(self.groups),
            self.plan.window / GiB, limit_bytes / GiB,
        )  # fmt: skip

    # -- state ------------------------------------------------------------------------------------

    def _to_host(self, group: _Group) -> None:
        pin = self.cuda and torch.cuda.is_available()
        for t in group.tensors:
            master = t.data.to("cpu")
            group.masters.append(master.pin_memory() if pin else master)
            group.placeholders.append(torch.empty(0, dtype=t.dtype, device=self.device))
            t.data = group.placeholders[-1]

    def _load(self, group: _Group) -> None:
        if self.cuda:
            with torch.cuda.stream(self.stream):
                copies = [m.to(self.device, non_blocking=True) for m in group.masters]
                group.event = torch.cuda.Event()
                group.event.record(self.stream)
        else:  # a host "device": a real copy, so the same swaps run as on a GPU
            copies = [m.clone() for m in group.masters]
        for t, c in zip(group.tensors, copies):
            t.data = c
        group.loaded = True
        self.loads += 1

    def _ready(self, group: _Group) -> None:
        """The compute stream may read ``group`` now (and the allocator knows it does)."""
        if not group.loaded:
            self._load(group)
        if group.event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(group.event)
            for t in group.tensors:
                t.data.record_stream(compute)
            group.event = None

    def _release(self, group: _Group) -> None:
        for t, p in zip(group.tensors, group.placeholders):
            t.data = p
        group.loaded = False
        group.event = None

    def _window(self, index: int) -> list[int]:
        """``index`` and the ``prefetch`` groups learnt to follow it."""
        out = [index]
        while len(out) <= self.prefetch and self.next_of.get(out[-1]) not in (None, *out):
            out.append(self.next_of[out[-1]])
        return out

    # -- hooks ------------------------------------------------------------------------------------

    def _pre_hook(self, group: _Group):
        def hook(_module: nn.Module, args: tuple) -> None:
            if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
                raise OffloadError(
                    "block offload is for inference: a forward that needs gradients would lose its "
                    "released weights; disable it (pipe.disable_block_offload()) to train"
                )
            if self._last is not None and self._last != group.index:
                self.next_of[self._last] = group.index
            self._last = group.index
            window = self._window(group.index)
            for other in self.groups:  # anything outside the window (a stale prefetch) goes first
                if other.loaded and other.index not in window:
                    self._release(other)
            self._ready(group)
            for ahead in window[1:]:
                if not self.groups[ahead].loaded:
                    self._load(self.groups[ahead])
            self.max_loaded = max(self.max_loaded, sum(g.loaded for g in self.groups))

        return hook

    def _post_hook(self, group: _Group):
        def hook(_module: nn.Module, _args: tuple, _output) -> None:
            self._release(group)

        return hook

    def release_all(self) -> None:
        """Drop every streamed group from the device (a prefetch for a next call that does not come)."""
        for group in self.groups:
            if group.loaded:
                self._release(group)

    def loaded_bytes(self) -> int:
        """Streamed bytes on the device now."""
        return sum(g.nbytes for g in self.groups if g.loaded)

    def remove(self) -> None:
        """Take the hooks off; streamed tensors point at their host copies again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.stream is not None:
            self.stream.synchronize()
        for group in self.groups:
            for t, m in zip(group.tensors, group.masters):
                t.data = m
            group.loaded = False
