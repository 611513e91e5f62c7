"""The toy-world demo grid that ``python infer.py`` (no arguments) writes: one row per template, each
starting from what the base model draws for the prompt alone, then the template's effect at a few
values (or strengths) side by side; the inputs a template reads get cells of their own, never insets
over a result.

    python -m diffsynth_templates.toy.demo     # models/toy/base + models/toy/templates -> outputs/toy_demo.png
    python -m diffsynth_templates.toy.demo --model BASE --templates FOLDER --out grid.png --steps 20

Rows: brightness sweep; color change (the requested mean color as a swatch in the caption); structure
(a silhouette map from another scene, the prompt unchanged: the shapes move to the map); inpainting
(the input with the mask's outline, then the result); super-resolution (input, bicubic, result, truth);
a LoRA bank (sharp, blurred); templates composed. A row whose templates are not shipped is left out.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from diffsynth_templates.errors import DiffSynthTemplatesError
from diffsynth_templates.toy import world as toy_world
from diffsynth_templates.toy.metrics import iou, shape_mask
from diffsynth_templates.toy.models import ToyWorld

logger = logging.getLogger(__name__)

CELL = 3 * toy_world.TOY_SIZE  # pixels per cell side in the grid (images upscaled 3x, nearest neighbour)
LABEL = 38  # caption strip under each cell (two lines)
HEADER = 30  # row title strip
TITLE = 56  # the grid's title: the prompt
COLUMNS = 5
SEED = 0
SCENE, FOREIGN = (
    1,
    13,
)  # fixed_eval_prompts indices: the demo's prompt, and the scene its structure map is from
BRIGHTNESS = (0.5, 0.75, 1.25, 1.5)  # the scene re-rendered this much darker / brighter: the requests
TINTS = ("warm", "cool", "lime", "magenta")
TINT_STRENGTH = 0.4
STRENGTHS = (0.5, 1.0, 1.5)
OUTLINE = (0, 255, 255)  # the mask's outline on inpainting cells


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


@dataclass
class Tile:
    """One cell: a generated image (``inputs`` for the templates, None for the prompt alone, ``prompt``
    overriding the demo's) or a fixed picture (an input shown as such), its caption and a swatch."""

    label: str
    inputs: list[dict] | None = None
    picture: Image.Image | None = None
    swatch: tuple[float, float, float] | None = None  # a color shown beside the caption (RGB in [0, 1])
    prompt: str | None = None
    decorate: Callable[[Image.Image], Image.Image] | None = None  # drawn over the upscaled cell (outlines)
    measure: Callable[[Image.Image], str] | None = None  # a measurement of the image, added to the caption


@dataclass
class Row:
    title: str
    tiles: list[Tile]
    needs: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)


def _map(mask: np.ndarray) -> Image.Image:
    return Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB")


def box_around(mask: np.ndarray, margin: int = 4, grid: int = 8) -> np.ndarray:
    """A box mask (bool) covering ``mask``'s pixels plus ``margin``, snapped outwards to ``grid`` pixels
    (the toy DiT's tokens are 8 x 8 pixels)."""
    ys, xs = np.nonzero(mask)
    size = mask.shape[0]
    top, left = max(ys.min() - margin, 0) // grid * grid, max(xs.min() - margin, 0) // grid * grid
    bottom = min(-(-(ys.max() + 1 + margin) // grid) * grid, size)
    right = min(-(-(xs.max() + 1 + margin) // grid) * grid, size)
    box = np.zeros_like(mask, dtype=bool)
    box[top:bottom, left:right] = True
    return box


def _outline(box: np.ndarray) -> Callable[[Image.Image], Image.Image]:
    ys, xs = np.nonzero(box)
    scale = CELL / box.shape[0]

    def draw(image: Image.Image) -> Image.Image:
        out = image.copy()
        corners = [xs.min() * scale, ys.min() * scale, (xs.max() + 1) * scale - 1, (ys.max() + 1) * scale - 1]
        ImageDraw.Draw(out).rectangle(corners, outline=OUTLINE, width=2)
        return out

    return draw


def demo_rows(prompt: str, scene: toy_world.SceneSpec, other: toy_world.SceneSpec) -> list[Row]:
    """The rows for one scene; ``other`` gives the structure map (shapes elsewhere)."""
    rendered = toy_world.render(scene)
    base = Tile("base model: the prompt alone")
    variants = toy_world.render_prompt_variants(scene, [{"brightness": b} for b in BRIGHTNESS])
    asked = [toy_world.measure_brightness(v.image) for v in variants]
    silhouette = toy_world.render(other).mask > 127
    foreign = {"model_id": "structure", "image": _map(silhouette)}

    def luminance(image: Image.Image) -> str:
        return f" (gets {toy_world.measure_brightness(image):.2f})"

    def overlap(image: Image.Image) -> str:
        return f" (IoU {iou(shape_mask(image), silhouette):.2f})"

    def sharpness(image: Image.Image) -> str:
        return f" (edges {toy_world.measure_sharpness(image):.0f})"

    tint = {
        name: toy_world.measure_mean_rgb(
            toy_world.render_prompt_variants(scene, [{"tint": name, "tint_strength": TINT_STRENGTH}])[0].image
        )
        for name in TINTS
    }
    warm = {"model_id": "color", **dict(zip("RGB", tint["warm"]))}
    # inpainting: a box around the second shape, and a prompt that recolors it (the rest is kept)
    box = box_around(rendered.shape_masks[-1] > 127)
    mask = Image.fromarray((box * 255).astype(np.uint8))
    shape = scene.shapes[-1]
    recolor = "blue" if shape.color != "blue" else "yellow"
    recolored = prompt.replace(f"{shape.color} {shape.kind}", f"{recolor} {shape.kind}")
    inpaint = {"model_id": "inpaint", "image": rendered.image, "mask": mask, "force_inpaint": True}
    low = toy_world.lowres(rendered.image)
    structure = [Tile(f"strength {s:g}", [{**foreign, "strength": s}], measure=overlap) for s in STRENGTHS]
    return [
        Row("Brightness (a value -> KV tokens): asks for a mean luminance; 'gets' is the image's own",
            [Tile("base model", measure=luminance), *(Tile(f"asks {b:.2f}", [{"model_id": "brightness", "scale": b}], measure=luminance)
                     for b in asked)],
            ("brightness",)),
        Row("Color (mean R, G, B -> KV tokens): the swatch is the requested mean color",
            [base, *(Tile(f"mean color: {n}", [{"model_id": "color", **dict(zip("RGB", tint[n]))}], swatch=tint[n])
                     for n in TINTS)],
            ("color",)),
        Row("Structure (a silhouette map -> KV tokens): a map from another scene against the prompt; IoU with the map",
            [Tile("input: the silhouette map", picture=foreign["image"]), Tile("base (strength 0)", measure=overlap),
             *structure], ("structure",)),
        Row("Inpainting (image + mask -> KV tokens): only the boxed area is redrawn, to a new prompt",
            [Tile("input: image, mask outlined", picture=rendered.image, decorate=_outline(box)),
             Tile(f"prompt says '{recolor} {shape.kind}'", [inpaint], prompt=recolored, decorate=_outline(box)),
             Tile("same prompt as the input", [inpaint], decorate=_outline(box))],
            ("inpaint",)),
        Row(f"Super-resolution (a {low.width} px image -> KV tokens for {rendered.image.width} px)",
            [Tile(f"input: {low.width} x {low.height} px", picture=low),
             Tile("bicubic upscaling", picture=low.resize(rendered.image.size, Image.Resampling.BICUBIC)),
             Tile("super-resolution template", [{"model_id": "super_resolution", "image": low}]),
             Tile("ground truth", picture=rendered.image)],
            ("super_resolution",)),
        Row("A LoRA bank (its cache is LoRA weights): LoRA 0 or 1, a subtle change here; edges = Laplacian variance",
            [Tile("base model", measure=sharpness),
             Tile("LoRA 0: sharp", [{"model_id": "sharpness", "lora_ids": [0]}], measure=sharpness),
             Tile("LoRA 1: blurred", [{"model_id": "sharpness", "lora_ids": [1]}], measure=sharpness)],
            ("sharpness",)),
        Row("Templates composed: their KV tokens and LoRAs act together in one call",
            [Tile("input: the silhouette map", picture=foreign["image"]),
             Tile("structure", [foreign]),
             Tile("structure + brightness 0.2", [foreign, {"model_id": "brightness", "scale": 0.2}]),
             Tile("structure + warm color", [foreign, warm], swatch=tint["warm"]),
             Tile("structure + warm + blurred", [foreign, warm, {"model_id": "sharpness", "lora_ids": [1]}])],
            ("structure", "brightness", "color", "sharpness")),
    ]  # fmt: skip


def _caption(
    draw: ImageDraw.ImageDraw, x: int, y: int, tile: Tile, image: Image.Image, font: ImageFont.ImageFont
) -> None:
    if tile.swatch is not None:
        color = tuple(int(round(c * 255)) for c in tile.swatch)
        draw.rectangle([x + 4, y + 6, x + 24, y + 26], fill=color, outline="black")
        x += 28
    label = tile.label + (tile.measure(image) if tile.measure is not None else "")
    draw.text((x + 4, y + 6), label, fill="black", font=font)


def render_grid(title: str, rows: Sequence[tuple[Row, list[Image.Image]]]) -> Image.Image:
    """Rows of (header, cells with captions) under a title; every image upscaled to ``CELL``."""
    height = TITLE + sum(HEADER + CELL + LABEL for _ in rows)
    grid = Image.new("RGB", (COLUMNS * CELL, height), "white")
    draw = ImageDraw.Draw(grid)
    big, small = _font(16), _font(13)
    draw.text((8, 8), "The toy world: one base model steered by templates. Every generated image uses this prompt:", fill="black", font=big)  # fmt: skip
    draw.text((8, 30), title, fill=(0, 0, 160), font=small)
    y = TITLE
    for row, images in rows:
        draw.rectangle([0, y, grid.width, y + HEADER - 4], fill=(235, 235, 235))
        draw.text((8, y + 6), row.title, fill="black", font=big if len(row.title) < 90 else small)
        y += HEADER
        for i, (tile, image) in enumerate(zip(row.tiles, images)):
            x = i * CELL
            cell = image.resize((CELL, CELL), Image.Resampling.NEAREST)
            if tile.decorate is not None:
                cell = tile.decorate(cell)
            grid.paste(cell, (x, y))
            draw.rectangle([x, y, x + CELL - 1, y + CELL - 1], outline="white")
            _caption(draw, x, y + CELL, tile, image, small)
        y += CELL + LABEL
    return grid


def render_demo(model: str | Path, templates: str | Path, out: str | Path, steps: int = 20) -> Path:
    """Draw the demo grid of the toy base model ``model`` and the templates under ``templates`` into
    ``out`` (PNG, written atomically); the rows whose templates are not there are left out."""
    from tqdm import tqdm

    world = ToyWorld.load(model, templates, steps)
    scenes = toy_world.fixed_eval_prompts(max(SCENE, FOREIGN) + 1)
    (prompt, scene), (_, other) = scenes[SCENE], scenes[FOREIGN]
    rows = [r for r in demo_rows(prompt, scene, other) if all(n in world.names for n in r.needs)]  # fmt: skip
    drawn = []
    for row in tqdm(rows, desc="toy demo"):
        images = [
            t.picture if t.picture is not None else world.generate([t.prompt or prompt], SEED, t.inputs or [])[0]
            for t in row.tiles
        ]  # fmt: skip
        drawn.append((row, images))
    grid = render_grid(f'"{prompt}"  (seed {SEED}, {steps} steps)', drawn)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    grid.save(tmp)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m diffsynth_templates.toy.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="models/toy/base")
    p.add_argument("--templates", default="models/toy/templates")
    p.add_argument("--out", default="outputs/toy_demo.png")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = render_demo(args.model, args.templates, args.out, args.steps)
    except DiffSynthTemplatesError as e:  # a missing or broken model folder: one line, no traceback
        sys.stderr.write(f"error: {e}\n")
        return 2
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
