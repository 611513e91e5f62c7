"""Finite-value checks where numbers enter: call arguments, template inputs, weights, losses.

NaN or inf anywhere turns into an all-black image or a poisoned checkpoint with exit code 0, so every
entry point checks here and the error names the value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from numbers import Real

import torch

from ..errors import DiffSynthTemplatesError


class NonFiniteError(DiffSynthTemplatesError, ValueError):
    """A NaN or infinite value where a finite number is required."""


def check_finite_number(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite real number, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise NonFiniteError(f"{name} must be a finite number, got {value!r} ({type(value).__name__})")
    try:
        number = float(value)
    except OverflowError as e:  # a huge int
        raise NonFiniteError(f"{name} = {value!r} is too large to be a float") from e
    if not math.isfinite(number):
        raise NonFiniteError(f"{name} must be a finite number, got {value!r}")
    return number


def nonfinite_names(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of floating-point tensors holding NaN or inf (in order)."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    bad = []
    for name, t in items:
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
            if t.device.type != "meta" and not _all_finite(t):
                bad.append(name)
    return bad


def _all_finite(t: torch.Tensor) -> bool:
    """NaN and inf propagate through a sum, so a finite sum proves every element finite in one read
    with no temporary; only a non-finite sum (a NaN / inf inside, or finite values overflowing the
    float32 accumulator) needs the elementwise test."""
    if t.is_floating_point() and math.isfinite(
        t.sum(dtype=torch.float32 if t.element_size() < 4 else None).item()
    ):
        return True  # (.item() and math.isfinite: one tensor op per check, not three)
    return bool(torch.isfinite(t).all())


def check_finite_tensor(name: str, tensor: torch.Tensor | None) -> None:
    """Raise ``NonFiniteError`` if ``tensor`` holds NaN or inf."""
    if tensor is not None and nonfinite_names([(name, tensor)]):
        raise NonFiniteError(f"{name} holds NaN or inf values; pass finite values")


def check_finite_state(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], where: str
) -> None:
    """Raise ``NonFiniteError`` naming the first non-finite tensors of a state dict (``where``: its file)."""
    bad = nonfinite_names(tensors)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteError(f"{where}: tensor(s) {bad[:5]}{more} hold NaN or inf values")
