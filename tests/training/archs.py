"""Tiny template architectures for trainer tests; ``--import_modules tests.training.archs`` registers them.

``test_masked_kv`` reads an image and a mask (the ``inpaint`` processor draws a random mask per
sample), so stage I and ``--task full`` must seed processing per sample to agree. Importing this
module also registers ``test_scalar_kv`` / ``test_constant_lora`` from the template tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import tests.templates.helpers  # noqa: F401  (registers test_scalar_kv, test_constant_lora)
from diffsynth_templates.templates import TemplateModel, register_architecture

POOL = 4  # image and mask are average-pooled to POOL x POOL


@dataclass
class MaskedKVConfig:
    block_names: tuple[str, ...] = ("double_0", "single_1")
    heads: int = 2
    head_dim: int = 16
    length: int = 3

    def __post_init__(self):
        self.block_names = tuple(self.block_names)


@register_architecture("test_masked_kv")
class MaskedKV(TemplateModel):
    """(image, mask) -> pooled pixels -> per-block KV tokens."""

    config_class = MaskedKVConfig
    cache_keys = ("kv_cache",)

    def __init__(self, config: MaskedKVConfig):
        super().__init__()
        self.config = config
        width = config.length * config.heads * config.head_dim
        self.proj = nn.ModuleDict({b: nn.Linear(4 * POOL * POOL, 2 * width) for b in config.block_names})

    @torch.no_grad()
    def process_inputs(self, pipe=None, image=None, mask=None, **kwargs):
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
        mask_t = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255)[None]
        both = F.adaptive_avg_pool2d(torch.cat([pixels, mask_t])[None], POOL)
        return {"pooled": both.flatten(1), "coverage": float(mask_t.mean())}

    def forward(self, pipe=None, pooled=None, **kwargs):
        c = self.config
        kv = {}
        for name, proj in self.proj.items():
            k, v = proj(pooled.to(proj.weight.dtype)).view(1, c.length, 2, c.heads, c.head_dim).unbind(2)
            kv[name] = (k, v)
        return {"kv_cache": kv}


@dataclass
class EverythingConfig:
    text_dim: int = 96
    lora_module: str = "single_transformer_blocks.0.attn.to_out"
    lora_in: int = 128
    lora_out: int = 32


@register_architecture("test_everything")
class Everything(TemplateModel):
    """Emits every trained cache key at once (KV, LoRA, extra text tokens) plus a sampling-only one."""

    config_class = EverythingConfig
    cache_keys = ("kv_cache", "lora", "extra_text_embedding", "inpaint_mask")

    def __init__(self, config: EverythingConfig):
        super().__init__()
        self.config = config
        self.kv = nn.Parameter(torch.randn(2, 1, 2, 2, 16) * 0.5)
        self.text = nn.Parameter(torch.randn(1, 2, config.text_dim))
        self.lora_a = nn.Parameter(torch.randn(2, config.lora_in) * 0.1)
        self.lora_b = nn.Parameter(torch.randn(config.lora_out, 2) * 0.1)

    def forward(self, pipe=None, strength: float = 1.0, **kwargs):
        m = self.config.lora_module
        return {
            "kv_cache": {"single_1": (self.kv[0] * strength, self.kv[1])},
            "lora": {f"{m}.lora_A.weight": self.lora_a * strength, f"{m}.lora_B.weight": self.lora_b},
            "extra_text_embedding": self.text * strength,
            "inpaint_mask": torch.ones(1, 1, 4, 4),
        }
