"""Data processors of the template zoo: one dataset row (+ its loaded image) -> the template's inputs.

A training row is ``{"image": ..., "prompt": str, "edit_image"?: ..., "template_inputs"?: {...}}``
(DESIGN.md 4.6). The dataset reader resolves and opens every file path; a processor only ever sees
PIL images. Two layers:

1. *Measurements* and *conditions* (``mean_luminance``, ``canny_edges``, ``random_inpaint_mask``,
   ...) live in ``conditions``; they are re-exported here. Everything random takes an explicit seed.
2. *Processors* (this module): one small class per task, configured by a dataclass and looked up by
   name (``get_processor("inpaint", coverage=(0.2, 0.6))``). ``processor(row, image, seed)`` returns
   the template inputs.

Precedence: a value the row already gives in ``template_inputs`` under an output key wins over the
computed one (and the computation is skipped), so a curated dataset can pin e.g. its own depth maps,
masks or brightness labels. Other ``template_inputs`` keys pass through unchanged, except those a
processor reads as its own source (e.g. the aesthetic score).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from PIL import Image

from ..pipelines.image_io import inpaint_pair
from .conditions import (
    LUMA_WEIGHTS,
    MASK_COVERAGE_TOLERANCE,
    SHARPNESS_CANNY_THRESHOLDS,
    SHARPNESS_EDGE_DENSITY_SCALE,
    SHARPNESS_LAPLACIAN_LOG10_SCALE,
    ImageInput,
    ProcessorError,
    Range,
    Row,
    Seed,
    aesthetic_lora_id,
    canny_edges,
    check_canny_thresholds,
    check_mask_options,
    check_range,
    check_scale,
    check_thresholds,
    content_reference,
    degrade_for_super_resolution,
    depth_or_edges,
    depth_to_rgb,
    make_rng,
    mean_luminance,
    mean_rgb,
    random_inpaint_mask,
    sharpness,
    to_pil_rgb,
    to_rgb_array,
    upsample_bicubic,
)

logger = logging.getLogger(__name__)

__all__ = [
    "LUMA_WEIGHTS",
    "MASK_COVERAGE_TOLERANCE",
    "PROCESSORS",
    "SHARPNESS_CANNY_THRESHOLDS",
    "SHARPNESS_EDGE_DENSITY_SCALE",
    "SHARPNESS_LAPLACIAN_LOG10_SCALE",
    "AestheticConfig",
    "AestheticProcessor",
    "AgeConfig",
    "AgeProcessor",
    "BrightnessConfig",
    "BrightnessProcessor",
    "ColorProcessor",
    "ContentReferenceConfig",
    "ContentReferenceProcessor",
    "EditConfig",
    "EditProcessor",
    "ImageInput",
    "InpaintConfig",
    "InpaintProcessor",
    "ProcessorConfig",
    "ProcessorError",
    "Range",
    "Row",
    "Seed",
    "SharpnessProcessor",
    "StructureConfig",
    "StructureProcessor",
    "SuperResolutionConfig",
    "SuperResolutionProcessor",
    "TemplateProcessor",
    "aesthetic_lora_id",
    "canny_edges",
    "content_reference",
    "degrade_for_super_resolution",
    "depth_or_edges",
    "depth_to_rgb",
    "get_processor",
    "make_rng",
    "mean_luminance",
    "mean_rgb",
    "random_inpaint_mask",
    "register_processor",
    "sharpness",
    "to_pil_rgb",
    "to_rgb_array",
    "upsample_bicubic",
]


# ----------------------------------------------------------------------------------------------
# processors


@dataclass
class ProcessorConfig:
    """Base of the processors' configs; processors without options use it as is."""


class TemplateProcessor:
    """Row + loaded image + per-sample seed -> template inputs. Subclasses implement ``process``."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[ProcessorConfig]] = ProcessorConfig
    # template_inputs keys read as a source and not passed through (e.g. the aesthetic score).
    consumed_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ProcessorConfig | None = None) -> None:
        config = self.config_class() if config is None else config
        if not isinstance(config, self.config_class):
            raise ProcessorError(
                f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config

    def __call__(self, row: Mapping[str, Any], image: ImageInput, seed: int) -> dict[str, Any]:
        if not isinstance(row, Mapping):
            raise ProcessorError(f"processor {self.name!r}: row must be a dict, got {type(row).__name__}")
        make_rng(seed, f"processor {self.name!r} seed")  # validate early, even for deterministic ones
        given = row.get("template_inputs") or {}
        if not isinstance(given, Mapping):
            raise ProcessorError(
                f"processor {self.name!r}: row['template_inputs'] must be a dict, got {type(given).__name__}"
            )
        computed = self.process(row, to_pil_rgb(image, f"processor {self.name!r} image"), seed, given)
        extras = {k: v for k, v in given.items() if k not in computed and k not in self.consumed_keys}
        return {**extras, **computed}

    def process(self, row: Row, image: Image.Image, seed: int, given: Row) -> dict[str, Any]:
        """The template inputs; ``given`` is the row's ``template_inputs``, whose values win."""
        raise NotImplementedError

    def _field(self, row: Mapping[str, Any], given: Mapping[str, Any], field: str) -> Any:
        """A required value from the row itself or its template_inputs; a clear error if absent."""
        for source in (given, row):
            if source.get(field) is not None:
                return source[field]
        raise ProcessorError(
            f"processor {self.name!r} needs the row field {field!r} (top level or in template_inputs); "
            f"this row has keys {sorted(row)}"
        )

    def _number(self, value: Any, field: str) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise ProcessorError(f"processor {self.name!r}: {field} is {value!r}; expected a finite number")
        return number

    def _image(self, value: Any, field: str) -> Image.Image:
        return to_pil_rgb(value, f"processor {self.name!r} {field}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


PROCESSORS: dict[str, type[TemplateProcessor]] = {}


def register_processor(name: str) -> Callable[[type[TemplateProcessor]], type[TemplateProcessor]]:
    """Class decorator: make a processor available to ``get_processor(name)``."""

    def decorate(cls: type[TemplateProcessor]) -> type[TemplateProcessor]:
        if not (isinstance(cls, type) and issubclass(cls, TemplateProcessor)):
            raise ProcessorError(
                f"register_processor({name!r}) decorates TemplateProcessor subclasses, got {cls!r}"
            )
        if name in PROCESSORS and PROCESSORS[name] is not cls:
            raise ProcessorError(f"processor name {name!r} is already taken by {PROCESSORS[name].__name__}")
        cls.name = name
        PROCESSORS[name] = cls
        return cls

    return decorate


def get_processor(name: str, **config: Any) -> TemplateProcessor:
    """Build the processor registered as ``name``; ``config`` are fields of its config dataclass."""
    if name not in PROCESSORS:
        raise ProcessorError(
            f"unknown data processor {name!r}; known processors: {', '.join(sorted(PROCESSORS))}"
        )
    cls = PROCESSORS[name]
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ProcessorError(
            f"processor {name!r} has no option(s) {unknown}; its {cls.config_class.__name__} takes "
            f"{sorted(fields) or 'no options'}"
        )
    return cls(cls.config_class(**config))


@dataclass
class BrightnessConfig(ProcessorConfig):
    standard: str = "rec709"  # luma weights, see LUMA_WEIGHTS

    def __post_init__(self) -> None:
        if self.standard not in LUMA_WEIGHTS:
            raise ProcessorError(
                f"brightness standard is {self.standard!r}; expected one of {sorted(LUMA_WEIGHTS)}"
            )


@register_processor("brightness")
class BrightnessProcessor(TemplateProcessor):
    """``{"scale": mean luma of the target in [0, 1]}``."""

    config_class = BrightnessConfig

    def process(self, row: Row, image: Image.Image, seed: int, given: Row) -> dict[str, Any]:
        if "scale" in given:
            return {"scale": self._number(given["scale"], "template_inputs['scale']")}
        return {"scale": mean_luminance(image, self.config.standard)}


@register_processor("sharpness")
class SharpnessProcessor(TemplateProcessor):
    """``{"scale": sharpness of the target in [0, 1]}``."""

    def process(self, row: Row, image: Image.Image, seed: int, given: Row) -> dict[str, Any]:
        if "scale" in given:
            return {"scale": self._number(given["scale"], "template_inputs['scale']")}
        return {"scale": sharpness(image)}


@register_processor("color")
class ColorProcessor(TemplateProcessor):
    """``{"R": r, "G": g, "B": b}``: the target's mean color, each in [0, 1]."""

    def process(self, row: Row, image: Image.Image, seed: int, given: Row) -> dict[str, Any]:
        measured = dict(zip("RGB", mean_rgb(image))) if not all(k in given for k in "RGB") else {}
        return {
            k: self._number(given[k], f"template_inputs[{k!r}]") if k in given else measured[k] for k in "RGB"
        }


@dataclass
class StructureConfig(ProcessorConfig):
    canny_low: float = 100
    canny_high: float = 200

    def __post_init__(self) -> None:
        check_canny_thresholds(self.canny_low, self.canny_high)


@register_processor("structure")
class StructureProcessor(TemplateProcessor):
    """``{"image": RGB map}``: the row's ``template_inputs["image"]`` (e.g. depth), else Canny edges."""

    config_class = StructureConfig

    def process(self, row: Row, image: Image.Image, seed: int, given: Row) -> dict[str, Any]:
        return {
            "image": depth_or_edges(given.get("image"), image, self.config.canny_low, self.config.canny_high)
        }


@dataclass
class SuperResolutionConfig(ProcessorConfig):
    scale: int = 4
    blur_sigma: Range = (0.2, 1.5)
    jpeg_quality: int | tuple[int, int] = (40, 95)
    upsample: bool = False  # True: bicubic back to the target size (for templates that want that)

    def __post_init__(self) -> None:
        check_scale(self.scale)
        check_range(self.blur_sigma, "blur_sigma", 0.0, 50.0)
        check_range(self.jpeg_quality, "jpeg_quality", 1, 100)


@register_processor("super_resolution")
class SuperResolutionProcessor(TemplateProcessor):
    """``{"image": degraded low-res copy of the target}`` (see ``degrade_for_super_resolution``)."""

    config_class = SuperResolutionConfig

    def process(self, row: Row, image: Image.Image, seed: int, given: Row) -> dict[str, Any]:
        if "image" in given:
            return {"image": self._image(given["image"], "template_inputs['image']")}
        cfg = self.config
        low = degrade_for_super_resolution(image, cfg.scale, cfg.blur_sigma, cfg.jpeg_quality, seed)
        return {"image": upsample_bicubic(low, image.size) if cfg.upsample else low}


@dataclass
class InpaintConfig(ProcessorConfig):
    coverage: Range = (0.1, 0.5)
    kind: str = "mixed"
    tolerance: float = MASK_COVERAGE_TOLERANCE
    force_inpaint: bool | None = None  # None: emit no flag; True/False: passed to the template as is
    # a row's own mask of another size than its image: an error, or (True) stretched to the image
    # by the template (emits resize_mask=True)
    resize_mask: bool = False

    def __post_init__(self) -> None:
        check_mask_options(self.coverage, self.kind, self.tolerance)
        if not isinstance(self.resize_mask, bool):
            raise ProcessorError(f"inpaint resize_mask must be true or false, got {self.resize_mask!r}")


@register_processor("inpaint")
class InpaintProcessor(TemplateProcessor):
    """``{"image": target, "mask": L mask (255 = regenerate)}`` (+ ``force_inpaint`` if configured)."""

    config_class = InpaintConfig

    def process(self, row: Row, image: Image.Image, seed: int, given: Row) -> dict[str, Any]:
        cfg = self.config
        source = self._image(given["image"], "template_inputs['image']") if "image" in given else image
        out: dict[str, Any] = {"image": source}
        if "mask" in given:  # the row's own mask: checked against its image as the template will
            resize = given.get("resize_mask", cfg.resize_mask)
            inpaint_pair(
                source,
                given["mask"],
                resize,
                f"processor 'inpaint' image ({row.get('image', 'template_inputs')!r})",
                "processor 'inpaint' template_inputs['mask']",
            )
            out["mask"] = given["mask"]
            if cfg.resize_mask and "resize_mask" not in given:
                out["resize_mask"] = True
        else:
            width, height = out["image"].size
            mask = random_inpaint_mask(height, width, cfg.coverage, cfg.kind, seed, cfg.tolerance)
            out["mask"] = Image.fromarray(mask, mode="L")
        if cfg.force_inpaint is not None:
            out["force_inpaint"] = given.get("force_inpaint", cfg.force_inpaint)
        return out


@dataclass
class EditConfig(ProcessorConfig):
    source_field: str = "edit_image"  # row field holding the loaded source image
    instruction_field: str = "prompt"  # row field holding the edit instruction


@register_processor("edit")
class EditProcessor(TemplateProcessor):
    """``{"image": source image, "prompt": instruction}``; the target image is what the edit yields."""

    config_class = EditConfig

    def process(self, row: Row, image: Image.Image, seed: int, given: Row) -> dict[str, Any]:
        source = given["image"] if "image" in given else self._field(row, {}, self.config.source_field)
        prompt = given["prompt"] if "prompt" in given else self._field(row, {}, self.config.instruction_field)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ProcessorError(
                f"processor 'edit': the instruction is {prompt!r}; expected a non-empty string"
            )
        return {"image": self._image(source, f"row[{self.config.source_field!r}]"), "prompt": prompt}


@dataclass
class ContentReferenceConfig(ProcessorConfig):
    crop_scale: Range = (0.6, 1.0)
    flip: bool = True

    def __post_init__(self) -> None:
        check_range(self.crop_scale, "crop_scale", 0.0, 1.0, low_open=True)


@register_processor("content_reference")
class ContentReferenceProcessor(TemplateProcessor):
    """``{"image": augmented target}``; a row's own reference (``template_inputs["image"]``) is used as is."""

    config_class = ContentReferenceConfig

    def process(self, row: Row, image: Image.Image, seed: int, given: Row) -> dict[str, Any]:
        if "image" in given:
            return {"image": self._image(given["image"], "template_inputs['image']")}
        return {"image": content_reference(image, seed, self.config.crop_scale, self.config.flip)}


@dataclass
class AestheticConfig(ProcessorConfig):
    score_field: str = "aesthetic_score"
    thresholds: tuple[float, ...] = (4.5, 5.5, 6.5)  # levels 0..3 on a 1-10 aesthetic-predictor scale
    lora_scale: float = 1.0

    def __post_init__(self) -> None:
        self.thresholds = check_thresholds(self.thresholds)


@register_processor("aesthetic")
class AestheticProcessor(TemplateProcessor):
    """``{"lora_ids": [level], "lora_scales": [scale]}`` from the row's aesthetic score."""

    config_class = AestheticConfig

    @property
    def consumed_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.config.score_field,)

    def process(self, row: Row, image: Image.Image, seed: int, given: Row) -> dict[str, Any]:
        if "lora_ids" in given:
            ids = (
                list(given["lora_ids"])
                if isinstance(given["lora_ids"], list | tuple)
                else [given["lora_ids"]]
            )
            return {
                "lora_ids": ids,
                "lora_scales": list(given.get("lora_scales", [self.config.lora_scale] * len(ids))),
            }
        field = self.config.score_field
        score = self._number(self._field(row, given, field), field)
        return {
            "lora_ids": [aesthetic_lora_id(score, self.config.thresholds)],
            "lora_scales": [self.config.lora_scale],
        }


@dataclass
class AgeConfig(ProcessorConfig):
    age_field: str = "age"


@register_processor("age")
class AgeProcessor(TemplateProcessor):
    """``{"age": float}`` read from the row (top level or ``template_inputs``)."""

    config_class = AgeConfig

    def process(self, row: Row, image: Image.Image, seed: int, given: Row) -> dict[str, Any]:
        field = self.config.age_field
        age = self._number(self._field(row, given, field), field)
        if age < 0:
            raise ProcessorError(
                f"processor 'age': {field} is {age}; expected a non-negative number of years"
            )
        return {"age": age}
