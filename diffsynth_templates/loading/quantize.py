"""Compact weight storage for the ``nn.Linear`` layers of any module, computed in a wider dtype.

``store_weights(module, "float8_e4m3fn")`` keeps each large Linear weight in FP8 with a float32 scale
per output channel (or one per tensor) and dequantizes it to the input's dtype at every call, so the
weights take about half their bf16 bytes while the arithmetic stays in bf16/fp32. Norms, embeddings,
biases, the input/output projections and time embedders (``DEFAULT_SKIP``) and small layers stay as
they are: they are a few percent of the bytes and the most precision-sensitive.

The layers stay ``nn.Linear`` instances (their class becomes a subclass in place), so forward hooks
(runtime LoRA branches), ``in_features``/``out_features`` and every module path keep working.

``"int8"`` and ``"nf4"`` (weight-only) go through torchao when it is installed (the ``quant`` extra);
without it they are refused with what to install.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DiffSynthTemplatesError

logger = logging.getLogger(__name__)

FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
TORCHAO_FORMATS = ("int8", "nf4")
STORAGE_FORMATS = FP8_FORMATS + TORCHAO_FORMATS
# module paths (regex, searched) whose Linears keep the compute dtype: input/output projections,
# time embedders, norms' own linears (AdaLN heads); a few percent of a DiT's bytes, most of its range
DEFAULT_SKIP = (
    r"(^|\.)(x_embedder|proj_in|proj_out|lm_head)$",
    r"(^|\.)all_x_embedder\.",
    r"(^|\.)all_final_layer\.",
    r"(^|\.)norm[^.]*\.",
    r"embedder\.",  # time_guidance_embed.timestep_embedder.*, t_embedder.mlp.*
    r"(^|\.)t_embedder\.",
)
MIN_ELEMENTS = 4096  # smaller Linears are not worth a dequantization per call
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256


class QuantizationError(DiffSynthTemplatesError, ValueError):
    """A storage format this torch or environment cannot provide, or a bad quantization option."""


def storage_format(value: str | torch.dtype) -> str:
    """``"float8_e4m3fn"``, ``"float8_e5m2"``, ``"int8"`` or ``"nf4"`` from a name or a torch dtype."""
    name = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
    if not isinstance(name, str) or name not in STORAGE_FORMATS:
        raise QuantizationError(
            f"weight storage {value!r} is not supported; use one of {list(STORAGE_FORMATS)} "
            "(torch.float8_e4m3fn, torch.float8_e5m2, or the strings 'int8' / 'nf4' with torchao installed)"
        )
    if name in FP8_FORMATS and not hasattr(torch, name):
        raise QuantizationError(
            f"this torch ({torch.__version__}) has no torch.{name}; FP8 weight storage needs torch >= 2.1: "
            "upgrade torch, or use weight_dtype=None"
        )
    return name


class FP8Linear(nn.Linear):
    """A Linear whose ``weight`` is FP8 and ``weight_scale`` float32 ``[out, 1]`` (or ``[1, 1]``).

    Its ``state_dict`` holds the dequantized ``weight`` (in the dtype it had before), so saving, copying
    weights into another module (``init_from_dit``) and fingerprints see an ordinary Linear; loading
    a wide ``weight`` into it quantizes that weight again.
    """

    weight_scale: Tensor
    source_dtype: torch.dtype = torch.float32

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        """The weight in ``dtype``: FP8 values are exact in bf16/fp16/fp32, then the scale applies."""
        return self.weight.to(dtype) * self.weight_scale.to(dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dequantized_weight(self.source_dtype).detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args):
        wide = state_dict.get(prefix + "weight")
        if wide is not None and wide.dtype != self.weight.dtype:
            q, scale = fp8_quantize(
                wide, str(self.weight.dtype).removeprefix("torch."), self.weight_scale.shape[0] > 1
            )
            state_dict = {**state_dict, prefix + "weight": q, prefix + "weight_scale": scale}
        super()._load_from_state_dict(state_dict, prefix, *args)


def fp8_quantize(weight: Tensor, fmt: str, per_channel: bool = True) -> tuple[Tensor, Tensor]:
    """``(q, scale)`` with ``q * scale ~= weight``: each row (or the tensor) scaled onto FP8's range."""
    dtype = getattr(torch, fmt)
    limit = torch.finfo(dtype).max
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1, 1)
    scale = torch.where(amax > 0, amax / limit, torch.ones_like(amax))
    q = (w / scale).clamp(-limit, limit).to(dtype)
    return q, scale


@dataclass
class StorageReport:
    """What ``store_weights`` did: layers converted and the weight bytes before and after."""

    storage: str
    layers: int
    kept: int  # Linears left in the compute dtype (skipped by name or size, or not divisible for NF4)
    bytes_before: int
    bytes_after: int


def store_weights(
    module: nn.Module,
    storage: str | torch.dtype,
    *,
    per_channel: bool = True,
    skip: Iterable[str] = DEFAULT_SKIP,
    min_elements: int = MIN_ELEMENTS,
) -> StorageReport:
    """Convert ``module``'s large ``nn.Linear`` weights in place to ``storage``; see the module doc."""
    fmt = storage_format(storage)
    patterns = [re.compile(p) for p in skip]
    before = module_weight_bytes(module)
    chosen, kept = [], 0
    for name, layer in module.named_modules():
        if not isinstance(layer, nn.Linear) or isinstance(layer, FP8Linear) or _is_quantized(layer):
            continue
        if any(p.search(name) for p in patterns) or layer.weight.numel() < min_elements:
            kept += 1
            continue
        chosen.append(layer)
    if fmt in TORCHAO_FORMATS:
        kept += _store_torchao(chosen, fmt)
    else:
        for layer in chosen:
            _to_fp8(layer, fmt, per_channel)
    report = StorageReport(fmt, len(chosen), kept, before, module_weight_bytes(module))
    logger.info(
        "%s: %d Linear weights stored as %s (%d kept), %.1f -> %.1f MiB",
        type(module).__name__, report.layers, fmt, kept, before / 2**20, report.bytes_after / 2**20,
    )  # fmt: skip
    return report


def _to_fp8(layer: nn.Linear, fmt: str, per_channel: bool) -> None:
    q, scale = fp8_quantize(layer.weight, fmt, per_channel)
    source = layer.weight.dtype
    layer.weight = nn.Parameter(q, requires_grad=False)
    layer.__class__ = FP8Linear
    layer.source_dtype = source
    layer.register_buffer("weight_scale", scale)


def _is_quantized(layer: nn.Linear) -> bool:
    return type(layer.weight.data) is not torch.Tensor or layer.weight.dtype in (torch.int8, torch.uint8)


def _store_torchao(layers: list[nn.Linear], fmt: str) -> int:
    """int8 / NF4 weight-only through torchao; returns how many layers NF4's blocking could not take."""
    try:
        import torchao.quantization as tq
    except ImportError as e:
        raise QuantizationError(
            f"weight storage {fmt!r} needs torchao: pip install 'diffsynth-templates[quant]' (or torchao); "
            "or use float8_e4m3fn, which needs nothing beyond torch"
        ) from e
    left = 0
    for layer in layers:
        if fmt == "int8":
            tq.quantize_(layer, tq.Int8WeightOnlyConfig())
        elif layer.weight.numel() % (NF4_BLOCK * NF4_SCALER_BLOCK) == 0:
            nf4 = tq.to_nf4(layer.weight.detach(), NF4_BLOCK, NF4_SCALER_BLOCK)
            layer.weight = nn.Parameter(nf4, requires_grad=False)
        else:
            left += 1
    return left


def module_weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer as stored (quantized tensors: their packed bytes)."""
    return sum(tensor_bytes(t) for t in [*module.parameters(), *module.buffers()])


def tensor_bytes(t: Tensor) -> int:
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t) is not torch.Tensor and type(t) is not nn.Parameter:
        names, _ = inner()  # a torchao tensor subclass: the sum of its packed inner tensors
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def cast_unquantized(module: nn.Module, old: torch.dtype, new: torch.dtype) -> None:
    """Parameters and buffers still in ``old`` (the pipeline's former dtype) moved to ``new``; FP8
    weights, scales and deliberately float32 tensors (``keep_fp32`` ones) are left as they are."""
    if old == new:
        return
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for key, t in store.items():
                if key == "weight_scale" or t is None or t.dtype != old or type(t.data) is not torch.Tensor:
                    continue
                t.data = t.data.to(new)
