"""What the per-step timing benchmarks share: their flags and the random pipeline of realistic
proportions they time (8 heads x 64, 2 double + 6 single blocks)."""

from __future__ import annotations

import argparse
import statistics

import torch

from diffsynth_templates import Flux2DiTConfig
from diffsynth_templates.pipelines.random_init import RandomPipelineSpec, random_flux2_pipeline


def step_timing_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per variant")
    parser.add_argument("--text_len", type=int, default=64, help="prompt tokens (max_sequence_length)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    return parser


def realistic_pipeline(args: argparse.Namespace):
    """A random-weight Flux2ImagePipeline on ``args.device`` / ``args.dtype``."""
    dit = Flux2DiTConfig(num_double_blocks=2, num_single_blocks=6, num_heads=8, head_dim=64, text_dim=96,
                         axes_dims_rope=(16, 16, 16, 16))  # fmt: skip
    return random_flux2_pipeline(
        RandomPipelineSpec(dit=dit), device=args.device, torch_dtype=getattr(torch, args.dtype)
    )


def print_ratio_table(times: dict[str, list[float]], base: str) -> None:
    """Median seconds per step of each variant and its ratio to ``base``, as a markdown table."""
    print(f"| variant | s / step | ratio to {base} |")
    print("|---|---|---|")
    reference = statistics.median(times[base])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.4f} | {med / reference:.2f} |")
