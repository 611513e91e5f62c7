"""Seconds per denoising step with a KV template at strength 1 (SDPA as before) vs another strength
(a float logit bias on the template's tokens), and without the template.

    python benchmarks/strength_overhead.py [--size 256] [--steps 4] [--repeats 5] [--tokens 64]

Runs the variants interleaved on the same random-weight pipeline of realistic proportions (8 heads x
64, 2 double + 6 single blocks), CFG 4 with the template on the positive side (the sides batched into
one DiT call), and prints a markdown table of medians.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ holds step_timing.py
from step_timing import print_ratio_table, realistic_pipeline, step_timing_parser  # noqa: E402

from diffsynth_templates.pipelines.kv_schedule import with_log_strength


def main() -> None:
    parser = step_timing_parser(__doc__)
    parser.add_argument("--tokens", type=int, default=64, help="template KV tokens per block")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    pipe = realistic_pipeline(args)
    generator = torch.Generator().manual_seed(0)
    kv = {
        name: tuple(
            torch.randn(1, args.tokens, 8, 64, generator=generator).to(args.device, dtype) for _ in "kv"
        )
        for name in pipe.dit.kv_block_specs
    }
    variants = {"no template": None, "strength 1": kv, "strength 0.5": with_log_strength(kv, 0.5)}

    def one_run(cache) -> float:
        start = time.perf_counter()
        pipe("a red circle", negative_prompt="blurry", height=args.size, width=args.size, cfg_scale=4.0,
             num_inference_steps=args.steps, seed=0, max_sequence_length=args.text_len, output_type="latent",
             progress=False, kv_cache=cache)  # fmt: skip
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps

    for cache in variants.values():  # warm-up
        one_run(cache)
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, cache in variants.items():
            times[name].append(one_run(cache))

    tokens = (args.size // 16) ** 2
    print(f"\nTemplate strength, {args.size}x{args.size} ({tokens} image + {args.text_len} text tokens, "
          f"{args.tokens} template tokens per block), {args.device} {args.dtype}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), median of {args.repeats} runs x "
          f"{args.steps} steps\n")  # fmt: skip
    print_ratio_table(times, "strength 1")


if __name__ == "__main__":
    with torch.no_grad():
        main()
