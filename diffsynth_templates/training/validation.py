"""Validation images during training: the pipeline run with the template as it is right now.

Each entry of ``--validation_inputs`` is one image::

    {"prompt": "a red circle", "template_inputs": {"scale": 0.8}, "seed": 0,
     "height": 512, "width": 512, "num_inference_steps": 20, "cfg_scale": 4.0, "negative_prompt": ""}

String values of ``template_inputs`` that name an existing image file are opened as images. The
template runs exactly as ``TemplatePipeline`` runs it (``process_inputs`` then ``forward``, no
gradients, its cache checked against the DiT); the images of one step form a grid saved as
``validation/step-{step}.png``.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..loading.image_files import open_image
from ..pipelines.lora import merge_loras
from ..templates.cache import TemplateOutput, to_device, validate_output
from .config import ConfigError
from .dataset import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)


def _load_images(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _load_images(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_load_images(v) for v in value]
    if isinstance(value, str) and Path(value).suffix.lower() in IMAGE_EXTENSIONS:
        return open_image(value, "--validation_inputs image", error=ConfigError)
    return value


def check_validation_images(items: list[dict[str, Any]] | None) -> None:
    """Open every image ``--validation_inputs`` names now, so a bad one fails before training, not at step N."""
    for item in items or []:
        _load_images(item.get("template_inputs") or {})


@torch.no_grad()
def render_validation(
    pipe: Any,  # Flux2ImagePipeline or ZImagePipeline around the DiT being trained
    items: list[dict[str, Any]],
    template: torch.nn.Module | None,
    dit_lora: torch.nn.Module | None,
) -> list[Image.Image]:
    accepted = set(inspect.signature(pipe.__call__).parameters) - {"self", "prompt"}
    images = []
    for item in items:
        call = {k: v for k, v in item.items() if k != "template_inputs"}
        call.setdefault("height", 256)
        call.setdefault("width", 256)
        call.setdefault("seed", 0)
        cache: dict[str, Any] = {}
        if template is not None:
            inputs = _load_images(item.get("template_inputs") or {})
            features = template.process_inputs(pipe=pipe, **inputs)
            cache = template(pipe=pipe, **features)
            validate_output(TemplateOutput("the trained template", cache), pipe.dit, accepted, batch_size=1)
            cache = to_device(cache, pipe.device, pipe.torch_dtype)
        if dit_lora is not None:
            own = {k: v.detach() for k, v in dit_lora.cache().items()}
            cache["lora"] = merge_loras([cache["lora"], own]) if cache.get("lora") else own
        images.append(pipe(**call, **cache, progress=False)[0])
    return images


def save_grid(images: list[Image.Image], path: Path, columns: int = 4) -> Path:
    """Tile images row by row (cells sized to the largest image) and write a PNG atomically."""
    width = max(i.width for i in images)
    height = max(i.height for i in images)
    columns = min(columns, len(images))
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for n, image in enumerate(images):
        grid.paste(image, ((n % columns) * width, (n // columns) * height))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
