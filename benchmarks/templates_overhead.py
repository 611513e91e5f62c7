"""What templates cost: per-step time with KV templates, and the template stage with lazy loading.

    python benchmarks/templates_overhead.py [--size 256] [--steps 4] [--repeats 3]

On a random-weight pipeline of realistic proportions (8 heads x 64, 2 double + 6 single blocks):

1. seconds per denoising step (cfg 4, both sides batched) for the base pipeline and with 1, 2 and 4
   ``value_kv`` templates of 512 tokens per block, runs interleaved (A B C D A B C D ...);
2. template-stage seconds (running the templates, no denoising) with ``lazy_loading`` for 1, 4 and
   11 templates: the first call (read from disk), repeated calls (held in host memory, moved on and
   off the device, recomputed) and repeated calls with the output memo.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffsynth_templates import Flux2DiTConfig
from diffsynth_templates.pipelines.random_init import RandomPipelineSpec, random_flux2_pipeline
from diffsynth_templates.templates import (
    TemplatePipeline,
    TemplateSpec,
    build_architecture,
    save_template_folder,
)
from diffsynth_templates.templates.residency import HostStore
from diffsynth_templates.templates.zoo.value_kv import ValueKVConfig


def make_templates(root: Path, dit_config: Flux2DiTConfig, count: int, length: int) -> list[Path]:
    folders = []
    for i in range(count):
        torch.manual_seed(i)
        config = ValueKVConfig.for_dit(dit_config, length=length)
        model = build_architecture("value_kv", config.__dict__)
        for p in model.parameters():  # trained-looking weights, so the KV tokens are not all zero
            p.data.normal_(0, 0.02)
        folders.append(save_template_folder(root / f"t{i}", model, TemplateSpec("value_kv", name=f"t{i}")))
    return folders


def timed(fn, sync: bool) -> float:
    start = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--length", type=int, default=512, help="KV tokens per block per template")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    args = p.parse_args()
    sync = args.device.startswith("cuda")
    dit = Flux2DiTConfig(num_double_blocks=2, num_single_blocks=6, num_heads=8, head_dim=64, text_dim=96,
                         axes_dims_rope=(16, 16, 16, 16))  # fmt: skip
    pipe = random_flux2_pipeline(
        RandomPipelineSpec(dit=dit), device=args.device, torch_dtype=getattr(torch, args.dtype)
    )
    call = dict(prompt="a red circle", height=args.size, width=args.size, num_inference_steps=args.steps,
                cfg_scale=4.0, seed=0, max_sequence_length=64, output_type="latent", progress=False)  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        folders = make_templates(Path(tmp), dit, 11, args.length)

        # 1. per-step time
        variants = {"base": None}
        for n in (1, 2, 4):
            tp = TemplatePipeline.from_pretrained(folders[:n], torch_dtype=pipe.torch_dtype, device=args.device,
                                                  host_store=HostStore())  # fmt: skip
            variants[f"{n} KV template(s)"] = (tp, [{"model_id": i, "scale": 0.5} for i in range(n)])

        def run(variant):
            if variant is None:
                return pipe(**call)
            tp, inputs = variant
            return tp(pipe, template_inputs=inputs, **call)

        for v in variants.values():
            run(v)  # warm-up (template caches are memoized, so later runs time the denoising)
        step_times = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, v in variants.items():
                step_times[name].append(timed(lambda v=v: run(v), sync) / args.steps)

        # 2. template stage with lazy loading
        stage = {}
        for n in (1, 4, 11):
            inputs = [{"model_id": i, "scale": 0.5} for i in range(n)]
            tp = TemplatePipeline.from_pretrained(folders[:n], torch_dtype=pipe.torch_dtype, device=args.device,
                                                  lazy_loading=True, memo_size=0, host_store=HostStore())  # fmt: skip
            first = timed(lambda tp=tp, inputs=inputs: tp.run_templates(pipe, inputs), sync)
            repeated = [
                timed(lambda tp=tp, inputs=inputs: tp.run_templates(pipe, inputs), sync)
                for _ in range(args.repeats)
            ]
            tp.memo.max_entries = 64
            tp.run_templates(pipe, inputs)
            memo = [
                timed(lambda tp=tp, inputs=inputs: tp.run_templates(pipe, inputs), sync)
                for _ in range(args.repeats)
            ]
            stage[n] = (first, statistics.median(repeated), statistics.median(memo))

    tokens = (args.size // 16) ** 2
    print(f"\nTemplates, {args.size}x{args.size} ({tokens} image tokens), {args.device} {args.dtype}, "
          f"{args.length} KV tokens per block per template, median of {args.repeats}\n")  # fmt: skip
    base = statistics.median(step_times["base"])
    print("| pipeline | s / step | ratio to base |\n|---|---|---|")
    for name, ts in step_times.items():
        print(f"| {name} | {statistics.median(ts):.4f} | {statistics.median(ts) / base:.2f} |")
    print(
        "\n| templates (lazy, 1 resident) | first call s | repeated call s | repeated, memoized s |\n|---|---|---|---|"
    )
    for n, (first, repeated, memo) in stage.items():
        print(f"| {n} | {first:.4f} | {repeated:.4f} | {memo:.5f} |")


if __name__ == "__main__":
    with torch.no_grad():
        main()
