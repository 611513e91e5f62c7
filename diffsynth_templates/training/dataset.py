"""The training Dataset: validated samples -> training dicts at their bucket size.

The jobs behind it live in their own modules: ``metadata`` (reading metadata files; the contract is in
its docstring), ``rows`` (validating one row), ``images`` (opening and cropping images), ``buckets``
(training sizes and the batch sampler) and ``samples`` (the records and errors). Their public names
are re-exported here, so ``from diffsynth_templates.training.dataset import read_metadata`` keeps working.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from .buckets import (
    BucketBatchSampler,
    assign_bucket,
    fit_to_pixel_budget,
    make_buckets,
    warn_upscaling,
)
from .images import cover_crop, load_and_crop, load_image, to_rgb
from .metadata import read_metadata
from .rows import has_image_extension
from .samples import (
    FORMATS,
    IMAGE_EXTENSIONS,
    KNOWN_FIELDS,
    BadRow,
    BadRowPolicy,
    DatasetError,
    MetadataReport,
    Sample,
    SampleLoadError,
    Size,
    sample_draw,
    sample_seed,
)

__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "KNOWN_FIELDS",
    "BadRow",
    "BadRowPolicy",
    "BucketBatchSampler",
    "DatasetConfig",
    "DatasetError",
    "MetadataReport",
    "Sample",
    "SampleLoadError",
    "Size",
    "TemplateDataset",
    "assign_bucket",
    "collate_as_lists",
    "cover_crop",
    "fit_to_pixel_budget",
    "load_and_crop",
    "load_image",
    "make_buckets",
    "read_metadata",
    "sample_draw",
    "sample_seed",
    "to_rgb",
]


@dataclass
class DatasetConfig:
    max_pixels: int = 1024 * 1024
    multiple: int = 16
    buckets: bool = True  # off: each image gets its own fit_to_pixel_budget size (use batch size 1)
    aspect_range: tuple[float, float] = (0.5, 2.0)
    num_aspects: int = 9
    seed: int = 0  # global seed mixed into every sample's seed
    # "target": edit images and template-input images are cover-cropped to the target's size, so
    # spatially aligned inputs (depth, edges, masks) stay aligned; "original": RGB at native size
    condition_size: Literal["target", "original"] = "target"
    # condition dropout (``TrainConfig`` has the meanings): shares of the samples, drawn per sample seed
    caption_dropout: float = 0.0
    unaligned_prompt: float = 0.0
    unaligned_prompt_field: str = "prompt_unaligned"
    template_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.multiple < 1 or self.max_pixels < self.multiple**2:
            raise ValueError(f"max_pixels={self.max_pixels} must hold at least one {self.multiple}^2 tile")
        if self.condition_size not in ("target", "original"):
            raise ValueError(f"condition_size must be 'target' or 'original', got {self.condition_size!r}")


class TemplateDataset(torch.utils.data.Dataset):
    """Samples as training dicts::

        {"id": str, "image": PIL RGB (bucket size), "prompt": str, "edit_images": [PIL RGB],
         "template_inputs": dict (image files loaded as PIL RGB, other files left as Path), "seed": int}

    ``sizes[i]`` is sample ``i``'s output size; pass ``sizes`` to ``BucketBatchSampler`` (or use
    ``batch_sampler``). An image that fails to load here (deleted or damaged after indexing) raises
    ``SampleLoadError`` naming the file and the metadata line; the trainer catches it and skips the
    sample (inside a DataLoader, the whole batch). Use ``collate_as_lists`` as the collate function.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        config: DatasetConfig | None = None,
        source: str | os.PathLike | None = None,
    ):
        self.samples = list(samples)
        self.config = config or DatasetConfig()
        self.source = source  # the metadata file, for error messages
        cfg = self.config
        if cfg.buckets:
            self.buckets: list[Size] | None = make_buckets(
                cfg.max_pixels, cfg.multiple, cfg.aspect_range, cfg.num_aspects
            )
            self.sizes = [assign_bucket(*s.size, self.buckets) for s in self.samples]
        else:
            self.buckets = None
            self.sizes = [fit_to_pixel_budget(*s.size, cfg.max_pixels, cfg.multiple) for s in self.samples]
        warn_upscaling(self.samples, self.sizes, cfg.max_pixels)
        if cfg.unaligned_prompt > 0:
            self._check_unaligned_prompts()

    @classmethod
    def from_report(cls, report: MetadataReport, config: DatasetConfig | None = None) -> TemplateDataset:
        return cls(report.samples, config, source=report.path)

    def batch_sampler(self, batch_size: int, **kwargs: Any) -> BucketBatchSampler:
        return BucketBatchSampler(self.sizes, batch_size, **{"seed": self.config.seed, **kwargs})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample, size = self.samples[index], self.sizes[index]
        condition_size = size if self.config.condition_size == "target" else None
        seed = sample_seed(sample.id, self.config.seed)
        item = {
            "id": sample.id,
            "image": self._load(sample, sample.image, size),
            "prompt": self._prompt(sample, seed),
            "edit_images": [self._load(sample, path, condition_size) for path in sample.edit_images],
            "template_inputs": self._load_inputs(sample, sample.template_inputs, condition_size),
            "seed": seed,
        }
        if self.config.template_dropout > 0:  # only then: items stay as they were with the option off
            item["drop_template"] = sample_draw(seed, "template_dropout") < self.config.template_dropout
        return item

    def _prompt(self, sample: Sample, seed: int) -> str:
        """The sample's prompt, or (condition dropout) the empty one or its unaligned one; one draw
        decides both, so the two shares never overlap."""
        cfg = self.config
        if cfg.caption_dropout == 0 and cfg.unaligned_prompt == 0:
            return sample.prompt
        draw = sample_draw(seed, "prompt")
        if draw < cfg.caption_dropout:
            return ""
        if draw < cfg.caption_dropout + cfg.unaligned_prompt:
            return sample.extra[cfg.unaligned_prompt_field]
        return sample.prompt

    def _check_unaligned_prompts(self) -> None:
        name = self.config.unaligned_prompt_field
        bad = [s.line for s in self.samples if not isinstance(s.extra.get(name), str)]
        if bad:
            where = f"{self.source}" if self.source else "the metadata"
            raise DatasetError(
                f"--unaligned_prompt needs a {name!r} string in every row; {where} lines {bad[:10]} "
                f"({len(bad)} rows) have none. Add the column or pass --unaligned_prompt_field NAME"
            )

    def _load_inputs(self, sample: Sample, value: Any, size: Size | None) -> Any:
        if isinstance(value, dict):
            return {k: self._load_inputs(sample, v, size) for k, v in value.items()}
        if isinstance(value, list):
            return [self._load_inputs(sample, v, size) for v in value]
        if isinstance(value, Path) and has_image_extension(value):
            return self._load(sample, value, size)
        return value

    def _load(self, sample: Sample, path: Path, size: Size | None) -> Image.Image:
        try:
            return load_image(path, size)
        except Exception as err:  # any decoder failure means the same thing: this sample is unusable now
            where = f"{self.source}, line {sample.line}" if self.source else f"metadata line {sample.line}"
            raise SampleLoadError(
                f"cannot load {path} ({where}, sample {sample.id}): {type(err).__name__}: {err}. "
                "The sample is skipped; restore the file or remove the row.",
                path=path,
                line=sample.line,
                sample_id=sample.id,
            ) from err


def collate_as_lists(batch: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """DataLoader collate for ``TemplateDataset``: PIL images cannot be stacked, so keep lists per key."""
    return {key: [item[key] for item in batch] for key in batch[0]}
