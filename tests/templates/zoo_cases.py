"""The zoo at its tiny configs, per family: what the zoo tests build, feed and call, shared by
tests/templates/test_zoo.py, test_zoo_zimage.py and the twin tests in test_zoo_families.py."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from diffsynth_templates.pipelines.lora import validate_lora
from diffsynth_templates.templates.zoo import (
    ImageKV,
    ImageKVConfig,
    ImageLoRA,
    ImageLoRAConfig,
    Inpaint,
    InpaintConfig,
    LoRABank,
    LoRABankConfig,
    ValueKV,
    ValueKVConfig,
)

CALL = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=0, max_sequence_length=16)


def rgb(size: int = 32, seed: int = 0) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(array)


def half_mask(size: int = 32) -> np.ndarray:
    mask = np.zeros((size, size), np.float32)
    mask[:, size // 2 :] = 1.0  # regenerate the right half
    return mask


def perturb_zeros(model: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero-initialized parts (V projections, LoRA B) random values, so the template acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def check_cache(pipe, cache: dict) -> None:
    if "kv_cache" in cache:
        pipe.dit.validate_kv_cache(cache["kv_cache"], batch_size=1)
    if "lora" in cache:
        validate_lora(pipe.dit, cache["lora"])


# every architecture at its tiny config: task -> (build, template inputs), per family
TINY = {
    "flux2": {
        "brightness": (lambda: ValueKV(ValueKVConfig.tiny()), {"scale": 0.7}),
        "color": (
            lambda: ValueKV(ValueKVConfig.tiny(values=("R", "G", "B"))),
            {"R": 0.9, "G": 0.1, "B": 0.4},
        ),
        "age": (lambda: ValueKV(ValueKVConfig.tiny(values=("age",), ranges=((0, 100),))), {"age": 42.0}),
        "structure": (lambda: ImageKV(ImageKVConfig.tiny()), {"image": rgb()}),
        "edit": (
            lambda: ImageKV(ImageKVConfig.tiny(use_prompt=True)),
            {"image": rgb(), "prompt": "a blue square"},
        ),
        "super_resolution": (lambda: ImageKV(ImageKVConfig.tiny(upscale=2.0)), {"image": rgb(16)}),
        "inpaint": (lambda: Inpaint(InpaintConfig.tiny()), {"image": rgb(), "mask": half_mask()}),
        "image_lora": (lambda: ImageLoRA(ImageLoRAConfig.tiny()), {"image": rgb()}),
        "lora_bank": (
            lambda: LoRABank(LoRABankConfig.tiny()),
            {"lora_ids": [0, 2], "lora_scales": [0.5, -1.0], "merge_type": "mean"},
        ),
    },
    "zimage": {
        "brightness": (lambda: ValueKV(ValueKVConfig.tiny_zimage()), {"scale": 0.7}),
        "color": (
            lambda: ValueKV(ValueKVConfig.tiny_zimage(values=("R", "G", "B"))),
            {"R": 0.9, "G": 0.1, "B": 0.4},
        ),
        "structure": (lambda: ImageKV(ImageKVConfig.tiny_zimage()), {"image": rgb()}),
        "edit": (
            lambda: ImageKV(ImageKVConfig.tiny_zimage(use_prompt=True)),
            {"image": rgb(), "prompt": "a blue square"},
        ),
        "super_resolution": (lambda: ImageKV(ImageKVConfig.tiny_zimage(upscale=2.0)), {"image": rgb(16)}),
        "inpaint": (lambda: Inpaint(InpaintConfig.tiny_zimage()), {"image": rgb(), "mask": half_mask()}),
        "image_lora": (lambda: ImageLoRA(ImageLoRAConfig.tiny_zimage()), {"image": rgb()}),
        "lora_bank": (
            lambda: LoRABank(LoRABankConfig.tiny_zimage()),
            {"lora_ids": [0, 2], "lora_scales": [0.5, -1.0], "merge_type": "mean"},
        ),
    },
}

# (family, task) pairs, ids "flux2-brightness", "zimage-brightness", ...
TINY_CASES = [(family, task) for family in TINY for task in sorted(TINY[family])]
TINY_IDS = [f"{family}-{task}" for family, task in TINY_CASES]
