"""A trainable LoRA on the DiT's Linear layers, applied through the same runtime hooks as inference.

The LoRA never touches the DiT's weights: ``cache()`` returns it in the LoRA-cache format of
DESIGN.md 4.2 (``{module}.lora_A.weight`` ``[r, in]``, ``{module}.lora_B.weight`` ``[out, r]``) and the
objective applies it with ``applied_lora``, like a template's LoRA. The saved file is that same
dict, with ``alpha / rank`` folded into B, so it loads as a pipeline's ``lora=`` argument as is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..pipelines.families import FAMILIES
from ..pipelines.lora import LoRAError
from ..pipelines.lora_files import save_lora_file


def match_lora_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Linear layers whose dotted path equals a target or ends with ``.{target}``."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(name == t or name.endswith(f".{t}") for t in targets)
    ]
    if not names:
        raise ValueError(
            f"--lora_target_modules {list(targets)} match no Linear layer of {type(model).__name__}; "
            "give suffixes of Linear paths such as to_q,to_k,to_v,to_out.0"
        )
    return names


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot hold dots


class DiTLoRA(nn.Module):
    def __init__(
        self, dit: nn.Module, rank: int, targets: Sequence[str], alpha: float | None = None, seed: int = 0
    ):
        super().__init__()
        self.rank, self.scale = rank, (alpha if alpha is not None else rank) / rank
        self.module_names = match_lora_targets(dit, targets)
        layers = dict(dit.named_modules())
        generator = torch.Generator().manual_seed(seed)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name in self.module_names:
            layer = layers[name]
            # the usual LoRA start: A like a Linear's default init, B zero, so training starts at the base model
            bound = 1 / math.sqrt(layer.in_features)
            a = (torch.rand(rank, layer.in_features, generator=generator) * 2 - 1) * bound
            self.lora_A[_key(name)] = nn.Parameter(a.to(layer.weight.device))
            self.lora_B[_key(name)] = nn.Parameter(
                torch.zeros(layer.out_features, rank, device=layer.weight.device)
            )

    def cache(self) -> dict[str, Tensor]:
        out = {}
        for name in self.module_names:
            out[f"{name}.lora_A.weight"] = self.lora_A[_key(name)]
            out[f"{name}.lora_B.weight"] = self.lora_B[_key(name)] * self.scale
        return out

    def load_cache(self, lora: dict[str, Tensor]) -> None:
        """Inverse of ``cache()`` (for resuming from a saved LoRA file)."""
        expected = {f"{n}.lora_{p}.weight" for n in self.module_names for p in "AB"}
        if set(lora) != expected:
            raise ValueError(
                f"the LoRA file does not match this DiT LoRA: missing {sorted(expected - set(lora))[:5]}, "
                f"unexpected {sorted(set(lora) - expected)[:5]}; were --lora_rank/--lora_target_modules changed?"
            )
        with torch.no_grad():
            for name in self.module_names:
                self.lora_A[_key(name)].copy_(lora[f"{name}.lora_A.weight"])
                self.lora_B[_key(name)].copy_(lora[f"{name}.lora_B.weight"] / self.scale)


def export_dit_lora(
    lora: Mapping[str, Tensor], dit_config: dict, fmt: str | None, folder: Path
) -> Path | None:
    """``--lora_export_format``: the trained LoRA also as ``dit_lora_{fmt}.safetensors`` in the ComfyUI
    (BFL names) or diffusers layout, next to our ``dit_lora.safetensors``; the family is read from
    the DiT config's ``_class_name``."""
    if not fmt:
        return None
    name = dit_config.get("_class_name")
    family = next((f for f in FAMILIES.values() if name in f.class_names), None)
    if family is None:
        raise LoRAError(f"cannot export a LoRA for a DiT of class {name!r}: not one of our backbones")
    return save_lora_file(lora, Path(folder) / f"dit_lora_{fmt}.safetensors", family, fmt)
