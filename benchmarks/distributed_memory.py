"""Per-process memory of the frozen base DiT + the trained part, per distributed mode (meta-device accounting).

The DiT (FLUX.2-klein 4B / 9B widths), the DiT LoRA (the trainer's default targets) and an ``image_kv``
template (its klein preset) are built on the meta device: exact parameter counts, no memory. Per
process, with ``N`` processes, bf16 frozen weights and fp32 trained weights with AdamW:

* frozen DiT: 2 B/param; divided by ``N`` under FSDP2 and ZeRO-3 (with a template or a LoRA);
* trained weights 4 B, gradients 4 B, Adam moments 8 B per param:
  DDP keeps all of it on every process; ZeRO-2 keeps the weights whole and divides gradients, Adam and
  its fp32 master copy (+4 B) by ``N``; ZeRO-3 divides everything (+ the master copy); FSDP2 divides
  weights, gradients and Adam (its sharded fp32 parameters are the master copy);
* FSDP2 / ZeRO-3 also hold one DiT block gathered whole at a time (the largest, in its dtype).

Activations are not counted (they depend on resolution and gradient checkpointing, not on the mode).

    python benchmarks/distributed_memory.py --processes 8
"""

from __future__ import annotations

import argparse

import torch

from diffsynth_templates.backbones.flux2_dit import Flux2DiT, Flux2DiTConfig
from diffsynth_templates.loading.meta_init import meta_build
from diffsynth_templates.templates import build_architecture
from diffsynth_templates.templates.zoo.image_kv import ImageKVConfig
from diffsynth_templates.training.config import DEFAULT_LORA_TARGETS
from diffsynth_templates.training.distributed import block_class_names
from diffsynth_templates.training.dit_lora import match_lora_targets

GIB = 2**30
MODES = ("DDP", "ZeRO-2", "ZeRO-3", "FSDP2")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sizes(preset: str, lora_rank: int) -> dict[str, int]:
    """Parameter counts: the DiT, its largest block, the DiT LoRA, the image_kv template."""
    with meta_build():
        dit = Flux2DiT(getattr(Flux2DiTConfig, preset)())
        names = block_class_names(dit)
        blocks = [m for m in dit.modules() if type(m).__name__ in names]
        template = build_architecture("image_kv", vars(getattr(ImageKVConfig, preset)()))
    layers = dict(dit.named_modules())
    lora = sum(
        lora_rank * (layers[n].in_features + layers[n].out_features)
        for n in match_lora_targets(dit, DEFAULT_LORA_TARGETS.split(","))
    )
    return {
        "dit": _count(dit),
        "block": max(_count(b) for b in blocks),
        "lora": lora,
        "template": _count(template),
    }


def per_process(mode: str, n: int, frozen: int, trained: int, block: int, block_bytes: int) -> float:
    """Bytes per process: frozen weights (bf16) + trained weights, gradients, Adam (fp32)."""
    sharded_frozen = mode in ("ZeRO-3", "FSDP2")
    total = 2 * frozen / (n if sharded_frozen else 1)
    if mode == "DDP":
        total += 16 * trained
    elif mode == "ZeRO-2":
        total += 4 * trained + (4 + 8 + 4) * trained / n
    elif mode == "ZeRO-3":
        total += (4 + 4 + 8 + 4) * trained / n
    else:  # FSDP2
        total += (4 + 4 + 8) * trained / n
    if sharded_frozen:
        total += block * block_bytes  # one block gathered whole at a time
    return total


def table(n: int, lora_rank: int) -> str:
    rows = [
        f"| width | trained | trained params | {' | '.join(MODES)} |",
        "|---|---|---|" + "---|" * len(MODES),
    ]
    for preset in ("klein_4b", "klein_9b"):
        s = sizes(preset, lora_rank)
        cases = {
            "dit (full)": (0, s["dit"], 4),
            f"dit_lora (rank {lora_rank})": (s["dit"], s["lora"], 2),
            "template (image_kv)": (s["dit"], s["template"], 2),
        }
        for name, (frozen, trained, block_bytes) in cases.items():
            cells = [
                f"{per_process(m, n, frozen, trained, s['block'], block_bytes) / GIB:.1f}" for m in MODES
            ]
            rows.append(
                f"| {preset} ({s['dit'] / 1e9:.2f} B) | {name} | {trained / 1e6:,.0f} M | {' | '.join(cells)} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--lora_rank", type=int, default=32)
    args = parser.parse_args()
    print(f"GiB per process, {args.processes} processes (weights, gradients, Adam; no activations)\n")
    print(table(args.processes, args.lora_rank))


if __name__ == "__main__":
    main()
