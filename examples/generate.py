"""Generate with the bundled toy models from Python: the base pipeline, then a template on top.

    python examples/generate.py            # writes outputs/example_base.png, outputs/example_bright.png
                                           # and outputs/example_dark.png (a few seconds on a CPU)

The same calls work on a real checkpoint (``Flux2ImagePipeline.from_pretrained("black-forest-labs/
FLUX.2-klein-base-4B", torch_dtype=torch.bfloat16)``) with its own size, steps and cfg. The toy model
is made for 64 x 64 pixels, 20 steps and no classifier-free guidance (cfg 1); its word-level
tokenizer knows the toy captions' words (shapes, colors, sizes, positions, backgrounds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline
from diffsynth_templates.templates import TemplatePipeline

ROOT = Path(__file__).resolve().parents[1]  # the repository: models/toy lives there
PROMPT = "a large red circle at the top left on a gray background"
TOY = {"height": 64, "width": 64, "num_inference_steps": 20, "cfg_scale": 1.0, "seed": 0, "progress": False}


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs"), help="folder for the PNGs (default: outputs)"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    pipe = Flux2ImagePipeline.from_pretrained(
        ROOT / "models/toy/base", torch_dtype=torch.float32, device="cpu"
    )
    written = []

    # The base model alone.
    image = pipe(PROMPT, **TOY)[0]
    written.append(args.out / "example_base.png")
    image.save(written[-1])

    # The brightness template (value_kv: one float in [0, 1] -> KV tokens in every DiT block). It runs
    # once per call, before denoising; its cache goes into the frozen base pipeline.
    templates = TemplatePipeline.from_pretrained([ROOT / "models/toy/templates/brightness"])
    for name, scale in (("bright", 0.85), ("dark", 0.15)):
        image = templates(pipe, template_inputs=[{"model_id": 0, "scale": scale}], prompt=PROMPT, **TOY)[0]
        written.append(args.out / f"example_{name}.png")
        image.save(written[-1])

    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
