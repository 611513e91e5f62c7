"""Seconds per denoising step with CFG: both sides batched into one DiT call vs two sequential calls.

    python benchmarks/cfg_batching.py [--size 256] [--steps 4] [--repeats 5]

Runs both variants interleaved (A B A B ...) on the same random-weight pipeline of realistic
proportions (8 heads x 64, 2 double + 6 single blocks) and prints a markdown table of medians.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ holds step_timing.py
from step_timing import print_ratio_table, realistic_pipeline, step_timing_parser  # noqa: E402


def main() -> None:
    parser = step_timing_parser(__doc__)
    args = parser.parse_args()

    pipe = realistic_pipeline(args)
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
    print_ratio_table(times, next(iter(variants)))


if __name__ == "__main__":
    with torch.no_grad():
        main()
