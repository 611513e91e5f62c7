"""The toy-world demo grid that ``python infer.py`` (no arguments) writes: the base model, each toy
template, templates composed, and a brightness sweep, every cell labelled.

    python -m diffsynth_templates.toy.demo     # models/toy/base + models/toy/templates -> outputs/toy_demo.png
    python -m diffsynth_templates.toy.demo --model BASE --templates FOLDER --out grid.png --steps 20
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from diffsynth_templates.errors import DiffSynthTemplatesError
from diffsynth_templates.toy import world as toy_world
from diffsynth_templates.toy.models import ToyWorld, inpaint_mask

logger = logging.getLogger(__name__)

CELL = 3 * toy_world.TOY_SIZE  # pixels per cell side in the grid (images upscaled 3x, nearest neighbour)
LABEL = 30  # label strip under each cell
COLUMNS = 5
SEED = 0


@dataclass
class Cell:
    label: str
    inputs: list[dict]
    needs: tuple[str, ...] = ()  # templates the cell uses (skipped when one is not shipped)
    condition: Image.Image | None = None  # shown as a small inset (control maps, inputs)


def demo_cells(scene: toy_world.SceneSpec, other: toy_world.SceneSpec) -> list[Cell]:
    """Cells for one scene; ``other`` gives the structure-control layout (shapes elsewhere)."""
    rendered = toy_world.render(scene)
    silhouette = Image.fromarray(toy_world.render(other).mask).convert("RGB")
    mask = Image.fromarray((inpaint_mask(0, toy_world.TOY_SIZE) * 255).astype(np.uint8))
    low = toy_world.lowres(rendered.image)
    warm = toy_world.measure_mean_rgb(toy_world.render_prompt_variants(scene, [{"tint": "warm", "tint_strength": 0.4}])[0].image)  # fmt: skip
    structure = {"model_id": "structure", "image": silhouette}
    cells = [
        Cell("base model", []),
        Cell("brightness 0.75", [{"model_id": "brightness", "scale": 0.75}], ("brightness",)),
        Cell("color: warm tint", [{"model_id": "color", **dict(zip("RGB", warm))}], ("color",)),
        Cell("structure control", [structure], ("structure",), silhouette),
        Cell(
            "inpaint (box mask)",
            [{"model_id": "inpaint", "image": rendered.image, "mask": mask, "force_inpaint": True}],
            ("inpaint",),
            mask.convert("RGB"),
        ),  # fmt: skip
        Cell(
            f"super-res from {low.width}px",
            [{"model_id": "super_resolution", "image": low}],
            ("super_resolution",),
            low,
        ),
        Cell("LoRA: blurred", [{"model_id": "sharpness", "lora_ids": [1]}], ("sharpness",)),
        Cell(
            "structure + brightness",
            [structure, {"model_id": "brightness", "scale": 0.2}],
            ("structure", "brightness"),
        ),  # fmt: skip
        Cell(
            "structure+color+blur",
            [
                structure,
                {"model_id": "color", **dict(zip("RGB", warm))},
                {"model_id": "sharpness", "lora_ids": [1]},
            ],
            ("structure", "color", "sharpness"),
        ),  # fmt: skip
    ]
    cells += [
        Cell(f"brightness {b:.2f}", [{"model_id": "brightness", "scale": b}], ("brightness",))
        for b in (0.1, 0.25, 0.4, 0.55, 0.7)
    ]
    return cells


def render_grid(tiles: Sequence[tuple[str, Image.Image, Image.Image | None]], title: str) -> Image.Image:
    rows = -(-len(tiles) // COLUMNS)
    top = 28
    grid = Image.new("RGB", (COLUMNS * CELL, top + rows * (CELL + LABEL)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((8, 8), title, fill="black")
    for i, (label, image, inset) in enumerate(tiles):
        x, y = (i % COLUMNS) * CELL, top + (i // COLUMNS) * (CELL + LABEL)
        grid.paste(image.resize((CELL, CELL), Image.Resampling.NEAREST), (x, y))
        if inset is not None:  # the condition, bottom right, framed
            small = inset.resize((CELL // 3, CELL // 3), Image.Resampling.NEAREST)
            grid.paste(small, (x + CELL - small.width - 2, y + CELL - small.height - 2))
            draw.rectangle([x + CELL - small.width - 3, y + CELL - small.height - 3, x + CELL - 2, y + CELL - 2], outline="white")  # fmt: skip
        draw.text((x + 4, y + CELL + 8), label, fill="black")
    return grid


def render_demo(model: str | Path, templates: str | Path, out: str | Path, steps: int = 20) -> Path:
    """Draw the demo grid of the toy base model ``model`` and the templates under ``templates`` into
    ``out`` (PNG, written atomically); the cells whose templates are not there are left out."""
    from tqdm import tqdm

    world = ToyWorld.load(model, templates, steps)
    (prompt, scene), (_, other) = toy_world.fixed_eval_prompts(2)
    cells = [c for c in demo_cells(scene, other) if all(n in world.names for n in c.needs)]
    tiles = []
    for cell in tqdm(cells, desc="toy demo"):
        tiles.append((cell.label, world.generate([prompt], SEED, cell.inputs)[0], cell.condition))
    grid = render_grid(tiles, f'"{prompt}"  (seed {SEED}, {steps} steps)')
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
