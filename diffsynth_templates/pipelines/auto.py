"""Pick the pipeline class a model folder needs: FLUX.2-klein or Z-Image, read from its own files.

    pipe = load_pipeline("Tongyi-MAI/Z-Image-Turbo")   # -> ZImagePipeline
    pipe = load_pipeline("models/toy/base")            # -> Flux2ImagePipeline

Thin wrappers over the family registry (``pipelines.families``), which owns detection.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .families import FAMILIES, detect_family, get_family

BACKBONES = tuple(FAMILIES)
BACKBONE_TITLES = {name: family.title for name, family in FAMILIES.items()}  # how messages spell them


def detect_backbone(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
) -> str:
    """``"flux2"`` or ``"zimage"`` for a local model folder or a ModelScope id (or a transformer folder)."""
    return detect_family(source, revision=revision, cache_dir=cache_dir, offline=offline).name


def pipeline_class(backbone: str) -> type:
    return get_family(backbone).pipeline_class()


def load_pipeline(
    source: str | os.PathLike,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
):
    """``Flux2ImagePipeline`` or ``ZImagePipeline``, whichever ``source`` holds, loaded with ``kwargs``."""
    where = {k: kwargs.get(k) for k in ("revision", "cache_dir", "offline")}
    return pipeline_class(detect_backbone(source, **where)).from_pretrained(
        source, torch_dtype, device, **kwargs
    )
