"""``lora_bank``: N LoRAs over the same DiT modules; inputs pick, weight and merge some of them.

Aesthetic alignment: LoRA ``i`` is trained on images of preference level ``i`` (the aesthetic data
processor maps a score to a level), so ``lora_ids=[3]`` asks for the most preferred look and
``lora_ids=[0, 3], lora_scales=[-1, 1]`` steers away from one level towards another.

The selected LoRAs are merged into one LoRA cache by rank concatenation with each scale folded into
its A rows (the deltas add: ``sum_i s_i B_i A_i``); ``merge_type="mean"`` divides every scale by the
number selected. The scales are folded in ``process_inputs``, so a stage-I feature cache holds only
ids and scales. Every B starts at zero: an untrained bank is an exact no-op.

Parameters per LoRA: ``rank * (in + out)`` per module; at klein-4B size (4 LoRAs of rank 8 over the
image-stream q/k/v/out of the 5 double blocks and attn.to_out of the 20 single blocks): 13.8 M;
klein-9B: 24.1 M.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..base import TemplateModel
from ..registry import register_architecture
from ..schema import InputField, InputSchema, TemplateInputError
from ._common import LoRATargetsConfig, TemplateConfigError, module_key, parameter_device

MERGE_TYPES = ("sum", "mean")


@dataclass
class LoRABankConfig(LoRATargetsConfig):
    rank: int = 8
    num_loras: int = 4  # e.g. aesthetic preference levels 0..3
    merge_type: str = "sum"  # default when the input gives none

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        if isinstance(self.num_loras, bool) or not isinstance(self.num_loras, int) or self.num_loras <= 0:
            raise TemplateConfigError(f"{owner}.num_loras must be a positive integer, got {self.num_loras!r}")
        if self.merge_type not in MERGE_TYPES:
            raise TemplateConfigError(
                f"{owner}.merge_type is {self.merge_type!r}; expected one of {MERGE_TYPES}"
            )


class LoRAStack(nn.Module):
    """N LoRAs of one module: ``lora_A [N, rank, in]``, ``lora_B [N, out, rank]`` (zero)."""

    def __init__(self, num_loras: int, in_features: int, out_features: int, rank: int):
        super().__init__()
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default init range for A
        self.lora_A = nn.Parameter(torch.empty(num_loras, rank, in_features).uniform_(-bound, bound))
        self.lora_B = nn.Parameter(torch.zeros(num_loras, out_features, rank))

    def forward(self, ids: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
        """The selected LoRAs concatenated along the rank: ``A [k * rank, in]``, ``B [out, k * rank]``."""
        a = (self.lora_A[ids] * scales[:, None, None].to(self.lora_A.dtype)).flatten(0, 1)
        b = self.lora_B[ids].permute(1, 0, 2).flatten(1)  # column block i pairs with A's row block i
        return a, b


@register_architecture("lora_bank")
class LoRABank(TemplateModel):
    """``lora_ids`` (+ ``lora_scales``, ``merge_type``) -> ``{"lora": ...}`` for the configured modules."""

    config_class = LoRABankConfig
    input_schema = InputSchema(
        [
            InputField(
                "lora_ids", "list[int]", minimum=0, description="which LoRAs (e.g. preference levels)"
            ),
            InputField(
                "lora_scales", "list[float]", required=False, description="one weight per id (default 1)"
            ),
            InputField("merge_type", "str", required=False, description="'sum' (default) or 'mean'"),
        ]
    )
    cache_keys = ("lora",)

    def __init__(self, config: LoRABankConfig):
        super().__init__()
        self.config = config
        self.input_schema = InputSchema(
            [
                InputField(
                    "lora_ids",
                    "list[int]",
                    minimum=0,
                    maximum=config.num_loras - 1,
                    description=f"which of the {config.num_loras} LoRAs",
                ),
                *type(self).input_schema.fields[1:],
            ]
        )
        self.loras = nn.ModuleDict(
            {
                module_key(m): LoRAStack(config.num_loras, i, o, config.rank)
                for m, i, o in zip(config.modules, config.in_features, config.out_features)
            }
        )

    @torch.no_grad()
    def process_inputs(
        self,
        pipe: Any = None,
        lora_ids: Any = None,
        lora_scales: Any = None,
        merge_type: str | None = None,
        **inputs: Any,
    ) -> dict[str, Tensor]:
        """``{"lora_ids": [k] int64, "lora_scales": [k] float32}`` with the merge folded into the scales."""
        n = self.config.num_loras
        if lora_ids is None:
            raise TemplateInputError(f"lora_bank: missing input 'lora_ids' (a list of ids in [0, {n - 1}])")
        ids = list(lora_ids) if isinstance(lora_ids, (list, tuple)) else [lora_ids]
        if not ids:
            raise TemplateInputError("lora_bank: lora_ids is empty; give at least one id")
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                raise TemplateInputError(
                    f"lora_bank: lora id {i!r} is out of range; this bank holds ids 0..{n - 1}"
                )
        scales = [1.0] * len(ids) if lora_scales is None else lora_scales
        scales = list(scales) if isinstance(scales, (list, tuple)) else [scales]
        if len(scales) != len(ids):
            raise TemplateInputError(
                f"lora_bank: {len(scales)} lora_scales for {len(ids)} lora_ids; give one scale per id"
            )
        if any(
            isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) for s in scales
        ):
            raise TemplateInputError(f"lora_bank: lora_scales must be finite numbers, got {scales!r}")
        merge_type = self.config.merge_type if merge_type is None else merge_type
        if merge_type not in MERGE_TYPES:
            raise TemplateInputError(
                f"lora_bank: unknown merge_type {merge_type!r}; use one of {MERGE_TYPES}"
            )
        if merge_type == "mean":
            scales = [s / len(ids) for s in scales]
        device = parameter_device(self)
        return {
            "lora_ids": torch.tensor(ids, dtype=torch.long, device=device),
            "lora_scales": torch.tensor(scales, dtype=torch.float32, device=device),
        }

    def forward(
        self,
        pipe: Any = None,
        lora_ids: Tensor | None = None,
        lora_scales: Tensor | None = None,
        **features: Any,
    ) -> dict[str, Any]:
        n = self.config.num_loras
        if (
            lora_ids is None
            or lora_scales is None
            or lora_ids.shape != lora_scales.shape
            or lora_ids.ndim != 1
        ):
            raise TemplateInputError(
                "lora_bank.forward needs 'lora_ids' and 'lora_scales', two 1-D tensors of equal length; "
                "pass the output of process_inputs"
            )
        if (
            lora_ids.numel()
            and lora_ids.device.type != "meta"
            and (int(lora_ids.min()) < 0 or int(lora_ids.max()) >= n)
        ):
            raise TemplateInputError(f"lora_bank: lora_ids {lora_ids.tolist()} are out of range 0..{n - 1}")
        device = parameter_device(self)
        ids, scales = lora_ids.to(device), lora_scales.to(device)
        lora = {}
        for module in self.config.modules:
            a, b = self.loras[module_key(module)](ids, scales)
            lora[f"{module}.lora_A.weight"] = a
            lora[f"{module}.lora_B.weight"] = b
        return {"lora": lora}
