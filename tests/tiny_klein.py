"""A tiny FLUX.2-klein folder in the official layout, written by diffusers and transformers.

transformer/ (Flux2Transformer2DModel, sharded), vae/ (AutoencoderKLFlux2 with non-trivial BatchNorm
statistics), text_encoder/ (Qwen3ForCausalLM, 28 layers so layers 9/18/27 exist, sharded),
tokenizer/ (tokenizer.json with Qwen's special tokens + tokenizer_config.json), scheduler/.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.backbones.test_qwen3 import tiny_hf_qwen3
from tests.pipelines.test_flux2_prompt import QWEN3_CHAT_TEMPLATE, tiny_qwen_tokenizer

TEXT_HIDDEN = 32  # tiny_hf_qwen3's width; the DiT sees 3 layers side by side
KLEIN_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}


def tiny_transformer(seed: int = 0):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(
        in_channels=128,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * TEXT_HIDDEN,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        block_out_channels=(16, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=32,
    ).eval()
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.1)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    return vae


def save_tiny_tokenizer(root: Path):
    """The tiny Qwen tokenizer in ``root/tokenizer/`` as the official repos ship it (both families')."""
    tok = tiny_qwen_tokenizer()
    (root / "tokenizer").mkdir(parents=True)
    tok.save(str(root / "tokenizer" / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "pad_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "bos_token": None,
        "model_max_length": 131072,
        "chat_template": QWEN3_CHAT_TEMPLATE,
    }
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return tok


def build_tiny_klein(root: Path) -> Path:
    tok = save_tiny_tokenizer(root)
    tiny_hf_qwen3(vocab_size=tok.get_vocab_size(), seed=5).save_pretrained(
        root / "text_encoder", max_shard_size="100KB"
    )
    tiny_transformer().save_pretrained(root / "transformer", max_shard_size="50KB")
    tiny_vae().save_pretrained(root / "vae")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(KLEIN_SCHEDULER))
    return root


def diffusers_klein_pipeline(root: Path):
    """diffusers' Flux2KleinPipeline on the same folder (built from parts: no model_index.json needed)."""
    import transformers
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
        vae=AutoencoderKLFlux2.from_pretrained(root / "vae").eval(),
        text_encoder=transformers.Qwen3ForCausalLM.from_pretrained(root / "text_encoder").eval(),
        tokenizer=transformers.AutoTokenizer.from_pretrained(root / "tokenizer"),
        transformer=Flux2Transformer2DModel.from_pretrained(root / "transformer").eval(),
    )
