"""``--base_weight_dtype float8_e4m3fn``: stage II's frozen DiT is stored in FP8 while the template (and
a DiT LoRA) train in full precision; full fine-tuning with it is refused."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file

from diffsynth_templates.loading.quantize import FP8Linear
from diffsynth_templates.training.config import ConfigError, parse_args
from diffsynth_templates.training.trainer import run
from tests.training.helpers import SMALL


def config(*args):
    return parse_args([str(a) for a in args])


def test_a_template_trains_through_an_fp8_base_dit(base_model, dataset, tmp_path):
    from diffsynth_templates.templates.zoo import ImageKVConfig

    structure = json.dumps(asdict(ImageKVConfig.tiny(key_norm=True)))
    common = ["--model", base_model, "--dataset_metadata_path", dataset, "--architecture", "image_kv",
              "--architecture_config", structure, "--data_processor", "inpaint", *SMALL,
              "--trainable_models", "template,dit_lora", "--lora_rank", 2, "--max_steps", 3]  # fmt: skip
    seen = {}

    def built(model, optimizer):
        seen["fp8"] = [n for n, m in model.named_modules() if isinstance(m, FP8Linear)]
        seen["trainable_dtypes"] = {p.dtype for p in model.parameters() if p.requires_grad}

    result = run(config("--task", "full", "--output_path", tmp_path / "fp8", "--base_weight_dtype",
                        "float8_e4m3fn", "--template_init", "dit", *common), built)  # fmt: skip
    assert seen["fp8"] and seen["trainable_dtypes"] == {torch.float32}
    assert all(torch.isfinite(torch.tensor(result.losses))) and len(result.losses) == 3
    trained = load_file(result.checkpoint / "model.safetensors")
    assert all(t.dtype != torch.float8_e4m3fn for t in trained.values())  # the template stays wide
    # init_from_dit read the FP8 DiT's dequantized weights: close to the checkpoint's own
    dit = load_file(base_model / "transformer" / "diffusion_pytorch_model.safetensors")
    name = "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight"
    assert torch.allclose(trained[name].float(), dit[name].float(), rtol=0.07, atol=1e-3)

    wide = run(
        config("--task", "full", "--output_path", tmp_path / "wide", "--template_init", "dit", *common)
    )
    # the same run with the wide base: close losses (FP8 changes the frozen weights by ~2-6%)
    assert abs(result.losses[0] - wide.losses[0]) < 0.1 * abs(wide.losses[0]) + 1e-3


def test_base_weight_dtype_is_refused_with_full_dit_training_and_checked():
    base = ["--model", "m", "--cache_path", "c", "--output_path", "o", "--max_steps", 1]
    with pytest.raises(ConfigError, match="--trainable_models has dit"):
        config(*base, "--base_weight_dtype", "float8_e4m3fn", "--trainable_models", "dit")
    with pytest.raises(ConfigError, match="base_weight_dtype"):
        config(*base, "--base_weight_dtype", "int4", "--trainable_models", "dit_lora")
    assert config(*base, "--trainable_models", "dit").base_weight_dtype is None
    assert config(
        *base, "--base_weight_dtype", "float8_e4m3fn", "--trainable_models", "dit_lora"
    ).base_weight_dtype
