"""Measurements and conditions computed from images, for the data processors (``processors``).

1. *Measurements* (``mean_luminance``, ``sharpness``, ``mean_rgb``): what a scalar template is
   conditioned on, measured on the target image so the template learns "make the image like this".
2. *Conditions* (``canny_edges``, ``degrade_for_super_resolution``, ``random_inpaint_mask``, ...):
   the image-like inputs. Everything random takes an explicit ``seed`` (an int or a
   ``numpy.random.Generator``) and never touches global RNG state, so a stage-I rerun rebuilds
   bit-identical inputs for every sample.

The ``check_*`` helpers validate processor options; the processors' configs call them too.
"""

from __future__ import annotations

import bisect
import io
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from PIL import Image

from ..errors import DiffSynthTemplatesError

logger = logging.getLogger(__name__)


class ProcessorError(DiffSynthTemplatesError, ValueError, TypeError):
    """A data processor's config, row or image is wrong; the message names the processor and field."""


ImageInput = Image.Image | np.ndarray
Seed = int | np.random.Generator
Range = float | tuple[float, float]
Row = Mapping[str, Any]

# Luma weights on gamma-encoded sRGB values (Y', not linear-light luminance).
LUMA_WEIGHTS: dict[str, tuple[float, float, float]] = {
    "rec709": (0.2126, 0.7152, 0.0722),
    "rec601": (0.299, 0.587, 0.114),
}

# Sharpness = mean of two saturating scores, each strictly increasing in its measurement:
#   tanh(log10(1 + var(Laplacian)) / SHARPNESS_LAPLACIAN_LOG10_SCALE)
#   tanh(canny_edge_density / SHARPNESS_EDGE_DENSITY_SCALE)
# Laplacian variance of 8-bit photos spans ~3 (heavy blur) to ~1e4 (over-sharpened), hence the log:
# variance 1e3 maps to tanh(1) = 0.76. Photo edge densities (Canny 100/200) are ~0.05-0.15; 0.1 maps
# to 0.76 too. Both depend on resolution: compare images of similar size.
SHARPNESS_LAPLACIAN_LOG10_SCALE = 3.0
SHARPNESS_EDGE_DENSITY_SCALE = 0.1
SHARPNESS_CANNY_THRESHOLDS = (100, 200)

# random_inpaint_mask reaches |coverage - target| <= tolerance; in practice within tolerance / 2.
MASK_COVERAGE_TOLERANCE = 0.05
_MAX_MASK_SHAPES = 1000


# ----------------------------------------------------------------------------------------------
# input checks


def to_rgb_array(image: ImageInput, name: str = "image") -> np.ndarray:
    """Return ``image`` as a contiguous uint8 ``[H, W, 3]`` array.

    PIL images of any mode are converted to RGB (an alpha channel is dropped); arrays must already be
    uint8 ``[H, W, 3]``.
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ProcessorError(
                f"{name} array has shape {image.shape}; expected [H, W, 3] RGB "
                "(stack a grayscale [H, W] array with np.stack([a] * 3, -1))"
            )
        if image.dtype != np.uint8:
            raise ProcessorError(
                f"{name} array has dtype {image.dtype}; expected uint8 "
                "(convert [0, 1] floats with (a * 255).round().astype(np.uint8))"
            )
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ProcessorError(f"{name} array has shape {image.shape}; expected a non-empty image")
        return np.ascontiguousarray(image)
    if isinstance(image, str):
        raise ProcessorError(
            f"{name} is the path {image!r}; load it first (PIL.Image.open(path).convert('RGB'))"
        )
    raise ProcessorError(
        f"{name} must be a PIL image or a uint8 [H, W, 3] numpy array, got {type(image).__name__}"
    )


def to_pil_rgb(image: ImageInput, name: str = "image") -> Image.Image:
    """Return ``image`` as a PIL RGB image (see ``to_rgb_array`` for what is accepted)."""
    if isinstance(image, Image.Image) and image.mode == "RGB":
        return image
    return Image.fromarray(to_rgb_array(image, name), mode="RGB")


def _gray(image: ImageInput, name: str) -> np.ndarray:
    return cv2.cvtColor(to_rgb_array(image, name), cv2.COLOR_RGB2GRAY)


def make_rng(seed: Seed, name: str = "seed") -> np.random.Generator:
    """A private generator from an int seed (or the generator itself); never the global RNG."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ProcessorError(f"{name} must be an int or a numpy.random.Generator, got {type(seed).__name__}")
    if seed < 0:
        raise ProcessorError(f"{name} is {seed}; expected a non-negative int")
    return np.random.default_rng(int(seed))


def check_range(
    value: Range, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> tuple[float, float]:
    """Normalize a number or a ``(min, max)`` pair to a pair, checking it lies inside [low, high]."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        pair = (float(value), float(value))
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        pair = (float(value[0]), float(value[1]))
    else:
        raise ProcessorError(f"{name} is {value!r}; expected a number or a (min, max) pair")
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    for v in pair:
        below = v <= low if low_open else v < low
        above = v >= high if high_open else v > high
        if not math.isfinite(v) or below or above:
            raise ProcessorError(f"{name} is {value!r}; every value must lie in {left}{low}, {high}{right}")
    if pair[0] > pair[1]:
        raise ProcessorError(f"{name} is {value!r}; expected min <= max")
    return pair


def sample_in(rng: np.random.Generator, pair: tuple[float, float]) -> float:
    return pair[0] if pair[0] == pair[1] else float(rng.uniform(pair[0], pair[1]))


# ----------------------------------------------------------------------------------------------
# measurements


def mean_luminance(image: ImageInput, standard: str = "rec709") -> float:
    """Mean luma in [0, 1]: Rec. 709 (default) or Rec. 601 weights applied to sRGB-encoded values."""
    if standard not in LUMA_WEIGHTS:
        raise ProcessorError(f"standard is {standard!r}; expected one of {sorted(LUMA_WEIGHTS)}")
    rgb = to_rgb_array(image).reshape(-1, 3).astype(np.float64)
    return float(rgb.mean(axis=0) @ np.asarray(LUMA_WEIGHTS[standard]) / 255.0)


def mean_rgb(image: ImageInput) -> tuple[float, float, float]:
    """Per-channel means in [0, 1]."""
    r, g, b = (to_rgb_array(image).reshape(-1, 3).mean(axis=0) / 255.0).tolist()
    return float(r), float(g), float(b)


def sharpness(image: ImageInput) -> float:
    """A [0, 1] sharpness score: blur lowers it, sharpening raises it (constants documented above)."""
    gray = _gray(image, "image")
    edges = cv2.Canny(gray, *SHARPNESS_CANNY_THRESHOLDS)
    edge_density = np.count_nonzero(edges) / edges.size
    laplacian_var = float(cv2.Laplacian(gray, cv2.CV_64F).var())
    laplacian_score = math.tanh(math.log10(1.0 + laplacian_var) / SHARPNESS_LAPLACIAN_LOG10_SCALE)
    edge_score = math.tanh(edge_density / SHARPNESS_EDGE_DENSITY_SCALE)
    return float(0.5 * laplacian_score + 0.5 * edge_score)


# ----------------------------------------------------------------------------------------------
# conditions


def check_canny_thresholds(low: float, high: float) -> None:
    if not (0 <= low < high):
        raise ProcessorError(f"Canny thresholds are low={low}, high={high}; expected 0 <= low < high")


def canny_edges(image: ImageInput, low: float = 100, high: float = 200, mode: str = "L") -> Image.Image:
    """Canny edge map as a PIL image with values {0, 255}; ``mode`` "L" or "RGB" (3 equal channels)."""
    check_canny_thresholds(low, high)
    if mode not in ("L", "RGB"):
        raise ProcessorError(f"mode is {mode!r}; expected 'L' or 'RGB'")
    edges = Image.fromarray(cv2.Canny(_gray(image, "image"), low, high), mode="L")
    return edges.convert("RGB") if mode == "RGB" else edges


def _normalize_to_uint8(array: np.ndarray) -> np.ndarray:
    """Min-max stretch any numeric map (16-bit or float depth) to uint8; a constant map becomes 0."""
    array = array.astype(np.float64)
    lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round((np.nan_to_num(array, nan=lo) - lo) / (hi - lo) * 255.0).astype(np.uint8)


def depth_to_rgb(depth: ImageInput, name: str = "depth map") -> Image.Image:
    """A loaded depth map (8/16-bit or float, PIL or array) as an RGB image; non-8-bit maps are stretched."""
    if isinstance(depth, Image.Image):
        if depth.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            depth = np.asarray(depth)
        else:
            return depth.convert("RGB")
    if isinstance(depth, np.ndarray):
        if depth.ndim == 3 and depth.shape[-1] == 1:
            depth = depth[..., 0]
        if depth.ndim == 2:
            gray = depth if depth.dtype == np.uint8 else _normalize_to_uint8(depth)
            return Image.fromarray(gray, mode="L").convert("RGB")
    return to_pil_rgb(depth, name)


def depth_or_edges(
    depth: ImageInput | None, image: ImageInput | None = None, low: float = 100, high: float = 200
) -> Image.Image:
    """The structure condition as RGB: the row's depth map if given, else Canny edges of ``image``.

    Both come back as RGB so the structure template sees one format whichever source a row uses.
    """
    if depth is not None:
        return depth_to_rgb(depth)
    if image is None:
        raise ProcessorError(
            "depth_or_edges needs a depth map or an image to compute Canny edges from; got neither"
        )
    return canny_edges(image, low, high, mode="RGB")


def check_scale(scale: int) -> None:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 2:
        raise ProcessorError(f"super-resolution scale is {scale!r}; expected an int >= 2")


def degrade_for_super_resolution(
    image: ImageInput,
    scale: int = 4,
    blur_sigma: Range = (0.2, 1.5),
    jpeg_quality: int | tuple[int, int] = (40, 95),
    seed: Seed = 0,
) -> Image.Image:
    """A realistic low-res input: Gaussian blur, area downscale, JPEG re-encode.

    The output is exactly ``(W // scale, H // scale)``. ``blur_sigma`` (pixels of the input; 0 skips
    the blur) and ``jpeg_quality`` (1..100) are fixed values or ``(min, max)`` ranges sampled with
    ``seed``. Use ``upsample_bicubic`` for the classic baseline at the original size.
    """
    check_scale(scale)
    sigma_range = check_range(blur_sigma, "blur_sigma", 0.0, 50.0)
    quality_range = check_range(jpeg_quality, "jpeg_quality", 1, 100)
    array = to_rgb_array(image)
    height, width = array.shape[:2]
    out_w, out_h = width // scale, height // scale
    if out_w < 1 or out_h < 1:
        raise ProcessorError(f"image is {width}x{height}; too small to downscale by {scale}")
    rng = make_rng(seed)
    sigma = sample_in(rng, sigma_range)
    lo_q, hi_q = int(quality_range[0]), int(quality_range[1])
    quality = lo_q if lo_q == hi_q else int(rng.integers(lo_q, hi_q + 1))
    if sigma > 0:
        array = cv2.GaussianBlur(array, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
    # INTER_AREA averages the covered pixels: a fair model of a sensor at lower resolution.
    small = cv2.resize(array, (out_w, out_h), interpolation=cv2.INTER_AREA)
    buffer = io.BytesIO()
    Image.fromarray(small, mode="RGB").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        result = decoded.convert("RGB")
    logger.debug("SR degradation: scale %d, sigma %.3f, jpeg quality %d", scale, sigma, quality)
    return result


def upsample_bicubic(image: ImageInput, size: tuple[int, int]) -> Image.Image:
    """Bicubic resize to ``size = (width, height)``: the baseline a super-resolution template must beat."""
    width, height = size
    if width < 1 or height < 1:
        raise ProcessorError(f"size is {size}; expected (width, height) with both >= 1")
    return to_pil_rgb(image).resize((width, height), Image.Resampling.BICUBIC)


def _draw_box(mask: np.ndarray, rng: np.random.Generator, max_area: float) -> None:
    """A random box of area <= ``max_area`` pixels (so boxes never overshoot the target coverage)."""
    height, width = mask.shape
    area = max(1.0, rng.uniform(0.5, 1.0) * max_area)
    aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
    box_w = int(min(width, max(1, math.floor(area)), max(1, math.floor(math.sqrt(area * aspect)))))
    box_h = int(min(height, max(1, math.floor(area / box_w))))
    top = int(rng.integers(0, height - box_h + 1))
    left = int(rng.integers(0, width - box_w + 1))
    mask[top : top + box_h, left : left + box_w] = 255


def _draw_stroke(mask: np.ndarray, rng: np.random.Generator, size: float) -> None:
    """A brush stroke: a random thick polyline (round joints and caps, as cv2 draws thick lines)."""
    height, width = mask.shape
    thickness = max(1, round(rng.uniform(0.02, 0.08) * min(height, width) * size))
    n_points = int(rng.integers(4, 11))
    point = np.array([rng.uniform(0, width - 1), rng.uniform(0, height - 1)])
    angle = rng.uniform(0, 2 * math.pi)
    points = [point]
    for _ in range(n_points - 1):
        angle += rng.normal(0.0, 0.8)  # momentum: strokes wander rather than zigzag
        length = max(1.0, rng.uniform(0.05, 0.2) * max(height, width) * size)
        point = point + length * np.array([math.cos(angle), math.sin(angle)])
        point = np.clip(point, 0, [width - 1, height - 1])
        points.append(point)
    polyline = np.round(np.stack(points)).astype(np.int32).reshape(-1, 1, 2)
    # LINE_8, not LINE_AA: anti-aliasing would put gray values into a {0, 255} mask.
    cv2.polylines(mask, [polyline], isClosed=False, color=255, thickness=thickness, lineType=cv2.LINE_8)


def check_mask_options(coverage: Range, kind: str, tolerance: float) -> tuple[float, float]:
    if kind not in ("box", "brush", "mixed"):
        raise ProcessorError(f"mask kind is {kind!r}; expected 'box', 'brush' or 'mixed'")
    if not (0 < tolerance < 0.5):
        raise ProcessorError(f"mask tolerance is {tolerance}; expected a fraction in (0, 0.5)")
    return check_range(coverage, "coverage", 0.0, 1.0, low_open=True, high_open=True)


def random_inpaint_mask(
    height: int,
    width: int,
    coverage: Range = (0.1, 0.5),
    kind: str = "mixed",
    seed: Seed = 0,
    tolerance: float = MASK_COVERAGE_TOLERANCE,
) -> np.ndarray:
    """A uint8 ``[height, width]`` mask in {0, 255}; 255 marks the region to regenerate.

    A target coverage is drawn from ``coverage`` (a fraction in (0, 1), or a ``(min, max)`` range),
    then boxes, brush strokes or both (``kind`` "box", "brush", "mixed") are added until the white
    fraction is within ``tolerance`` of it (boxes are sized to the remaining deficit; a stroke that
    would overshoot is rejected and the next one drawn smaller).
    """
    for value, name in ((height, "height"), (width, "width")):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ProcessorError(f"mask {name} is {value!r}; expected a positive int")
    cov_range = check_mask_options(coverage, kind, tolerance)
    total = int(height) * int(width)
    if total * tolerance < 2:
        raise ProcessorError(
            f"a {height}x{width} mask cannot hit a coverage within {tolerance}; use a larger mask or tolerance"
        )
    rng = make_rng(seed)
    target = sample_in(rng, cov_range)
    mask = np.zeros((height, width), dtype=np.uint8)
    filled, stroke_size, slack = 0, 1.0, tolerance / 2
    for attempt in range(2 * _MAX_MASK_SHAPES):
        deficit = target - filled / total
        if deficit <= slack and filled > 0:  # never an empty mask: it would teach nothing
            break
        # After _MAX_MASK_SHAPES tries, finish with boxes: they always make progress.
        use_box = attempt >= _MAX_MASK_SHAPES or kind == "box" or (kind == "mixed" and rng.random() < 0.5)
        if use_box:
            _draw_box(mask, rng, deficit * total)
            filled = int(np.count_nonzero(mask))
            continue
        candidate = mask.copy()
        _draw_stroke(candidate, rng, stroke_size)
        count = int(np.count_nonzero(candidate))
        if count / total > target + slack:
            stroke_size *= 0.7
            continue
        mask, filled = candidate, count
    achieved = filled / total
    if abs(achieved - target) > tolerance:  # unreachable with the size check above; kept as a guard
        raise RuntimeError(f"inpaint mask reached coverage {achieved:.3f} for target {target:.3f}")
    logger.debug("inpaint mask (%s): target %.3f, achieved %.3f", kind, target, achieved)
    return mask


def content_reference(
    image: ImageInput, seed: Seed, crop_scale: Range = (0.6, 1.0), flip: bool = True
) -> Image.Image:
    """A random crop (each side a ``crop_scale`` fraction, aspect kept), maybe mirrored, resized back.

    ``crop_scale=1.0, flip=False`` returns the image unchanged. Augmenting the reference stops a
    content-reference template from learning to copy pixels instead of content.
    """
    lo, hi = check_range(crop_scale, "crop_scale", 0.0, 1.0, low_open=True)
    pil = to_pil_rgb(image)
    rng = make_rng(seed)
    width, height = pil.size
    side = sample_in(rng, (lo, hi))
    crop_w, crop_h = max(1, round(width * side)), max(1, round(height * side))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    out = pil.crop((left, top, left + crop_w, top + crop_h))
    if flip and rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out if out.size == pil.size else out.resize(pil.size, Image.Resampling.BICUBIC)


def check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(t) for t in thresholds)
    if (
        not values
        or any(not math.isfinite(t) for t in values)
        or any(a >= b for a, b in zip(values, values[1:]))
    ):
        raise ProcessorError(
            f"aesthetic thresholds are {thresholds!r}; expected a non-empty, strictly increasing list"
        )
    return values


def aesthetic_lora_id(score: float, thresholds: Sequence[float] = (4.5, 5.5, 6.5)) -> int:
    """Preference level of ``score``: the number of thresholds <= score (0 .. len(thresholds))."""
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise ProcessorError(f"aesthetic score is {score!r}; expected a finite number")
    return bisect.bisect_right(check_thresholds(thresholds), float(score))
