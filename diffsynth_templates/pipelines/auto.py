"""Pick the pipeline class a model folder needs: FLUX.2-klein or Z-Image, read from its own files.

    pipe = load_pipeline("Tongyi-MAI/Z-Image-Turbo")   # -> ZImagePipeline
    pipe = load_pipeline("models/toy/base")            # -> Flux2ImagePipeline

Thin wrappers over the family registry (``pipelines.families``), which owns detection.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .common import COMPONENTS, ComponentFolders, PipelineInputError, component_folders
from .families import FAMILIES, detect_family, family_of_folder, get_family

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


def backbone_of_folders(folders: ComponentFolders) -> str:
    """``detect_backbone`` for folders resolved already: read where the DiT came from (its override's
    folder, else the model's), as ``detect_backbone(transformer or model)`` does."""
    transformer = folders.roots["transformer"]
    source = folders.source if transformer == folders.root else transformer
    return family_of_folder(transformer, source).name


def resolve_model(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    **overrides: str | os.PathLike | None,
) -> ComponentFolders:
    """The model's component folders, every source (``source``, each component override) resolved once:
    what an entry point hands to ``from_pretrained`` and to ``backbone_of_folders``."""
    unknown = sorted(set(overrides) - set(COMPONENTS))
    if unknown:
        raise PipelineInputError(f"unknown component(s) {unknown}; components are {list(COMPONENTS)}")
    return component_folders(source, overrides, revision, cache_dir, offline)


def pipeline_class(backbone: str) -> type:
    return get_family(backbone).pipeline_class()


def load_pipeline(
    source: str | os.PathLike,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
):
    """``Flux2ImagePipeline`` or ``ZImagePipeline``, whichever ``source`` holds, loaded with ``kwargs``."""
    where = {k: kwargs.pop(k, None) for k in ("revision", "cache_dir", "offline")}
    overrides = {k: kwargs.pop(k) for k in COMPONENTS if k in kwargs}
    folders = resolve_model(source, **where, **overrides)  # once; from_pretrained reuses the folders
    return pipeline_class(backbone_of_folders(folders)).from_pretrained(
        folders, torch_dtype, device, **overrides, **where, **kwargs
    )
