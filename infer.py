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
import difflib
import json
import logging
import math
import os
import sys
from pathlib import Path

from diffsynth_templates.errors import DiffSynthTemplatesError

# --weight_dtype: loading.quantize.STORAGE_FORMATS (named here so --help needs no torch import)
WEIGHT_DTYPES = ("float8_e4m3fn", "float8_e5m2", "int8", "nf4")
DTYPES = {"auto": None, "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
DEFAULT_TOY_MODEL = Path(__file__).resolve().parent / "models" / "toy" / "base"
TOY_TEMPLATES = DEFAULT_TOY_MODEL.parent / "templates"
DEMO_OUTPUT = Path("outputs") / "toy_demo.png"
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed / Generator.manual_seed accept
SEED_RANGE_TEXT = "[-2**63, 2**64 - 1] (torch.manual_seed's range)"
SIZE_MULTIPLE = 16  # pixels per DiT token side of the official models; --help says the same
OUTPUT_SUFFIXES = (".png",)  # the generation parameters live in PNG text metadata
# generous bounds that stop a typo before it allocates tens of GB; each has a flag to raise it
LIMITS = {"max_size": 4096, "max_pixels": 16 * 1024 * 1024, "max_steps": 1000, "max_images": 64}
# job-file lists and the repeatable flags they correspond to
JOB_LISTS = {"templates": "template", "template_inputs": "template_input",
             "negative_template_inputs": "negative_template_input"}  # fmt: skip
# flags a job file may not set: running folder code must be the command line's own decision
COMMAND_LINE_ONLY = {
    "trust_remote_code": "it can only come from the command line: pass --trust_remote_code yourself",
    "job": "a job file cannot name another job file",
}


class InferError(DiffSynthTemplatesError, ValueError):
    """A bad command-line or job value; the message names it and what would be right."""


class JobFileError(InferError):
    """A job file that cannot be read, or a key or value in it that is not allowed."""


def _seed(text: str) -> int:
    """argparse type for --seed: an integer in torch.manual_seed's range."""
    try:
        value = int(text)
    except ValueError:
        msg = f"invalid seed {text!r}: expected an integer in {SEED_RANGE_TEXT}"
        raise argparse.ArgumentTypeError(msg) from None
    if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"seed {value} is outside {SEED_RANGE_TEXT}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="local folder or ModelScope id in the official layout "
                   f"(transformer/, text_encoder/, vae/, tokenizer/); default: {DEFAULT_TOY_MODEL}")  # fmt: skip
    for name in ("transformer", "text_encoder", "vae", "tokenizer"):
        single = (
            " (or one .safetensors file: BFL/ComfyUI layout, fp8-scaled too)" if name == "transformer" else ""
        )
        g.add_argument(
            f"--{name}", default=None, help=f"take the {name} from this folder or id instead{single}"
        )
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
        "--weight_dtype",
        default=None,
        choices=WEIGHT_DTYPES,
        help="store the DiT's, text encoder's and templates' large Linear weights in this format and "
        "compute in --dtype (float8_e4m3fn: about half the bf16 bytes; int8/nf4 need torchao)",
    )
    g.add_argument(
        "--vram_limit",
        type=float,
        default=None,
        metavar="GB",
        help="keep at most GB GiB of DiT weights on the device; the other blocks stream from host memory "
        "(same images); the text encoder and VAE visit the device only for their phase",
    )
    g.add_argument(
        "--vae_tile_size", type=int, default=None, help="decode the VAE in tiles of this many latent pixels"
    )
    g.add_argument(
        "--offline", action="store_true", help="never touch the network; use only cached downloads"
    )
    g.add_argument(
        "--lora", action="append", default=None, metavar="PATH[:SCALE]",
        help="a LoRA file (BFL/ComfyUI/ai-toolkit, kohya or diffusers layout; local, or "
        "owner/name/file.safetensors on ModelScope) at SCALE (default 1); repeatable, the deltas add",
    )  # fmt: skip
    g.add_argument(
        "--variant",
        default=None,
        choices=("turbo", "base"),
        help="Z-Image only: sampling defaults (default: turbo if the model name says so, else base)",
    )

    g = p.add_argument_group(
        "generation",
        "--height, --width, --steps and --cfg_scale default to the model's recommended values: its "
        "generation_defaults.json (the toy model: 64x64, 20 steps, cfg 1), else the official model's "
        "(FLUX.2-klein base 1024, 50 steps, cfg 4; distilled klein 4 steps, cfg 1; Z-Image Turbo 8 steps, "
        "cfg 1; Z-Image base 50 steps, cfg 5), else 1024x1024, 50 steps, cfg 4; the values used are logged",
    )
    g.add_argument("--prompt", default="a photo of a cat",
                   help="the text prompt (a job file may give a list: one set of images per prompt)")  # fmt: skip
    g.add_argument("--negative_prompt", default="", help="what to steer away from (used when cfg_scale != 1)")
    g.add_argument("--height", type=int, default=None,
                   help=f"image height in pixels, a multiple of {SIZE_MULTIPLE} (default: the model's)")  # fmt: skip
    g.add_argument("--width", type=int, default=None,
                   help=f"image width in pixels, a multiple of {SIZE_MULTIPLE} (default: the model's)")  # fmt: skip
    g.add_argument("--steps", type=int, default=None, dest="num_inference_steps",
                   help="denoising steps (default: the model's)")  # fmt: skip
    g.add_argument("--cfg_scale", type=float, default=None,
                   help="classifier-free guidance scale (1 = off, one DiT pass; default: the model's)")  # fmt: skip
    g.add_argument("--seed", type=_seed, default=0,
                   help="random seed (noise is drawn on the CPU: same seed, same image)")  # fmt: skip
    g.add_argument("--num_images", type=int, default=1,
                   help="images per prompt (seeds seed, seed+1, ...)")  # fmt: skip
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
        "--resize_mask",
        action="store_true",
        help="stretch an --inpaint_mask of another size to --input_image's size (else a size mismatch "
        "is an error)",
    )
    g.add_argument(
        "--edit_image", action="append", default=None, help="reference image for editing (repeatable)"
    )

    g = p.add_argument_group("limits", "refused before anything is allocated; raise them deliberately")
    g.add_argument("--max_size", type=int, default=LIMITS["max_size"],
                   help="largest --height / --width (default %(default)s)")  # fmt: skip
    g.add_argument("--max_pixels", type=int, default=LIMITS["max_pixels"],
                   help="largest height x width (default %(default)s, 16 MP)")  # fmt: skip
    g.add_argument("--max_steps", type=int, default=LIMITS["max_steps"],
                   help="largest --steps (default %(default)s)")  # fmt: skip
    g.add_argument("--max_images", type=int, default=LIMITS["max_images"],
                   help="most images in one run, prompts x --num_images (default %(default)s)")  # fmt: skip

    g = p.add_argument_group("templates")
    g.add_argument("--template", action="append", default=[], metavar="SOURCE",
                   help="template folder or ModelScope id (repeatable; model_id 0, 1, ... in order)")  # fmt: skip
    g.add_argument("--template_input", action="append", default=[], metavar="'KEY=VALUE ...'",
                   help="one template input: space-separated KEY=VALUE pairs, e.g. 'model_id=0 scale=0.7 strength=0.6'; "
                   "values are JSON when they parse (numbers, lists, true), image paths load as images (repeatable). "
                   "strength (default 1) scales the template's effect: 0 = without it, above 1 amplifies")  # fmt: skip
    g.add_argument("--negative_template_input", action="append", default=[], metavar="'KEY=VALUE ...'",
                   help="a template input for the negative (unconditional) side (repeatable)")  # fmt: skip
    g.add_argument("--job", default=None, help="JSON file with any of: templates, template_inputs, "
                   "negative_template_inputs (lists) and the generation flags by name, e.g. \"steps\": 20 "
                   "(flags override it; see examples/job.json). Not trust_remote_code: that is a flag only")  # fmt: skip
    g.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="allow DiffSynth-format templates to run their model.py (command line only, never from --job)",
    )
    g.add_argument(
        "--lazy_loading", action="store_true", help="keep at most one template on the device at a time"
    )

    g = p.add_argument_group("output")
    g.add_argument("--output", default="outputs/image.png",
                   help="PNG path; several images get _0, _1, ... suffixes (prompt-major order)")  # fmt: skip
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run_demo() -> list[Path]:
    """The bundled toy world: base model, each template, compositions and a sweep, as one labelled grid."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not (DEFAULT_TOY_MODEL / "model_index.json").is_file():
        raise InferError(
            f"the bundled toy model {DEFAULT_TOY_MODEL} is missing (a partial checkout?); "
            "rebuild it with scripts/train_toy.sh or pass --model"
        )
    from diffsynth_templates.toy.demo import render_demo

    out = render_demo(DEFAULT_TOY_MODEL, TOY_TEMPLATES, DEMO_OUTPUT)
    logging.info("wrote %s (the toy-world demo; see README for what each cell shows)", out)
    return [out]


def main(argv: list[str] | None = None) -> list[Path]:
    """The command line: our errors become ``error: <message>`` on stderr and exit code 2."""
    try:
        return generate(sys.argv[1:] if argv is None else argv)
    except DiffSynthTemplatesError as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(2) from None


def generate(argv: list[str]) -> list[Path]:
    """Parse ``argv`` (and ``--job``), check every value, then load and generate; returns the PNG paths."""
    if not argv:  # `python infer.py`: the demo that works out of the box
        return run_demo()
    parser = build_parser()
    args = parser.parse_args(argv)
    job = {}
    if args.job:  # the job's generation arguments become defaults, so explicit flags still win
        job = read_job(args.job, parser)
        parser.set_defaults(**{k: v for k, v in job.items() if k not in JOB_LISTS})
        args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    check_args(args)
    loras = [parse_lora(text) for text in args.lora or []]
    prompts = [args.prompt] if isinstance(args.prompt, str) else list(args.prompt)
    paths = output_paths(args.output, len(prompts) * args.num_images, args.max_images)
    templates, template_inputs, negative_inputs = _template_job(args, job)
    images = {name: _open_image(getattr(args, name), f"--{name}") for name in ("input_image", "inpaint_mask")}
    edit_images = [_open_image(p, "--edit_image") for p in args.edit_image or []]

    import torch
    from PIL.PngImagePlugin import PngInfo

    from diffsynth_templates.pipelines.auto import (
        BACKBONE_TITLES,
        backbone_of_folders,
        pipeline_class,
        resolve_model,
    )
    from diffsynth_templates.pipelines.defaults import defaults_of_folder

    model = args.model or str(DEFAULT_TOY_MODEL)
    if args.model is None and not DEFAULT_TOY_MODEL.is_dir():
        raise InferError(
            f"no --model given and the bundled toy model {DEFAULT_TOY_MODEL} is missing; pass --model"
        )
    offline = True if args.offline else None
    overrides = {name: getattr(args, name) for name in ("transformer", "text_encoder", "vae", "tokenizer")}
    folders = resolve_model(model, offline=offline, **overrides)  # each source once for the whole run
    backbone = backbone_of_folders(folders)
    if loras:  # each LoRA found (or downloaded) before any weights are loaded
        from diffsynth_templates.pipelines.lora_files import resolve_lora_source

        loras = [(resolve_lora_source(path, offline=offline), scale) for path, scale in loras]
    title = BACKBONE_TITLES[backbone]
    for flag, value, supported in (
        ("--variant", args.variant, backbone == "zimage"),
        ("--edit_image", args.edit_image, backbone == "flux2"),
        ("--vae_tile_size", args.vae_tile_size, backbone == "flux2"),
    ):
        if value and not supported:
            raise InferError(f"{flag} is not supported by {title} pipelines ({model} is {title})")
    if folders.root is None:  # every component from elsewhere and no model folder: say what is wrong
        from diffsynth_templates.pipelines.defaults import recommended_defaults

        recommended_defaults(model, variant=args.variant, offline=offline)
    _fill_defaults(args, defaults_of_folder(folders.root, model, variant=args.variant))
    check_size(args.height, args.width, args.max_size, args.max_pixels)  # before anything is allocated

    dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    pipe = pipeline_class(backbone).from_pretrained(
        folders,
        torch_dtype=dtype,
        device=args.device,
        **overrides,
        offline=offline,
        **({"variant": args.variant} if backbone == "zimage" else {}),
        weight_dtype=args.weight_dtype,
    )
    for i, (path, scale) in enumerate(loras):
        pipe.load_lora(path, scale, adapter_name=f"lora_{i}")
    if args.offload:
        pipe.enable_model_cpu_offload(args.device or "cuda")
    if args.vram_limit is not None:
        pipe.enable_block_offload(vram_limit_gb=args.vram_limit)
    if args.vae_tile_size:
        pipe.enable_vae_tiling(args.vae_tile_size)

    call = dict(
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.num_inference_steps,
        cfg_scale=args.cfg_scale,
        progress=not args.quiet,
        max_pixels=args.max_pixels,
    )
    # only what the user gave: a template may produce input_image / inpaint_mask itself (force_inpaint),
    # and the same argument given twice is an error
    if images["input_image"] is not None:
        call.update(input_image=images["input_image"], denoising_strength=args.denoising_strength)
    if images["inpaint_mask"] is not None:
        call.update(inpaint_mask=images["inpaint_mask"], resize_mask=args.resize_mask)
    if args.max_sequence_length is not None:
        call["max_sequence_length"] = args.max_sequence_length
    if edit_images:
        call["edit_image"] = edit_images
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
        if args.weight_dtype:
            from diffsynth_templates.templates.storage import store_template_weights

            store_template_weights(template_pipe, args.weight_dtype)

        def run(**kw):
            return template_pipe(
                pipe, template_inputs=template_inputs, negative_template_inputs=negative_inputs, **kw
            )

    skipped = ("output", "quiet", "num_images", *LIMITS)
    record = {k: v for k, v in vars(args).items() if k not in skipped}
    record.update(  # what actually ran: the job's lists and the flags' together
        template=templates,
        template_inputs=_jsonable(template_inputs),
        negative_template_inputs=_jsonable(negative_inputs),
    )
    written = []
    for k, (prompt, index) in enumerate((p, i) for p in prompts for i in range(args.num_images)):
        seed = args.seed + index
        image = run(prompt=prompt, **call, seed=seed)[0]
        meta = PngInfo()
        meta.add_text("parameters", json.dumps({**record, "prompt": prompt, "model": model, "seed": seed}))
        try:
            image.save(paths[k], pnginfo=meta)
        except OSError as e:
            raise InferError(f"cannot write {str(paths[k])!r}: {e}") from e
        logging.info("wrote %s", paths[k])
        written.append(paths[k])
    return written


# -- checks, all before anything is loaded --------------------------------------------------------


def check_args(args: argparse.Namespace) -> None:
    """Every generation value, whether from a flag or the job file: types, ranges, finiteness."""
    for name in LIMITS:
        _check_int(f"--{name}", getattr(args, name), 1)
    _check_int("--num_images", args.num_images, 1, args.max_images, "--max_images")
    if args.num_inference_steps is not None:
        _check_int("--steps", args.num_inference_steps, 1, args.max_steps, "--max_steps")
    for flag, value in (("--max_sequence_length", args.max_sequence_length), ("--vae_tile_size", args.vae_tile_size)):  # fmt: skip
        if value is not None:
            _check_int(flag, value, 1)
    last_seed = args.seed + args.num_images - 1
    if not SEED_RANGE[0] <= args.seed <= last_seed <= SEED_RANGE[1]:
        raise InferError(
            f"--seed {args.seed} (images use seeds {args.seed}..{last_seed}) is outside {SEED_RANGE_TEXT}"
        )
    if args.cfg_scale is not None:
        _check_float(
            "--cfg_scale", args.cfg_scale, "a finite number >= 0 (1 = no guidance)", lambda v: v >= 0
        )
    _check_float("--denoising_strength", args.denoising_strength, "in (0, 1]", lambda v: 0 < v <= 1)
    if args.denoising_strength != 1.0 and not args.input_image:
        raise InferError(f"--denoising_strength {args.denoising_strength} needs --input_image to start from")
    if args.inpaint_mask and not args.input_image:
        raise InferError(
            "--inpaint_mask needs --input_image: the mask marks which of its pixels to regenerate"
        )
    if args.vram_limit is not None:
        _check_float("--vram_limit", args.vram_limit, "a number of GiB > 0", lambda v: v > 0)
        if args.offload:
            raise InferError("--vram_limit and --offload are two offload modes: pass one of them")
    if args.height is not None or args.width is not None:  # the rest once the model's defaults are known
        check_size(args.height, args.width, args.max_size, args.max_pixels)


def parse_lora(text: str) -> tuple[str, float]:
    """``--lora PATH[:SCALE]``: the part after the last ':' is the scale when it is a number."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            scale = float(tail)
        except ValueError:
            path, scale = text, 1.0
        else:
            if not math.isfinite(scale):
                raise InferError(f"--lora {text!r}: the scale {tail!r} must be a finite number")
    else:
        path, scale = text, 1.0
    if not path:
        raise InferError(
            f"--lora {text!r} names no file: expected PATH[:SCALE], e.g. my_lora.safetensors:0.8"
        )
    return path, scale


def check_size(height: int | None, width: int | None, max_size: int, max_pixels: int) -> None:
    """Multiples of 16 within the limits, refused before any tensor is allocated."""
    for name, value in (("height", height), ("width", width)):
        if value is None:
            continue
        _check_int(f"--{name}", value, SIZE_MULTIPLE, max_size, "--max_size")
        if value % SIZE_MULTIPLE:
            lower, upper = (
                value // SIZE_MULTIPLE * SIZE_MULTIPLE,
                (value // SIZE_MULTIPLE + 1) * SIZE_MULTIPLE,
            )
            raise InferError(
                f"{name}={value} is not a multiple of {SIZE_MULTIPLE} (--{name}); use {lower} or {upper}"
            )
    if height is not None and width is not None and height * width > max_pixels:
        raise InferError(
            f"--height {height} x --width {width} = {height * width} pixels is more than --max_pixels "
            f"{max_pixels}; use a smaller size or pass --max_pixels {height * width} (memory grows with it)"
        )


def _check_int(flag: str, value, minimum: int, maximum: int | None = None, raise_with: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InferError(f"{flag} must be an integer, got {value!r}")
    if value < minimum:
        raise InferError(f"{flag} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InferError(
            f"{flag} {value} is above the limit {maximum}; pass {raise_with} {value} to allow it"
        )


def _check_float(flag: str, value, what: str, ok) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not ok(value)
    ):
        raise InferError(f"{flag} must be {what}, got {value!r}")


def output_paths(output: str, count: int, max_images: int) -> list[Path]:
    """The PNG paths a run writes, checked (suffix, folder creatable, not directories) before generating."""
    if count > max_images:
        raise InferError(
            f"{count} images (prompts x --num_images) are more than --max_images {max_images}; "
            f"pass --max_images {count} to allow it"
        )
    out = Path(output)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InferError(
            f"--output {output!r} must end in .png (the generation parameters are stored as PNG text); "
            f"e.g. {str(out.with_suffix('.png'))!r}"
        )
    paths = [out] if count == 1 else [out.with_name(f"{out.stem}_{k}{out.suffix}") for k in range(count)]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InferError(f"--output {output!r}: cannot create the folder {str(out.parent)!r}: {e}") from e
    if not os.access(out.parent, os.W_OK):
        raise InferError(f"--output {output!r}: the folder {str(out.parent)!r} is not writable")
    for path in paths:
        if path.is_dir():
            raise InferError(f"--output: {str(path)!r} is an existing folder; name a .png file instead")
    return paths


def _fill_defaults(args: argparse.Namespace, defaults) -> None:
    """The model's recommended height/width/steps/cfg for whatever the user left out; logged once."""
    used = []
    for name, flag in (("height", "--height"), ("width", "--width"), ("num_inference_steps", "--steps"),
                       ("cfg_scale", "--cfg_scale")):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, getattr(defaults, name))
            used.append(f"{flag} {getattr(defaults, name)}")
    if used:
        logging.info(
            "model defaults from %s: %s (pass the flags to change)", defaults.source, ", ".join(used)
        )


def _open_image(path: str | None, flag: str):
    if path is None:
        return None
    from diffsynth_templates.loading.image_files import open_image

    return open_image(path, flag, mode=None, error=InferError)


# -- template inputs ------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def parse_pairs(text: str, base: Path | None = None) -> dict:
    """``'model_id=0 scale=0.7 image=edge.png'`` -> ``{"model_id": 0, "scale": 0.7, "image": <PIL>}``."""
    out = {}
    for pair in text.split():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InferError(f"template input {pair!r} is not KEY=VALUE (in {text!r})")
        out[key] = _parse_value(value, base)
    return out


def _parse_value(value, base: Path | None):
    if isinstance(value, str):
        path = Path(value) if base is None or Path(value).is_absolute() else base / value
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return _open_image(str(path), "template input image").convert("RGB")
        try:
            return json.loads(value)
        except (ValueError, RecursionError):  # not JSON (or a number past Python's digit limit): a string
            return value
    return value


def _template_job(args, job: dict) -> tuple[list[str], list[dict], list[dict]]:
    """Merge the job's lists with the flags; paths in a job resolve against the job file's folder."""
    from diffsynth_templates.templates.schema import read_strength

    templates, inputs, negative = list(args.template), [], []
    if args.job:
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
    for side, dicts in (("template_input", inputs), ("negative_template_input", negative)):
        for index, d in enumerate(dicts):
            for key, value in d.items():
                _check_finite_json(value, f"{side}[{index}].{key}", InferError)
            read_strength(d, f"{side}[{index}]")  # before any model loads
    if (inputs or negative) and not templates:
        raise InferError('template inputs were given but no --template (or job "templates") to run them')
    return templates, inputs, negative


def _check_finite_json(value, where: str, error: type[InferError]) -> None:
    """NaN / inf / floats past the float range anywhere in a JSON value, named by its path."""
    if isinstance(value, float) and not math.isfinite(value):
        raise error(f"{where} must be a finite number, got {value!r}")
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite_json(v, f"{where}[{i}]", error)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite_json(v, f"{where}.{k}", error)


# -- job files ------------------------------------------------------------------------------------


def read_job(path: str, parser: argparse.ArgumentParser | None = None) -> dict:
    """A job file, read and validated: ``{dest: value}`` for flags plus the lists in ``JOB_LISTS``."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise JobFileError(f"cannot read job file {path!r}: {e}") from e
    except UnicodeDecodeError as e:
        raise JobFileError(f"job file {path!r} is not UTF-8 text: {e}") from e
    try:
        job = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, int digit limit, absurd nesting
        raise JobFileError(f"job file {path!r} is not valid JSON: {e}") from e
    return validate_job(job, path, parser)


def job_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The keys a job may hold, by flag name (``steps``) and by destination (``num_inference_steps``)."""
    keys = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", *COMMAND_LINE_ONLY, *JOB_LISTS.values()):
            continue
        for option in action.option_strings:
            keys[option.lstrip("-")] = action
        keys[action.dest] = action
    return keys


def validate_job(job: object, where: str, parser: argparse.ArgumentParser | None = None) -> dict:
    """Check a parsed job against the flags' schema; returns ``{dest: value}`` plus ``JOB_LISTS`` keys.

    Unknown keys are named with the closest known one; flag values are type-checked like the flag would
    be (ints are ints, choices are choices, numbers finite); ``prompt`` may be a list of strings.
    """
    parser = parser or build_parser()
    if not isinstance(job, dict):
        raise JobFileError(f"job file {where!r} must hold a JSON object, got {type(job).__name__}")
    keys = job_keys(parser)
    out = {}
    for key, value in job.items():
        if key in COMMAND_LINE_ONLY:
            raise JobFileError(f"job file {where!r} sets {key!r}: {COMMAND_LINE_ONLY[key]}")
        if key in JOB_LISTS:
            out[key] = _job_list(key, value, where)
            continue
        if key not in keys:
            close = difflib.get_close_matches(str(key), [*keys, *JOB_LISTS], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise JobFileError(
                f"job file {where!r}: unknown key {key!r}{hint}; known keys: {sorted({*keys, *JOB_LISTS})}"
            )
        action = keys[key]
        if action.dest in out:
            raise JobFileError(f"job file {where!r} gives {action.dest!r} twice (as {key!r})")
        out[action.dest] = _job_value(key, value, action, where)
    return out


def _job_value(key: str, value, action: argparse.Action, where: str):
    def bad(what: str):
        return JobFileError(f"job file {where!r}: {key!r} must be {what}, got {value!r}")

    if value is None and action.default is None:
        return None
    if key == "prompt" and not isinstance(value, str):
        if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
            raise bad("a string or a non-empty list of strings")
        return value
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise bad("true or false")
    elif isinstance(action, argparse._AppendAction):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
    elif action.type in (int, _seed):
        what = f"an integer in {SEED_RANGE_TEXT}" if action.type is _seed else "an integer"
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(what)
        if action.type is _seed and not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
            raise bad(what)
    elif action.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise bad("a finite number")
        try:
            value = float(value)
        except OverflowError:
            raise bad("a finite number") from None
    elif not isinstance(value, str):
        raise bad("a string")
    if action.choices is not None and value not in action.choices:
        raise bad(f"one of {sorted(action.choices)}")
    return value


def _job_list(key: str, value, where: str) -> list:
    """``templates``: a list of folder/id strings; ``*template_inputs``: a list of JSON objects."""
    if key == "templates":
        if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
            raise JobFileError(
                f"job file {where!r}: 'templates' must be a list of template folders or ids, "
                f'e.g. ["models/toy/templates/brightness"], got {value!r}'
            )
        return value
    if not isinstance(value, list) or not all(isinstance(d, dict) for d in value):
        raise JobFileError(
            f"job file {where!r}: {key!r} must be a list of objects, one per template input, "
            f'e.g. [{{"model_id": 0, "scale": 0.7}}], got {value!r}'
        )
    for index, d in enumerate(value):
        _check_finite_json(d, f"job file {where!r}: {key}[{index}]", JobFileError)
    return value


def _jsonable(inputs: list[dict]) -> list[dict]:
    """Template inputs for the PNG metadata: JSON values as they are, anything else (images) as ``<Type>``."""
    from diffsynth_templates.loading.json_io import to_json_value

    return to_json_value(inputs, fallback=lambda v: f"<{type(v).__name__}>")


if __name__ == "__main__":
    main(sys.argv[1:])
