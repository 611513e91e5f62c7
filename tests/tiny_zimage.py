"""A tiny Z-Image (Turbo) folder in the official layout, written by diffusers and transformers.

transformer/ (ZImageTransformer2DModel, sharded), vae/ (AutoencoderKL, 16 latent channels, scaling and
shift factors, no quant convs), text_encoder/ (Qwen3ForCausalLM), tokenizer/ (tokenizer.json with Qwen's
special tokens and a tokenizer_config.json carrying the chat template) and scheduler/ (static shift 3.0).
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
import transformers

from tests.tiny_klein import save_tiny_tokenizer

SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
}


# the tiny Z-Image VAE (diffusers AutoencoderKL, no quant convs, as Z-Image ships it)
TINY_VAE = dict(
    block_out_channels=(16, 32),
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=16,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def _randomize(model, scale: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.add_(torch.randn_like(p) * scale)


def build_tiny_zimage(root: Path) -> Path:
    torch.manual_seed(0)
    tok = save_tiny_tokenizer(root)
    text_encoder = transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(
            vocab_size=tok.get_vocab_size(),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=512,
        )
    ).eval()
    _randomize(text_encoder, 0.2)
    text_encoder.save_pretrained(root / "text_encoder", max_shard_size="20KB")
    transformer = diffusers.ZImageTransformer2DModel(
        dim=64,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=32,
        axes_dims=[8, 12, 12],
        axes_lens=[256, 64, 64],
    ).eval()
    _randomize(transformer, 0.05)
    transformer.save_pretrained(root / "transformer", max_shard_size="50KB")
    diffusers.AutoencoderKL(**TINY_VAE).save_pretrained(root / "vae")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return root
