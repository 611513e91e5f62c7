"""The toy world: a procedural dataset of simple shapes on plain backgrounds.

Each scene is one or two flat-colored shapes (circle, square, triangle, star, ring) placed in cells of
a 3x3 grid over a solid or vertically graded background, then passed through the photometric controls
that templates learn to steer: a global brightness factor, an optional color tint and a Gaussian blur.
Captions name only the content (shapes, colors, sizes, positions, background), never the photometric
controls, so a base model trained on them leaves those axes free for templates to control.

A ``SceneSpec`` fully determines its image: ``render(spec)`` is a pure function, and ``generate`` writes
the spec of every sample into the metadata so any image can be re-rendered or edited exactly.

    python -m diffsynth_templates.toy.world --out datasets/toy --num_samples 4000 --seed 0 --size 64

Depends only on numpy, Pillow and OpenCV so it runs anywhere the project does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
from PIL import Image

from diffsynth_templates.loading.write_safety import write_folder

logger = logging.getLogger(__name__)

DATASET_FOLDERS = ("images", "masks", "edges", "lowres")  # beside metadata.jsonl / metadata.json

# ---------------------------------------------------------------------------------------------------
# Vocabulary. Small and regular on purpose: a tiny text encoder + DiT must learn every word.
# ---------------------------------------------------------------------------------------------------

# sRGB values in [0, 255]; one value per name so a word always means the same color.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPE_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
BACKGROUND_COLORS: tuple[str, ...] = ("white", "gray", "black", "blue", "green", "yellow", "purple", "red")
SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")

# Nominal radius of each size as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.075, "medium": 0.115, "large": 0.16}

# Named 3x3 grid cells -> cell center (x, y) as fractions of the image side.
_ROWS = (("top", 1 / 6), ("middle", 1 / 2), ("bottom", 5 / 6))
_COLS = (("left", 1 / 6), ("center", 1 / 2), ("right", 5 / 6))


def _cell_name(row: str, col: str) -> str:
    if row == "middle" and col == "center":
        return "center"
    return f"{row} {col}"


POSITIONS: dict[str, tuple[float, float]] = {
    _cell_name(row, col): (x, y) for row, y in _ROWS for col, x in _COLS
}

# Tints wash the whole image toward a color (a "soft RGB" shift); names never appear in captions.
TINTS: dict[str, tuple[int, int, int]] = {
    "warm": (255, 150, 50),
    "cool": (60, 130, 255),
    "lime": (80, 220, 90),
    "magenta": (230, 60, 200),
}

# Tint strengths are drawn from [MIN, max_tint]. The base model's data stops at 0.25: strong enough to see,
# weak enough that the color words of the caption still hold. A color template's data may go further.
MIN_TINT_STRENGTH = 0.05
MAX_TINT_STRENGTH = 0.25
BRIGHTNESS_RANGE = (0.4, 1.6)
MAX_BLUR_SIGMA = 3.0
MAX_JITTER = 0.04  # of the image side; keeps a shape well inside its named cell
SUPERSAMPLE = 4  # render at 4x then area-downscale: cheap, clean anti-aliased edges
_SHIFT = 4  # fractional bits of cv2 drawing coordinates
LOWRES_FACTOR = 4
# Image side of the shipped toy world: 64 px keeps the toy DiT at 8 x 8 tokens (FLUX.2 patchifies 2 x 2
# latents of a 4x-downsampling toy VAE) while small shapes stay recognizable.
TOY_SIZE = 64

# Radius of the circle that encloses each kind, relative to the nominal radius (for placement).
_EXTENT: dict[str, float] = {"circle": 1.0, "ring": 1.0, "star": 1.05, "square": 1.21, "triangle": 1.27}
_EDGE_MARGIN = 0.02  # keep shapes this far (fraction of side) from the image border

# ---------------------------------------------------------------------------------------------------
# Scene description
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeSpec:
    kind: str
    color: str
    size: str
    position: str
    # Offset from the cell center, as fractions of the image side; part of the spec so render is pure.
    jitter: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        _check_choice("shape kind", self.kind, SHAPE_KINDS)
        _check_choice("shape color", self.color, SHAPE_COLORS)
        _check_choice("shape size", self.size, tuple(SIZES))
        _check_choice("shape position", self.position, tuple(POSITIONS))
        if len(self.jitter) != 2 or any(abs(j) > MAX_JITTER + 1e-9 for j in self.jitter):
            raise ValueError(f"shape jitter {self.jitter} must be two offsets within +-{MAX_JITTER}")
        object.__setattr__(self, "jitter", (float(self.jitter[0]), float(self.jitter[1])))


@dataclass(frozen=True)
class SceneSpec:
    background: str
    shapes: tuple[ShapeSpec, ...]
    # When set, the background is a vertical gradient from `background` (top) to this color (bottom).
    background_bottom: str | None = None
    brightness: float = 1.0  # multiplies all channels, then clipped to [0, 1]
    blur_sigma: float = 0.0  # Gaussian sigma in output pixels; 0 means sharp
    tint: str | None = None
    tint_strength: float = 0.0  # 0: no tint, 1: the image is replaced by the tint color

    def __post_init__(self) -> None:
        _check_choice("background color", self.background, BACKGROUND_COLORS)
        if self.background_bottom is not None:
            _check_choice("background_bottom color", self.background_bottom, BACKGROUND_COLORS)
        if not 1 <= len(self.shapes) <= 2:
            raise ValueError(f"a scene holds 1 or 2 shapes, got {len(self.shapes)}")
        object.__setattr__(self, "shapes", tuple(self.shapes))
        if not BRIGHTNESS_RANGE[0] <= self.brightness <= BRIGHTNESS_RANGE[1]:
            raise ValueError(f"brightness {self.brightness} outside {BRIGHTNESS_RANGE}")
        if not 0.0 <= self.blur_sigma <= MAX_BLUR_SIGMA:
            raise ValueError(f"blur_sigma {self.blur_sigma} outside [0, {MAX_BLUR_SIGMA}]")
        if self.tint is not None:
            _check_choice("tint", self.tint, tuple(TINTS))
        if not 0.0 <= self.tint_strength <= 1.0:
            raise ValueError(f"tint_strength {self.tint_strength} outside [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shapes"] = [{**s, "jitter": list(s["jitter"])} for s in d["shapes"]]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneSpec:
        shapes = tuple(ShapeSpec(**{**s, "jitter": tuple(s.get("jitter", (0.0, 0.0)))}) for s in d["shapes"])
        return cls(**{**d, "shapes": shapes})


def _check_choice(what: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {list(choices)}")


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------


def _check_max_tint(max_tint: float) -> None:
    if not MIN_TINT_STRENGTH <= max_tint <= 1.0:
        raise ValueError(
            f"max_tint {max_tint} outside [{MIN_TINT_STRENGTH}, 1]: tint strengths are drawn "
            f"from [{MIN_TINT_STRENGTH}, max_tint]"
        )


def _round(x: float) -> float:
    # Rounded so the spec survives a JSON round trip bit-exactly and re-renders the same image.
    return round(float(x), 3)


def _shape_center(shape: ShapeSpec) -> tuple[float, float]:
    """Center of a shape as fractions of the side, clamped so the whole shape stays inside the image."""
    cx, cy = POSITIONS[shape.position]
    reach = SIZES[shape.size] * _EXTENT[shape.kind] + _EDGE_MARGIN
    x = min(max(cx + shape.jitter[0], reach), 1.0 - reach)
    y = min(max(cy + shape.jitter[1], reach), 1.0 - reach)
    return x, y


def _overlaps(a: ShapeSpec, b: ShapeSpec) -> bool:
    (ax, ay), (bx, by) = _shape_center(a), _shape_center(b)
    reach = SIZES[a.size] * _EXTENT[a.kind] + SIZES[b.size] * _EXTENT[b.kind] + _EDGE_MARGIN
    return (ax - bx) ** 2 + (ay - by) ** 2 < reach**2


def _sample_shape(rng: np.random.Generator, position: str, forbidden_colors: set[str]) -> ShapeSpec:
    colors = [c for c in SHAPE_COLORS if c not in forbidden_colors]
    jitter = tuple(_round(j) for j in rng.uniform(-MAX_JITTER, MAX_JITTER, size=2))
    return ShapeSpec(
        kind=str(rng.choice(SHAPE_KINDS)),
        color=str(rng.choice(colors)),
        size=str(rng.choice(tuple(SIZES))),
        position=position,
        jitter=jitter,
    )


def sample_scene(
    rng: np.random.Generator, *, photometric: bool = True, max_tint: float = MAX_TINT_STRENGTH
) -> SceneSpec:
    """Draw a random scene. With ``photometric=False`` brightness is 1, and there is no blur or tint.

    ``max_tint`` bounds the tint strength. It changes only the drawn strengths, never which random
    numbers are drawn, so datasets that differ only in it have the same shapes and captions.
    """
    _check_max_tint(max_tint)
    background = str(rng.choice(BACKGROUND_COLORS))
    background_bottom = None
    if rng.random() < 0.25:
        background_bottom = str(rng.choice([c for c in BACKGROUND_COLORS if c != background]))
    # A shape never shares a color with the background, or it would be invisible.
    forbidden = {background, background_bottom} - {None}

    cells = list(POSITIONS)
    first = _sample_shape(rng, str(rng.choice(cells)), forbidden)
    shapes = [first]
    if rng.random() < 0.5:
        # Different cell and color, no overlap: every shape in the caption is fully visible.
        others = [c for c in cells if c != first.position]
        for _ in range(50):
            second = _sample_shape(rng, str(rng.choice(others)), forbidden | {first.color})
            if not _overlaps(first, second):
                shapes.append(second)
                break

    brightness, blur_sigma, tint, tint_strength = 1.0, 0.0, None, 0.0
    if photometric:
        brightness = _round(rng.uniform(*BRIGHTNESS_RANGE))
        if rng.random() < 0.5:  # half the images are sharp so the sharp end is well represented
            blur_sigma = _round(rng.uniform(0.5, MAX_BLUR_SIGMA))
        if rng.random() < 0.3:
            tint = str(rng.choice(tuple(TINTS)))
            tint_strength = _round(rng.uniform(MIN_TINT_STRENGTH, max_tint))
    return SceneSpec(
        background=background,
        shapes=tuple(shapes),
        background_bottom=background_bottom,
        brightness=brightness,
        blur_sigma=blur_sigma,
        tint=tint,
        tint_strength=tint_strength,
    )


# ---------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------


def _shape_phrase(shape: ShapeSpec, position: str | None) -> str:
    where = "" if position is None else f" at the {position}"
    return f"a {shape.size} {shape.color} {shape.kind}{where}"


def caption(spec: SceneSpec, *, positions: Sequence[str | None] | None = None) -> str:
    """Deterministic English caption of the scene content (not brightness, blur or tint).

    ``positions`` overrides where the caption puts each shape (``None``: say nowhere); the default is
    where they are. Captions that do not describe the layout train controls that must carry it.
    """
    if positions is None:
        positions = [s.position for s in spec.shapes]
    if len(positions) != len(spec.shapes):
        raise ValueError(f"{len(positions)} positions for {len(spec.shapes)} shapes")
    shapes = " and ".join(_shape_phrase(s, p) for s, p in zip(spec.shapes, positions))
    if spec.background_bottom is None:
        background = f"a {spec.background} background"
    else:
        background = f"a {spec.background} to {spec.background_bottom} gradient background"
    return f"{shapes} on {background}"


def caption_without_layout(spec: SceneSpec) -> str:
    """The caption with no position at all: "a small red circle and ... on a white background"."""
    return caption(spec, positions=[None] * len(spec.shapes))


def misplaced_caption(spec: SceneSpec, rng: np.random.Generator) -> str:
    """The caption with every shape moved to another cell (none where it is, no two in one cell): a
    prompt that contradicts the image's layout, as a foreign control map does at inference."""
    cells = list(POSITIONS)
    moved: list[str] = []
    for shape in spec.shapes:
        moved.append(str(rng.choice([c for c in cells if c != shape.position and c not in moved])))
    return caption(spec, positions=moved)


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------


class Rendered(NamedTuple):
    image: Image.Image  # final RGB image, photometric controls applied
    mask: np.ndarray  # uint8 [H, W] in {0, 255}: union of the visible shapes
    shape_masks: list[np.ndarray]  # one uint8 {0, 255} mask per shape, visible part only


def _rgb(name: str, table: dict[str, tuple[int, int, int]] = COLORS) -> np.ndarray:
    return np.asarray(table[name], dtype=np.float32) / 255.0


def _background(spec: SceneSpec, size: int) -> np.ndarray:
    top = _rgb(spec.background)
    bottom = top if spec.background_bottom is None else _rgb(spec.background_bottom)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    return np.broadcast_to(top * (1.0 - t) + bottom * t, (size, size, 3)).copy()


def _polygon(cx: float, cy: float, radii: Sequence[float], start_deg: float) -> np.ndarray:
    """Vertices at equal angular steps from ``start_deg`` (0 = right, -90 = up, y grows downward)."""
    angles = np.deg2rad(start_deg + 360.0 * np.arange(len(radii)) / len(radii))
    r = np.asarray(radii)
    return np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], axis=1)


def _shape_coverage(shape: ShapeSpec, size: int) -> np.ndarray:
    """Fraction of each output pixel the shape covers, float32 [size, size] in [0, 1]."""
    big = size * SUPERSAMPLE
    canvas = np.zeros((big, big), dtype=np.uint8)
    fx, fy = _shape_center(shape)
    cx, cy, r = fx * big, fy * big, SIZES[shape.size] * big
    # cv2 draws on integer pixels; SHIFT fractional bits keep sub-pixel placement at the 4x scale.
    one = 1 << _SHIFT

    def fix(points: np.ndarray) -> np.ndarray:
        return np.round(np.asarray(points) * one).astype(np.int32)[None]

    def disk(radius: float, value: int) -> None:
        center = (round(cx * one), round(cy * one))
        cv2.circle(canvas, center, round(radius * one), value, -1, cv2.LINE_8, _SHIFT)

    if shape.kind == "circle":
        disk(r, 255)
    elif shape.kind == "ring":
        disk(r, 255)
        disk(0.55 * r, 0)
    elif shape.kind == "square":
        half = 0.85 * r  # about the area of the circle of radius r
        pts = np.array(
            [[cx - half, cy - half], [cx + half, cy - half], [cx + half, cy + half], [cx - half, cy + half]]
        )
        cv2.fillPoly(canvas, fix(pts), 255, cv2.LINE_8, _SHIFT)
    elif shape.kind == "triangle":
        # Point up; centered on its bounding box rather than its centroid so it sits where a circle would.
        R = 1.1 * r
        cv2.fillPoly(canvas, fix(_polygon(cx, cy + 0.25 * R, [R] * 3, -90.0)), 255, cv2.LINE_8, _SHIFT)
    elif shape.kind == "star":
        pts = _polygon(cx, cy + 0.05 * r, [r, 0.45 * r] * 5, -90.0)
        cv2.fillPoly(canvas, fix(pts), 255, cv2.LINE_8, _SHIFT)
    else:  # unreachable: ShapeSpec validates kinds
        raise ValueError(f"no renderer for shape kind {shape.kind!r}")
    return cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _compose(spec: SceneSpec, size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Clean float image (no brightness, tint or blur) and the per-shape visible coverage."""
    image = _background(spec, size)
    coverages: list[np.ndarray] = []
    for shape in spec.shapes:
        alpha = _shape_coverage(shape, size)
        image = image * (1.0 - alpha[..., None]) + _rgb(shape.color) * alpha[..., None]
        coverages = [c * (1.0 - alpha) for c in coverages]  # later shapes occlude earlier ones
        coverages.append(alpha)
    return image, coverages


def _apply_photometric(image: np.ndarray, spec: SceneSpec) -> np.ndarray:
    if spec.tint is not None and spec.tint_strength > 0:
        image = image * (1.0 - spec.tint_strength) + _rgb(spec.tint, TINTS) * spec.tint_strength
    image = np.clip(image * spec.brightness, 0.0, 1.0)
    if spec.blur_sigma > 0:
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=spec.blur_sigma, borderType=cv2.BORDER_REFLECT)
    return image


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def _check_size(size: int) -> None:
    if size < 16 or size % LOWRES_FACTOR:
        raise ValueError(
            f"size {size} must be at least 16 and a multiple of {LOWRES_FACTOR} (try 64, 128, 256)"
        )


def render(spec: SceneSpec, size: int = TOY_SIZE) -> Rendered:
    """Render a scene: the final image, the union mask of its shapes and one mask per shape."""
    _check_size(size)
    clean, coverages = _compose(spec, size)
    shape_masks = [np.where(c >= 0.5, 255, 0).astype(np.uint8) for c in coverages]
    mask = np.maximum.reduce(shape_masks)
    image = Image.fromarray(_to_uint8(_apply_photometric(clean, spec)), mode="RGB")
    return Rendered(image, mask, shape_masks)


def render_clean(spec: SceneSpec, size: int = TOY_SIZE) -> Image.Image:
    """The scene with brightness 1 and no tint or blur: the structure that control maps describe."""
    _check_size(size)
    clean, _ = _compose(spec, size)
    return Image.fromarray(_to_uint8(clean), mode="RGB")


def edge_map(clean: Image.Image) -> Image.Image:
    """Canny edges, the union over the RGB channels so equal-luminance color borders still show."""
    rgb = np.asarray(clean)
    edges = np.maximum.reduce([cv2.Canny(rgb[..., c], 50, 150) for c in range(3)])
    return Image.fromarray(edges, mode="L")


def lowres(image: Image.Image, factor: int = LOWRES_FACTOR) -> Image.Image:
    """Area-downscaled copy, the input of super-resolution."""
    w, h = image.size
    if w % factor or h % factor:
        raise ValueError(f"image size {image.size} is not divisible by the low-res factor {factor}")
    small = cv2.resize(np.asarray(image), (w // factor, h // factor), interpolation=cv2.INTER_AREA)
    return Image.fromarray(small, mode="RGB")


# ---------------------------------------------------------------------------------------------------
# Measurements (the annotations templates are trained and evaluated on)
# ---------------------------------------------------------------------------------------------------


def measure_brightness(image: Image.Image) -> float:
    """Mean Rec.601 luminance in [0, 1]."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return float((rgb @ np.array([0.299, 0.587, 0.114])).mean())


def measure_mean_rgb(image: Image.Image) -> list[float]:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return [float(v) for v in rgb.reshape(-1, 3).mean(axis=0)]


def measure_sharpness(image: Image.Image) -> float:
    """Variance of the Laplacian of the gray image: high for crisp edges, low for blur."""
    gray = np.asarray(image.convert("L"), dtype=np.float64)
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


# ---------------------------------------------------------------------------------------------------
# Evaluation helpers
# ---------------------------------------------------------------------------------------------------


def fixed_eval_prompts(n: int = 16, seed: int = 1234) -> list[tuple[str, SceneSpec]]:
    """A fixed list of ``(caption, spec)`` with neutral photometrics, the same for a given (n, seed).

    Neutral (brightness 1, sharp, untinted) so evaluation sets the controlled axis itself, e.g. with
    ``render_prompt_variants``. The i-th prompt does not depend on ``n``.
    """
    out = []
    for i in range(n):
        spec = sample_scene(sample_rng(seed, i), photometric=False)
        out.append((caption(spec), spec))
    return out


def render_prompt_variants(
    spec: SceneSpec, variants: Sequence[dict[str, Any]], size: int = TOY_SIZE
) -> list[Rendered]:
    """Render one scene once per variant, each overriding SceneSpec fields (e.g. ``{"brightness": 0.5}``).

    The ground truth of a control sweep: same content, one axis moved.
    """
    return [render(dataclasses.replace(spec, **v), size) for v in variants]


# ---------------------------------------------------------------------------------------------------
# Dataset generation
# ---------------------------------------------------------------------------------------------------


def sample_rng(seed: int, index: int) -> np.random.Generator:
    # One stream per sample: sample i is the same whatever num_samples is.
    return np.random.default_rng([seed, index])


def _write_sample(root: Path, index: int, spec: SceneSpec, size: int) -> dict[str, Any]:
    name = f"{index:05d}.png"
    rendered = render(spec, size)
    rendered.image.save(root / "images" / name)
    Image.fromarray(rendered.mask, mode="L").save(root / "masks" / name)
    edge_map(render_clean(spec, size)).save(root / "edges" / name)
    lowres(rendered.image).save(root / "lowres" / name)

    brightness = round(measure_brightness(rendered.image), 4)
    mean_rgb = [round(v, 4) for v in measure_mean_rgb(rendered.image)]
    paths = {"mask": f"masks/{name}", "edges": f"edges/{name}", "lowres": f"lowres/{name}"}
    controls = {"brightness": brightness, "sharpness_level": spec.blur_sigma, "mean_rgb": mean_rgb}
    return {
        "image": f"images/{name}",
        "prompt": caption(spec),
        # What template data processors read; paths resolve against the dataset folder.
        "template_inputs": {**controls, **paths},
        # The same annotations at top level, for evaluation code that does not know template names.
        **controls,
        **paths,
        "spec": spec.to_dict(),
    }


def generate(
    out_dir: str | Path,
    num_samples: int,
    seed: int = 0,
    size: int = TOY_SIZE,
    *,
    max_tint: float = MAX_TINT_STRENGTH,
    overwrite: bool = False,
) -> Path:
    """Write a toy-world dataset to ``out_dir`` and return its path.

    Layout: ``images/``, ``masks/``, ``edges/``, ``lowres/`` (``{i:05d}.png``), ``metadata.jsonl`` and
    ``metadata.json`` (same rows). The same (num_samples, seed, size, max_tint) gives byte-identical
    files; ``max_tint`` changes only the tinted images, not the scenes or captions.
    Everything is written to a hidden sibling folder first and renamed into place at the end, so an
    interrupted run never leaves a dataset that looks complete.
    """
    _check_size(size)
    _check_max_tint(max_tint)
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    # a folder is replaced only when we wrote it and overwrite was asked for (never the cwd, home, /)
    with write_folder(
        out_dir, overwrite=overwrite, recognise=_is_toy_dataset, kind="toy dataset", what="dataset folder"
    ) as tmp:
        for sub in DATASET_FOLDERS:
            (tmp / sub).mkdir()
        rows = []
        for i in range(num_samples):
            rows.append(_write_sample(tmp, i, sample_scene(sample_rng(seed, i), max_tint=max_tint), size))
            if (i + 1) % 500 == 0:
                logger.info("rendered %d / %d samples", i + 1, num_samples)
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / "metadata.json").write_text(json.dumps(rows, indent=1) + "\n")
    logger.info("wrote %d samples to %s", num_samples, out_dir)
    return Path(out_dir)


def _is_toy_dataset(folder: Path) -> bool:
    """A dataset written before the write-safety marker: exactly the files and folders ``generate`` writes."""
    names = {p.name for p in folder.iterdir()}
    return names == {*DATASET_FOLDERS, "metadata.jsonl", "metadata.json"}


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m diffsynth_templates.toy.world",
        description="Generate the procedural toy-world dataset (shapes on backgrounds, with control annotations).",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("datasets/toy"), help="output folder (default: datasets/toy)"
    )
    parser.add_argument("--num_samples", type=int, default=4000, help="number of images (default: 4000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default: 0)")
    parser.add_argument(
        "--size",
        type=int,
        default=TOY_SIZE,
        help=f"image side in pixels, multiple of 4 (default: {TOY_SIZE})",
    )
    parser.add_argument(
        "--max_tint",
        type=float,
        default=MAX_TINT_STRENGTH,
        help=f"largest tint strength; the same seed keeps the same scenes (default: {MAX_TINT_STRENGTH})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return generate(
            args.out, args.num_samples, args.seed, args.size, max_tint=args.max_tint, overwrite=args.overwrite
        )
    except ValueError as e:  # bad sizes, an unsafe or existing --out
        parser.error(str(e))  # a usage problem: say it in one line, exit 2, no traceback


if __name__ == "__main__":
    main()
