"""Z-Image (Turbo and base): VAE latents patchified inside the DiT, ragged caption features, a DiT
that reads ``t = 1 - sigma`` and returns the *negated* velocity; no reference images.

``ZImageAdapter`` is the one place that turns latents, captions and template caches into a DiT call;
``ZImagePipeline`` samples through it and the trainer's objective trains through it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...backbones.zimage_dit import ZImageDiT, ZImageDiTConfig
from ...loading import CheckpointError
from ...loading.finite import NonFiniteError, check_finite_number
from ...loading.resolve import resolve_model_path
from ..common import PipelineInputError
from ..flow_match import NUM_TRAIN_TIMESTEPS, add_noise
from .base import Family, KVLayout, UnsupportedFeatureError
from .zimage_layouts import OFFICIAL

CLASS_NAMES = ("ZImagePipeline", "ZImageTransformer2DModel")  # what diffusers writes in _class_name
DEFAULT_SHIFT = 3.0  # the sampling scheduler's static shift
ZIMAGE_TRAINING_SHIFT = 3.0  # DiffSynth-Studio's Z-Image training shift (its scheduler default)

EDIT_IMAGES_UNSUPPORTED = (
    "Z-Image's DiT takes no reference (edit) images, only FLUX.2-klein's does; drop edit_image from "
    "these rows, or hand the source image to the template through template_inputs "
    '(e.g. {"image": "source.png"}), which any backbone supports'
)


@dataclass(frozen=True)
class SamplingDefaults:
    """What a call uses when ``num_inference_steps`` / ``cfg_scale`` are not given."""

    num_inference_steps: int
    cfg_scale: float


# Turbo is distilled for 8 steps without guidance; base samples 50 steps with CFG
# (guidance_scale 4 in diffusers' convention).
VARIANTS = {"turbo": SamplingDefaults(8, 1.0), "base": SamplingDefaults(50, 5.0)}


def variant_of(source) -> str:
    """ "turbo" when the model's folder or id names it, else "base"."""
    return "turbo" if "turbo" in Path(str(source)).name.lower() else "base"


def recommended_sampling(index: dict, classes: set, name: str, variant: str | None):
    """Z-Image's variants (``variant``, else read from the name as ``from_pretrained`` does)."""
    if not classes & set(CLASS_NAMES):
        return None
    variant = variant or variant_of(name)
    if variant not in VARIANTS:
        return None
    d = VARIANTS[variant]
    return d.num_inference_steps, d.cfg_scale, f"Z-Image {variant.capitalize()} model"


def kv_layout(config: ZImageDiTConfig) -> KVLayout:
    blocks = tuple(f"block_{i}" for i in range(config.num_layers))
    return KVLayout(
        blocks,
        config.num_heads,
        config.head_dim,
        config.in_channels,
        config.all_patch_size[0],
        config.cap_feat_dim,
    )


def attention_modules(config: ZImageDiTConfig, double_blocks=None, single_blocks=None) -> tuple[str, ...]:
    """``attention.to_q/to_k/to_v/to_out.0`` of the main blocks (``double_blocks`` gives their indices;
    Z-Image has no single blocks; the refiners are left out, like the KV door)."""
    blocks = range(config.num_layers) if double_blocks is None else double_blocks
    return tuple(f"layers.{i}.attention.{p}" for i in blocks for p in ("to_q", "to_k", "to_v", "to_out.0"))


# --- the training sigma draw ----------------------------------------------------------------------


def shifted_training_sigmas(shift: float = ZIMAGE_TRAINING_SHIFT) -> Tensor:
    """The Z-Image training grid: ``NUM_TRAIN_TIMESTEPS`` statically shifted sigmas, 1 first (float32)."""
    sigmas = torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1)[:-1]
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def draw_shifted_noise(
    seed: int, shape: tuple[int, ...], shift: float = ZIMAGE_TRAINING_SHIFT
) -> tuple[Tensor, Tensor]:
    """``(sigma [], noise shape)``, sigma a uniformly chosen entry of ``shifted_training_sigmas``."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, NUM_TRAIN_TIMESTEPS, (), generator=generator)
    sigma = shifted_training_sigmas(shift)[index]
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return sigma, noise


def draw_noise(seed: int, shape: tuple[int, ...], mu: float | None = None) -> tuple[Tensor, Tensor]:
    """The family's training draw; klein's ``mu`` does not apply (Z-Image trains on its static shift)."""
    return draw_shifted_noise(seed, shape, ZIMAGE_TRAINING_SHIFT)


# --- the scheduler's shift ------------------------------------------------------------------------


def check_shift(shift: object, name: str = "shift") -> float:
    """The static schedule shift: a finite number > 0 (3.0 for Z-Image)."""
    value = check_finite_number(name, shift)
    if value <= 0:
        raise NonFiniteError(f"{name} must be a finite number > 0 (Z-Image uses 3.0), got {shift!r}")
    return value


def read_shift(source, revision=None, cache_dir=None, offline=None) -> float:
    """The scheduler's static shift from ``scheduler/scheduler_config.json``, else 3.0."""
    try:
        root = resolve_model_path(
            source, allow_patterns=["scheduler/*"], revision=revision, cache_dir=cache_dir, offline=offline
        )
    except FileNotFoundError:
        return DEFAULT_SHIFT
    return shift_of_folder(root)


def shift_of_folder(root: Path | None) -> float:
    """``read_shift`` for a model folder resolved already (``None``: none, so 3.0)."""
    if root is None:
        return DEFAULT_SHIFT
    path = root / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return DEFAULT_SHIFT
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e}); download it again") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object, got {type(config).__name__}")
    if config.get("use_dynamic_shifting"):
        raise CheckpointError(
            f"{str(path)!r} asks for dynamic shifting; Z-Image samples with a static shift. "
            "Set use_dynamic_shifting to false (and shift, default 3.0)"
        )
    return check_shift(config.get("shift", DEFAULT_SHIFT), f"{str(path)!r}: shift")


# --- the model call -------------------------------------------------------------------------------


@dataclass
class ZImageSample:
    """One training sample in Z-Image's layout."""

    x0: Tensor  # [1, C, h, w]
    noise: Tensor
    sigma: Tensor
    caption: Tensor  # [L, D]
    kv: dict[str, tuple[Tensor, Tensor]]
    lora: dict[str, Tensor] | None

    def signature(self) -> tuple:
        """Samples with equal signatures go through the DiT as one batch (captions may be ragged)."""
        return (
            tuple(self.x0.shape),
            tuple(sorted((n, tuple(k.shape[1:])) for n, (k, _) in self.kv.items())),
        )


class ZImageAdapter:
    """Z-Image's model call: latent lists, caption lists, ``t = 1 - sigma``, the negated output."""

    @staticmethod
    def patch_size(dit: nn.Module) -> int:
        return dit.config.all_patch_size[0]

    def image_tokens(self, dit: nn.Module, latents: Tensor) -> int:
        """DiT tokens per sample of latents ``[B, C, h, w]``."""
        return latents.shape[-2] * latents.shape[-1] // self.patch_size(dit) ** 2

    @staticmethod
    def append_caption_tokens(
        cap_feats: list[Tensor], extra: Tensor, name: str, dim: int, device, dtype
    ) -> list[Tensor]:
        """Extra caption tokens go after each prompt's tokens (they get the following positions)."""
        batch = len(cap_feats)
        if extra.ndim != 3 or extra.shape[-1] != dim or extra.shape[0] not in (1, batch):
            raise PipelineInputError(
                f"{name} has shape {tuple(extra.shape)}; expected [1 or {batch}, L, {dim}]"
            )
        extra = extra.to(device, dtype).expand(batch, -1, -1)
        return [torch.cat([c, e]) for c, e in zip(cap_feats, extra)]

    @staticmethod
    def sampling_timestep(t: Tensor, batch: int) -> Tensor:
        """The scheduler's ``sigma * 1000`` as the DiT's time: it reads 1 - sigma (0 = noise)."""
        return (NUM_TRAIN_TIMESTEPS - t.expand(batch)) / NUM_TRAIN_TIMESTEPS

    @staticmethod
    def training_timestep(sigma: Tensor, dtype: torch.dtype) -> Tensor:
        timestep = sigma * NUM_TRAIN_TIMESTEPS  # what the scheduler holds; the DiT reads 1 - sigma
        return ((NUM_TRAIN_TIMESTEPS - timestep) / NUM_TRAIN_TIMESTEPS).to(dtype)

    def forward(
        self, dit: nn.Module, hidden: Tensor, timestep: Tensor, cap_feats: list[Tensor], kv_cache
    ) -> Tensor:
        """The DiT's raw output ``[B, C, h, w]`` for latents ``[B, C, h, w]``: the *negated* velocity."""
        out = dit(
            x=list(hidden.unsqueeze(2).unbind(0)),  # [C, 1 frame, h, w] per sample
            t=timestep,
            cap_feats=cap_feats,
            patch_size=self.patch_size(dit),
            kv_cache=kv_cache,
        )
        return torch.stack(out).squeeze(2)

    @staticmethod
    def to_velocity(output: Tensor) -> Tensor:
        return -output

    @staticmethod
    def guide(pos: Tensor, neg: Tensor, cfg_scale: float) -> Tensor:
        """Real CFG on raw outputs, in the reference's form ``pos + (cfg_scale - 1) * (pos - neg)``,
        negated to a velocity."""
        return -(pos + (cfg_scale - 1) * (pos - neg))

    # -- training ---------------------------------------------------------------------------------

    def prepare(
        self, features: Any, sigma: Tensor, noise: Tensor, cache: dict[str, Any], device
    ) -> ZImageSample:
        if features.edit_latents:
            raise UnsupportedFeatureError(
                f"metadata line {features.line} (sample {features.id}) has edit images: {EDIT_IMAGES_UNSUPPORTED}"
            )
        latents = features.latents.to(device, torch.float32)[None]  # [1, C, h, w]
        caption = features.prompt_embeds.to(device)
        extra = cache.get("extra_text_embedding")
        if extra is not None:
            dim = caption.shape[-1]
            (caption,) = self.append_caption_tokens(
                [caption], extra, "the template's extra_text_embedding", dim, device, caption.dtype
            )
        return ZImageSample(
            x0=latents,
            noise=noise.to(device),
            sigma=sigma.to(device),
            caption=caption,
            kv=dict(cache.get("kv_cache") or {}),
            lora=cache.get("lora") or None,
        )

    def predict(self, dit: nn.Module, group: list[ZImageSample], kv) -> tuple[Tensor, Tensor]:
        """``(prediction, target)`` for same-signature samples, ``[B, C, h, w]`` each."""
        x0 = torch.cat([s.x0 for s in group])
        noise = torch.cat([s.noise for s in group])
        sigma = torch.stack([s.sigma for s in group])
        x_t = add_noise(x0, noise, sigma[:, None, None, None])
        dtype = next(dit.parameters()).dtype
        timestep = self.training_timestep(sigma, dtype)
        output = self.forward(dit, x_t.to(dtype), timestep, [s.caption.to(dtype) for s in group], kv)
        return self.to_velocity(output), noise - x0


ZIMAGE = Family(
    name="zimage",
    title="Z-Image",
    class_names=CLASS_NAMES,
    dit_class=ZImageDiT,
    dit_config_class=ZImageDiTConfig,
    pipeline="diffsynth_templates.pipelines.zimage_pipeline:ZImagePipeline",
    kv_layout=kv_layout,
    name_prefixes=("block_", "layers."),
    attention_modules=attention_modules,
    recommended_sampling=recommended_sampling,
    tiny_spec="diffsynth_templates.pipelines.random_init:RandomZImageSpec",
    presets=("official",),
    adapter=ZImageAdapter(),
    draw_noise=draw_noise,
    checkpoint_layout=OFFICIAL,
    supports_edit_images=False,
    supports_inpainting=True,
    supports_guidance=True,
    default_cfg_scale=None,
    edit_images_unsupported=EDIT_IMAGES_UNSUPPORTED,
)
