"""Command-line image generation with a FLUX.2-klein or Z-Image pipeline (picked from the model folder).

    python infer.py --model black-forest-labs/FLUX.2-klein-base-4B --prompt "a red fox in snow" \
        --height 1024 --width 1024 --steps 50 --cfg_scale 4 --seed 0 --output outputs/fox.png
    python infer.py --model Tongyi-MAI/Z-Image-Turbo --prompt "a red fox in snow"   # 8 steps, no CFG

Each image is written as a PNG whose text metadata holds the generation parameters (JSON under
the key ``parameters``), so any output can be reproduced.

    python infer.py          # no arguments: the toy-world demo grid (models/toy) -> outputs/toy_demo.png
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DTYPES = {"auto": None, "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
DEFAULT_TOY_MODEL = Path(__file__).resolve().parent / "models" / "toy" / "base"
TOY_TEMPLATES = DEFAULT_TOY_MODEL.parent / "templates"
DEMO_OUTPUT = Path("outputs") / "toy_demo.png"


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
    g.add_argument(
        "--variant",
        default=None,
        choices=("turbo", "base"),
        help="Z-Image only: sampling defaults (default: turbo if the model name says so, else base)",
    )

    g = p.add_argument_group("generation")
    g.add_argument("--prompt", default="a photo of a cat", help="the text prompt")
    g.add_argument("--negative_prompt", default="", help="what to steer away from (used when cfg_scale != 1)")
    g.add_argument("--height", type=int, default=1024, help="image height in pixels, a multiple of 16")
    g.add_argument("--width", type=int, default=1024, help="image width in pixels, a multiple of 16")
    g.add_argument("--steps", type=int, default=None, dest="num_inference_steps",
                   help="denoising steps (default: the pipeline's, FLUX.2 50, Z-Image Turbo 8 / base 50)")  # fmt: skip
    g.add_argument("--cfg_scale", type=float, default=None, help="classifier-free guidance scale "
                   "(1 = off, one DiT pass; default: the pipeline's, FLUX.2 4, Z-Image Turbo 1 / base 5)")  # fmt: skip
    g.add_argument(
        "--seed", type=int, default=0, help="random seed (noise is drawn on the CPU: same seed, same image)"
    )
    g.add_argument("--num_images", type=int, default=1, help="images to generate (seeds seed, seed+1, ...)")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help="prompt tokens (padded/truncated; default: the pipeline's, 512)")  # fmt: skip
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

    g = p.add_argument_group("templates")
    g.add_argument("--template", action="append", default=[], metavar="SOURCE",
                   help="template folder or ModelScope id (repeatable; model_id 0, 1, ... in order)")  # fmt: skip
    g.add_argument("--template_input", action="append", default=[], metavar="'KEY=VALUE ...'",
                   help="one template input: space-separated KEY=VALUE pairs, e.g. 'model_id=0 scale=0.7'; "
                   "values are JSON when they parse (numbers, lists, true), image paths load as images (repeatable)")  # fmt: skip
    g.add_argument("--negative_template_input", action="append", default=[], metavar="'KEY=VALUE ...'",
                   help="a template input for the negative (unconditional) side (repeatable)")  # fmt: skip
    g.add_argument("--job", default=None, help="JSON file with any of: templates, template_inputs, "
                   "negative_template_inputs and generation arguments (flags override it)")  # fmt: skip
    g.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="allow DiffSynth-format templates to run their model.py",
    )
    g.add_argument(
        "--lazy_loading", action="store_true", help="keep at most one template on the device at a time"
    )

    g = p.add_argument_group("output")
    g.add_argument(
        "--output", default="outputs/image.png", help="PNG path; several images get _0, _1, ... suffixes"
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run_demo() -> list[Path]:
    """The bundled toy world: base model, each template, compositions and a sweep, as one labelled grid."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not (DEFAULT_TOY_MODEL / "model_index.json").is_file():
        raise SystemExit(
            f"the bundled toy model {DEFAULT_TOY_MODEL} is missing (a partial checkout?); "
            "rebuild it with scripts/train_toy.sh or pass --model"
        )
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scripts.toy_demo import make_demo

    out = make_demo(DEFAULT_TOY_MODEL, TOY_TEMPLATES, DEMO_OUTPUT)
    logging.info("wrote %s (the toy-world demo; see README for what each cell shows)", out)
    return [out]


def main(argv: list[str] | None = None) -> list[Path]:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # `python infer.py`: the demo that works out of the box
        return run_demo()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.job:  # the job's generation arguments become defaults, so explicit flags still win
        dests = {a.dest for a in parser._actions}
        job = _read_job(args.job)
        parser.set_defaults(**{k: v for k, v in job.items() if k in dests and k != "job"})
        args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    import torch
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from diffsynth_templates.pipelines.auto import BACKBONE_TITLES, detect_backbone, pipeline_class

    model = args.model or str(DEFAULT_TOY_MODEL)
    if args.model is None and not DEFAULT_TOY_MODEL.is_dir():
        raise SystemExit(
            f"no --model given and the bundled toy model {DEFAULT_TOY_MODEL} is missing; pass --model"
        )
    offline = True if args.offline else None
    backbone = detect_backbone(args.transformer or model, offline=offline)
    title = BACKBONE_TITLES[backbone]
    for flag, value, supported in (
        ("--variant", args.variant, backbone == "zimage"),
        ("--edit_image", args.edit_image, backbone == "flux2"),
        ("--vae_tile_size", args.vae_tile_size, backbone == "flux2"),
    ):
        if value and not supported:
            raise SystemExit(f"{flag} is not supported by {title} pipelines ({model} is {title})")
    dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    pipe = pipeline_class(backbone).from_pretrained(
        model,
        torch_dtype=dtype,
        device=args.device,
        transformer=args.transformer,
        text_encoder=args.text_encoder,
        vae=args.vae,
        tokenizer=args.tokenizer,
        offline=offline,
        **({"variant": args.variant} if backbone == "zimage" else {}),
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
        denoising_strength=args.denoising_strength,
        input_image=Image.open(args.input_image) if args.input_image else None,
        inpaint_mask=Image.open(args.inpaint_mask) if args.inpaint_mask else None,
        progress=not args.quiet,
    )
    # unset: the pipeline's own defaults (they differ between backbones and Z-Image variants)
    for name in ("num_inference_steps", "cfg_scale", "max_sequence_length"):
        if getattr(args, name) is not None:
            call[name] = getattr(args, name)
    if args.edit_image:
        call["edit_image"] = [Image.open(p) for p in args.edit_image]
    templates, template_inputs, negative_inputs = _template_job(args)
    run = pipe
    if templates:
        from diffsynth_templates.templates import TemplatePipeline

        template_pipe = TemplatePipeline.from_pretrained(
            templates,
            torch_dtype=pipe.torch_dtype,
            device=pipe.device,
            lazy_loading=args.lazy_loading,
            trust_remote_code=args.trust_remote_code,
            offline=True if args.offline else None,
        )

        def run(**kw):
            return template_pipe(
                pipe, template_inputs=template_inputs, negative_template_inputs=negative_inputs, **kw
            )

    written = []
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for index in range(args.num_images):
        seed = args.seed + index
        image = run(**call, seed=seed)[0]
        path = (
            output
            if args.num_images == 1
            else output.with_name(f"{output.stem}_{index}{output.suffix or '.png'}")
        )
        meta = PngInfo()
        record = {k: v for k, v in vars(args).items() if k not in ("output", "quiet", "num_images")}
        record.update(
            template_inputs=_jsonable(template_inputs), negative_template_inputs=_jsonable(negative_inputs)
        )
        meta.add_text("parameters", json.dumps({**record, "model": model, "seed": seed}))
        image.save(path, pnginfo=meta)
        logging.info("wrote %s", path)
        written.append(path)
    return written


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def parse_pairs(text: str, base: Path | None = None) -> dict:
    """``'model_id=0 scale=0.7 image=edge.png'`` -> ``{"model_id": 0, "scale": 0.7, "image": <PIL>}``."""
    out = {}
    for pair in text.split():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"template input {pair!r} is not KEY=VALUE (in {text!r})")
        out[key] = _parse_value(value, base)
    return out


def _parse_value(value, base: Path | None):
    if isinstance(value, str):
        path = Path(value) if base is None or Path(value).is_absolute() else base / value
        if path.suffix.lower() in IMAGE_SUFFIXES:
            if not path.is_file():
                raise SystemExit(f"template input image {str(path)!r} does not exist")
            from PIL import Image

            return Image.open(path).convert("RGB")
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _template_job(args) -> tuple[list[str], list[dict], list[dict]]:
    """Merge ``--job`` with the flags; image paths in a job resolve against the job file's folder."""
    templates, inputs, negative = list(args.template), [], []
    if args.job:
        job = _read_job(args.job)
        base = Path(args.job).parent
        templates = [
            str(base / t) if (base / t).exists() else t for t in job.get("templates", [])
        ] + templates
        inputs = [{k: _parse_value(v, base) for k, v in d.items()} for d in job.get("template_inputs", [])]
        negative = [
            {k: _parse_value(v, base) for k, v in d.items()} for d in job.get("negative_template_inputs", [])
        ]
    inputs += [parse_pairs(t) for t in args.template_input]
    negative += [parse_pairs(t) for t in args.negative_template_input]
    if (inputs or negative) and not templates:
        raise SystemExit("template inputs were given but no --template to run them")
    return templates, inputs, negative


def _read_job(path: str) -> dict:
    try:
        job = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"cannot read job file {path!r}: {e}") from e
    if not isinstance(job, dict):
        raise SystemExit(f"job file {path!r} must hold a JSON object")
    return job


def _jsonable(inputs: list[dict]) -> list[dict]:
    return [
        {
            k: (v if isinstance(v, (int, float, str, bool, list)) else f"<{type(v).__name__}>")
            for k, v in d.items()
        }
        for d in inputs
    ]


if __name__ == "__main__":
    main(sys.argv[1:])
