"""Step caching on the bundled toy world: what each preset saves and what it costs in quality.

    python benchmarks/step_cache.py            # the full tables (about 20 minutes on 2 CPU cores)
    python benchmarks/step_cache.py --quick    # 2 prompts, 20 steps, cfg 1: a smoke run, nothing written

On ``models/toy/base`` (a FLUX.2-klein-layout DiT of 2 double + 4 single blocks) and 8 fixed toy
prompts (one seed), for 20 and 50 steps, cfg 1 and 4, with no template and with two (brightness +
structure, KV on the positive side):

1. every ``step_cache`` preset against the uncached images of the same run: DiT block computations
   (uncached / cached), wall time per image and its ratio, PSNR (mean and worst image) and the
   largest |difference| of the images in [0, 1];
2. side by side, the naive baseline "reuse the whole DiT output of the last computed step for the
   next k-1 steps" at several k;
3. the toy world's control metrics with and without caching (50 steps, cfg 1): the brightness
   template's Spearman correlation and the structure template's IoU (scripts/eval_controls.py);
4. cache-dit's DBCache (+ TaylorSeer) on diffusers' ``Flux2KleinPipeline`` loaded from the same
   folder, fed our prompt embeddings (the toy tokenizer has no chat template), each system against
   its own uncached images; if cache-dit is not installed the section says so.

The tables replace the "Step caching" section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import write_section  # noqa: E402
from diffsynth_templates.pipelines.step_cache import PRESETS  # noqa: E402
from diffsynth_templates.toy import world as toy_world  # noqa: E402
from diffsynth_templates.toy.metrics import psnr  # noqa: E402
from diffsynth_templates.toy.models import ToyWorld  # noqa: E402

TOY = ROOT / "models" / "toy"
NAIVE_K = (3, 5, 7)
CACHE_DIT_CONFIGS = (  # (residual_diff_threshold, max_continuous_cached_steps), Fn=1 Bn=0, TaylorSeer order 1
    (0.08, 3),
    (0.16, 5),
    (0.32, 8),
    (0.64, 12),
)
logger = logging.getLogger("step_cache")


def eval_controls_module():
    """scripts/eval_controls.py (not a package), for its brightness and structure measurements."""
    spec = importlib.util.spec_from_file_location("eval_controls", ROOT / "scripts" / "eval_controls.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["eval_controls"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@dataclass
class CachedToyWorld(ToyWorld):
    """The toy world generating with a step cache and a CFG scale (what ToyWorld.generate fixes)."""

    step_cache: Any = None
    cfg_scale: float = 1.0

    def generate(self, prompts, seed, inputs=()):
        call = dict(
            prompt=list(prompts), height=self.size, width=self.size, num_inference_steps=self.steps,
            cfg_scale=self.cfg_scale, seed=seed, max_sequence_length=40, progress=False,
            step_cache=self.step_cache,
        )  # fmt: skip
        if not inputs:
            return self.pipe(**call)
        return self.templates(self.pipe, template_inputs=list(inputs), **call)


@dataclass
class Run:
    images: list[np.ndarray]  # [H, W, 3] in [0, 1]
    seconds: float  # wall time per image
    computed: int  # DiT block computations
    total: int  # what the uncached run computes


@contextlib.contextmanager
def reuse_last_output(pipe, k: int):
    """The naive baseline: the DiT's whole output is computed every k-th call of a stream and reused
    for the k-1 calls after it (k = 1: every call runs, as without it). Yields the [computed, total]
    DiT call counts."""
    original, streams, counts = pipe._model, {}, [0, 0]

    def model(hidden, timestep, c, positions):
        n, last = streams.get(id(c), (0, None))
        if n % k == 0 or last is None:
            last = original(hidden, timestep, c, positions)
            counts[0] += 1
        counts[1] += 1
        streams[id(c)] = (n + 1, last)
        return last

    pipe._model = model
    try:
        yield counts
    finally:
        del pipe._model


def scene_inputs(scene) -> list[dict]:
    """The two-template setting: a brighter target and the scene's silhouette as the structure."""
    from PIL import Image

    brighter = toy_world.render_prompt_variants(scene.spec, [{"brightness": 1.25}])[0].image
    mask = Image.fromarray((scene.mask * 255).astype(np.uint8)).convert("RGB")
    return [
        {"model_id": "brightness", "scale": toy_world.measure_brightness(brighter)},
        {"model_id": "structure", "image": mask},
    ]


@contextlib.contextmanager
def counted_dit_calls(pipe):
    """Yields ``[n]``: the DiT forwards run inside (each runs every block)."""
    calls = [0]
    handle = pipe.dit.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def generate_one(
    world: CachedToyWorld, scene, templates: bool, method: str
) -> tuple[np.ndarray, float, int, int]:
    """One scene (seed 0) with ``method`` ("none", a preset name, or "reuse-k"): the image in [0, 1],
    its wall time, and the DiT block computations it ran and would have run uncached."""
    pipe, blocks = world.pipe, world.pipe.dit.num_blocks
    inputs = scene_inputs(scene) if templates else ()
    world.step_cache = None if method == "none" or method.startswith("reuse-") else method
    k = int(method.split("-")[1]) if method.startswith("reuse-") else 1
    start = time.perf_counter()
    with counted_dit_calls(pipe) as calls, reuse_last_output(pipe, k) as counts:
        image = np.asarray(world.generate([scene.prompt], 0, inputs)[0], np.float64) / 255
    seconds = time.perf_counter() - start
    stats = pipe.step_cache_stats
    if stats is not None:
        return image, seconds, stats.computed_blocks, stats.total_blocks
    # uncached (k = 1) or the naive baseline: whole DiT calls, run or reused
    return image, seconds, calls[0] * blocks, counts[1] * blocks


def generate_all(world: CachedToyWorld, scenes, templates: bool, methods: list[str]) -> dict[str, Run]:
    """Every scene with every method, interleaved (scene 1: A B C ..., scene 2: A B C ...) so that
    load from other processes spreads over all methods alike."""
    runs = {m: Run([], 0.0, 0, 0) for m in methods}
    for scene in scenes:
        for method, run in runs.items():
            image, seconds, computed, total = generate_one(world, scene, templates, method)
            run.images.append(image)
            run.seconds += seconds / len(scenes)
            run.computed, run.total = run.computed + computed, run.total + total
    return runs


def compare(ref: Run, run: Run) -> dict[str, float]:
    scores = [psnr(a * 255, b * 255) for a, b in zip(run.images, ref.images)]
    return {
        "reduction": run.total / max(run.computed, 1),
        "seconds": run.seconds,
        "speedup": ref.seconds / run.seconds,
        "psnr_mean": float(np.mean(scores)),
        "psnr_worst": float(np.min(scores)),
        "max_diff": float(max(np.abs(a - b).max() for a, b in zip(run.images, ref.images))),
    }


def fmt_db(value: float) -> str:
    return "inf" if value == float("inf") else f"{value:.1f}"


def quality_table(world, scenes, settings, methods) -> tuple[list[str], dict]:
    """Rows of the speed/quality table and the measured values by (steps, cfg, templates, method)."""
    rows = [
        "| steps | cfg | templates | method | block computations, uncached / cached | s / image | "
        "wall-time speed-up | PSNR mean dB | PSNR worst dB | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    values = {}
    for steps, cfg, templates in settings:
        world.steps, world.cfg_scale = steps, cfg
        runs = generate_all(world, scenes, templates, ["none", *methods])
        ref = runs["none"]
        rows.append(f"| {steps} | {cfg:g} | {2 if templates else 0} | none | 1.00x | {ref.seconds:.3f} | 1.00x | - | - | - |")  # fmt: skip
        for method in methods:
            v = compare(ref, runs[method])
            values[(steps, cfg, templates, method)] = v
            name = method if not method.startswith("reuse-") else f"naive: reuse last output, k={method[6:]}"
            rows.append(
                f"| {steps} | {cfg:g} | {2 if templates else 0} | {name} | {v['reduction']:.2f}x | "
                f"{v['seconds']:.3f} | {v['speedup']:.2f}x | {fmt_db(v['psnr_mean'])} | "
                f"{fmt_db(v['psnr_worst'])} | {v['max_diff']:.4f} |"
            )
            logger.info(rows[-1])
    return rows, values


def controls_table(world, eval_controls, scenes_ec, methods) -> list[str]:
    """The brightness and structure templates' headline metrics, 50 steps, cfg 1, with each method."""
    rows = [
        "| method | brightness Spearman (target >= 0.9) | brightness MAE | structure IoU (target >= 0.6) |",
        "|---|---|---|---|",
    ]
    world.steps, world.cfg_scale = 50, 1.0
    none = lambda scene: []  # noqa: E731
    for method in ("none", *methods):
        world.step_cache = None if method == "none" else method
        bright = eval_controls.eval_brightness(world, scenes_ec, [0], none)
        structure = eval_controls.eval_structure(world, scenes_ec, [0], none)
        rows.append(
            f"| {method} | {bright['brightness_spearman']:.3f} | {bright['brightness_mae']:.3f} | "
            f"{structure['structure_iou']:.3f} |"
        )
        logger.info(rows[-1])
    return rows


# --- cache-dit on diffusers -------------------------------------------------------------------------


def cache_dit_table(ours_pipe, prompts: list[str], steps: int) -> list[str]:
    """cache-dit's DBCache + TaylorSeer on diffusers' Flux2KleinPipeline, same weights and embeddings."""
    try:
        import cache_dit
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig
        from diffusers import Flux2KleinPipeline
    except ImportError as e:
        return [f"cache-dit could not run here: {type(e).__name__}: {e}"]
    logging.getLogger("cache_dit").setLevel(logging.WARNING)
    pipe = Flux2KleinPipeline.from_pretrained(TOY / "base", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    embeds = [ours_pipe.encode_prompt([p], 40)[0] for p in prompts]
    cfg = pipe.transformer.config
    groups = {"single_transformer_blocks": cfg.num_single_layers, "transformer_blocks": cfg.num_layers}

    methods = [None, *CACHE_DIT_CONFIGS]  # None: uncached
    runs = {m: Run([], 0.0, 0, 0) for m in methods}
    for e in embeds:  # interleaved, image by image, like ours
        for method, run in runs.items():
            if method is not None:
                config = DBCacheConfig(
                    Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=method[0],
                    max_warmup_steps=1, max_continuous_cached_steps=method[1],
                )  # fmt: skip
                calibrator = TaylorSeerCalibratorConfig(taylorseer_order=1)
                cache_dit.enable_cache(pipe, cache_config=config, calibrator_config=calibrator)
            image, seconds = _one(pipe, e, steps)
            skipped = 0
            if method is not None:
                by_name = {st.cache_options["name"]: st for st in cache_dit.summary(pipe, details=False, logging=False) or []}  # fmt: skip
                for name, stats in by_name.items():  # each group's first block always runs
                    group = "single_transformer_blocks" if name.startswith("single") else "transformer_blocks"
                    skipped += len(stats.cached_steps) * (groups[group] - 1)
                cache_dit.disable_cache(pipe)
            run.images.append(image)
            run.seconds += seconds / len(embeds)
            run.total += steps * sum(groups.values())
            run.computed += steps * sum(groups.values()) - skipped
    ref = runs[None]
    rows = [
        "| method | block computations, uncached / cached | s / image | wall-time speed-up | PSNR mean dB | "
        "PSNR worst dB | max abs diff |",
        "|---|---|---|---|---|---|---|",
        f"| diffusers, uncached | 1.00x | {ref.seconds:.3f} | 1.00x | - | - | - |",
    ]
    for threshold, max_cached in CACHE_DIT_CONFIGS:
        v = compare(ref, runs[(threshold, max_cached)])
        rows.append(
            f"| cache-dit DBCache F1B0 + TaylorSeer 1, threshold {threshold}, max {max_cached} cached in a row | "
            f"{v['reduction']:.2f}x | {v['seconds']:.3f} | {v['speedup']:.2f}x | {fmt_db(v['psnr_mean'])} | "
            f"{fmt_db(v['psnr_worst'])} | {v['max_diff']:.4f} |"
        )
        logger.info(rows[-1])
    return rows


def _one(pipe, embeds, steps: int) -> tuple[np.ndarray, float]:
    """One diffusers image ``[H, W, 3]`` in [0, 1] and its wall time."""
    start = time.perf_counter()
    out = pipe(
        prompt_embeds=embeds, height=64, width=64, num_inference_steps=steps, guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0), output_type="np",
    )  # fmt: skip
    return out.images[0].astype(np.float64), time.perf_counter() - start


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return (
        f"CPU {cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} thread), float32, Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 prompts, 20 steps, cfg 1; nothing written")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    eval_controls = eval_controls_module()
    n_prompts = 2 if args.quick else args.prompts
    scenes = [eval_controls.Scene(p, s) for p, s in toy_world.fixed_eval_prompts(n_prompts)]
    base = ToyWorld.load(TOY / "base", TOY / "templates")
    world = CachedToyWorld(base.pipe, base.templates, base.names)
    methods = [*PRESETS, *(f"reuse-{k}" for k in NAIVE_K)]
    settings = [(20, 1.0, False)] if args.quick else [
        (steps, cfg, templates) for steps in (50, 20) for cfg in (1.0, 4.0) for templates in (False, True)
    ]  # fmt: skip
    start = time.perf_counter()
    quality, _ = quality_table(world, scenes, settings, methods)
    if args.quick:
        print("\n".join(quality))
        return 0
    controls = controls_table(world, eval_controls, scenes, ["balanced", "fast"])
    cache_dit_rows = cache_dit_table(world.pipe, [s.prompt for s in scenes], 50)
    minutes = (time.perf_counter() - start) / 60
    section = "\n".join([
        "## Step caching",
        "",
        "Written by `benchmarks/step_cache.py`.",
        "",
        f"Machine: {machine()}. {minutes:.0f} minutes in all.",
        f"Settings: the bundled toy world (`models/toy/base`: FLUX.2-klein layout, 2 double + 4 single "
        f"blocks, 64x64 images), {n_prompts} fixed toy prompts, seed 0, one image per call; two templates "
        "= brightness (a 1.25x brighter target) + structure (the scene's silhouette), KV on the positive "
        "side. Each method against the uncached images of the same run; block computations count one "
        "block's forward over one DiT call's batch; wall time is the whole call (text encoder, templates, "
        "DiT, VAE) per image, so it gains less than the DiT does; methods run interleaved image by image, "
        "on a machine shared with other jobs, so wall times are noisy (block counts and PSNR are exact).",
        "",
        *quality,
        "",
        "Control metrics with caching (50 steps, cfg 1, the prompts above, seed 0; scripts/eval_controls.py's "
        "measurements, each template alone):",
        "",
        *controls,
        "",
        "cache-dit on diffusers' `Flux2KleinPipeline` (same folder and weights, our prompt embeddings; "
        "50 steps, cfg 1; each system against its own uncached images). cache-dit caches each block group "
        "(2 double, 4 single) with its first block always computed:",
        "",
        *cache_dit_rows,
        "",
    ])  # fmt: skip
    write_section(args.output, "Step caching", section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
