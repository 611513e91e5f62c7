"""The one attention function every DiT block calls, the KV door of Diffusion Templates, and RoPE.

Template caches enter here and only here: extra key/value tokens are appended to a block's keys and
values after QK-norm and after RoPE, with no norm, no rotation and no mask (DESIGN.md 4.1). Keeping a
single function means every backbone honours the same contract. A template's ``strength`` (DESIGN.md
4.7) arrives as an additive logit bias on its own tokens; without one the call is today's plain SDPA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DiffSynthTemplatesError

KVCache = Mapping[str, tuple[Tensor, Tensor]]


class KVCacheError(DiffSynthTemplatesError, ValueError):
    """A KV cache does not fit the model it is given to."""


@dataclass(frozen=True)
class KVBlockSpec:
    """What a block accepts: its attention heads and head size."""

    heads: int
    head_dim: int


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    extra_kv: tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor] | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Scaled dot-product attention over ``[B, S, H, D]`` tensors; returns ``[B, S, H * D]``.

    ``extra_kv`` holds template tokens ``[B or 1, L, H, D]`` appended to the keys and values. A
    batch-1 cache is broadcast to the batch, so one cache serves both CFG sides or any batch.
    ``mask`` (bool ``[B, S]``, True = a real token) hides padding keys of a ragged batch; template
    tokens are never masked, so the mask is extended with True for them. The one exception is a
    third entry ``valid`` (bool ``[B, L]``) that pipelines add when they stack two CFG sides whose
    caches differ in length (``pipelines.common.batch_side_kv``): a row sees only its own tokens.
    A floating-point third entry ``[B or 1, L]`` is instead an additive bias on the logits of the
    template tokens (``log(strength)`` per token; ``-inf`` hides a padding token): the attention mass
    a token receives is scaled by ``exp(bias)`` before normalization.
    """
    bias = None
    if extra_kv is not None and extra_kv[0].shape[1] > 0:
        extra_k, extra_v = extra_kv[0], extra_kv[1]
        valid = extra_kv[2] if len(extra_kv) == 3 else None
        batch, length = k.shape[0], k.shape[1]
        k = torch.cat([k, extra_k.to(k.dtype).expand(batch, -1, -1, -1)], dim=1)
        v = torch.cat([v, extra_v.to(v.dtype).expand(batch, -1, -1, -1)], dim=1)
        if valid is not None and valid.is_floating_point():  # strength: a float mask, padding included
            bias, mask = _logit_bias(mask, valid, batch, length, q.dtype), None
        elif mask is not None or valid is not None:
            own = mask if mask is not None else torch.ones(batch, length, dtype=torch.bool, device=k.device)
            extra = valid.expand(batch, -1) if valid is not None else own.new_ones(batch, extra_k.shape[1])
            mask = torch.cat([own, extra.to(own.device)], dim=1)
    attn_mask = bias if mask is None else mask[:, None, None, :]  # broadcast over heads and queries
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
    )
    return out.transpose(1, 2).flatten(2)


def _logit_bias(mask: Tensor | None, extra: Tensor, batch: int, length: int, dtype: torch.dtype) -> Tensor:
    """The float ``attn_mask`` ``[B, 1, 1, S + L]``: 0 on the block's own keys (``-inf`` on padding
    ``mask`` hides), ``extra`` (the template tokens' log-strength) on the appended ones."""
    own = torch.zeros(batch, length, dtype=dtype, device=extra.device)
    if mask is not None:
        own = own.masked_fill(~mask.to(own.device), float("-inf"))
    return torch.cat([own, extra.to(dtype).expand(batch, -1)], dim=1)[:, None, None, :]


@contextlib.contextmanager
def module_attribute(
    module: torch.nn.Module, name: str, value: object, default: object = None
) -> Iterator[None]:
    """``module.<name> = value`` inside, its previous value (``default`` where it had none) restored
    after: how a caller hands a forward per-call state (a flag or an object on the module, not global
    state, so ``torch.compile`` traces it)."""
    previous = getattr(module, name, default)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, previous)


def kv_cache_prevalidated(model: torch.nn.Module, enabled: bool = True):
    """Inside, ``model``'s forward trusts its ``kv_cache``: the caller (a sampler) validated it once,
    before its loop."""
    return module_attribute(model, "kv_cache_prevalidated", enabled, default=False)


def validate_kv_cache(
    kv_cache: KVCache | None,
    specs: Mapping[str, KVBlockSpec],
    batch_size: int | None = None,
    source: str | None = None,
) -> None:
    """Check a whole cache against a model before any compute; raise ``KVCacheError`` naming the block.

    ``source`` names who produced the cache (e.g. a template) so the message points at the culprit.
    """
    if kv_cache is None:
        return
    who = f" (from {source})" if source else ""
    if not isinstance(kv_cache, Mapping):
        raise KVCacheError(
            f"kv_cache{who} must be a dict of block name -> (k, v), got {type(kv_cache).__name__}"
        )
    for name, entry in kv_cache.items():
        spec = specs.get(name)
        if spec is None:
            known = _summarize_names(specs)
            raise KVCacheError(
                f"kv_cache{who} has unknown block name {name!r}; this model's blocks are {known}"
            )
        if not (isinstance(entry, (tuple, list)) and len(entry) in (2, 3)):
            raise KVCacheError(f"kv_cache{who}[{name!r}] must be a (k, v) pair of tensors")
        k, v = entry[0], entry[1]
        if not (isinstance(k, Tensor) and isinstance(v, Tensor)):
            raise KVCacheError(
                f"kv_cache{who}[{name!r}] must hold tensors, got {type(k).__name__}, {type(v).__name__}"
            )
        if k.ndim != 4:
            raise KVCacheError(
                f"kv_cache{who}[{name!r}] k has shape {tuple(k.shape)}; expected 4 dims "
                f"[batch, tokens, {spec.heads}, {spec.head_dim}]"
            )
        if len(entry) == 3:  # (k, v, valid) of stacked CFG sides, or (k, v, log-strength bias)
            _check_third_entry(entry[2], k, f"kv_cache{who}[{name!r}]")
        if k.shape != v.shape:
            raise KVCacheError(
                f"kv_cache{who}[{name!r}] k shape {tuple(k.shape)} and v shape {tuple(v.shape)} differ; they must match"
            )
        if k.shape[2] != spec.heads or k.shape[3] != spec.head_dim:
            raise KVCacheError(
                f"kv_cache{who}[{name!r}] has heads x head_dim = {k.shape[2]} x {k.shape[3]}; "
                f"block {name!r} expects {spec.heads} x {spec.head_dim}"
            )
        if batch_size is not None and k.shape[0] not in (1, batch_size):
            raise KVCacheError(
                f"kv_cache{who}[{name!r}] has batch {k.shape[0]}; expected 1 (broadcast) or the batch size {batch_size}"
            )
        if not k.is_floating_point() or not v.is_floating_point():
            raise KVCacheError(f"kv_cache{who}[{name!r}] must be floating point, got {k.dtype}/{v.dtype}")


def _check_third_entry(extra: object, k: Tensor, where: str) -> None:
    """A bool ``valid`` mask ``[batch, tokens]`` or a float logit bias ``[1 or batch, tokens]``."""
    if isinstance(extra, Tensor) and extra.dtype == torch.bool and extra.shape == k.shape[:2]:
        return
    if (
        isinstance(extra, Tensor)
        and extra.is_floating_point()
        and extra.ndim == 2
        and extra.shape[0] in (1, k.shape[0])
        and extra.shape[1] == k.shape[1]
    ):
        return
    raise KVCacheError(
        f"{where} third entry must be a bool mask [batch, tokens] = {list(k.shape[:2])} or a float "
        f"logit bias [1 or batch, {k.shape[1]}], got {getattr(extra, 'shape', type(extra).__name__)}"
        + (f" of {extra.dtype}" if isinstance(extra, Tensor) else "")
    )


def _summarize_names(specs: Mapping[str, KVBlockSpec]) -> str:
    names = list(specs)
    return f"[{names[0]!r} ... {names[-1]!r}] ({len(names)} blocks)" if len(names) > 6 else repr(names)


# --- rotary position embedding -------------------------------------------------------------------


def check_rope_axes(axes: Sequence[int], head_dim: int, name: str) -> None:
    """RoPE axis sizes must be even (rotations act on pairs), non-negative (a 0-size axis is simply not
    rotated) and sum to ``head_dim``; ``name`` says whose field is wrong."""
    if sum(axes) != head_dim or any(a < 0 or a % 2 for a in axes):
        raise ValueError(
            f"{name} {tuple(axes)} must be even, non-negative sizes summing to head_dim {head_dim}"
        )


def rope_cos_sin(ids: Tensor, axes_dims: tuple[int, ...], theta: float) -> tuple[Tensor, Tensor]:
    """Per-axis rotary tables for position ids ``[..., N, n_axes]``; returns cos, sin ``[..., N, sum(axes)]``.

    Angles are computed in float64 and rounded to float32 once, as the reference does, so positions
    in the thousands (edit images sit at t = 10, 20, ...) keep their precision.
    """
    if ids.shape[-1] != len(axes_dims):
        raise ValueError(
            f"position ids have {ids.shape[-1]} axes; this model's RoPE expects {len(axes_dims)}"
        )
    float64 = torch.float64 if ids.device.type != "mps" else torch.float32
    pos = ids.to(float64)
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=float64, device=ids.device) / dim))
        angles = pos[..., axis, None] * inv_freq  # [..., N, dim/2]
        cos.append(angles.cos().repeat_interleave(2, dim=-1))
        sin.append(angles.sin().repeat_interleave(2, dim=-1))
    return torch.cat(cos, dim=-1).float(), torch.cat(sin, dim=-1).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs of ``x [B, S, H, D]`` by tables ``[S, D]`` or ``[B, S, D]`` (in float32)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    pairs = x.float().unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos + rotated * sin).to(x.dtype)
