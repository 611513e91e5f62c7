"""diffsynth-templates: controllable diffusion with Diffusion Templates.

Public names are imported lazily so ``import diffsynth_templates`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Flux2DiT": "diffsynth_templates.backbones.flux2_dit",
    "Flux2DiTConfig": "diffsynth_templates.backbones.flux2_dit",
    "KVCacheError": "diffsynth_templates.backbones.attention",
    "Qwen3TextEncoder": "diffsynth_templates.backbones.qwen3",
    "Qwen3Config": "diffsynth_templates.backbones.qwen3",
    "Flux2VAE": "diffsynth_templates.backbones.flux2_vae",
    "Flux2VAEConfig": "diffsynth_templates.backbones.flux2_vae",
    "CheckpointError": "diffsynth_templates.loading",
    "ZImageDiT": "diffsynth_templates.backbones.zimage_dit",
    "ZImageDiTConfig": "diffsynth_templates.backbones.zimage_dit",
    "AutoencoderKL": "diffsynth_templates.backbones.autoencoder_kl",
    "AutoencoderKLConfig": "diffsynth_templates.backbones.autoencoder_kl",
    "Flux2ImagePipeline": "diffsynth_templates.pipelines.flux2_pipeline",
    "ZImagePipeline": "diffsynth_templates.pipelines.zimage_pipeline",
    "TemplatePipeline": "diffsynth_templates.templates.pipeline",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffsynth_templates' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)
