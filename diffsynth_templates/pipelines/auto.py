"""Pick the pipeline class a model folder needs: FLUX.2-klein or Z-Image, read from its own files.

    pipe = load_pipeline("Tongyi-MAI/Z-Image-Turbo")   # -> ZImagePipeline
    pipe = load_pipeline("models/toy/base")            # -> Flux2ImagePipeline

The backbone is decided by ``model_index.json``'s ``_class_name`` (what diffusers writes), else by
``transformer/config.json``'s (or ``config.json``'s, for a transformer folder itself); anything else
is an error that says what was found.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..loading.resolve import resolve_model_path
from .common import PipelineInputError

# class names (pipeline or transformer) -> backbone
_CLASS_BACKBONES = {
    "Flux2KleinPipeline": "flux2",
    "Flux2Pipeline": "flux2",
    "Flux2Transformer2DModel": "flux2",
    "ZImagePipeline": "zimage",
    "ZImageTransformer2DModel": "zimage",
}
BACKBONES = ("flux2", "zimage")
BACKBONE_TITLES = {"flux2": "FLUX.2", "zimage": "Z-Image"}  # how messages spell them


def _class_name(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise PipelineInputError(f"{str(path)!r} is not a JSON object: {e}") from e


def detect_backbone(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
) -> str:
    """``"flux2"`` or ``"zimage"`` for a local model folder or a ModelScope id (or a transformer folder)."""
    root = resolve_model_path(
        source,
        allow_patterns=["model_index.json", "transformer/config.json", "config.json"],
        revision=revision,
        cache_dir=cache_dir,
        offline=offline,
    )
    found = []
    for path in (root / "model_index.json", root / "transformer" / "config.json", root / "config.json"):
        name = _class_name(path)
        if name is None:
            continue
        found.append(f"{path.relative_to(root)}: {name!r}")
        if name in _CLASS_BACKBONES:
            return _CLASS_BACKBONES[name]
    raise PipelineInputError(
        f"cannot tell which backbone {str(source)!r} is: "
        f"{'; '.join(found) if found else 'it has no model_index.json, transformer/config.json or config.json'}. "
        f"Known classes: {sorted(_CLASS_BACKBONES)}"
    )


def pipeline_class(backbone: str) -> type:
    if backbone == "flux2":
        from .flux2_pipeline import Flux2ImagePipeline

        return Flux2ImagePipeline
    if backbone == "zimage":
        from .zimage_pipeline import ZImagePipeline

        return ZImagePipeline
    raise PipelineInputError(f"unknown backbone {backbone!r}; expected one of {BACKBONES}")


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
