"""Two-stage training vs ``--task full``: seconds per step, peak memory, and cache bytes per sample.

    python benchmarks/training_stages.py [--size 128] [--samples 8] [--steps 8] [--batch_size 2]

Builds one setup in a temporary folder: a random base model of realistic proportions (DiT of 8 heads
x 64, 2 double + 6 single blocks; the real FLUX.2 VAE architecture; a 28-layer Qwen3 text encoder of
width ``--text_hidden``), ``--samples`` random images, and a zoo ``image_kv`` template with the ``structure`` processor (Canny edges, encoded by the
VAE in ``process_inputs``). Then, each in its own process so peak memory is its own: stage I
(``data_process``), stage II from that cache, and ``full`` (features computed every step). Seconds
per step are the median of the trainer's own per-step wall times (data loading included) after two
warm-up steps. Peak memory is host RSS (``resource``), plus CUDA max allocated when on a GPU.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _child(args_json: str) -> None:
    """Run one ``train.py`` task in this process and print its wall time and peak memory as JSON."""
    import torch

    sys.path.insert(0, str(REPO))
    from diffsynth_templates.training.config import parse_args
    from diffsynth_templates.training.trainer import run

    start = time.perf_counter()
    run(parse_args(json.loads(args_json)))
    report = {
        "seconds": time.perf_counter() - start,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }
    print("RESULT " + json.dumps(report))


def _run(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps([str(a) for a in args])],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{out.stderr[-4000:]}")
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _step_seconds(output: Path) -> float:
    from diffsynth_templates.training.metrics import read_metrics

    seconds = [float(r["seconds"]) for r in read_metrics(output / "logs" / "metrics.csv")]
    return statistics.median(seconds[2:] or seconds)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--samples", type=int, default=8, help="dataset size")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per training run")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--text_len", type=int, default=64, help="max_sequence_length")
    parser.add_argument("--text_hidden", type=int, default=256, help="text encoder width (28 layers)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child)
        return

    sys.path.insert(0, str(REPO))
    import torch

    from diffsynth_templates import Flux2DiTConfig
    from diffsynth_templates.backbones.flux2_vae import Flux2VAEConfig
    from diffsynth_templates.pipelines.random_init import RandomPipelineSpec, random_flux2_pipeline
    from diffsynth_templates.templates.zoo import ImageKVConfig

    dit = Flux2DiTConfig(num_double_blocks=2, num_single_blocks=6, num_heads=8, head_dim=64,
                         text_dim=3 * args.text_hidden, axes_dims_rope=(16, 16, 16, 16))  # fmt: skip
    template_config = ImageKVConfig.for_dit(dit, num_single_blocks=1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = RandomPipelineSpec(dit=dit, vae=Flux2VAEConfig(), text_hidden=args.text_hidden)
        random_flux2_pipeline(spec).save_pretrained(root / "base")
        rng = np.random.default_rng(0)
        rows = []
        for i in range(args.samples):
            coarse = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
            Image.fromarray(coarse).resize((args.size, args.size), Image.Resampling.BICUBIC).save(
                root / f"{i}.png"
            )
            rows.append({"image": f"{i}.png", "prompt": f"a photo of a red circle number {i}"})
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

        common = ["--model", root / "base", "--architecture", "image_kv",
                  "--architecture_config", json.dumps(asdict(template_config)), "--data_processor", "structure",
                  "--max_pixels", args.size * args.size, "--max_sequence_length", args.text_len,
                  "--dataset_metadata_path", root / "metadata.jsonl"]  # fmt: skip
        training = ["--max_steps", args.steps, "--batch_size", args.batch_size, "--learning_rate", 1e-4]
        stage_one = _run(["--task", "data_process", "--cache_path", root / "cache", *common])
        stage_two = _run(["--task", "train", "--cache_path", root / "cache", "--output_path", root / "two", *common, *training])  # fmt: skip
        full = _run(["--task", "full", "--output_path", root / "full", *common, *training])

        cache = root / "cache"
        parts = {
            "text embeddings": _size(cache / "store" / "text"),
            "latents": _size(cache / "store" / "latents"),
            "template features": _size(cache / "shards"),
        }
        total = _size(cache)
        device = "cuda" if torch.cuda.is_available() else "cpu"

        def cuda(result: dict) -> str:
            return "-" if result["cuda_mb"] is None else f"{result['cuda_mb']:.0f} MiB"

        print(f"\n{args.samples} samples of {args.size}x{args.size}, batch {args.batch_size}, {args.text_len} prompt tokens, "
              f"image_kv template (structure), {device}, torch {torch.__version__}\n")  # fmt: skip
        print("| run | time | peak host RSS | CUDA max allocated |")
        print("|---|---|---|---|")
        print(f"| stage I (`data_process`, once) | {stage_one['seconds'] / args.samples:.3f} s/sample "
              f"({stage_one['seconds']:.1f} s total) | {stage_one['rss_mb']:.0f} MiB | {cuda(stage_one)} |")  # fmt: skip
        for name, result, out in (("stage II from the cache", stage_two, "two"), ("`full` (features every step)", full, "full")):  # fmt: skip
            print(
                f"| {name} | {_step_seconds(root / out):.3f} s/step | {result['rss_mb']:.0f} MiB | {cuda(result)} |"
            )
        print(f"\ncache on disk: {total / 2**20:.2f} MiB, {total / args.samples / 1024:.1f} KiB per sample ("
              + ", ".join(f"{k} {v / args.samples / 1024:.1f} KiB" for k, v in parts.items()) + "; index and skip lists the rest)")  # fmt: skip


if __name__ == "__main__":
    main()
