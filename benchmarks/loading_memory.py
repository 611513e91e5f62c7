"""Peak host memory of Flux2DiT.from_pretrained relative to the checkpoint size.

    python benchmarks/loading_memory.py [--blocks 2] [--dtype bfloat16]

Writes a sharded checkpoint with klein-4B widths (3072 hidden) and a few blocks, then loads it in a
fresh subprocess and reports the peak resident set size. Meta-device construction plus per-tensor
loading should keep the peak near one copy of the weights (plus the interpreter and torch).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

LOADER = """
import sys, torch
from diffsynth_templates import Flux2DiT

def status(key):  # VmHWM is this process's peak RSS (reset at exec, unlike getrusage's maxrss)
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

base = status("VmHWM")
model = Flux2DiT.from_pretrained(sys.argv[1], torch_dtype=getattr(torch, sys.argv[2]))
params = sum(p.numel() * p.element_size() for p in model.parameters())
# fp32 tensors may stay memory-mapped from the file: touch one element per 4 KiB page so they count
touched = sum(float(p.detach().reshape(-1)[:: 4096 // p.element_size()].float().sum()) for p in model.parameters())
print(base, status("VmHWM"), params)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--double", type=int, default=1)
    p.add_argument("--single", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()

    import torch
    from safetensors.torch import save_file

    from diffsynth_templates import Flux2DiT, Flux2DiTConfig
    from diffsynth_templates.loading.meta_init import meta_build

    cfg = Flux2DiTConfig.klein_4b()
    cfg.num_double_blocks, cfg.num_single_blocks = args.double, args.single
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with meta_build():
            shapes = {k: v.shape for k, v in Flux2DiT(cfg).state_dict().items()}
        # write shards of ~200 MB without ever holding the whole model in this process
        index, shard, size, n = {}, {}, 0, 0
        for key, shape in shapes.items():
            shard[key] = torch.randn(shape) * 0.02
            size += shard[key].numel() * 4
            if size > 200e6:
                n += 1
                save_file(shard, str(folder / f"diffusion_pytorch_model-{n:05d}.safetensors"))
                index.update({k: f"diffusion_pytorch_model-{n:05d}.safetensors" for k in shard})
                shard, size = {}, 0
        if shard:
            n += 1
            save_file(shard, str(folder / f"diffusion_pytorch_model-{n:05d}.safetensors"))
            index.update({k: f"diffusion_pytorch_model-{n:05d}.safetensors" for k in shard})
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"weight_map": index})
        )
        (folder / "config.json").write_text(json.dumps(cfg.to_diffusers()))
        on_disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        out = subprocess.run(
            [sys.executable, "-c", LOADER, str(folder), args.dtype],
            capture_output=True,
            text=True,
            check=True,
        )
        base, peak, params = map(int, out.stdout.split())
    print(
        f"\nFlux2DiT.from_pretrained, klein-4B widths, {args.double} double + {args.single} single blocks, {args.dtype}\n"
    )
    print(
        "| checkpoint on disk | loaded weights | process RSS before load | peak RSS after load | peak growth / loaded weights |"
    )
    print("|---|---|---|---|---|")
    gb = 1e9
    print(
        f"| {on_disk / gb:.2f} GB | {params / gb:.2f} GB | {base / gb:.2f} GB | {peak / gb:.2f} GB | {(peak - base) / params:.2f} |"
    )


if __name__ == "__main__":
    main()
