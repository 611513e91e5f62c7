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
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor

from ..backbones.attention import KVCache
from ..backbones.autoencoder_kl import AutoencoderKL
from ..backbones.qwen3 import Qwen3TextEncoder
from ..backbones.zimage_dit import ZImageDiT
from .common import PipelineInputError, batch_side_kv, conditioning_loras, side_lora_rows
from .families.zimage import (
    DEFAULT_SHIFT,
    VARIANTS,
    ZIMAGE,
    SamplingDefaults,
    check_shift,
    read_shift,
    shift_of_folder,
    variant_of,
)
from .flow_match import NUM_TRAIN_TIMESTEPS, FlowMatchSchedule
from .flux2_prompt import (
    DEFAULT_PAD_TOKEN,
    UnknownWordWarner,
    pad_or_truncate,
    prepare_tokenizer,
    qwen3_chat_prompt,
)
from .image_io import ImageLike, image_to_tensor, resize_image
from .kv_schedule import ScheduledKVCache
from .lora import LoRACache
from .sampling import FamilyPipeline

__all__ = [
    "CHAT_TEMPLATE", "DEFAULT_SHIFT", "VARIANTS", "SamplingDefaults", "ZImagePipeline", "ZImagePromptEncoder",
    "chat_prompt", "check_shift", "variant_of", "zimage_schedule",
]  # fmt: skip

logger = logging.getLogger(__name__)

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


# --- prompts --------------------------------------------------------------------------------------


def chat_prompt(prompt: str) -> str:
    """Qwen3's chat template for one user turn with the generation prompt, thinking enabled (no empty
    ``<think>`` block), as the Z-Image pipeline applies it."""
    return qwen3_chat_prompt(prompt, thinking=True)


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


class ZImagePipeline(FamilyPipeline):
    """``ZImagePipeline.from_pretrained(...)(prompt, ...)`` -> images."""

    backbone = "zimage"
    family = ZIMAGE
    vae_class = AutoencoderKL
    prompt_encoder_class = ZImagePromptEncoder
    conditioning_class = Conditioning
    scheduler_config = SCHEDULER_CONFIG
    model_index = MODEL_INDEX

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
        self.variant, self.defaults = self._checked_variant(variant)
        self.dit, self.vae, self.text_encoder, self.tokenizer = dit, vae, text_encoder, tokenizer
        self.prompt_encoder = prompt_encoder or ZImagePromptEncoder(tokenizer, text_encoder)
        check_shift(shift)
        self.shift = shift
        self.patch_size = ZIMAGE.adapter.patch_size(dit)
        # pixels per DiT token side: the VAE's downsampling, then the DiT's patchify
        self.pixels_per_token = vae.config.downsample_factor * self.patch_size
        self.device = torch.device(device) if device is not None else next(dit.parameters()).device
        self.torch_dtype = torch_dtype or next(dit.parameters()).dtype
        self.offload_device: torch.device | None = None
        self.tokenizer_config: dict = {"tokenizer_class": "Qwen2Tokenizer", "chat_template": CHAT_TEMPLATE}
        self._batch_memo: dict = {}

    @property
    def default_cfg_scale(self) -> float:
        """The variant's (Turbo: 1.0, base: 5.0)."""
        return self.defaults.cfg_scale

    @property
    def default_num_inference_steps(self) -> int:
        """The variant's (Turbo: 8, base: 50)."""
        return self.defaults.num_inference_steps

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
        weight_dtype: torch.dtype | str | None = None,
    ) -> ZImagePipeline:
        """Load the official layout (``transformer/``, ``text_encoder/``, ``vae/``, ``tokenizer/``,
        ``scheduler/``) from a local folder or a ModelScope id (e.g. ``Tongyi-MAI/Z-Image-Turbo``).

        ``variant`` ("turbo" or "base") picks the sampling defaults; when omitted it is "turbo" if the
        source's name contains "turbo", else "base". The scheduler's ``shift`` is read when present.
        """
        folders, device, torch_dtype = cls._folders(
            source, torch_dtype, device, revision, cache_dir, offline,
            transformer=transformer, text_encoder=text_encoder, vae=vae, tokenizer=tokenizer,
        )  # fmt: skip
        pipe = cls.from_folders(folders, device, torch_dtype, name=str(source), weight_dtype=weight_dtype)
        if variant is not None:
            pipe.variant, pipe.defaults = cls._checked_variant(variant)
        logger.info("Z-Image %s defaults %s, shift %s", pipe.variant, pipe.defaults, pipe.shift)
        pipe.name_or_path = str(transformer or source)
        config_path = Path(folders["tokenizer"]) / "tokenizer_config.json"
        if config_path.is_file():  # kept for save_pretrained (chat template, special tokens)
            pipe.tokenizer_config = json.loads(config_path.read_text())
        return pipe

    @classmethod
    def _folder_settings(cls, folders, name: str) -> dict:
        # the variant from the name the user gave; the scheduler's shift from the model's folder
        # (resolved already with the components), else from the transformer's source
        root = folders.root if folders.root is not None else folders.roots.get("transformer")
        return {"variant": variant_of(name), "shift": shift_of_folder(root)}

    def _settings(self) -> dict:
        return {"variant": self.variant, "shift": self.shift}

    @staticmethod
    def _checked_variant(variant: str) -> tuple[str, SamplingDefaults]:
        if variant not in VARIANTS:
            raise PipelineInputError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        return variant, VARIANTS[variant]

    def _scheduler_config(self) -> dict:
        return {**SCHEDULER_CONFIG, "shift": self.shift}

    # -- building blocks --------------------------------------------------------------------------

    def encode_prompt(
        self, prompts: list[str], max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
    ) -> list[Tensor]:
        """Caption features, one ``[L_i, hidden]`` per prompt, in the pipeline's device and dtype."""
        with self._on_device(self.text_encoder):
            return self.prompt_encoder.encode(
                prompts, max_sequence_length, device=self.device, dtype=self.torch_dtype
            )

    def prompt_features(self, prompt: str, max_sequence_length: int) -> Tensor:
        return self.encode_prompt([prompt], max_sequence_length)[0]

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

    # -- the loop's hooks -------------------------------------------------------------------------

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae.config.downsample_factor
        return height // f, width // f

    def _schedule(self, steps, h, w, strength):
        return zimage_schedule(steps, self.shift, strength, device=self.device)

    def _text(self, prompts, max_len, extra, name) -> dict:
        cap_feats = self.encode_prompt(prompts, max_len)
        if extra is not None:
            dim = self.dit.config.cap_feat_dim
            cap_feats = ZIMAGE.adapter.append_caption_tokens(
                cap_feats, extra, name, dim, self.device, self.torch_dtype
            )
        return {"cap_feats": cap_feats}

    def _timestep(self, t: Tensor, batch: int) -> Tensor:
        return ZIMAGE.adapter.sampling_timestep(t, batch)

    def _own_tokens(self, x: Tensor, hidden: Tensor) -> int:
        return ZIMAGE.adapter.image_tokens(self.dit, x)

    def _batch_sides(self, cond, uncond, own_tokens):
        return _batch_sides(cond, uncond, own_tokens)

    def _model(self, hidden: Tensor, timestep: Tensor, c: Conditioning, positions) -> Tensor:
        with conditioning_loras(self.dit, c.lora, c.lora_rows):
            out = ZIMAGE.adapter.forward(self.dit, hidden, timestep, c.cap_feats, c.kv_cache)
        return out.float()


# --- helpers --------------------------------------------------------------------------------------

_read_shift = read_shift  # the family's, under its old name


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
