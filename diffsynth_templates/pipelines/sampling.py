"""The one denoising loop and CFG batching every backbone's pipeline runs, with loading and saving
of the official folder layout.

A pipeline class (``Flux2ImagePipeline``, ``ZImagePipeline``) composes its ``family`` (the model-call
adapter: layout, timestep convention, output sign, guidance form) with its components, and fills the
few hooks below (``_text``, ``_tokens``, ``_untokens``, ``_positions``, ``_hidden``, ``_model``,
``_schedule``, ``_latent_output``); everything else, from argument checks to the final image, is here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..backbones.attention import KVCache, kv_cache_prevalidated
from ..backbones.qwen3 import Qwen3TextEncoder
from ..loading import read_config, write_json_atomic
from ..loading.meta_init import meta_build
from .common import (
    ComponentFolders,
    PipelineBase,
    PipelineInputError,
    as_prompt_list,
    at_step,
    check_call,
    check_finite_cache,
    check_finite_output,
    check_seed,
    check_size,
    component_folders,
    default_device_and_dtype,
)
from .families import Family
from .flow_match import FlowMatchSchedule, add_noise, euler_step, velocity_towards
from .flux2_prompt import load_tokenizer, read_tokenizer_settings
from .image_io import ImageLike, image_to_tensor, inpaint_pair, paste_unmasked, place_mask, tensor_to_output
from .kv_schedule import ScheduledKVCache
from .lora import LoRACache, validate_lora
from .lora_adapters import LoRAAdaptersMixin
from .memory import LowMemoryMixin, load_stored
from .single_file import load_family_dit
from .step_cache import StepCacheConfig, StepCacheSession, StepCacheStats, resolve_step_cache


class FamilyPipeline(LowMemoryMixin, LoRAAdaptersMixin, PipelineBase):
    """What both pipelines share; subclasses set the class attributes and fill the hooks."""

    family: ClassVar[Family]
    vae_class: ClassVar[type]
    prompt_encoder_class: ClassVar[type]
    conditioning_class: ClassVar[type]
    scheduler_config: ClassVar[dict]
    model_index: ClassVar[dict]
    tokenizer_config: dict = {"tokenizer_class": "Qwen2Tokenizer"}  # what save_pretrained writes
    # both CFG sides in one DiT call when they fit; False runs them as two passes (benchmarks, checks)
    cfg_batching: bool = True
    # KV caches are validated once per call, before the loop; True (debugging) re-checks at every step
    check_kv_each_step: bool = False
    # what the last call's step cache did (None: the call ran without one)
    step_cache_stats: StepCacheStats | None = None
    _step_cache: StepCacheSession | None = None

    # -- the template -> pipeline contract ---------------------------------------------------------

    @property
    def accepted_cache_keys(self) -> frozenset[str]:
        """Keys a template's cache may set on the positive side of a call."""
        return self.family.cache_keys

    @property
    def negative_cache_keys(self) -> frozenset[str]:
        """Keys a negative template's cache may set (passed as ``negative_{key}``)."""
        return self.family.negative_cache_keys

    @property
    def default_cfg_scale(self) -> float:
        """The ``cfg_scale`` a call uses when none is given."""
        return self.family.default_cfg_scale

    # -- loading and saving the official layout (transformer/, text_encoder/, vae/, tokenizer/) -----

    @classmethod
    def load_components(
        cls,
        folders: ComponentFolders | Mapping[str, Path],
        device,
        torch_dtype,
        dit: Any = "load",
        weight_dtype: torch.dtype | str | None = None,
    ) -> dict[str, Any]:
        """The constructor's components from their folders, resolved already: what ``from_pretrained``
        (so ``infer.py``), the trainer's stage I (``dit=None``: no DiT weights) and stage II all load
        through. ``weight_dtype`` (e.g. ``torch.float8_e4m3fn``) stores the DiT's and the text
        encoder's large Linear weights compactly (``loading.quantize``), converted on the host."""
        if isinstance(dit, str):  # its folder, or the one file --transformer named
            dit = load_stored(
                lambda at: load_family_dit(cls.family, folders, torch_dtype, at), device, weight_dtype
            )
        te = load_stored(
            lambda at: Qwen3TextEncoder.from_pretrained(
                folders["text_encoder"], torch_dtype=torch_dtype, device=at
            ),
            device,
            weight_dtype,
        )
        vae = cls.vae_class.from_pretrained(folders["vae"], torch_dtype=torch_dtype, device=device)
        tok = load_tokenizer(folders["tokenizer"])
        pad_token, padding_side = read_tokenizer_settings(folders["tokenizer"])
        prompt_encoder = cls.prompt_encoder_class(tok, te, pad_token=pad_token, padding_side=padding_side)
        return dict(
            dit=dit, vae=vae, text_encoder=te, tokenizer=tok, device=device, torch_dtype=torch_dtype,
            prompt_encoder=prompt_encoder,
        )  # fmt: skip

    @classmethod
    def from_folders(
        cls,
        folders: ComponentFolders,
        device,
        torch_dtype,
        dit: Any = "load",
        name: str | None = None,
        weight_dtype: torch.dtype | str | None = None,
    ) -> FamilyPipeline:
        """The pipeline from component folders resolved already: ``from_pretrained`` (so ``infer.py``)
        and both training stages build through here. ``dit=None`` (stage I, which never runs the DiT)
        puts a weightless skeleton in its place; ``name`` is the model as the user named it (some
        families read their variant from it; default: the folders' source)."""
        if dit is None:
            config = cls.family.dit_config_class.from_diffusers(read_config(folders["transformer"]))
            with meta_build():
                dit = cls.family.dit_class(config)
        components = cls.load_components(folders, device, torch_dtype, dit, weight_dtype)
        return cls(**components, **cls._folder_settings(folders, name or str(folders)))

    @classmethod
    def _folder_settings(cls, folders: ComponentFolders, name: str) -> dict[str, Any]:
        """Constructor arguments a family reads from its model folder besides the components."""
        return {}

    def _settings(self) -> dict[str, Any]:
        """The constructor arguments besides the components that ``with_dit`` carries over."""
        return {}

    def with_dit(self, dit: torch.nn.Module) -> FamilyPipeline:
        """A pipeline around ``dit`` (in its dtype) sharing this one's text encoder, VAE and settings
        (the trainer's validation images come from the DiT being trained)."""
        dtype = next(dit.parameters()).dtype
        return type(self)(
            dit, self.vae, self.text_encoder, self.tokenizer, self.device, dtype, self.prompt_encoder,
            **self._settings(),
        )  # fmt: skip

    def prompt_features(self, prompt: str, max_sequence_length: int) -> Tensor:
        """One prompt's text features ``[L, D]``, as the trainer's stage I stores them."""
        raise NotImplementedError

    @staticmethod
    def _folders(source, torch_dtype, device, revision, cache_dir, offline, **overrides):
        """Each component's folder (``overrides``: a component's own folder or id), with the device
        and dtype the call asked for or their defaults. ``source`` may be a ``ComponentFolders``
        resolved already (``infer.py`` does that): nothing is resolved again."""
        device, torch_dtype = default_device_and_dtype(device, torch_dtype)
        return component_folders(source, overrides, revision, cache_dir, offline), device, torch_dtype

    def save_pretrained(self, root: str | os.PathLike) -> Path:
        """Write the official layout (``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
        ``scheduler/``, ``model_index.json``), readable by this class and by diffusers."""
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
        write_json_atomic(self._scheduler_config(), root / "scheduler" / "scheduler_config.json")
        write_json_atomic(self.model_index, root / "model_index.json")
        return root

    def _scheduler_config(self) -> dict:
        return self.scheduler_config

    # -- the public call (one signature for every family) ----------------------------------------

    @property
    def default_num_inference_steps(self) -> int:
        """The ``num_inference_steps`` a call uses when none is given."""
        return 50

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
        callback_on_step_end: Callable[[FamilyPipeline, int, Tensor, dict], dict | None] | None = None,
        step_cache: str | StepCacheConfig | None = None,
        reuse_edit_kv: bool = False,
    ):
        """Generate images; returns a list of PIL images, a float array ``[B, H, W, 3]`` in [0, 1]
        (``output_type="np"``) or latents (``output_type="latent"``: FLUX.2 the VAE's ``[B, 32, H/8,
        W/8]``, Z-Image the DiT's ``[B, 16, H/8, W/8]`` as diffusers returns them).

        ``num_inference_steps`` and ``cfg_scale`` default to the model's (``default_num_inference_steps``,
        ``default_cfg_scale``: FLUX.2-klein 50 and 4.0; Z-Image Turbo 8 and 1.0, base 50 and 5.0).
        ``edit_image`` (reference images) needs a family that takes them (FLUX.2-klein).
        ``inpaint_mask`` must have ``input_image``'s size (``resize_mask=True`` stretches it to that
        size first); both are placed onto ``height x width`` alike (resized to cover, center-cropped).
        ``max_pixels`` bounds ``height * width`` (default 4096 x 4096).
        ``step_cache`` (``"quality"``, ``"balanced"``, ``"fast"`` or a ``StepCacheConfig``) forecasts
        the DiT's block work on some steps instead of computing it (``pipelines/step_cache.py``; what
        it skipped is in ``pipe.step_cache_stats``); None, the default, computes every step.
        ``reuse_edit_kv=True`` computes the ``edit_image`` tokens' keys/values on the first step only and
        reuses them after (approximate; ``pipelines/edit_kv.py``); klein-9B-KV always does, exactly.
        """
        steps = self.default_num_inference_steps if num_inference_steps is None else num_inference_steps
        cfg_scale = self.default_cfg_scale if cfg_scale is None else cfg_scale
        return self._sample(
            prompt, negative_prompt, height, width, steps, cfg_scale, seed, latents, max_sequence_length,
            input_image, denoising_strength, inpaint_mask, resize_mask, kv_cache, negative_kv_cache, lora,
            negative_lora, extra_text_embedding, negative_extra_text_embedding, output_type, progress,
            max_pixels, callback_on_step_end, edit_image=edit_image, step_cache=step_cache,
            reuse_edit_kv=reuse_edit_kv,
        )  # fmt: skip

    # -- the loop ---------------------------------------------------------------------------------

    def _sample(
        self,
        prompt,
        negative_prompt,
        height: int,
        width: int,
        num_inference_steps: int,
        cfg_scale: float,
        seed: int | None,
        latents: Tensor | None,
        max_sequence_length: int,
        input_image,
        denoising_strength: float,
        inpaint_mask,
        resize_mask: bool,
        kv_cache,
        negative_kv_cache,
        lora,
        negative_lora,
        extra_text_embedding,
        negative_extra_text_embedding,
        output_type: str,
        progress: bool,
        max_pixels: int | None,
        callback_on_step_end: Callable | None,
        edit_image=None,
        step_cache: str | StepCacheConfig | None = None,
        reuse_edit_kv: bool = False,
    ):
        """Every argument checked once, both CFG sides' conditioning built and validated once, then
        Euler steps of the family's velocity (inpainting: steered onto the input outside the mask)."""
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
        step_cache = resolve_step_cache(step_cache)
        if not isinstance(reuse_edit_kv, bool):
            raise PipelineInputError(f"reuse_edit_kv must be True or False, got {reuse_edit_kv!r}")
        if edit_image is not None and not self.family.supports_edit_images:
            raise PipelineInputError(
                f"{type(self).__name__} takes no edit_image: {self.family.edit_images_unsupported}"
            )
        pair = None  # the mask at the input image's size, checked before anything is computed
        if inpaint_mask is not None:
            pair = inpaint_pair(input_image, inpaint_mask, resize_mask)
        elif input_image is not None:
            image_to_tensor(input_image, "input_image")
        h, w = self._latent_size(height, width)

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
        schedule = self._schedule(num_inference_steps, h, w, strength)
        x = self._tokens(noise if clean is None else add_noise(clean, noise, schedule.sigmas[0]))
        clean_tokens = None if clean is None else self._tokens(clean)
        positions = self._positions(h, w, edit_image, reuse_edit_kv)
        mask = None  # placed on the latent grid exactly where the image lands
        if pair is not None:
            mask = self._tokens(place_mask(pair[1], height, width, grid=(h, w)).to(self.device))

        self._batch_memo = {}
        self._step_cache = None if step_cache is None else StepCacheSession(step_cache, schedule.sigmas)
        n_steps = len(schedule)
        with (
            self._on_device(self.dit),
            kv_cache_prevalidated(self.dit, not self.check_kv_each_step),
            self.loaded_loras_applied(),
        ):
            for i, t in enumerate(tqdm(schedule.timesteps, disable=not progress, desc="denoising")):
                if self._step_cache is not None:
                    self._step_cache.step = i
                cond_i = at_step(cond, i, n_steps)
                uncond_i = None if uncond is None else at_step(uncond, i, n_steps)
                velocity = self._velocity(x, t, cond_i, uncond_i, cfg_scale, positions)
                if mask is not None:  # outside the mask, steer straight onto the input's latents
                    keep = velocity_towards(x, clean_tokens, schedule.sigmas[i])
                    velocity = keep * (1 - mask) + velocity * mask
                x = euler_step(x, velocity, schedule.sigmas[i], schedule.sigmas[i + 1]).float()
                if callback_on_step_end is not None:
                    out = callback_on_step_end(self, i, t, {"latents": x})
                    x = (out or {}).get("latents", x)

        self.step_cache_stats = None if self._step_cache is None else self._step_cache.finish()
        self._step_cache = None
        check_finite_output(x, "latents after denoising")
        latents_out = self._untokens(x, h, w)
        if output_type == "latent":
            return self._latent_output(latents_out)
        images = self.decode_latents(latents_out).float()
        check_finite_output(images, "decoded images")
        if inpaint_mask is not None:  # pixels outside the mask: exactly the input's
            images = paste_unmasked(images, input_image, inpaint_mask, resize_mask)
        return tensor_to_output(images, output_type)

    def _conditioning(self, prompts, max_len, kv_cache, lora, extra_embedding, side: str):
        """One CFG side: text (+ the template's extra tokens), its KV cache and LoRA, validated once."""
        text = self._text(prompts, max_len, extra_embedding, f"{side}extra_text_embedding")
        if isinstance(kv_cache, ScheduledKVCache):
            entries = [(self._checked_kv(c, len(prompts), side), a, b) for c, a, b in kv_cache.entries]
            kv_cache = ScheduledKVCache(entries)
        else:
            kv_cache = self._checked_kv(kv_cache, len(prompts), side)
        if lora:
            validate_lora(self.dit, lora, source=f"{side}lora")
            check_finite_cache(lora, f"{side}lora")
        return self.conditioning_class(**text, kv_cache=kv_cache or None, lora=lora or None)

    def _velocity(self, x: Tensor, t: Tensor, cond, uncond, cfg_scale: float, positions) -> Tensor:
        adapter = self.family.adapter
        hidden = self._hidden(x, positions)
        timestep = self._timestep(t, x.shape[0])
        if uncond is None:
            with self._cache_stream("cond", cond):
                return adapter.to_velocity(self._model(hidden, timestep, cond, positions))
        key = (id(cond.kv_cache), id(uncond.kv_cache))
        if key not in self._batch_memo:  # concatenating the sides' caches once per call, not per step
            batched = (
                self._batch_sides(cond, uncond, self._own_tokens(x, hidden)) if self.cfg_batching else None
            )
            self._batch_memo[key] = batched
        batched = self._batch_memo[key]
        if batched is not None:
            with self._cache_stream("both", batched):
                both = self._model(
                    torch.cat([hidden, hidden]), torch.cat([timestep, timestep]), batched, positions
                )
            pos, neg = both.chunk(2)
        else:
            with self._cache_stream("cond", cond):
                pos = self._model(hidden, timestep, cond, positions)
            with self._cache_stream("uncond", uncond):
                neg = self._model(hidden, timestep, uncond, positions)
        return adapter.guide(pos, neg, cfg_scale)

    def _cache_stream(self, name: str, c):
        """The step cache of one stream of DiT calls (a CFG side, or both batched), if the call has
        one; its history restarts when the side's KV tokens change (a step window opened or closed)."""
        if self._step_cache is None:
            return contextlib.nullcontext()
        return self._step_cache.stream(self.dit, name, id(c.kv_cache))

    # -- hooks ------------------------------------------------------------------------------------

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        """The noise grid ``(h, w)`` for an image size."""
        raise NotImplementedError

    def _schedule(self, steps: int, h: int, w: int, strength: float) -> FlowMatchSchedule:
        raise NotImplementedError

    def _text(self, prompts: list[str], max_len: int, extra: Tensor | None, name: str) -> dict[str, Any]:
        """The conditioning's text fields (prompt features with the extra tokens appended)."""
        raise NotImplementedError

    def _tokens(self, latents: Tensor) -> Tensor:
        """Latents ``[B, C, h, w]`` in the layout the loop steps (FLUX.2: packed tokens)."""
        return latents

    def _untokens(self, x: Tensor, h: int, w: int) -> Tensor:
        return x

    def _positions(self, h: int, w: int, edit_image, reuse_edit_kv: bool = False) -> Any:
        """Whatever ``_model`` needs besides the conditioning, computed once per call (``reuse_edit_kv``:
        the reference tokens' keys/values may be reused across steps)."""
        return None

    def _hidden(self, x: Tensor, positions) -> Tensor:
        return x.to(self.torch_dtype)

    def _timestep(self, t: Tensor, batch: int) -> Tensor:
        raise NotImplementedError

    def _own_tokens(self, x: Tensor, hidden: Tensor) -> int:
        """The DiT's own sequence length per row (bounds the KV padding CFG batching accepts)."""
        raise NotImplementedError

    def _batch_sides(self, cond, uncond, own_tokens: int):
        raise NotImplementedError

    def _model(self, hidden: Tensor, timestep: Tensor, c, positions) -> Tensor:
        """The DiT's float32 output for the image tokens, in the family's sign."""
        raise NotImplementedError

    def _latent_output(self, latents: Tensor) -> Tensor:
        return latents
