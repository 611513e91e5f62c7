"""The toy models' shapes: the same classes as the real FLUX.2 stack, small configs.

``scripts/build_toy_base.py`` and ``scripts/train_toy_vae.py`` build the shipped models from these.
"""

from __future__ import annotations

from diffsynth_templates.backbones.flux2_dit import Flux2DiTConfig
from diffsynth_templates.toy import world

TEXT_HIDDEN = 64  # hidden size of the tiny Qwen3 text encoder
# what the toy model is made for; infer.py uses these when the user gives no size, steps or cfg
GENERATION_DEFAULTS = {"height": 64, "width": 64, "num_inference_steps": 20, "cfg_scale": 1.0}

# 32 latent channels like the official FLUX.2 VAE, but three levels (4x downsampling) instead of four:
# 32 channels per 4x4 RGB patch (1.5x compression) so the round trip, which the inpainting hard
# constraint keeps outside the mask, can approach the 35 dB target. An 8x VAE (6x compression) of this
# size plateaued near 25 dB on 128 px toy images.
TOY_VAE_CONFIG = dict(
    block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=32
)


def toy_vocabulary() -> list[str]:
    """Every word a toy caption (wrapped in Qwen's chat roles) can hold, in a fixed order."""
    words = ["a", "an", "and", "at", "the", "on", "to", "background", "gradient", "user", "assistant"]
    for group in (world.SHAPE_COLORS, world.BACKGROUND_COLORS, world.SHAPE_KINDS, world.SIZES):
        words += list(group)
    for position in world.POSITIONS:
        words += position.split()
    return list(dict.fromkeys(words))


def toy_dit_config(latent_channels: int) -> Flux2DiTConfig:
    return Flux2DiTConfig(
        in_channels=4 * latent_channels,
        num_double_blocks=2,
        num_single_blocks=4,
        num_heads=3,
        head_dim=64,
        text_dim=3 * TEXT_HIDDEN,
        axes_dims_rope=(16, 16, 16, 16),
    )
