"""Runtime LoRA: low-rank branches on Linear layers for the duration of a call, never fused.

A LoRA cache is ``{"{module}.lora_A.weight": [r, in], "{module}.lora_B.weight": [out, r]}`` with
``{module}`` a Linear path of the DiT (DESIGN.md 4.2). Applying it registers forward hooks that add
``B @ A @ x`` to the layer's output; leaving the context removes them. Base weights are never
written, so nothing accumulates and user-fused LoRAs stay as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DiffSynthTemplatesError

LoRACache = Mapping[str, Tensor]


class LoRAError(DiffSynthTemplatesError, ValueError):
    """A LoRA cache does not fit the model it is applied to."""


def split_lora(lora: LoRACache, source: str | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Group a flat LoRA dict into ``{module: (A, B)}``; raise on unpaired or mis-shaped entries."""
    who = f" (from {source})" if source else ""
    if not isinstance(lora, Mapping):
        raise LoRAError(
            f"lora{who} must be a dict of '{{module}}.lora_A.weight' / '.lora_B.weight' -> tensor, got {type(lora).__name__}"
        )
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in lora.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise LoRAError(
                f"LoRA entry {key!r}{who} must map a string key to a tensor, got {type(value).__name__}"
            )
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.endswith(suffix):
                pairs.setdefault(key[: -len(suffix)], {})[part] = value
                break
        else:
            raise LoRAError(
                f"LoRA key {key!r}{who} is not of the form '{{module}}.lora_A.weight' or '{{module}}.lora_B.weight'"
            )
    out = {}
    for module, parts in pairs.items():
        if set(parts) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(parts)).pop()
            raise LoRAError(f"LoRA for {module!r}{who} has no {missing}.weight")
        a, b = parts["lora_A"], parts["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoRAError(
                f"LoRA for {module!r}{who}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} must be [r, in] and [out, r]"
            )
        out[module] = (a, b)
    return out


def validate_lora(
    model: nn.Module, lora: LoRACache, source: str | None = None
) -> dict[str, tuple[Tensor, Tensor]]:
    """Check every module exists, is a Linear, and matches the LoRA's in/out sizes."""
    who = f" (from {source})" if source else ""
    pairs = split_lora(lora, source)
    modules = dict(model.named_modules())
    for name, (a, b) in pairs.items():
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear):
            what = "does not exist" if layer is None else f"is a {type(layer).__name__}, not a Linear"
            raise LoRAError(f"LoRA module {name!r}{who} {what} in {type(model).__name__}")
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            raise LoRAError(
                f"LoRA for {name!r}{who} maps {a.shape[1]} -> {b.shape[0]} features; "
                f"the layer maps {layer.in_features} -> {layer.out_features}"
            )
    return pairs


def _lora_hook(a: Tensor, b: Tensor, scale: float, rows: slice | None):
    def hook(module: nn.Linear, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = inputs[0] if rows is None else inputs[0][rows]
        delta = scale * F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))
        if rows is None:
            return output + delta
        output = output.clone()
        output[rows] = output[rows] + delta
        return output

    return hook


@contextlib.contextmanager
def applied_lora(
    model: nn.Module,
    lora: LoRACache | None,
    scale: float = 1.0,
    source: str | None = None,
    rows: slice | None = None,
) -> Iterator[None]:
    """Within the block, ``model``'s Linear layers carry the LoRA's low-rank branches.

    ``rows`` restricts the branch to a slice of the batch, so the two CFG sides can carry different
    LoRAs in one batched call.
    """
    if not lora:
        yield
        return
    pairs = validate_lora(model, lora, source)
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, (a, b) in pairs.items():
            layer = modules[name]
            a = a.to(layer.weight.device)
            b = b.to(layer.weight.device)
            handles.append(layer.register_forward_hook(_lora_hook(a, b, scale, rows)))
        yield
    finally:
        for h in handles:
            h.remove()


def merge_loras(loras: list[LoRACache]) -> dict[str, Tensor]:
    """Concatenate along the rank, so the merged delta is the sum of the deltas (DESIGN.md 4.2)."""
    grouped: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for lora in loras:
        for module, ab in split_lora(lora).items():
            grouped.setdefault(module, []).append(ab)
    merged = {}
    for module, pairs in grouped.items():
        merged[f"{module}.lora_A.weight"] = torch.cat([a for a, _ in pairs], dim=0)
        merged[f"{module}.lora_B.weight"] = torch.cat([b for _, b in pairs], dim=1)
    return merged
