"""The FLUX.2-klein text-to-image pipeline, with the inputs Diffusion Templates feed it.

Text -> Qwen3 embeddings; noise -> Euler steps of the Flux2DiT velocity (real CFG, both sides batched
into one DiT call when they fit) -> FLUX.2 VAE decode. Template caches arrive as ordinary arguments:
``kv_cache`` / ``negative_kv_cache`` (extra attention tokens per block), ``lora`` / ``negative_lora``
(runtime low-rank branches), ``extra_text_embedding`` (extra text tokens) and ``inpaint_mask`` with
``input_image`` (a hard constraint: outside the mask the result is the input).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..backbones.attention import KVCache
from ..backbones.flux2_dit import Flux2DiT
from ..backbones.flux2_vae import Flux2VAE
from ..backbones.qwen3 import Qwen3TextEncoder
from .common import batch_side_kv, conditioning_loras, side_lora_rows
from .edit_kv import KV_MODEL_PIPELINE, REFERENCE_TIMESTEP, EditPositions, is_reference_kv_model
from .families.flux2 import EDIT_TIME_STEP, FLUX2
from .flow_match import klein_schedule
from .flux2_prompt import Flux2PromptEncoder
from .image_io import ImageLike, fit_to_area, image_to_tensor, resize_image
from .lora import LoRACache
from .sampling import FamilyPipeline

__all__ = ["EDIT_TIME_STEP", "Conditioning", "Flux2ImagePipeline", "KLEIN_SCHEDULER_CONFIG", "MODEL_INDEX"]

logger = logging.getLogger(__name__)

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


class Flux2ImagePipeline(FamilyPipeline):
    """``Flux2ImagePipeline.from_pretrained(...)(prompt, ...)`` -> images."""

    backbone = "flux2"
    family = FLUX2
    vae_class = Flux2VAE
    prompt_encoder_class = Flux2PromptEncoder
    conditioning_class = Conditioning
    scheduler_config = KLEIN_SCHEDULER_CONFIG
    model_index = MODEL_INDEX
    # klein-9B-KV: reference tokens attend only to themselves, their K/V computed once per call
    # (``pipelines/edit_kv.py``); from_pretrained sets it from the folder's model_index.json
    reference_kv_model: bool = False

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
        weight_dtype: torch.dtype | str | None = None,
    ) -> Flux2ImagePipeline:
        """Load the official layout (``transformer/``, ``text_encoder/``, ``vae/``, ``tokenizer/``).

        ``source`` is a local folder or a ModelScope id. Any component can come from elsewhere
        (klein-base repos may take the text encoder, VAE and tokenizer from the klein repo): pass a
        folder or id holding that component, either as its ``{component}/`` subfolder or directly.
        """
        folders, device, torch_dtype = cls._folders(
            source, torch_dtype, device, revision, cache_dir, offline,
            transformer=transformer, text_encoder=text_encoder, vae=vae, tokenizer=tokenizer,
        )  # fmt: skip
        pipe = cls.from_folders(folders, device, torch_dtype, weight_dtype=weight_dtype)
        pipe.name_or_path = str(transformer or source)
        if is_reference_kv_model(_model_index(folders.roots["transformer"])):
            pipe.reference_kv_model = True
            pipe.model_index = {**MODEL_INDEX, "_class_name": KV_MODEL_PIPELINE, "is_distilled": True}
        return pipe

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

    def prompt_features(self, prompt: str, max_sequence_length: int) -> Tensor:
        return self.encode_prompt([prompt], max_sequence_length)[0][0]

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

    # -- the loop's hooks -------------------------------------------------------------------------

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.pixels_per_token, width // self.pixels_per_token

    def _schedule(self, steps, h, w, strength):
        return klein_schedule(steps, h * w, strength, device=self.device)

    def _text(self, prompts, max_len, extra, name) -> dict:
        embeds, text_ids = self.encode_prompt(prompts, max_len)
        if extra is not None:
            embeds, text_ids = FLUX2.adapter.append_text_tokens(embeds, text_ids, extra, name)
        return {"prompt_embeds": embeds, "text_ids": text_ids}

    def _tokens(self, latents: Tensor) -> Tensor:
        return FLUX2.adapter.pack(latents)

    def _untokens(self, x: Tensor, h: int, w: int) -> Tensor:
        return FLUX2.adapter.unpack(x, h, w)

    def _latent_output(self, latents: Tensor) -> Tensor:
        with self._on_device(self.vae):
            return self.vae.unpatchify(self.vae.denormalize(latents.to(self.device)))

    def _positions(self, h: int, w: int, edit_image, reuse_edit_kv: bool = False) -> EditPositions:
        """Image position ids, then each reference image's tokens and ids (t = 10, 20, ...); for the KV
        model the reference tokens' keys/values instead, computed here once."""
        img_ids = FLUX2.adapter.grid_ids(h, w, t=0).to(self.device)
        edit_tokens, edit_ids = self._edit_tokens(edit_image)
        if edit_ids is None:
            return EditPositions(img_ids, None, h * w)
        if self.reference_kv_model:
            with self._on_device(self.dit):
                kv = self.dit.reference_kv(edit_tokens.to(self.torch_dtype), edit_ids, REFERENCE_TIMESTEP)
            return EditPositions(img_ids, None, h * w, reference_kv=kv)
        return EditPositions(torch.cat([img_ids, edit_ids]), edit_tokens, h * w, reuse=reuse_edit_kv)

    def _edit_tokens(self, edit_image) -> tuple[Tensor | None, Tensor | None]:
        if edit_image is None:
            return None, None
        images = edit_image if isinstance(edit_image, list) else [edit_image]
        latents = []
        for index, image in enumerate(images):
            pixels = image_to_tensor(image, f"edit_image[{index}]")
            height, width = fit_to_area(*pixels.shape[-2:], MAX_EDIT_AREA, self.pixels_per_token)
            latents.append(self.encode_image(image, height, width, f"edit_image[{index}]"))
        return FLUX2.adapter.reference_tokens(latents, self.device)

    def _hidden(self, x: Tensor, positions: EditPositions) -> Tensor:
        edit_tokens = positions.edit_tokens
        hidden = x if edit_tokens is None else torch.cat([x, edit_tokens.expand(x.shape[0], -1, -1)], dim=1)
        return hidden.to(self.torch_dtype)

    def _timestep(self, t: Tensor, batch: int) -> Tensor:
        return FLUX2.adapter.sampling_timestep(t, batch, self.torch_dtype)

    def _own_tokens(self, x: Tensor, hidden: Tensor) -> int:
        return hidden.shape[1]

    def _batch_sides(self, cond, uncond, own_tokens):
        return _batch_sides(cond, uncond, own_tokens)

    def _model(self, hidden: Tensor, timestep: Tensor, c: Conditioning, positions: EditPositions) -> Tensor:
        hidden, ids, kv, record = positions.call_parts(hidden, c.kv_cache, c.prompt_embeds)
        with (
            conditioning_loras(self.dit, c.lora, c.lora_rows),
            positions.recording(self.dit, record, c.prompt_embeds),
        ):
            out = FLUX2.adapter.forward(self.dit, hidden, timestep, ids, c.prompt_embeds, c.text_ids, kv)
        return out[:, : positions.n_img].float()


# --- helpers --------------------------------------------------------------------------------------

# the family's layout helpers under their old names (``from flux2_pipeline import _pack`` keeps working)
_pack, _unpack, _grid_ids = FLUX2.adapter.pack, FLUX2.adapter.unpack, FLUX2.adapter.grid_ids
_append_text_tokens = FLUX2.adapter.append_text_tokens


def _model_index(root) -> dict:
    """A folder's ``model_index.json`` object (``{}`` when it has none or it is not an object)."""
    try:
        data = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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
