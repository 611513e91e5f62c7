"""Stage I: one dataset sample -> the features stage II trains on, all computed without gradients.

For a sample: the prompt's text embeddings (text encoder), the VAE latents of the target image and of
every edit image, and the template's features: the data processor turns the row into template
inputs (seeded by the sample's own seed, so a rerun and ``--task full`` build identical inputs), then
the template's ``process_inputs`` turns those into features.

Text embeddings and latents are identified by their content (``content_key``): the same prompt or
the same image under the same encoder is computed once and stored once, whichever sample, run or
template asked for it. Stage I and ``--task full`` run exactly this code, one sample at a time, so
both paths see bit-identical features.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from PIL import Image
from torch import Tensor

from ..errors import DiffSynthTemplatesError
from ..loading.tensor_tree import detached_cpu
from ..pipelines.image_io import fit_to_area
from .backbones import EDIT_IMAGES_UNSUPPORTED, UnsupportedFeatureError, get_backbone
from .dataset import SampleLoadError, TemplateDataset

logger = logging.getLogger(__name__)


class FeatureError(DiffSynthTemplatesError, ValueError):
    """A template's ``process_inputs`` returned something that cannot be cached."""


class SampleSkipped(Exception):
    """This sample cannot be used (file lost, processor or template rejected it); it is skipped."""


@dataclass
class SampleFeatures:
    """Everything stage II needs for one sample. Tensors are on the CPU."""

    id: str
    order: int  # position among the dataset's valid rows: fixes the batch plan
    line: int  # metadata line, for messages
    size: tuple[int, int]  # (width, height) of the target image
    latents: Tensor | None  # [C, h, w] float32 (FLUX.2: 128, Z-Image: 16); None when only its key is kept
    prompt_embeds: Tensor | None  # [L, D]
    edit_latents: list[Tensor | None] = field(default_factory=list)
    template: dict[str, Any] = field(default_factory=dict)  # process_inputs output: tensors + JSON values
    keys: dict[str, Any] = field(default_factory=dict)  # content keys: "text", "latents", "edit"
    # shapes of latents / prompt_embeds / edit_latents, recorded in the cache and checked on reading
    shapes: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# nested features <-> flat tensors + JSON structure
# --------------------------------------------------------------------------------------------------


def flatten_features(value: Any, tensors: dict[str, Tensor], prefix: str, where: str = "features") -> Any:
    """A JSON description of ``value`` whose tensors are moved into ``tensors`` under ``prefix{n}``.

    Dicts (string keys), lists, tuples, tensors, numbers, strings, booleans and None are kept exactly;
    anything else (a PIL image, a numpy array) is an error naming the offending entry.
    """
    if isinstance(value, Tensor):
        name = f"{prefix}{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise FeatureError(f"{where} has non-string keys {bad}; feature dicts need string keys")
        return {
            "dict": {k: flatten_features(v, tensors, prefix, f"{where}[{k!r}]") for k, v in value.items()}
        }
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [flatten_features(v, tensors, prefix, f"{where}[{i}]") for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    hint = " (convert images to tensors inside process_inputs)" if isinstance(value, Image.Image) else ""
    raise FeatureError(
        f"{where} is a {type(value).__name__}; features must be tensors, numbers, strings, or lists/dicts of them{hint}"
    )


def unflatten_features(structure: Any, get: Callable[[str], Tensor]) -> Any:
    ((kind, value),) = structure.items()
    if kind == "tensor":
        return get(value)
    if kind == "dict":
        return {k: unflatten_features(v, get) for k, v in value.items()}
    if kind == "list":
        return [unflatten_features(v, get) for v in value]
    if kind == "tuple":
        return tuple(unflatten_features(v, get) for v in value)
    return value


def content_key(kind: str, **parts: Any) -> str:
    text = json.dumps({"kind": kind, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def image_digest(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# the extractor
# --------------------------------------------------------------------------------------------------


class ContentStoreLike(Protocol):
    """What the extractor needs from a content store (``feature_cache.ContentStore`` on disk)."""

    def has(self, kind: str, key: str) -> bool: ...

    def put(self, kind: str, key: str, tensor: Tensor) -> None: ...

    def shape(self, kind: str, key: str) -> list[int]: ...


class FeatureExtractor:
    """``extractor(item) -> SampleFeatures`` for items of ``SafeItems`` (a ``TemplateDataset`` row)."""

    def __init__(
        self,
        pipe: Any,  # the backbone's pipeline (Flux2ImagePipeline / ZImagePipeline); its DiT is not used
        fingerprints: dict[str, str],  # text_encoder, vae, tokenizer
        max_sequence_length: int,
        max_pixels: int,
        template: torch.nn.Module | None = None,
        processor: Callable | None = None,
        store: ContentStoreLike | None = None,
    ):
        self.pipe, self.template, self.processor, self.store = pipe, template, processor, store
        self.max_sequence_length, self.max_pixels = max_sequence_length, max_pixels
        self.backbone = get_backbone(pipe.backbone)
        dtype = str(pipe.torch_dtype)
        # the backbone is part of every key: FLUX.2 and Z-Image encode text (and images) differently,
        # even with the very same Qwen3 weights
        self._text_id = {
            "backbone": self.backbone.name,
            "text_encoder": fingerprints["text_encoder"],
            "tokenizer": fingerprints["tokenizer"],
            "max_sequence_length": max_sequence_length,
            "dtype": dtype,
        }
        self._vae_id = {"backbone": self.backbone.name, "vae": fingerprints["vae"], "dtype": dtype}

    @torch.no_grad()
    def __call__(self, item: dict[str, Any]) -> SampleFeatures:
        if "error" in item:
            raise SampleSkipped(item["error"])
        where = f"metadata line {item['line']} (sample {item['id']})"
        if item["edit_images"] and not self.backbone.supports_edit_images:
            raise UnsupportedFeatureError(
                f"{where} has an edit_image, but the base model is {self.backbone.title}: {EDIT_IMAGES_UNSUPPORTED}"
            )
        image: Image.Image = item["image"]
        text_key, embeds = self._text(item["prompt"])
        latents_key, latents = self._latents(image, image.size)
        edit = [self._latents(e, self._edit_size(e)) for e in item["edit_images"]]
        features = SampleFeatures(
            id=item["id"],
            order=item["order"],
            line=item["line"],
            size=image.size,
            latents=latents,
            prompt_embeds=embeds,
            edit_latents=[t for _, t in edit],
            keys={"text": text_key, "latents": latents_key, "edit": [k for k, _ in edit]},
            shapes={"latents": self._shape("latents", latents_key, latents),
                    "text": self._shape("text", text_key, embeds),
                    "edit": [self._shape("latents", k, t) for k, t in edit]},
        )  # fmt: skip
        if self.template is not None:
            features.template = self._template_features(item, where)
        return features

    def _shape(self, kind: str, key: str, tensor: Tensor | None) -> list[int]:
        """A tensor's shape; one kept only in the store is read from its file header."""
        return list(tensor.shape) if tensor is not None else self.store.shape(kind, key)

    def _text(self, prompt: str) -> tuple[str, Tensor | None]:
        key = content_key("text", prompt=prompt, **self._text_id)
        if self.store is not None and self.store.has("text", key):
            return key, None
        embeds = self.backbone.prompt_embeds(self.pipe, prompt, self.max_sequence_length).cpu().contiguous()
        if self.store is not None:
            self.store.put("text", key, embeds)
            return key, None
        return key, embeds

    def _edit_size(self, image: Image.Image) -> tuple[int, int]:
        """Edit images are encoded at their own size, shrunk to the pixel budget (as the pipeline does)."""
        height, width = fit_to_area(image.height, image.width, self.max_pixels, self.pipe.pixels_per_token)
        return width, height

    def _latents(self, image: Image.Image, size: tuple[int, int]) -> tuple[str, Tensor | None]:
        width, height = size
        key = content_key(
            "latents",
            image=image_digest(image),
            size=list(image.size),
            target=[width, height],
            **self._vae_id,
        )
        if self.store is not None and self.store.has("latents", key):
            return key, None
        latents = self.pipe.encode_image(image, height, width)[0].cpu().contiguous()
        if self.store is not None:
            self.store.put("latents", key, latents)
            return key, None
        return key, latents

    def _template_features(self, item: dict[str, Any], where: str) -> dict[str, Any]:
        edit_images = item["edit_images"]
        row = {
            **item.get("extra", {}),
            "image": item["image"],
            "prompt": item["prompt"],
            "template_inputs": item["template_inputs"],
        }
        if edit_images:
            row["edit_image"] = edit_images[0] if len(edit_images) == 1 else edit_images
        training = self.template.training
        self.template.eval()  # the same mode in stage I and in --task full, where the template trains
        try:
            if self.processor is not None:
                inputs = self.processor(row, item["image"], item["seed"])
            else:
                inputs = dict(item["template_inputs"])
            if item.get("drop_template"):
                inputs = blank_images(inputs, where)
            features = self.template.process_inputs(pipe=self.pipe, **inputs)
        except FeatureError:
            raise
        except Exception as e:  # a row the processor or template cannot use: skip it, say which and why
            raise SampleSkipped(
                f"{where}: the data processor / process_inputs failed: {type(e).__name__}: {e}"
            ) from e
        finally:
            self.template.train(training)
        if not isinstance(features, dict):
            raise FeatureError(f"process_inputs returned {type(features).__name__}; it must return a dict")
        flatten_features(features, {}, "check/")  # reject what cannot be cached, in both modes alike
        return detached_cpu(features)


def blank_images(inputs: dict[str, Any], where: str) -> dict[str, Any]:
    """Template dropout: every image among the template's inputs replaced by a black one of its size
    and mode, the "no condition" a map-reading template learns to pass through. A template that reads
    no image has no such case: an error, rather than training on unchanged inputs."""
    found = []

    def blank(value: Any) -> Any:
        if isinstance(value, Image.Image):
            found.append(value)
            return Image.new(value.mode, value.size)
        if isinstance(value, dict):
            return {k: blank(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(blank(v) for v in value)
        return value

    blanked = blank(inputs)
    if not found:
        raise FeatureError(
            f"{where}: --template_dropout replaces a template's input images by black ones, but its inputs "
            f"{sorted(inputs)} hold no image; train this template with --template_dropout 0"
        )
    return blanked


class SafeItems(torch.utils.data.Dataset):
    """``TemplateDataset`` items (plus extra fields, line and order) for some of its indices.

    A sample whose image vanished or broke after indexing comes back as ``{"error": ...}`` instead of
    raising inside a DataLoader worker, so it is skipped alone and iteration goes on.
    """

    def __init__(self, dataset: TemplateDataset, indices: list[int] | None = None):
        self.dataset = dataset
        self.indices = list(range(len(dataset))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.indices[i]
        sample = self.dataset.samples[index]
        base = {"id": sample.id, "line": sample.line, "order": index}
        try:
            item = self.dataset[index]
        except SampleLoadError as e:
            return {**base, "error": str(e)}
        return {**item, **base, "extra": sample.extra}
