"""Reference-image (edit_image) KV reuse: wall time per image and quality against recomputing the
reference tokens at every step.

    python benchmarks/edit_kv_reuse.py [--size 256] [--steps 20] [--repeats 3] [--write]

Variants, interleaved (A B C A B C ...) on one pipeline:
- ``exact``: today's default, the reference tokens run through every block at every step;
- ``reuse_edit_kv``: their keys/values recorded on the first step and reused (approximate);
- ``KV-model mode``: what klein-9B-KV does (reference tokens attend to themselves, computed once);
  a different model behaviour, so timed only (its quality is its own model's, see the parity test).

Speed: random weights of realistic proportions (8 heads x 64, 2 double + 6 single blocks), one
reference image the size of the output, cfg 1 and cfg 4. Quality (PSNR and max |diff| of
``reuse_edit_kv`` against ``exact``, 8 prompts): the bundled toy base model (trained weights, 64 px,
its 20 steps) and the random model above. ``--write`` replaces the section in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffsynth_templates import Flux2DiTConfig
from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline
from diffsynth_templates.pipelines.random_init import RandomPipelineSpec, random_flux2_pipeline

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square", "a green triangle", "two yellow dots", "a striped box",
           "a dark night sky", "a bright sun", "a small house"]  # fmt: skip


def reference_image(size: int, seed: int = 0) -> Image.Image:
    """A smooth random picture (gradients and blobs), the same for every run."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    channels = [
        np.sin(xx * g.uniform(2, 8) + g.uniform(0, 6)) * np.cos(yy * g.uniform(2, 8)) for _ in range(3)
    ]
    return Image.fromarray(((np.stack(channels, -1) * 0.5 + 0.5) * 255).astype(np.uint8))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def generate(pipe, prompt, size, steps, cfg, edit, mode, output_type="np"):
    pipe.reference_kv_model = mode == "kv_model"
    try:
        return pipe(prompt, height=size, width=size, num_inference_steps=steps, cfg_scale=cfg, seed=0,
                    edit_image=[edit], reuse_edit_kv=mode == "reuse", output_type=output_type,
                    max_sequence_length=64, progress=False)  # fmt: skip
    finally:
        pipe.reference_kv_model = False


def quality(pipe, size, steps, cfg, edit) -> tuple[float, float, float]:
    """Mean and worst PSNR (dB) and max |diff| of reuse against exact over ``PROMPTS``."""
    scores, worst_diff = [], 0.0
    for prompt in PROMPTS:
        exact = generate(pipe, prompt, size, steps, cfg, edit, "exact")
        reused = generate(pipe, prompt, size, steps, cfg, edit, "reuse")
        scores.append(psnr(reused, exact))
        worst_diff = max(worst_diff, float(np.abs(reused - exact).max()))
    return statistics.mean(scores), min(scores), worst_diff


def timing(pipe, size, steps, cfg, edit, repeats, device) -> dict[str, float]:
    modes = {"exact": "exact", "reuse_edit_kv=True": "reuse", "KV-model mode": "kv_model"}
    times = {name: [] for name in modes}
    for mode in modes.values():  # warm-up
        generate(pipe, PROMPTS[0], size, steps, cfg, edit, mode, "latent")
    for _ in range(repeats):
        for name, mode in modes.items():
            start = time.perf_counter()
            generate(pipe, PROMPTS[0], size, steps, cfg, edit, mode, "latent")
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=256, help="output and reference side in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32

    dit = Flux2DiTConfig(num_double_blocks=2, num_single_blocks=6, num_heads=8, head_dim=64, text_dim=96,
                         axes_dims_rope=(16, 16, 16, 16))  # fmt: skip
    big = random_flux2_pipeline(RandomPipelineSpec(dit=dit), device=args.device, torch_dtype=dtype)
    toy = Flux2ImagePipeline.from_pretrained(ROOT / "models/toy/base", device=args.device, torch_dtype=dtype)
    tokens = (args.size // 16) ** 2
    lines = [
        "## Edit-image KV reuse (benchmarks/edit_kv_reuse.py)",
        "",
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.device} "
        f"{str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads. Wall time per image "
        f"(median of {args.repeats}, interleaved), random weights 8 heads x 64, 2 double + 6 single blocks, "
        f"{args.size}x{args.size} output ({tokens} tokens) + one {args.size}x{args.size} reference "
        f"({tokens} tokens), {args.steps} steps:",
        "",
        "| cfg | exact (s) | reuse_edit_kv=True (s) | speed-up | KV-model mode (s) | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    edit = reference_image(args.size)
    for cfg in (1.0, 4.0):
        t = timing(big, args.size, args.steps, cfg, edit, args.repeats, args.device)
        print(f"timed cfg {cfg:g}: {t}", file=sys.stderr, flush=True)
        e, r, k = t["exact"], t["reuse_edit_kv=True"], t["KV-model mode"]
        lines.append(f"| {cfg:g} | {e:.3f} | {r:.3f} | {e / r:.2f}x | {k:.3f} | {e / k:.2f}x |")
    lines += [
        "",
        f"Quality of `reuse_edit_kv=True` against exact, {len(PROMPTS)} prompts (PSNR on images in [0, 1]):",
        "",
        "| model | size, steps, cfg | mean PSNR (dB) | worst PSNR (dB) | max abs diff |",
        "|---|---|---|---|---|",
    ]
    cases = [("toy base (trained)", toy, 64, 20, 1.0), ("random (above)", big, args.size, args.steps, 1.0),
             ("random (above)", big, args.size, args.steps, 4.0)]  # fmt: skip
    for name, pipe, size, steps, cfg in cases:
        mean, worst, diff = quality(pipe, size, steps, cfg, reference_image(size))
        print(f"quality {name} cfg {cfg:g}: {mean:.1f} {worst:.1f} {diff:.4f}", file=sys.stderr, flush=True)
        lines.append(f"| {name} | {size} px, {steps}, {cfg:g} | {mean:.1f} | {worst:.1f} | {diff:.4f} |")
    section = "\n".join(lines) + "\n"
    print(section)
    if args.write:
        from results import write_section  # benchmarks/ is on sys.path when run as a script

        write_section(ROOT / "benchmarks" / "RESULTS.md", "Edit-image KV reuse", section)


if __name__ == "__main__":
    with torch.no_grad():
        main()
