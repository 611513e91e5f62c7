"""Seconds per denoising step with a KV template at strength 1 (SDPA as before) vs another strength
(a float logit bias on the template's tokens), and without the template.

    python benchmarks/strength_overhead.py [--size 256] [--steps 4] [--repeats 5] [--tokens 64]

Runs the variants interleaved on the same random-weight pipeline of realistic proportions (8 heads x
64, 2 double + 6 single blocks), CFG 4 with the template on the positive side (the sides batched into
one DiT call), and prints a markdown table of medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffsynth_templates import Flux2DiTConfig
from diffsynth_templates.pipelines.kv_schedule import with_log_strength
from diffsynth_templates.pipelines.random_init import RandomPipelineSpec, random_flux2_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per variant")
    parser.add_argument("--tokens", type=int, default=64, help="template KV tokens per block")
    parser.add_argument("--text_len", type=int, default=64, help="prompt tokens (max_sequence_length)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    args = parser.parse_args()

    dit = Flux2DiTConfig(num_double_blocks=2, num_single_blocks=6, num_heads=8, head_dim=64, text_dim=96,
                         axes_dims_rope=(16, 16, 16, 16))  # fmt: skip
    dtype = getattr(torch, args.dtype)
    pipe = random_flux2_pipeline(RandomPipelineSpec(dit=dit), device=args.device, torch_dtype=dtype)
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
    print("| variant | s / step | ratio to strength 1 |")
    print("|---|---|---|")
    base = statistics.median(times["strength 1"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.4f} | {med / base:.2f} |")


if __name__ == "__main__":
    with torch.no_grad():
        main()
