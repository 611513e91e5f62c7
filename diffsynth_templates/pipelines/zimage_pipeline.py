"""The Z-Image text-to-image pipeline (Turbo and base), with the inputs Diffusion Templates feed it.

Text -> Qwen3 (second-to-last hidden state, padding stripped) -> caption features; noise -> Euler
steps of the negated ZImageDiT output over a statically shifted schedule (real CFG, both sides in
one DiT call) -> 16-channel AutoencoderKL decode. Template caches arrive as ordinary arguments,
exactly as for ``Flux2ImagePipeline``: ``kv_cache`` / ``negative_kv_cache`` (extra attention tokens
for ``block_{i}``), ``lora`` / ``negative_lora``, ``extra_text_embedding`` and ``inpaint_mask`` with
``input_image``.

Guidance follows this project's convention, ``neg + cfg_scale * (pos - neg)`` (1 = no CFG); diffusers'
``ZImagePipeline`` writes the same thing as ``pos + guidance_scale * (pos - neg)``, so
``cfg_scale = guidance_scale + 1``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor
from tqdm.auto import tqdm

from ..backbones.attention import KVCache
from ..backbones.autoencoder_kl import AutoencoderKL
from ..backbones.qwen3 import Qwen3TextEncoder
from ..backbones.zimage_dit import ZImageDiT
from ..loading import CheckpointError
from ..loading.finite import NonFiniteError, check_finite_number
from ..loading.resolve import resolve_model_path
from .common import (
    PipelineBase,
    PipelineInputError,
    as_prompt_list,
    at_step,
    batch_side_kv,
    check_call,
    check_finite_cache,
    check_finite_output,
    check_seed,
    check_size,
    component_folders,
    conditioning_loras,
    default_device_and_dtype,
    side_lora_rows,
)
from .flow_match import NUM_TRAIN_TIMESTEPS, FlowMatchSchedule, add_noise, euler_step, velocity_towards
from .flux2_prompt import (
    DEFAULT_PAD_TOKEN,
    UnknownWordWarner,
    load_tokenizer,
    pad_or_truncate,
    prepare_tokenizer,
    read_tokenizer_settings,
)
from .image_io import (
    ImageLike,
    image_to_tensor,
    inpaint_pair,
    paste_unmasked,
    place_mask,
    resize_image,
    tensor_to_output,
)
from .kv_schedule import ScheduledKVCache
from .lora import LoRACache, validate_lora

logger = logging.getLogger(__name__)

DEFAULT_SHIFT = 3.0
DEFAULT_MAX_SEQUENCE_LENGTH = 512
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
    "shift": DEFAULT_SHIFT,
    "use_dynamic_shifting": False,
}
MODEL_INDEX = {
    "_class_name": "ZImagePipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3ForCausalLM"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "ZImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# What save_pretrained writes when the loaded tokenizer/ had no tokenizer_config.json: the part of
# Qwen3's chat template a Z-Image prompt goes through, so transformers' tokenizer can apply it.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


@dataclass(frozen=True)
class SamplingDefaults:
    """What a call uses when ``num_inference_steps`` / ``cfg_scale`` are not given."""

    num_inference_steps: int
    cfg_scale: float


# Turbo is distilled for 8 steps without guidance; base samples 50 steps with CFG
# (guidance_scale 4 in diffusers' convention).
VARIANTS = {"turbo": SamplingDefaults(8, 1.0), "base": SamplingDefaults(50, 5.0)}


# --- prompts --------------------------------------------------------------------------------------


def chat_prompt(prompt: str) -> str:
    """Qwen3's chat template for one user turn with the generation prompt, thinking enabled (no empty
    ``<think>`` block), as the Z-Image pipeline applies it."""
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


class ZImagePromptEncoder:
    """Prompts -> caption features: Qwen3's second-to-last hidden state of the real tokens (frozen)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        text_encoder: Qwen3TextEncoder,
        *,
        pad_token: str = DEFAULT_PAD_TOKEN,
        padding_side: str = "right",
    ):
        tokenizer, pad_id = prepare_tokenizer(tokenizer, pad_token, padding_side)
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.pad_id, self.padding_side = pad_id, padding_side
        self.unknown_words = UnknownWordWarner(tokenizer)

    @property
    def embed_dim(self) -> int:
        return self.text_encoder.config.hidden_size

    def tokenize(self, prompts: Sequence[str], max_sequence_length: int) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask ``[B, L]`` (int64, CPU), truncated to ``max_sequence_length``.

        With right padding (Qwen's) a causal encoder gives real tokens the same states whatever follows
        them, so rows are padded only to the longest prompt; left padding would move the real tokens'
        positions, so then rows are padded to ``max_sequence_length`` exactly as the reference does.
        """
        if (
            isinstance(max_sequence_length, bool)
            or not isinstance(max_sequence_length, int)
            or max_sequence_length < 1
        ):
            raise PipelineInputError(
                f"max_sequence_length must be an integer >= 1, got {max_sequence_length!r}"
            )
        texts = [chat_prompt(p) for p in prompts]
        encodings = self.tokenizer.encode_batch(texts)
        self.unknown_words.check(prompts, texts, encodings)
        for prompt, e in zip(prompts, encodings):
            if len(e.ids) > max_sequence_length:
                logger.warning(
                    "prompt of %d tokens truncated to %d: %.60r...", len(e.ids), max_sequence_length, prompt
                )
        length = max_sequence_length
        if self.padding_side == "right":
            length = min(max_sequence_length, max(len(e.ids) for e in encodings))
        rows = [pad_or_truncate(e.ids, length, self.pad_id, self.padding_side) for e in encodings]
        return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])

    @torch.no_grad()
    def encode(
        self,
        prompts: Sequence[str],
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> list[Tensor]:
        """One ``[L_i, hidden]`` tensor per prompt (its real tokens only; lengths differ)."""
        input_ids, attention_mask = self.tokenize(list(prompts), max_sequence_length)
        te_device = self.text_encoder.device
        (states,) = self.text_encoder(
            input_ids.to(te_device), attention_mask.to(te_device), output_hidden_states_layers=(-2,)
        )
        device = te_device if device is None else device
        dtype = self.text_encoder.dtype if dtype is None else dtype
        keep = attention_mask.bool().to(te_device)
        return [row[mask].to(device=device, dtype=dtype) for row, mask in zip(states, keep)]


# --- sampling schedule ----------------------------------------------------------------------------


def zimage_schedule(
    num_inference_steps: int,
    shift: float = DEFAULT_SHIFT,
    denoising_strength: float = 1.0,
    device: str | torch.device = "cpu",
) -> FlowMatchSchedule:
    """``linspace(1, 1/N, N)`` warped by the static shift ``s * x / (1 + (s - 1) * x)``.

    Computed in float32 in the reference scheduler's order, so the trajectory matches it bit for bit.
    ``denoising_strength`` < 1 starts at ``1/N + (1 - 1/N) * strength`` before the shift (img2img),
    as for FLUX.2.
    """
    if (
        isinstance(num_inference_steps, bool)
        or not isinstance(num_inference_steps, int)
        or num_inference_steps < 1
    ):
        raise PipelineInputError(
            f"num_inference_steps must be a positive integer, got {num_inference_steps!r}"
        )
    if not 0.0 < denoising_strength <= 1.0:
        raise PipelineInputError(f"denoising_strength must be in (0, 1], got {denoising_strength}")
    n = num_inference_steps
    start = 1 / n + (1 - 1 / n) * denoising_strength if denoising_strength < 1 else 1.0
    sigmas = np.array(torch.linspace(start, 1 / n, n).tolist(), dtype=np.float32)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32, device=device)
    return FlowMatchSchedule(torch.cat([sigmas, sigmas.new_zeros(1)]), sigmas * NUM_TRAIN_TIMESTEPS)


# --- the pipeline ---------------------------------------------------------------------------------


@dataclass
class Conditioning:
    """Everything one CFG side feeds the DiT besides the latents."""

    cap_feats: list[Tensor]  # one [L_i, cap_feat_dim] per sample
    kv_cache: KVCache | ScheduledKVCache | None = None
    lora: LoRACache | None = None
    # when both CFG sides share one batched call: each side's LoRA with the batch rows it applies to
    lora_rows: tuple[tuple[LoRACache, slice], ...] = ()


class ZImagePipeline(PipelineBase):
    """``ZImagePipeline.from_pretrained(...)(prompt, ...)`` -> images."""

    backbone = "zimage"

    def __init__(
        self,
        dit: ZImageDiT,
        vae: AutoencoderKL,
        text_encoder: Qwen3TextEncoder,
        tokenizer: Tokenizer,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
        prompt_encoder: ZImagePromptEncoder | None = None,
        variant: str = "turbo",
        shift: float = DEFAULT_SHIFT,
    ):
        if variant not in VARIANTS:
            raise PipelineInputError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        self.dit, self.vae, self.text_encoder, self.tokenizer = dit, vae, text_encoder, tokenizer
        self.prompt_encoder = prompt_encoder or ZImagePromptEncoder(tokenizer, text_encoder)
        check_shift(shift)
        self.variant, self.defaults, self.shift = variant, VARIANTS[variant], shift
        self.patch_size = dit.config.all_patch_size[0]
        # pixels per DiT token side: the VAE's downsampling, then the DiT's patchify
        self.pixels_per_token = vae.config.downsample_factor * self.patch_size
        self.device = torch.device(device) if device is not None else next(dit.parameters()).device
        self.torch_dtype = torch_dtype or next(dit.parameters()).dtype
        self.offload_device: torch.device | None = None
        self.tokenizer_config: dict = {"tokenizer_class": "Qwen2Tokenizer", "chat_template": CHAT_TEMPLATE}
        self._batch_memo: dict = {}

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        *,
        variant: str | None = None,
        transformer: str | os.PathLike | None = None,
        text_encoder: str | os.PathLike | None = None,
        vae: str | os.PathLike | None = None,
        tokenizer: str | os.PathLike | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        offline: bool | None = None,
    ) -> ZImagePipeline:
        """Load the official layout (``transformer/``, ``text_encoder/``, ``vae/``, ``tokenizer/``,
        ``scheduler/``) from a local folder or a ModelScope id (e.g. ``Tongyi-MAI/Z-Image-Turbo``).

        ``variant`` ("turbo" or "base") picks the sampling defaults; when omitted it is "turbo" if the
        source's name contains "turbo", else "base". The scheduler's ``shift`` is read when present.
        """
        device, torch_dtype = default_device_and_dtype(device, torch_dtype)
        overrides = {
            "transformer": transformer,
            "text_encoder": text_encoder,
            "vae": vae,
            "tokenizer": tokenizer,
        }
        folders = component_folders(source, overrides, revision, cache_dir, offline)
        variant = variant or ("turbo" if "turbo" in Path(str(source)).name.lower() else "base")
        shift = _read_shift(source, revision, cache_dir, offline)
        logger.info("Z-Image %s defaults %s, shift %s", variant, VARIANTS.get(variant), shift)

        dit = ZImageDiT.from_pretrained(folders["transformer"], torch_dtype=torch_dtype, device=device)
        te = Qwen3TextEncoder.from_pretrained(folders["text_encoder"], torch_dtype=torch_dtype, device=device)
        vae_model = AutoencoderKL.from_pretrained(folders["vae"], torch_dtype=torch_dtype, device=device)
        tok = load_tokenizer(folders["tokenizer"])
        pad_token, padding_side = read_tokenizer_settings(folders["tokenizer"])
        prompt_encoder = ZImagePromptEncoder(tok, te, pad_token=pad_token, padding_side=padding_side)
        pipe = cls(dit, vae_model, te, tok, device, torch_dtype, prompt_encoder, variant, shift)
        pipe.name_or_path = str(transformer or source)
        config_path = Path(folders["tokenizer"]) / "tokenizer_config.json"
        if config_path.is_file():  # kept for save_pretrained (chat template, special tokens)
            pipe.tokenizer_config = json.loads(config_path.read_text())
        return pipe

    def save_pretrained(self, root: str | os.PathLike) -> Path:
        """Write the official layout, readable by this class and by diffusers' ``ZImagePipeline``."""
        from ..loading import write_json_atomic

        root = Path(root)
        self.dit.save_pretrained(root / "transformer")
        self.vae.save_pretrained(root / "vae")
        self.text_encoder.save_pretrained(root / "text_encoder")
        (root / "tokenizer").mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(root / "tokenizer" / "tokenizer.json"))
        write_json_atomic(
            {
                **self.tokenizer_config,
                "pad_token": self.tokenizer.id_to_token(self.prompt_encoder.pad_id),
                "padding_side": self.prompt_encoder.padding_side,
            },
            root / "tokenizer" / "tokenizer_config.json",
        )
        write_json_atomic(
            {**SCHEDULER_CONFIG, "shift": self.shift}, root / "scheduler" / "scheduler_config.json"
        )
        write_json_atomic(MODEL_INDEX, root / "model_index.json")
        return root

    # -- memory modes -----------------------------------------------------------------------------

    # -- building blocks --------------------------------------------------------------------------

    def encode_prompt(
        self, prompts: list[str], max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
    ) -> list[Tensor]:
        """Caption features, one ``[L_i, hidden]`` per prompt, in the pipeline's device and dtype."""
        with self._on_device(self.text_encoder):
            return self.prompt_encoder.encode(
                prompts, max_sequence_length, device=self.device, dtype=self.torch_dtype
            )

    def encode_image(self, image: ImageLike, height: int, width: int, name: str = "image") -> Tensor:
        """An image resized/cropped to ``height x width`` as DiT latents ``[1, 16, height/8, width/8]``."""
        pixels = resize_image(image_to_tensor(image, name), height, width)
        with self._on_device(self.vae):
            return self.vae.encode_to_dit(pixels.to(self.device, self.vae.dtype)).float()

    @property
    def size_reason(self) -> str:
        """Why sizes are multiples of ``pixels_per_token``, for error messages."""
        p = self.patch_size
        return f"the VAE downsamples {self.vae.config.downsample_factor}x and the DiT packs {p}x{p} patches"

    def decode_latents(self, latents: Tensor) -> Tensor:
        """DiT latents ``[B, 16, h, w]`` to images in [-1, 1] (unclamped)."""
        with self._on_device(self.vae):
            return self.vae.decode_from_dit(latents.to(self.device, self.vae.dtype))

    # -- generation -------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int | None = None,
        cfg_scale: float | None = None,
        seed: int | None = None,
        latents: Tensor | None = None,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        input_image: ImageLike | None = None,
        denoising_strength: float = 1.0,
        inpaint_mask: ImageLike | None = None,
        resize_mask: bool = False,
        kv_cache: KVCache | ScheduledKVCache | None = None,
        negative_kv_cache: KVCache | ScheduledKVCache | None = None,
        lora: LoRACache | None = None,
        negative_lora: LoRACache | None = None,
        extra_text_embedding: Tensor | None = None,
        negative_extra_text_embedding: Tensor | None = None,
        output_type: str = "pil",
        progress: bool = True,
        max_pixels: int | None = None,
        callback_on_step_end: Callable[[ZImagePipeline, int, Tensor, dict], dict | None] | None = None,
    ):
        """Generate images; returns a list of PIL images, a float array ``[B, H, W, 3]`` in [0, 1]
        (``output_type="np"``) or the sampled DiT latents ``[B, 16, H/8, W/8]`` (``"latent"``, as
        diffusers returns them; ``decode_latents`` turns them into images).

        ``num_inference_steps`` and ``cfg_scale`` default to the variant's (Turbo: 8 and 1.0, base: 50
        and 5.0). ``inpaint_mask`` must have ``input_image``'s size (``resize_mask=True`` stretches it
        to that size first); both are placed onto ``height x width`` alike. ``max_pixels`` bounds
        ``height * width`` (default 4096 x 4096).
        """
        steps = self.defaults.num_inference_steps if num_inference_steps is None else num_inference_steps
        cfg_scale = self.defaults.cfg_scale if cfg_scale is None else cfg_scale
        prompts = as_prompt_list(prompt, "prompt")
        batch = len(prompts)
        negatives = as_prompt_list(negative_prompt, "negative_prompt", batch)
        check_size(height, width, self.pixels_per_token, max_pixels, self.size_reason)
        tensors = {
            "latents": latents,
            "extra_text_embedding": extra_text_embedding,
            "negative_extra_text_embedding": negative_extra_text_embedding,
        }
        check_call(
            output_type,
            cfg_scale,
            denoising_strength,
            input_image,
            inpaint_mask,
            steps,
            tensors,
            max_sequence_length,
            callback_on_step_end,
        )
        seed = check_seed(seed)
        pair = None  # the mask at the input image's size, checked before anything is computed
        if inpaint_mask is not None:
            pair = inpaint_pair(input_image, inpaint_mask, resize_mask)
        elif input_image is not None:
            image_to_tensor(input_image, "input_image")
        f = self.vae.config.downsample_factor
        h, w = height // f, width // f

        cond = self._conditioning(prompts, max_sequence_length, kv_cache, lora, extra_text_embedding, "")
        uncond = None
        if cfg_scale != 1.0:
            uncond = self._conditioning(
                negatives,
                max_sequence_length,
                negative_kv_cache,
                negative_lora,
                negative_extra_text_embedding,
                "negative_",
            )

        noise = self._initial_noise(batch, h, w, seed, latents)
        clean = None if input_image is None else self.encode_image(input_image, height, width, "input_image")
        strength = denoising_strength if input_image is not None else 1.0
        schedule = zimage_schedule(steps, self.shift, strength, device=self.device)
        x = noise if clean is None else add_noise(clean, noise, schedule.sigmas[0])
        mask = None  # placed on the latent grid exactly where the image lands
        if pair is not None:
            mask = place_mask(pair[1], height, width, grid=(h, w)).to(self.device)

        self._batch_memo = {}
        with self._on_device(self.dit):
            for i, t in enumerate(tqdm(schedule.timesteps, disable=not progress, desc="denoising")):
                cond_i = at_step(cond, i, steps)
                uncond_i = None if uncond is None else at_step(uncond, i, steps)
                velocity = self._velocity(x, t, cond_i, uncond_i, cfg_scale)
                if mask is not None:  # outside the mask, steer straight onto the input's latents
                    keep = velocity_towards(x, clean, schedule.sigmas[i])
                    velocity = keep * (1 - mask) + velocity * mask
                x = euler_step(x, velocity, schedule.sigmas[i], schedule.sigmas[i + 1]).float()
                if callback_on_step_end is not None:
                    out = callback_on_step_end(self, i, t, {"latents": x})
                    x = (out or {}).get("latents", x)

        check_finite_output(x, "latents after denoising")
        if output_type == "latent":
            return x
        images = self.decode_latents(x).float()
        check_finite_output(images, "decoded images")
        if inpaint_mask is not None:  # pixels outside the mask: exactly the input's
            images = paste_unmasked(images, input_image, inpaint_mask, resize_mask)
        return tensor_to_output(images, output_type)

    def _conditioning(self, prompts, max_len, kv_cache, lora, extra_embedding, side: str) -> Conditioning:
        cap_feats = self.encode_prompt(prompts, max_len)
        if extra_embedding is not None:
            cap_feats = self._append_tokens(cap_feats, extra_embedding, f"{side}extra_text_embedding")
        if isinstance(kv_cache, ScheduledKVCache):
            entries = [(self._checked_kv(c, len(prompts), side), a, b) for c, a, b in kv_cache.entries]
            kv_cache = ScheduledKVCache(entries)
        else:
            kv_cache = self._checked_kv(kv_cache, len(prompts), side)
        if lora:
            validate_lora(self.dit, lora, source=f"{side}lora")
            check_finite_cache(lora, f"{side}lora")
        return Conditioning(cap_feats, kv_cache or None, lora or None)

    def _append_tokens(self, cap_feats: list[Tensor], extra: Tensor, name: str) -> list[Tensor]:
        """Extra caption tokens go after each prompt's tokens (they get the following positions)."""
        dim, batch = self.dit.config.cap_feat_dim, len(cap_feats)
        if extra.ndim != 3 or extra.shape[-1] != dim or extra.shape[0] not in (1, batch):
            raise PipelineInputError(
                f"{name} has shape {tuple(extra.shape)}; expected [1 or {batch}, L, {dim}]"
            )
        extra = extra.to(self.device, self.torch_dtype).expand(batch, -1, -1)
        return [torch.cat([c, e]) for c, e in zip(cap_feats, extra)]

    def _velocity(
        self, x: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning | None, cfg_scale: float
    ):
        batch = x.shape[0]
        hidden = x.to(self.torch_dtype)
        # the DiT reads 1 - sigma (0 = noise) and predicts the negated velocity
        t_dit = (NUM_TRAIN_TIMESTEPS - t.expand(batch)) / NUM_TRAIN_TIMESTEPS
        if uncond is None:
            return -self._dit(hidden, t_dit, cond)
        key = (id(cond.kv_cache), id(uncond.kv_cache))
        if key not in self._batch_memo:  # concatenating the sides' caches once per call, not per step
            image_tokens = x.shape[-2] * x.shape[-1] // self.patch_size**2
            self._batch_memo[key] = _batch_sides(cond, uncond, image_tokens)
        batched = self._batch_memo[key]
        if batched is not None:
            pos, neg = self._dit(torch.cat([hidden, hidden]), torch.cat([t_dit, t_dit]), batched).chunk(2)
        else:
            pos, neg = self._dit(hidden, t_dit, cond), self._dit(hidden, t_dit, uncond)
        # the reference's form: pos + guidance * (pos - neg) with guidance = cfg_scale - 1
        return -(pos + (cfg_scale - 1) * (pos - neg))

    def _dit(self, hidden: Tensor, t: Tensor, c: Conditioning) -> Tensor:
        with conditioning_loras(self.dit, c.lora, c.lora_rows):
            out = self.dit(
                x=list(hidden.unsqueeze(2).unbind(0)),
                t=t,
                cap_feats=c.cap_feats,
                patch_size=self.patch_size,
                kv_cache=c.kv_cache,
            )
        return torch.stack(out).squeeze(2).float()


# --- helpers --------------------------------------------------------------------------------------


def _read_shift(source, revision, cache_dir, offline) -> float:
    """The scheduler's static shift from ``scheduler/scheduler_config.json``, else 3.0."""
    try:
        root = resolve_model_path(
            source, allow_patterns=["scheduler/*"], revision=revision, cache_dir=cache_dir, offline=offline
        )
    except FileNotFoundError:
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


def check_shift(shift: object, name: str = "shift") -> float:
    """The static schedule shift: a finite number > 0 (3.0 for Z-Image)."""
    value = check_finite_number(name, shift)
    if value <= 0:
        raise NonFiniteError(f"{name} must be a finite number > 0 (Z-Image uses 3.0), got {shift!r}")
    return value


def _batch_sides(cond: Conditioning, uncond: Conditioning, image_tokens: int = 0) -> Conditioning | None:
    """Both CFG sides as one batch (captions may differ in length: the DiT masks the padding; KV
    caches may differ too: see ``batch_side_kv``)."""
    batch = len(cond.cap_feats)
    own = len(cond.cap_feats[0]) + image_tokens
    ok, kv = batch_side_kv(cond.kv_cache, uncond.kv_cache, batch, own_tokens=own)
    if not ok:
        return None
    rows = side_lora_rows(cond.lora, uncond.lora, batch)
    return replace(cond, cap_feats=cond.cap_feats + uncond.cap_feats, kv_cache=kv, lora=None, lora_rows=rows)
