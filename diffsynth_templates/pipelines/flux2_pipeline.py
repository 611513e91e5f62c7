"""The FLUX.2-klein text-to-image pipeline, with the inputs Diffusion Templates feed it.

Text -> Qwen3 embeddings; noise -> Euler steps of the Flux2DiT velocity (real CFG, both sides batched
into one DiT call when they fit) -> FLUX.2 VAE decode. Template caches arrive as ordinary arguments:
``kv_cache`` / ``negative_kv_cache`` (extra attention tokens per block), ``lora`` / ``negative_lora``
(runtime low-rank branches), ``extra_text_embedding`` (extra text tokens) and ``inpaint_mask`` with
``input_image`` (a hard constraint: outside the mask the result is the input).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..backbones.attention import KVCache
from ..backbones.flux2_dit import Flux2DiT
from ..backbones.flux2_vae import Flux2VAE
from ..backbones.qwen3 import Qwen3TextEncoder
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
from .flow_match import add_noise, euler_step, klein_schedule, velocity_towards
from .flux2_prompt import Flux2PromptEncoder, load_tokenizer, read_tokenizer_settings
from .image_io import (
    ImageLike,
    fit_to_area,
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

EDIT_TIME_STEP = 10  # reference images sit at t = 10, 20, ... in the position ids
MAX_EDIT_AREA = 1024 * 1024
# what the official klein repos ship, so saved folders load in diffusers too
KLEIN_SCHEDULER_CONFIG = {
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
MODEL_INDEX = {
    "_class_name": "Flux2KleinPipeline",
    "is_distilled": False,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3ForCausalLM"],
    "tokenizer": ["transformers", "Qwen2TokenizerFast"],
    "transformer": ["diffusers", "Flux2Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}


@dataclass
class Conditioning:
    """Everything one CFG side feeds the DiT besides the latents."""

    prompt_embeds: Tensor  # [B, L, D]
    text_ids: Tensor  # [L, 4]
    kv_cache: KVCache | None = None
    lora: LoRACache | None = None
    # when both CFG sides share one batched call: each side's LoRA with the batch rows it applies to
    lora_rows: tuple[tuple[LoRACache, slice], ...] = ()


class Flux2ImagePipeline(PipelineBase):
    """``Flux2ImagePipeline.from_pretrained(...)(prompt, ...)`` -> images."""

    backbone = "flux2"

    def __init__(
        self,
        dit: Flux2DiT,
        vae: Flux2VAE,
        text_encoder: Qwen3TextEncoder,
        tokenizer,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
        prompt_encoder: Flux2PromptEncoder | None = None,
    ):
        self.dit, self.vae, self.text_encoder, self.tokenizer = dit, vae, text_encoder, tokenizer
        self.prompt_encoder = prompt_encoder or Flux2PromptEncoder(tokenizer, text_encoder)
        # pixels per DiT token side: the VAE's downsampling, then the 2x2 patchify
        self.pixels_per_token = vae.config.downsample_factor * 2
        self.device = torch.device(device) if device is not None else next(dit.parameters()).device
        self.torch_dtype = torch_dtype or next(dit.parameters()).dtype
        self.offload_device: torch.device | None = None
        self.vae_tile_size: int | None = None
        self._batch_memo: dict = {}

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        *,
        transformer: str | os.PathLike | None = None,
        text_encoder: str | os.PathLike | None = None,
        vae: str | os.PathLike | None = None,
        tokenizer: str | os.PathLike | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        offline: bool | None = None,
    ) -> Flux2ImagePipeline:
        """Load the official layout (``transformer/``, ``text_encoder/``, ``vae/``, ``tokenizer/``).

        ``source`` is a local folder or a ModelScope id. Any component can come from elsewhere
        (klein-base repos may take the text encoder, VAE and tokenizer from the klein repo): pass a
        folder or id holding that component, either as its ``{component}/`` subfolder or directly.
        """
        device, torch_dtype = default_device_and_dtype(device, torch_dtype)
        overrides = {
            "transformer": transformer,
            "text_encoder": text_encoder,
            "vae": vae,
            "tokenizer": tokenizer,
        }
        folders = component_folders(source, overrides, revision, cache_dir, offline)
        dit = Flux2DiT.from_pretrained(folders["transformer"], torch_dtype=torch_dtype, device=device)
        te = Qwen3TextEncoder.from_pretrained(folders["text_encoder"], torch_dtype=torch_dtype, device=device)
        vae_model = Flux2VAE.from_pretrained(folders["vae"], torch_dtype=torch_dtype, device=device)
        tok = load_tokenizer(folders["tokenizer"])
        pad_token, padding_side = read_tokenizer_settings(folders["tokenizer"])
        prompt_encoder = Flux2PromptEncoder(tok, te, pad_token=pad_token, padding_side=padding_side)
        pipe = cls(dit, vae_model, te, tok, device, torch_dtype, prompt_encoder)
        pipe.name_or_path = str(transformer or source)
        return pipe

    def save_pretrained(self, root: str | os.PathLike) -> Path:
        """Write the official layout (``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
        ``scheduler/``, ``model_index.json``), readable by this class and by diffusers."""
        from ..loading import write_json_atomic

        root = Path(root)
        self.dit.save_pretrained(root / "transformer")
        self.vae.save_pretrained(root / "vae")
        self.text_encoder.save_pretrained(root / "text_encoder")
        (root / "tokenizer").mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(root / "tokenizer" / "tokenizer.json"))
        pad_token = self.tokenizer.id_to_token(self.prompt_encoder.pad_id)
        write_json_atomic(
            {
                "tokenizer_class": "Qwen2Tokenizer",
                "pad_token": pad_token,
                "padding_side": self.prompt_encoder.padding_side,
            },
            root / "tokenizer" / "tokenizer_config.json",
        )
        write_json_atomic(KLEIN_SCHEDULER_CONFIG, root / "scheduler" / "scheduler_config.json")
        write_json_atomic(MODEL_INDEX, root / "model_index.json")
        return root

    # -- memory modes -----------------------------------------------------------------------------

    def enable_vae_tiling(self, tile_size: int = 64) -> Flux2ImagePipeline:
        """Decode latents in overlapping tiles of ``tile_size`` VAE latent pixels (bounded memory)."""
        self.vae_tile_size = tile_size
        return self

    # -- building blocks --------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 512) -> tuple[Tensor, Tensor]:
        """Prompt embeddings ``[B, L, 3 * hidden]`` (pipeline dtype) and text position ids ``[L, 4]``."""
        with self._on_device(self.text_encoder):
            embeds, text_ids = self.prompt_encoder.encode(
                prompts, max_sequence_length=max_sequence_length, device=self.device, dtype=self.torch_dtype
            )
        return embeds, text_ids.reshape(-1, text_ids.shape[-1])[: embeds.shape[1]].to(self.device)

    def encode_image(self, image: ImageLike, height: int, width: int, name: str = "image") -> Tensor:
        """An image resized/cropped to ``height x width`` as normalized DiT latents ``[1, 128, h, w]``."""
        pixels = resize_image(image_to_tensor(image, name), height, width)
        with self._on_device(self.vae):
            return self.vae.encode_to_dit(pixels.to(self.device, self.vae_dtype)).float()

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Normalized DiT latents ``[B, 128, h, w]`` to images in [-1, 1]."""
        with self._on_device(self.vae):
            return self.vae.decode_from_dit(
                latents.to(self.device, self.vae_dtype), tile_size=self.vae_tile_size
            )

    @property
    def size_reason(self) -> str:
        """Why sizes are multiples of ``pixels_per_token``, for error messages."""
        return f"the VAE downsamples {self.vae.config.downsample_factor}x and the DiT packs 2x2 patches"

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    # -- generation -------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 50,
        cfg_scale: float = 4.0,
        seed: int | None = None,
        latents: Tensor | None = None,
        max_sequence_length: int = 512,
        input_image: ImageLike | None = None,
        denoising_strength: float = 1.0,
        edit_image: ImageLike | list[ImageLike] | None = None,
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
        callback_on_step_end: Callable[[Flux2ImagePipeline, int, Tensor, dict], dict | None] | None = None,
    ):
        """Generate images; returns a list of PIL images, a float array ``[B, H, W, 3]`` in [0, 1]
        (``output_type="np"``) or VAE latents ``[B, 32, H/8, W/8]`` (``output_type="latent"``).

        ``inpaint_mask`` must have ``input_image``'s size (``resize_mask=True`` stretches it to that
        size first); both are placed onto ``height x width`` alike (resized to cover, center-cropped).
        ``max_pixels`` bounds ``height * width`` (default 4096 x 4096).
        """
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
            num_inference_steps,
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
        do_cfg = cfg_scale != 1.0
        h, w = height // self.pixels_per_token, width // self.pixels_per_token

        cond = self._conditioning(prompts, max_sequence_length, kv_cache, lora, extra_text_embedding, "")
        uncond = None
        if do_cfg:
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
        schedule = klein_schedule(
            num_inference_steps,
            h * w,
            denoising_strength if input_image is not None else 1.0,
            device=self.device,
        )
        x = _pack(noise if clean is None else add_noise(clean, noise, schedule.sigmas[0]))
        clean_tokens = None if clean is None else _pack(clean).expand(batch, -1, -1)
        img_ids = _grid_ids(h, w, t=0).to(self.device)
        edit_tokens, edit_ids = self._edit_tokens(edit_image)
        mask_tokens = None
        if pair is not None:  # placed on the token grid exactly where the image lands
            mask_tokens = _pack(place_mask(pair[1], height, width, grid=(h, w)).to(self.device))

        self._batch_memo = {}
        n_steps = len(schedule)
        with self._on_device(self.dit):
            for i, t in enumerate(tqdm(schedule.timesteps, disable=not progress, desc="denoising")):
                cond_i = at_step(cond, i, n_steps)
                uncond_i = None if uncond is None else at_step(uncond, i, n_steps)
                velocity = self._velocity(x, t, cond_i, uncond_i, cfg_scale, img_ids, edit_tokens, edit_ids)
                if mask_tokens is not None:  # outside the mask, steer straight onto the input's latents
                    keep = velocity_towards(x, clean_tokens, schedule.sigmas[i])
                    velocity = keep * (1 - mask_tokens) + velocity * mask_tokens
                x = euler_step(x, velocity, schedule.sigmas[i], schedule.sigmas[i + 1]).float()
                if callback_on_step_end is not None:
                    out = callback_on_step_end(self, i, t, {"latents": x})
                    x = (out or {}).get("latents", x)

        check_finite_output(x, "latents after denoising")
        latents_out = _unpack(x, h, w)
        if output_type == "latent":
            with self._on_device(self.vae):
                return self.vae.unpatchify(self.vae.denormalize(latents_out.to(self.device)))
        images = self.decode_latents(latents_out).float()
        check_finite_output(images, "decoded images")
        if inpaint_mask is not None:  # pixels outside the mask: exactly the input's
            images = paste_unmasked(images, input_image, inpaint_mask, resize_mask)
        return tensor_to_output(images, output_type)

    def _conditioning(self, prompts, max_len, kv_cache, lora, extra_embedding, side: str) -> Conditioning:
        embeds, text_ids = self.encode_prompt(prompts, max_len)
        if extra_embedding is not None:
            embeds, text_ids = _append_text_tokens(
                embeds, text_ids, extra_embedding, f"{side}extra_text_embedding"
            )
        if isinstance(kv_cache, ScheduledKVCache):
            entries = [(self._checked_kv(c, len(prompts), side), a, b) for c, a, b in kv_cache.entries]
            kv_cache = ScheduledKVCache(entries)
        else:
            kv_cache = self._checked_kv(kv_cache, len(prompts), side)
        if lora:
            validate_lora(self.dit, lora, source=f"{side}lora")
            check_finite_cache(lora, f"{side}lora")
        return Conditioning(embeds, text_ids, kv_cache or None, lora or None)

    def _edit_tokens(self, edit_image) -> tuple[Tensor | None, Tensor | None]:
        """Reference images as extra image tokens, each at its own time position t = 10, 20, ..."""
        if edit_image is None:
            return None, None
        images = edit_image if isinstance(edit_image, list) else [edit_image]
        tokens, ids = [], []
        for index, image in enumerate(images):
            pixels = image_to_tensor(image, f"edit_image[{index}]")
            height, width = fit_to_area(*pixels.shape[-2:], MAX_EDIT_AREA, self.pixels_per_token)
            latents = self.encode_image(image, height, width, f"edit_image[{index}]")
            tokens.append(_pack(latents))
            ids.append(
                _grid_ids(
                    height // self.pixels_per_token,
                    width // self.pixels_per_token,
                    t=EDIT_TIME_STEP * (index + 1),
                )
            )
        return torch.cat(tokens, dim=1), torch.cat(ids).to(self.device)

    def _velocity(
        self, x, t, cond: Conditioning, uncond: Conditioning | None, cfg_scale, img_ids, edit_tokens, edit_ids
    ):
        n_img = x.shape[1]
        hidden = x
        if edit_tokens is not None:
            hidden = torch.cat([x, edit_tokens.expand(x.shape[0], -1, -1)], dim=1)
            img_ids = torch.cat([img_ids, edit_ids])
        hidden = hidden.to(self.torch_dtype)
        # the reference feeds sigma as (sigma * 1000) / 1000 in the latents' dtype; so do we
        sigma = (t.expand(x.shape[0]).to(self.torch_dtype)) / 1000

        if uncond is None:
            return self._dit(hidden, sigma, img_ids, cond)[:, :n_img].float()
        key = (id(cond.kv_cache), id(uncond.kv_cache))
        if key not in self._batch_memo:  # concatenating the sides' caches once per call, not per step
            self._batch_memo[key] = _batch_sides(cond, uncond, hidden.shape[1])
        batched = self._batch_memo[key]
        if batched is not None:
            both = self._dit(torch.cat([hidden, hidden]), torch.cat([sigma, sigma]), img_ids, batched)
            pos, neg = both[:, :n_img].float().chunk(2)
        else:
            pos = self._dit(hidden, sigma, img_ids, cond)[:, :n_img].float()
            neg = self._dit(hidden, sigma, img_ids, uncond)[:, :n_img].float()
        return neg + cfg_scale * (pos - neg)

    def _dit(self, hidden: Tensor, sigma: Tensor, img_ids: Tensor, c: Conditioning) -> Tensor:
        with conditioning_loras(self.dit, c.lora, c.lora_rows):
            return self.dit(
                hidden_states=hidden,
                encoder_hidden_states=c.prompt_embeds,
                timestep=sigma,
                img_ids=img_ids,
                txt_ids=c.text_ids,
                kv_cache=c.kv_cache,
            )


# --- helpers --------------------------------------------------------------------------------------


def _append_text_tokens(embeds: Tensor, text_ids: Tensor, extra: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Extra text tokens go after the prompt, continuing its sequence positions."""
    if extra.ndim != 3 or extra.shape[-1] != embeds.shape[-1] or extra.shape[0] not in (1, embeds.shape[0]):
        raise PipelineInputError(
            f"{name} has shape {tuple(extra.shape)}; expected [1 or {embeds.shape[0]}, L, {embeds.shape[-1]}]"
        )
    length = embeds.shape[1]
    extra_ids = torch.zeros(extra.shape[1], text_ids.shape[-1], dtype=text_ids.dtype, device=text_ids.device)
    extra_ids[:, -1] = torch.arange(length, length + extra.shape[1], device=text_ids.device)
    extra = extra.to(embeds.device, embeds.dtype).expand(embeds.shape[0], -1, -1)
    return torch.cat([embeds, extra], dim=1), torch.cat([text_ids, extra_ids])


def _batch_sides(cond: Conditioning, uncond: Conditioning, image_tokens: int = 0) -> Conditioning | None:
    """Both CFG sides as one batch when their shapes match (each side keeps its own LoRA rows)."""
    if cond.prompt_embeds.shape != uncond.prompt_embeds.shape:
        return None
    if not torch.equal(cond.text_ids, uncond.text_ids):
        return None
    batch = cond.prompt_embeds.shape[0]
    own = cond.prompt_embeds.shape[1] + image_tokens
    ok, kv = batch_side_kv(cond.kv_cache, uncond.kv_cache, batch, own_tokens=own)
    if not ok:
        return None
    embeds = torch.cat([cond.prompt_embeds, uncond.prompt_embeds])
    rows = side_lora_rows(cond.lora, uncond.lora, batch)
    return replace(cond, prompt_embeds=embeds, kv_cache=kv, lora=None, lora_rows=rows)


def _pack(latents: Tensor) -> Tensor:
    """``[B, C, h, w]`` -> tokens ``[B, h * w, C]`` in row-major order."""
    return latents.flatten(2).transpose(1, 2)


def _unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def _grid_ids(h: int, w: int, t: int) -> Tensor:
    """Position ids (t, row, col, 0) for an ``h x w`` token grid, row-major."""
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return torch.stack([torch.full_like(rows, t), rows, cols, torch.zeros_like(rows)], dim=-1)
