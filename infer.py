"""Command-line image generation with a FLUX.2-klein pipeline.

    python infer.py --model black-forest-labs/FLUX.2-klein-base-4B --prompt "a red fox in snow" \
        --height 1024 --width 1024 --steps 50 --cfg_scale 4 --seed 0 --output outputs/fox.png

Each image is written as a PNG whose text metadata holds the generation parameters (JSON under
the key ``parameters``), so any output can be reproduced.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DTYPES = {"auto": None, "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
DEFAULT_TOY_MODEL = Path(__file__).resolve().parent / "models" / "toy" / "base"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="local folder or ModelScope id in the official layout "
                   f"(transformer/, text_encoder/, vae/, tokenizer/); default: {DEFAULT_TOY_MODEL}")  # fmt: skip
    for name in ("transformer", "text_encoder", "vae", "tokenizer"):
        g.add_argument(f"--{name}", default=None, help=f"take the {name} from this folder or id instead")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=sorted(DTYPES),
        help="weights dtype (auto: bf16 on CUDA, fp32 on CPU)",
    )
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu... (default: cuda if available)")
    g.add_argument(
        "--offload",
        action="store_true",
        help="keep components on the CPU; each visits the GPU only while it runs",
    )
    g.add_argument(
        "--vae_tile_size", type=int, default=None, help="decode the VAE in tiles of this many latent pixels"
    )
    g.add_argument(
        "--offline", action="store_true", help="never touch the network; use only cached downloads"
    )

    g = p.add_argument_group("generation")
    g.add_argument("--prompt", default="a photo of a cat", help="the text prompt")
    g.add_argument("--negative_prompt", default="", help="what to steer away from (used when cfg_scale != 1)")
    g.add_argument("--height", type=int, default=1024, help="image height in pixels, a multiple of 16")
    g.add_argument("--width", type=int, default=1024, help="image width in pixels, a multiple of 16")
    g.add_argument("--steps", type=int, default=50, dest="num_inference_steps", help="denoising steps")
    g.add_argument(
        "--cfg_scale", type=float, default=4.0, help="classifier-free guidance scale (1 = off, one DiT pass)"
    )
    g.add_argument(
        "--seed", type=int, default=0, help="random seed (noise is drawn on the CPU: same seed, same image)"
    )
    g.add_argument("--num_images", type=int, default=1, help="images to generate (seeds seed, seed+1, ...)")
    g.add_argument("--max_sequence_length", type=int, default=512, help="prompt tokens (padded/truncated)")
    g.add_argument("--input_image", default=None, help="start from this image (img2img / inpainting)")
    g.add_argument(
        "--denoising_strength", type=float, default=1.0, help="with --input_image: how much to change (0-1]"
    )
    g.add_argument(
        "--inpaint_mask", default=None, help="with --input_image: white = regenerate, black = keep"
    )
    g.add_argument(
        "--edit_image", action="append", default=None, help="reference image for editing (repeatable)"
    )

    g = p.add_argument_group("output")
    g.add_argument(
        "--output", default="outputs/image.png", help="PNG path; several images get _0, _1, ... suffixes"
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    import torch
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline

    model = args.model or str(DEFAULT_TOY_MODEL)
    if args.model is None and not DEFAULT_TOY_MODEL.is_dir():
        raise SystemExit(
            f"no --model given and the bundled toy model {DEFAULT_TOY_MODEL} is missing; pass --model"
        )
    dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    pipe = Flux2ImagePipeline.from_pretrained(
        model,
        torch_dtype=dtype,
        device=args.device,
        transformer=args.transformer,
        text_encoder=args.text_encoder,
        vae=args.vae,
        tokenizer=args.tokenizer,
        offline=True if args.offline else None,
    )
    if args.offload:
        pipe.enable_model_cpu_offload(args.device or "cuda")
    if args.vae_tile_size:
        pipe.enable_vae_tiling(args.vae_tile_size)

    call = dict(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.num_inference_steps,
        cfg_scale=args.cfg_scale,
        max_sequence_length=args.max_sequence_length,
        denoising_strength=args.denoising_strength,
        input_image=Image.open(args.input_image) if args.input_image else None,
        inpaint_mask=Image.open(args.inpaint_mask) if args.inpaint_mask else None,
        edit_image=[Image.open(p) for p in args.edit_image] if args.edit_image else None,
        progress=not args.quiet,
    )
    written = []
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for index in range(args.num_images):
        seed = args.seed + index
        image = pipe(**call, seed=seed)[0]
        path = (
            output
            if args.num_images == 1
            else output.with_name(f"{output.stem}_{index}{output.suffix or '.png'}")
        )
        meta = PngInfo()
        record = {k: v for k, v in vars(args).items() if k not in ("output", "quiet", "num_images")}
        meta.add_text("parameters", json.dumps({**record, "model": model, "seed": seed}))
        image.save(path, pnginfo=meta)
        logging.info("wrote %s", path)
        written.append(path)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
