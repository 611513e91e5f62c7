"""Seconds per denoising step with CFG: both sides batched into one DiT call vs two sequential calls.

    python benchmarks/cfg_batching.py [--size 256] [--steps 4] [--repeats 5]

Runs both variants interleaved (A B A B ...) on the same random-weight pipeline of realistic
proportions (8 heads x 64, 2 double + 6 single blocks) and prints a markdown table of medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffsynth_templates import Flux2DiTConfig
from diffsynth_templates.pipelines.random_init import RandomPipelineSpec, random_flux2_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per variant")
    parser.add_argument("--text_len", type=int, default=64, help="prompt tokens (max_sequence_length)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    args = parser.parse_args()

    dit = Flux2DiTConfig(num_double_blocks=2, num_single_blocks=6, num_heads=8, head_dim=64, text_dim=96,
                         axes_dims_rope=(16, 16, 16, 16))  # fmt: skip
    pipe = random_flux2_pipeline(
        RandomPipelineSpec(dit=dit), device=args.device, torch_dtype=getattr(torch, args.dtype)
    )
    # the pipeline's public switch: both CFG sides in one DiT call, or two passes
    variants = {"batched (1 call, batch 2)": True, "sequential (2 calls, batch 1)": False}

    def one_run() -> float:
        start = time.perf_counter()
        pipe("a red circle", negative_prompt="blurry", height=args.size, width=args.size, cfg_scale=4.0,
             num_inference_steps=args.steps, seed=0, max_sequence_length=args.text_len, output_type="latent",
             progress=False)  # fmt: skip
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps

    times = {name: [] for name in variants}
    for batching in variants.values():  # warm-up
        pipe.cfg_batching = batching
        one_run()
    for _ in range(args.repeats):
        for name, batching in variants.items():
            pipe.cfg_batching = batching
            times[name].append(one_run())

    tokens = (args.size // 16) ** 2
    print(f"\nCFG batching, {args.size}x{args.size} ({tokens} image + {args.text_len} text tokens), "
          f"{args.device} {args.dtype}, median of {args.repeats} runs x {args.steps} steps "
          f"(whole step incl. text encoding amortized)\n")  # fmt: skip
    print("| variant | s / step | ratio to batched |")
    print("|---|---|---|")
    base = statistics.median(times[next(iter(variants))])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.4f} | {med / base:.2f} |")


if __name__ == "__main__":
    with torch.no_grad():
        main()
