"""The FLUX.2 VAE: a KL autoencoder with 32 latent channels and frozen BatchNorm statistics.

Images in [-1, 1] go to 32-channel latents at 1/8 resolution; the DiT sees those latents folded
2x2 into 128 channels at 1/16 resolution and normalized by the BatchNorm running statistics stored in
the checkpoint. Parameter names follow the official ``vae/diffusion_pytorch_model.safetensors`` (the
diffusers ``AutoencoderKLFlux2`` layout), so the checkpoint loads without renaming.

Precision choice: the 2 x 128 BatchNorm statistics are kept in float32 whatever the model dtype, and
``normalize`` / ``denormalize`` run in float32 before casting back. They are a shift and scale applied
to every latent, so rounding them to bfloat16 (diffusers does when the VAE is loaded in bf16) biases
all latents alike by up to 2^-8 relative; float32 costs 1 KiB and keeps the checkpoint's numbers
exact, and the bf16 output is then the float32 result rounded once. In float32 the result is
bit-identical to the klein pipeline.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..loading.model_loading import PretrainedModule
from .attention import attention

logger = logging.getLogger(__name__)

# Block types the official config names; they are the only ones this module implements.
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
# Every GroupNorm in the encoder and decoder uses this eps (it is not a config field).
NORM_EPS = 1e-6
# Config keys that describe nothing this module needs (tiling defaults, training hints).
_IGNORED_CONFIG_KEYS = {"sample_size", "force_upcast", "scaling_factor", "shift_factor"}


@dataclass
class Flux2VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None  # None: same as the encoder
    layers_per_block: int = 2
    latent_channels: int = 32
    norm_num_groups: int = 32
    act_fn: str = "silu"
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = 1e-4
    batch_norm_momentum: float = 0.1
    patch_size: tuple[int, int] = (2, 2)
    down_block_types: tuple[str, ...] | None = None  # None: DOWN_BLOCK for every level
    up_block_types: tuple[str, ...] | None = None  # None: UP_BLOCK for every level
    extra: dict = field(default_factory=dict, repr=False, compare=False)  # unknown keys, kept as read

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        if self.decoder_block_out_channels is not None:
            self.decoder_block_out_channels = tuple(self.decoder_block_out_channels)
        self.patch_size = tuple(self.patch_size)
        levels = len(self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types or (DOWN_BLOCK,) * levels)
        self.up_block_types = tuple(self.up_block_types or (UP_BLOCK,) * levels)

        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Flux2VAEConfig.{name} must be a positive integer, got {value!r}")
        if levels == 0:
            raise ValueError(
                "Flux2VAEConfig.block_out_channels is empty; give one width per resolution level"
            )
        for name in ("block_out_channels", "decoder_block_out_channels"):
            widths = getattr(self, name)
            if widths is None:
                continue
            bad = [c for c in widths if c % self.norm_num_groups]
            if bad:
                raise ValueError(
                    f"Flux2VAEConfig.{name}={widths} has width(s) {bad} not divisible by "
                    f"norm_num_groups={self.norm_num_groups}; every GroupNorm needs whole groups"
                )
        if self.decoder_block_out_channels is not None and len(self.decoder_block_out_channels) != levels:
            raise ValueError(
                f"Flux2VAEConfig.decoder_block_out_channels={self.decoder_block_out_channels} has "
                f"{len(self.decoder_block_out_channels)} levels but block_out_channels has {levels}; "
                "the decoder must upsample as often as the encoder downsamples"
            )
        if self.down_block_types != (DOWN_BLOCK,) * levels:
            raise ValueError(
                f"Flux2VAEConfig.down_block_types={self.down_block_types}: only {levels} x {DOWN_BLOCK!r} "
                "(one per block_out_channels entry) is supported"
            )
        if self.up_block_types != (UP_BLOCK,) * levels:
            raise ValueError(
                f"Flux2VAEConfig.up_block_types={self.up_block_types}: only {levels} x {UP_BLOCK!r} "
                "(one per block_out_channels entry) is supported"
            )
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"Flux2VAEConfig.act_fn={self.act_fn!r}: only 'silu' is supported")
        if len(self.patch_size) != 2 or any(not isinstance(p, int) or p < 1 for p in self.patch_size):
            raise ValueError(f"Flux2VAEConfig.patch_size={self.patch_size} must be two positive integers")
        if not self.batch_norm_eps > 0:
            raise ValueError(f"Flux2VAEConfig.batch_norm_eps={self.batch_norm_eps} must be > 0")

    @classmethod
    def from_dict(cls, d: Mapping) -> Flux2VAEConfig:
        """Read ``vae/config.json`` as diffusers writes it; unknown keys are logged and kept in ``extra``."""
        class_name = d.get("_class_name")
        if class_name not in (None, "AutoencoderKLFlux2"):
            raise ValueError(
                f"config is for {class_name!r}, not the FLUX.2 VAE (AutoencoderKLFlux2); "
                "point at the FLUX.2 checkpoint's vae/ folder"
            )
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and not k.startswith("_")}
        unexpected = sorted(set(extra) - _IGNORED_CONFIG_KEYS)
        if unexpected:
            logger.warning("Flux2VAEConfig ignores unknown config keys %s", unexpected)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        """``config.json`` as diffusers' ``AutoencoderKLFlux2`` writes it (round-trips through ``from_dict``)."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k != "extra"}
        return {
            "_class_name": "AutoencoderKLFlux2",
            **self.extra,
            **{k: v for k, v in d.items() if v is not None},
        }

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side (8 for the official four-level VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def dit_channels(self) -> int:
        """Channels of the patchified latent the DiT sees (128 for the official VAE)."""
        return self.latent_channels * math.prod(self.patch_size)


# --- building blocks -----------------------------------------------------------------------------


class ResnetBlock(nn.Module):
    """Pre-norm residual block: (GroupNorm, SiLU, 3x3 conv) twice, 1x1 shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column at the bottom/right only (as trained)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all pixels, with a GroupNorm in front and a residual around."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # ".0" in the checkpoint names

    def forward(self, x: Tensor) -> Tensor:
        _, _, height, width = x.shape
        tokens = rearrange(self.group_norm(x), "b c h w -> b (h w) c")
        q, k, v = (rearrange(proj(tokens), "b s c -> b s 1 c") for proj in (self.to_q, self.to_k, self.to_v))
        out = self.to_out[0](attention(q, k, v))
        return x + rearrange(out, "b (h w) c -> b c h w", h=height, w=width)


class MidBlock(nn.Module):
    """ResNet, optional attention, ResNet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)] if add_attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_layers
        self.resnets = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in zip(widths, widths[1:]))
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_layers
        self.resnets = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in zip(widths, widths[1:]))
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    """Image -> 2 * latent_channels moments (mean, log-variance) at 1/downsample_factor resolution."""

    def __init__(self, cfg: Flux2VAEConfig):
        super().__init__()
        widths, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        ins = (widths[0],) + widths[:-1]
        self.down_blocks = nn.ModuleList(
            DownBlock(a, b, cfg.layers_per_block, groups, downsample=i < len(widths) - 1)
            for i, (a, b) in enumerate(zip(ins, widths))
        )
        self.mid_block = MidBlock(widths[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents -> image; the up blocks run from the widest-at-lowest-resolution level upwards."""

    def __init__(self, cfg: Flux2VAEConfig):
        super().__init__()
        widths = tuple(reversed(cfg.decoder_block_out_channels or cfg.block_out_channels))
        groups = cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, cfg.mid_block_add_attention)
        ins = (widths[0],) + widths[:-1]
        # one more ResNet per level than the encoder has, as in the checkpoint
        self.up_blocks = nn.ModuleList(
            UpBlock(a, b, cfg.layers_per_block + 1, groups, upsample=i < len(widths) - 1)
            for i, (a, b) in enumerate(zip(ins, widths))
        )
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class LatentBatchNormStats(nn.Module):
    """The frozen BatchNorm statistics of the patchified latents; only its running stats are used.

    It is never run as a layer: ``Flux2VAE.normalize`` applies the statistics the way the klein
    pipeline does. The checkpoint's ``bn.num_batches_tracked`` (a training counter) is not kept.
    """

    def __init__(self, channels: int, eps: float, momentum: float):
        super().__init__()
        self.eps = eps
        self.momentum = momentum  # recorded for completeness; nothing here updates the statistics
        self.register_buffer("running_mean", torch.zeros(channels, dtype=torch.float32))
        self.register_buffer("running_var", torch.ones(channels, dtype=torch.float32))

    def mean_std(self) -> tuple[Tensor, Tensor]:
        """Per-channel mean and sqrt(var + eps) in float32, shaped ``[1, C, 1, 1]``."""
        mean = self.running_mean.float().view(1, -1, 1, 1)
        std = torch.sqrt(self.running_var.float().view(1, -1, 1, 1) + self.eps)
        return mean, std


# --- tiling helpers ------------------------------------------------------------------------------


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length``, each seam overlapping >= ``overlap``.

    Tiles are spread evenly, so the last one ends exactly at ``length`` and no tile is smaller than
    ``tile`` (a small edge tile would decode with too little context).
    """
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def blend_ramp(start: int, size: int, prev_end: int | None, next_start: int | None) -> Tensor:
    """1-D blending weight of a tile on ``[start, start + size)``.

    It rises linearly across the overlap with the previous tile and falls across the overlap with
    the next; two neighbours' weights sum to 1 inside their overlap, so seams fade instead of cut.
    """
    pos = torch.arange(size, dtype=torch.float32) + 0.5
    weight = torch.ones(size)
    if prev_end is not None and prev_end > start:
        weight = torch.minimum(weight, pos / (prev_end - start))
    if next_start is not None and next_start < start + size:
        weight = torch.minimum(weight, (size - pos) / (start + size - next_start))
    return weight


def _tile_weight(starts: list[int], index: int, size: int, scale: int) -> Tensor:
    """Pixel-space blending weight of tile ``index`` along one axis; ``starts`` and ``size`` in latents.

    All tiles along an axis share one size (``tile_starts`` never makes a short edge tile).
    """
    prev_end = (starts[index - 1] + size) * scale if index > 0 else None
    next_start = starts[index + 1] * scale if index + 1 < len(starts) else None
    return blend_ramp(starts[index] * scale, size * scale, prev_end, next_start)


# --- the model -----------------------------------------------------------------------------------


class Flux2VAE(PretrainedModule, nn.Module):
    config_class = Flux2VAEConfig
    load_options = {
        "ignore_keys": lambda key: key == "bn.num_batches_tracked",
        "keep_fp32": lambda name: name.startswith("bn."),  # the latent BatchNorm statistics
    }

    def __init__(self, config: Flux2VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        moments = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(moments, moments, 1) if config.use_quant_conv else None
        self.post_quant_conv = (
            nn.Conv2d(config.latent_channels, config.latent_channels, 1)
            if config.use_post_quant_conv
            else None
        )
        self.bn = LatentBatchNormStats(config.dit_channels, config.batch_norm_eps, config.batch_norm_momentum)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    # --- pixels <-> 32-channel latents ---

    def encode(self, images: Tensor) -> Tensor:
        """``[B, in_channels, H, W]`` in [-1, 1] -> the posterior mode ``[B, latent_channels, H/f, W/f]``.

        The klein pipeline encodes with the mode (mean), not a sample, so encoding is deterministic.
        """
        mean, _logvar = self.encoder_moments(images).chunk(2, dim=1)
        return mean

    def encoder_moments(self, images: Tensor) -> Tensor:
        """The posterior's mean and log-variance stacked on channels, ``[B, 2 * latent_channels, H/f, W/f]``
        (training needs both: sampling and the KL term)."""
        check_image(images, self.config.in_channels, self.config.downsample_factor, "Flux2VAE.encode")
        moments = self.encoder(images.to(self.dtype))
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def decode(
        self, latents: Tensor, tile_size: int | None = None, tile_overlap: int | None = None
    ) -> Tensor:
        """``[B, latent_channels, h, w]`` -> images ``[B, out_channels, h*f, w*f]``, unclamped.

        With ``tile_size`` (in latent pixels), latents larger than a tile are decoded tile by tile
        with ``tile_overlap`` latent pixels of overlap (default ``tile_size // 4``), blended linearly;
        peak memory then depends on the tile, not the image.
        """
        check_latents(latents, self.config.latent_channels, 1, "Flux2VAE.decode")
        if tile_size is not None:
            tile_overlap = tile_size // 4 if tile_overlap is None else tile_overlap
            if tile_size < 1 or not 0 <= tile_overlap < tile_size:
                raise ValueError(
                    f"tile_size={tile_size}, tile_overlap={tile_overlap}: "
                    "need tile_size >= 1 and 0 <= tile_overlap < tile_size (both in latent pixels)"
                )
        latents = latents.to(self.dtype)
        if tile_size is None or max(latents.shape[-2:]) <= tile_size:
            return self._decode_tile(latents)
        return self._decode_tiled(latents, tile_size, tile_overlap)

    def _decode_tile(self, latents: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def _decode_tiled(self, latents: Tensor, tile: int, overlap: int) -> Tensor:
        f = self.config.downsample_factor
        batch, _, height, width = latents.shape
        out = torch.zeros(batch, self.config.out_channels, height * f, width * f, device=latents.device)
        weight_sum = torch.zeros(height * f, width * f, device=latents.device)
        rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
        logger.debug("tiled VAE decode: %d x %d tiles of %d latent pixels", len(rows), len(cols), tile)
        for i, top in enumerate(rows):
            h = min(tile, height - top)
            wy = _tile_weight(rows, i, h, f)
            for j, left in enumerate(cols):
                w = min(tile, width - left)
                wx = _tile_weight(cols, j, w, f)
                pixels = self._decode_tile(latents[:, :, top : top + h, left : left + w])
                weight = (wy[:, None] * wx[None, :]).to(latents.device)
                y0, x0 = top * f, left * f
                out[:, :, y0 : y0 + h * f, x0 : x0 + w * f] += pixels.float() * weight
                weight_sum[y0 : y0 + h * f, x0 : x0 + w * f] += weight
        return (out / weight_sum).to(self.dtype)

    # --- 32-channel latents <-> the DiT's normalized 128-channel latents ---

    def patchify(self, latents: Tensor) -> Tensor:
        """Fold each 2x2 patch into channels: ``[B, C, h, w] -> [B, C*4, h/2, w/2]``, channel c*4 + dy*2 + dx."""
        ph, pw = self.config.patch_size
        check_latents(latents, self.config.latent_channels, (ph, pw), "Flux2VAE.patchify")
        return rearrange(latents, "b c (h ph) (w pw) -> b (c ph pw) h w", ph=ph, pw=pw)

    def unpatchify(self, latents: Tensor) -> Tensor:
        """Inverse of ``patchify``: ``[B, C*4, h/2, w/2] -> [B, C, h, w]``."""
        ph, pw = self.config.patch_size
        check_latents(latents, self.config.dit_channels, 1, "Flux2VAE.unpatchify")
        return rearrange(latents, "b (c ph pw) h w -> b c (h ph) (w pw)", ph=ph, pw=pw)

    def normalize(self, latents: Tensor) -> Tensor:
        """``(x - running_mean) / sqrt(running_var + eps)`` per channel, as the klein pipeline encodes."""
        check_latents(latents, self.config.dit_channels, 1, "Flux2VAE.normalize")
        mean, std = self.bn.mean_std()
        return ((latents.float() - mean) / std).to(latents.dtype)

    def denormalize(self, latents: Tensor) -> Tensor:
        """``x * sqrt(running_var + eps) + running_mean``, as the klein pipeline does before decoding."""
        check_latents(latents, self.config.dit_channels, 1, "Flux2VAE.denormalize")
        mean, std = self.bn.mean_std()
        return (latents.float() * std + mean).to(latents.dtype)

    def encode_to_dit(self, images: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> normalized DiT latents ``[B, 128, H/16, W/16]``."""
        f, (ph, pw) = self.config.downsample_factor, self.config.patch_size
        check_image(images, self.config.in_channels, (f * ph, f * pw), "Flux2VAE.encode_to_dit")
        return self.normalize(self.patchify(self.encode(images)))

    def decode_from_dit(
        self, latents: Tensor, tile_size: int | None = None, tile_overlap: int | None = None
    ) -> Tensor:
        """Normalized DiT latents ``[B, 128, h, w]`` -> images ``[B, 3, 16h, 16w]`` (unclamped)."""
        latents32 = self.unpatchify(self.denormalize(latents))
        return self.decode(latents32, tile_size=tile_size, tile_overlap=tile_overlap)


# --- input checks --------------------------------------------------------------------------------


def check_image(images: Tensor, channels: int, multiple: int | tuple[int, int], where: str) -> None:
    """Images ``[B, channels, H, W]`` with H and W multiples of ``multiple`` (one int or ``(my, mx)``)."""
    my, mx = _fits(images, channels, multiple)
    if my:
        raise ValueError(
            f"{where} got images of shape {tuple(images.shape)}; expected [B, {channels}, H, W] with H a "
            f"multiple of {my} and W a multiple of {mx}. Resize or crop the image to fit."
        )


def check_latents(latents: Tensor, channels: int, multiple: int | tuple[int, int], where: str) -> None:
    """Latents ``[B, channels, h, w]`` with h and w multiples of ``multiple`` (one int or ``(my, mx)``)."""
    my, mx = _fits(latents, channels, multiple)
    if my:
        size = "" if (my, mx) == (1, 1) else f" with h a multiple of {my} and w a multiple of {mx}"
        raise ValueError(
            f"{where} got latents of shape {tuple(latents.shape)}; expected [B, {channels}, h, w]{size}"
        )


def _fits(x: Tensor, channels: int, multiple: int | tuple[int, int]) -> tuple[int, int] | tuple[None, None]:
    """``(None, None)`` when ``x`` is ``[B, channels, h, w]`` with h, w multiples of ``multiple``; else
    the multiples ``(my, mx)`` it missed, for the message."""
    my, mx = (multiple, multiple) if isinstance(multiple, int) else multiple
    if x.ndim != 4 or x.shape[1] != channels or x.shape[2] % my or x.shape[3] % mx:
        return my, mx
    return None, None
