"""The one mover for nested values of tensors (dicts, lists, tuples): caches, batches, features."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor


def map_tensors(value: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it; mappings become dicts, lists and tuples keep
    their kind (as plain ``list``/``tuple``); any other value is returned as is."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    return value


def move_tensors(
    value: Any,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    non_blocking: bool = False,
) -> Any:
    """Every tensor in ``value`` moved to ``device``; floating-point ones also cast to ``dtype`` (integer
    and boolean tensors, e.g. ids and masks, keep theirs)."""

    def move(tensor: Tensor) -> Tensor:
        if dtype is not None and tensor.is_floating_point():
            return tensor.to(device=device, dtype=dtype, non_blocking=non_blocking)
        return tensor if device is None else tensor.to(device, non_blocking=non_blocking)

    return map_tensors(value, move)


def detached_cpu(value: Any) -> Any:
    """Every tensor in ``value`` detached, on the CPU and contiguous (what may be cached or saved)."""
    return map_tensors(value, lambda t: t.detach().cpu().contiguous())
