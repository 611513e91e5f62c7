"""Template caches: validation against the base model, merging, and routing to pipeline arguments.

Merge rules (DESIGN.md 4.1-4.3):

- ``kv_cache``: per block, concatenated along the token axis (a block missing from a cache adds nothing);
- ``lora``: per module, concatenated along the rank, so the low-rank deltas add;
- ``extra_text_embedding``: concatenated along the sequence;
- any other key has exactly one producer; two templates emitting it is an error naming both.

Strength (DESIGN.md 4.7) is applied per template output before merging (``apply_strength``): a
``kv_cache`` gets ``log(strength)`` as a logit bias on its tokens, a ``lora`` its delta scaled;
strength 0 drops the whole output, strength 1 leaves it untouched (bit for bit today's result).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..loading.finite import NonFiniteError
from ..loading.tensor_tree import move_tensors
from ..pipelines.common import check_finite_cache
from ..pipelines.kv_schedule import broadcast_cat, merge_kv_caches, with_log_strength
from ..pipelines.lora import merge_loras, split_lora, validate_lora
from .base import TemplateError

MERGEABLE_KEYS = ("kv_cache", "lora", "extra_text_embedding")


class TemplateCacheError(TemplateError):
    """A cache is malformed, conflicts with another, or names an argument the pipeline does not take."""


class NonFiniteCacheError(TemplateCacheError, NonFiniteError):
    """A template produced NaN or inf (its weights or inputs hold them)."""


def check_finite_output(template: str, cache: Mapping[str, Any]) -> None:
    """Refuse a template cache with NaN / inf tensors, naming the template: it would blacken the image."""
    try:
        check_finite_cache(cache, f"template {template!r}")
    except NonFiniteError as e:
        raise NonFiniteCacheError(
            f"{e}; the template's weights or inputs hold NaN or inf, so every image would be black. "
            "Check its weights file (re-download or re-train it) and its inputs"
        ) from e


@dataclass
class TemplateOutput:
    """One template run's cache, with who produced it and over which steps its KV applies."""

    template: str
    cache: dict[str, Any]
    step_start: float = 0.0
    step_end: float = 1.0
    key: tuple | None = None  # what determines ``cache`` (template, dtype, pipeline, inputs), when known
    strength: float = 1.0  # applied when merging (``apply_strength``), so the template runs once


@dataclass
class MergedCache:
    values: dict[str, Any] = field(default_factory=dict)
    producers: dict[str, list[str]] = field(default_factory=dict)


#: cache keys strength scales; the call settings a template sets (input_image, inpaint_mask, height,
#: ...) are not a matter of degree: kept as they are for any strength > 0, dropped with the template at 0
SCALABLE_KEYS = ("kv_cache", "lora")
#: cache keys strength cannot scale, so only 0 (drop) and 1 (as is) are accepted with them
UNSCALABLE_KEYS = ("extra_text_embedding",)


def apply_strength(out: TemplateOutput) -> TemplateOutput | None:
    """``out`` with its strength applied to its cache; None (nothing to merge) at strength 0."""
    if out.strength == 1.0:
        return out
    if out.strength == 0.0:
        return None
    keys = set(out.cache)
    unscalable = sorted(keys.intersection(UNSCALABLE_KEYS))
    if unscalable or not keys.intersection(SCALABLE_KEYS):
        why = f"produces {unscalable}" if unscalable else f"produces only {sorted(keys)}"
        raise TemplateCacheError(
            f"template {out.template!r} {why}, which strength cannot scale (it scales {list(SCALABLE_KEYS)}); "
            f"use strength 0 (without the template) or 1 (as is), got {out.strength}"
        )
    cache = dict(out.cache)
    if "kv_cache" in cache:
        cache["kv_cache"] = with_log_strength(cache["kv_cache"], out.strength)
    if "lora" in cache:
        cache["lora"] = scale_lora(cache["lora"], out.strength)
    return replace(out, cache=cache)


def scale_lora(lora: Mapping[str, Tensor], scale: float) -> dict[str, Tensor]:
    """The LoRA with its delta ``B @ A`` scaled: each ``lora_B`` times ``scale``."""
    out = {}
    for module, (a, b) in split_lora(lora).items():
        out[f"{module}.lora_A.weight"] = a
        out[f"{module}.lora_B.weight"] = b * scale
    return out


def merge_outputs(outputs: Sequence[TemplateOutput]) -> MergedCache:
    """Merge the caches of one CFG side. KV with a step window stays separate (see ``kv_schedule``)."""
    merged = MergedCache()
    grouped: dict[str, list[tuple[str, Any]]] = {}
    for out in outputs:
        for key, value in out.cache.items():
            grouped.setdefault(key, []).append((out.template, value))
    for key, entries in grouped.items():
        names = [n for n, _ in entries]
        values = [v for _, v in entries]
        merged.producers[key] = names
        if key == "kv_cache":
            merged.values[key] = merge_kv_caches(values)
        elif key == "lora":
            merged.values[key] = merge_loras(values)
        elif key == "extra_text_embedding":
            merged.values[key] = broadcast_cat(values, 1)
        elif len(entries) > 1:
            raise TemplateCacheError(
                f"templates {names[0]!r} and {names[1]!r} both produce {key!r}, which cannot be merged "
                f"(only {MERGEABLE_KEYS} merge); use one of them per call"
            )
        else:
            merged.values[key] = values[0]
    return merged


def validate_output(out: TemplateOutput, dit, accepted: set[str], batch_size: int | None = None) -> None:
    """Check one template's cache before anything is merged, so errors name the template."""
    if not isinstance(out.cache, Mapping):
        raise TemplateCacheError(
            f"template {out.template!r} returned {type(out.cache).__name__}; forward must return a dict"
        )
    for key, value in out.cache.items():
        if key not in accepted:
            raise TemplateCacheError(
                f"template {out.template!r} produced {key!r}, which the base pipeline does not accept; "
                f"accepted cache keys: {sorted(accepted)}"
            )
        if key == "kv_cache":
            dit.validate_kv_cache(value, batch_size=batch_size, source=f"template {out.template!r}")
        elif key == "lora":
            validate_lora(dit, value, source=f"template {out.template!r}")
        elif key == "extra_text_embedding":
            want = dit.config.text_dim
            if not isinstance(value, Tensor) or value.ndim != 3 or value.shape[-1] != want:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise TemplateCacheError(
                    f"template {out.template!r} produced extra_text_embedding {shape}; expected [B, L, {want}]"
                )


def to_device(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move tensors in a cache (nested in dicts / tuples / lists) to the pipeline's device and dtype."""
    return move_tensors(value, device, dtype)
