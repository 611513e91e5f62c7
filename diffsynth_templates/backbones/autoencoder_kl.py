"""The standard diffusers ``AutoencoderKL`` (the FLUX.1 / Z-Image 16-channel VAE and its relatives).

Images in [-1, 1] go to ``latent_channels`` latents at 1/8 resolution and back. The encoder and
decoder are the very same networks as the FLUX.2 VAE's (diffusers builds both from the same
``Encoder`` / ``Decoder`` classes: ResNet down/up blocks, a mid block with single-head attention,
GroupNorm eps 1e-6), so they are imported from ``flux2_vae`` rather than written twice. What differs
is around them: no BatchNorm statistics and no 2x2 patchify; instead the DiT sees
``(latents - shift_factor) * scaling_factor``, and the 1x1 quant convs are optional (the official
Z-Image VAE has neither). Parameter names follow the official ``vae/`` checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import Tensor, nn

from ..loading.model_loading import PretrainedModule
from .flux2_vae import DOWN_BLOCK, UP_BLOCK, Decoder, Encoder, Flux2VAEConfig, check_image, check_latents

logger = logging.getLogger(__name__)

# Config keys that describe nothing this module needs (tiling defaults, training hints).
_IGNORED_CONFIG_KEYS = {"sample_size", "force_upcast", "latents_mean", "latents_std"}


@dataclass
class AutoencoderKLConfig:
    """``vae/config.json`` of a diffusers ``AutoencoderKL``; defaults are diffusers' own."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    act_fn: str = "silu"
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    down_block_types: tuple[str, ...] | None = None  # None: DOWN_BLOCK for every level
    up_block_types: tuple[str, ...] | None = None  # None: UP_BLOCK for every level
    extra: dict = field(default_factory=dict, repr=False, compare=False)  # unknown keys, kept as read

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        levels = len(self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types or (DOWN_BLOCK,) * levels)
        self.up_block_types = tuple(self.up_block_types or (UP_BLOCK,) * levels)
        if not self.scaling_factor > 0:
            raise ValueError(f"AutoencoderKLConfig.scaling_factor must be > 0, got {self.scaling_factor}")
        self.networks()  # validates widths, groups and block types with the shared encoder/decoder rules

    def networks(self) -> Flux2VAEConfig:
        """The encoder/decoder architecture, in the form the shared ``Encoder`` / ``Decoder`` read."""
        return Flux2VAEConfig(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups,
            act_fn=self.act_fn,
            mid_block_add_attention=self.mid_block_add_attention,
            down_block_types=self.down_block_types,
            up_block_types=self.up_block_types,
        )

    @classmethod
    def from_dict(cls, d: Mapping) -> AutoencoderKLConfig:
        """Read ``vae/config.json`` as diffusers writes it; unknown keys are logged and kept in ``extra``."""
        class_name = d.get("_class_name")
        if class_name not in (None, "AutoencoderKL"):
            raise ValueError(
                f"config is for {class_name!r}, not diffusers' AutoencoderKL; point at a vae/ folder of that class"
            )
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and not k.startswith("_")}
        unexpected = sorted(set(extra) - _IGNORED_CONFIG_KEYS)
        if unexpected:
            logger.warning("AutoencoderKLConfig ignores unknown config keys %s", unexpected)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k != "extra"}
        return {"_class_name": "AutoencoderKL", **self.extra, **d}

    @classmethod
    def flux1(cls) -> AutoencoderKLConfig:
        """The 16-channel FLUX.1 VAE that Z-Image ships as ``vae/``."""
        return cls(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=16,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class AutoencoderKL(PretrainedModule, nn.Module):
    config_class = AutoencoderKLConfig

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        self.config = config
        networks = config.networks()
        self.encoder = Encoder(networks)
        self.decoder = Decoder(networks)
        moments = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(moments, moments, 1) if config.use_quant_conv else None
        self.post_quant_conv = (
            nn.Conv2d(config.latent_channels, config.latent_channels, 1)
            if config.use_post_quant_conv
            else None
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    # --- pixels <-> latents ---

    def encode(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> the posterior mode (mean) ``[B, latent_channels, H/8, W/8]``."""
        mean, _logvar = self.encoder_moments(images).chunk(2, dim=1)
        return mean

    def encoder_moments(self, images: Tensor) -> Tensor:
        """The posterior's mean and log-variance stacked on channels (training needs both)."""
        check_image(images, self.config.in_channels, self.config.downsample_factor, "AutoencoderKL.encode")
        moments = self.encoder(images.to(self.dtype))
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def decode(self, latents: Tensor) -> Tensor:
        """``[B, latent_channels, h, w]`` -> images ``[B, 3, 8h, 8w]``, unclamped."""
        check_latents(latents, self.config.latent_channels, 1, "AutoencoderKL.decode")
        latents = latents.to(self.dtype)
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    # --- VAE latents <-> the DiT's normalized latents ---

    def normalize(self, latents: Tensor) -> Tensor:
        """``(x - shift_factor) * scaling_factor``: what the DiT is trained on."""
        return (latents - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def denormalize(self, latents: Tensor) -> Tensor:
        """``x / scaling_factor + shift_factor``: back to what the decoder reads."""
        return latents / self.config.scaling_factor + (self.config.shift_factor or 0.0)

    def encode_to_dit(self, images: Tensor) -> Tensor:
        return self.normalize(self.encode(images))

    def decode_from_dit(self, latents: Tensor) -> Tensor:
        return self.decode(self.denormalize(latents))
