"""The family record: everything one backbone family does differently, outside its ``nn.Module``s.

A ``Family`` names the classes that identify it in a model folder, its KV-cache layout, where its tiny
and preset configs live, the model-call adapter that sampling and training both go through, the
training sigma draw, what it can do (edit images, inpainting, guidance), its default ``cfg_scale``
and the template cache keys its pipeline accepts. ``families/__init__.py`` holds the registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ...errors import DiffSynthTemplatesError

# what a template's cache may set: on each CFG side, the conditioning; on the positive side also the
# sampling arguments (an inpainting template sets input_image and inpaint_mask, a size template height)
SIDE_CACHE_KEYS = ("kv_cache", "lora", "extra_text_embedding")
CALL_CACHE_KEYS = (
    "height", "width", "num_inference_steps", "cfg_scale", "seed", "latents", "max_sequence_length",
    "input_image", "denoising_strength",
)  # fmt: skip


class UnsupportedFeatureError(DiffSynthTemplatesError, ValueError):
    """The base model cannot use this part of a sample or call (e.g. edit images on Z-Image)."""


@dataclass(frozen=True)
class KVLayout:
    """What a template built for one DiT config must match: its KV blocks (DESIGN.md 4.1), widths and
    latents."""

    block_names: tuple[str, ...]  # the KV cache's keys
    num_heads: int
    head_dim: int
    latent_channels: int  # channels of ``pipe.encode_image`` latents
    patch_size: int  # latent pixels per DiT token side (1: the VAE latents are already patchified)
    text_dim: int  # width of the prompt embeddings the DiT reads


@dataclass(frozen=True)
class Family:
    """One backbone family (FLUX.2-klein, Z-Image, ...): a per-model spec, in the spirit of torchtitan's."""

    name: str  # "flux2" | "zimage": template.json's base_backbone, the registry key
    title: str  # how messages spell it
    class_names: tuple[str, ...]  # model_index.json / transformer config ``_class_name``s that mean it
    dit_class: type
    dit_config_class: type
    pipeline: str  # "module:Class" of its sampling pipeline (imported on demand)
    kv_layout: Callable[[Any], KVLayout]  # DiT config -> layout
    name_prefixes: tuple[str, ...]  # KV block names and DiT Linear paths start with one of these
    # (config, double_blocks, single_blocks) -> the DiT Linear paths of its attention projections
    attention_modules: Callable[..., tuple[str, ...]]
    tiny_spec: str  # "module:Class" of the random tiny pipeline's spec (its ``.dit`` is the tiny config)
    presets: tuple[str, ...]  # classmethods of ``dit_config_class`` giving the released configs
    adapter: Any  # the model call, shared by sampling and training (see flux2.py / zimage.py)
    draw_noise: Callable[..., tuple[Tensor, Tensor]]  # (seed, shape, mu) -> (sigma [], noise shape)
    supports_edit_images: bool
    supports_inpainting: bool
    supports_guidance: bool
    default_cfg_scale: float | None  # None: the pipeline's variant decides (Z-Image turbo/base)
    # (model_index.json, the folder's _class_names, its name or id, variant) -> (steps, cfg_scale,
    # where they come from) when the folder is one of this family's released models, else None
    recommended_sampling: Callable[[dict, set, str, str | None], tuple[int, float, str] | None] = (
        lambda index, classes, name, variant: None
    )
    edit_images_unsupported: str = ""  # why not, and what to do instead, when it has no edit images
    # its native checkpoint naming (families/*_layouts.py): LoRA files, their export, single files
    checkpoint_layout: Any = None

    @property
    def cache_keys(self) -> frozenset[str]:
        """The keys a template's cache may hold for the positive side of a call."""
        keys = {*CALL_CACHE_KEYS, *SIDE_CACHE_KEYS}
        keys |= {"inpaint_mask"} if self.supports_inpainting else set()
        keys |= {"edit_image"} if self.supports_edit_images else set()
        return frozenset(keys)

    @property
    def negative_cache_keys(self) -> frozenset[str]:
        """The keys a negative template's cache may hold (passed as ``negative_{key}``)."""
        return frozenset(SIDE_CACHE_KEYS)

    def pipeline_class(self) -> type:
        return _load(self.pipeline)

    def tiny_config(self) -> Any:
        """The DiT config of the random tiny pipeline (tests, benchmarks, the toy world)."""
        return _load(self.tiny_spec)().dit

    def preset(self, name: str) -> Any:
        if name not in self.presets:
            raise UnsupportedFeatureError(f"{self.title} has the presets {list(self.presets)}, not {name!r}")
        return getattr(self.dit_config_class, name)()

    def check_edit_images(self, lines: list[int]) -> None:
        """Refuse, once and before any work, rows with edit images when the family takes none."""
        if self.supports_edit_images or not lines:
            return
        shown = ", ".join(map(str, lines[:10])) + (f" and {len(lines) - 10} more" if len(lines) > 10 else "")
        raise UnsupportedFeatureError(
            f"metadata lines {shown} have an edit_image, but the base model is {self.title}: "
            f"{self.edit_images_unsupported}"
        )


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)
