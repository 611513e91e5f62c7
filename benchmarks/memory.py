"""Memory and step time of the FLUX.2-klein DiT with bf16 weights, FP8 weights, and FP8 + block offload.

    python benchmarks/memory.py                       # CPU: exact weight bytes at full size + block timings
    python benchmarks/memory.py --device cuda         # GPU: whole steps at full size, peak allocated memory
    python benchmarks/memory.py --device cuda --presets klein_4b --vram_limit 4 --write

The DiT is built on the meta device (no memory) and materialized one block at a time with random
weights (normal, std 0.02) straight in its storage format, so the figures are those of the real sizes.
"Image templates" are what they add while denoising: a KV cache of as many tokens as the image, on
every block, per template (their own weights run once per call, before the loop, and are not counted).

On a GPU each row runs ``--steps`` whole DiT steps at ``--size`` (one CFG side) and reports
``torch.cuda.max_memory_allocated`` and seconds per step; the offload rows keep at most
``--vram_limit`` GiB of weights on the device. On the CPU a whole full-size step is out of reach, so
each row reports the exact weight bytes of the full model (and what offload keeps resident) and times
one full-width double block and one single block (``--tokens`` image tokens); the step time is those
timings times the block counts (marked "est."). The process's peak RSS is printed as well.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import write_section  # noqa: E402
from diffsynth_templates.backbones.flux2_dit import Flux2DiT, Flux2DiTConfig  # noqa: E402
from diffsynth_templates.loading.meta_init import meta_build  # noqa: E402
from diffsynth_templates.loading.quantize import module_weight_bytes, store_weights  # noqa: E402
from diffsynth_templates.pipelines.offload import BlockOffload, GiB, find_blocks  # noqa: E402

MODES = ("bf16", "fp8", "fp8 + offload")
TEXT_TOKENS = 512


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cores = len(__import__("os").sched_getaffinity(0))
    return f"CPU {platform.processor() or platform.machine()} ({cores} cores, {torch.get_num_threads()} threads), torch {torch.__version__}"  # fmt: skip


def peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0


def materialize(module: nn.Module, device, storage: str | None, seed: int = 0) -> None:
    """Random bf16 weights for a meta-device module, piece by piece (each block, then the rest), each
    stored in ``storage`` before the next is allocated: the peak is one block in bf16 over the result."""
    generator = torch.Generator(device).manual_seed(seed)
    pieces = [b for _, b in find_blocks(module)] if find_blocks(module) else []
    in_pieces = {id(p) for b in pieces for p in b.parameters()}
    for piece in [*pieces, module]:
        for sub in piece.modules():
            for key, p in list(sub._parameters.items()):
                if p is None or not p.is_meta or (piece is module and id(p) in in_pieces):
                    continue
                real = torch.empty(p.shape, dtype=torch.bfloat16, device=device)
                real.normal_(0.0, 0.02, generator=generator) if p.ndim > 1 else real.fill_(1.0)
                sub._parameters[key] = nn.Parameter(real, requires_grad=False)
        if storage is not None:
            store_weights(piece, storage)


def build(preset: str, mode: str, device, blocks: tuple[int, int] | None = None) -> Flux2DiT:
    cfg = getattr(Flux2DiTConfig, preset)()
    if blocks is not None:
        cfg.num_double_blocks, cfg.num_single_blocks = blocks
    with meta_build():
        dit = Flux2DiT(cfg).eval().requires_grad_(False)
    materialize(dit, device, None if mode == "bf16" else "float8_e4m3fn")
    return dit


def inputs(cfg: Flux2DiTConfig, image_tokens: int, templates: int, device):
    g = torch.Generator(device).manual_seed(1)
    side = int(image_tokens**0.5)
    ids = torch.stack(torch.meshgrid(torch.arange(1), torch.arange(side), torch.arange(side), torch.arange(1), indexing="ij"), -1).reshape(-1, 4)  # fmt: skip
    txt_ids = torch.zeros(TEXT_TOKENS, 4, dtype=torch.long)
    txt_ids[:, 3] = torch.arange(TEXT_TOKENS)
    kv = {}
    if templates:
        length = templates * side * side
        shape = (1, length, cfg.num_heads, cfg.head_dim)
        for name in [f"double_{i}" for i in range(cfg.num_double_blocks)] + [f"single_{i}" for i in range(cfg.num_single_blocks)]:  # fmt: skip
            kv[name] = tuple(
                torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16) for _ in range(2)
            )
    return dict(
        hidden_states=torch.randn(1, side * side, cfg.in_channels, generator=g, device=device, dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(1, TEXT_TOKENS, cfg.text_dim, generator=g, device=device, dtype=torch.bfloat16),
        timestep=torch.tensor([0.5], device=device),
        img_ids=ids.to(device),
        txt_ids=txt_ids.to(device),
        kv_cache=kv or None,
    )  # fmt: skip


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_row(preset: str, mode: str, templates: int, args, device) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    offload = mode.endswith("offload")
    dit = build(preset, mode, "cpu" if offload else device)
    weights = module_weight_bytes(dit)
    hook = BlockOffload(dit, device, int(args.vram_limit * GiB), prefetch=1) if offload else None
    call = inputs(dit.config, (args.size // 16) ** 2, templates, device)
    with torch.no_grad():
        dit(**call)  # warm-up (and, with offload, the order of the blocks is learnt)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            dit(**call)
        synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    row = dict(
        weights=weights, peak=torch.cuda.max_memory_allocated(device), seconds=seconds, estimated=False
    )
    if hook is not None:
        row["resident"] = hook.plan.resident_bytes
        hook.remove()
    del dit, call
    return row


def cpu_row(preset: str, mode: str, templates: int, args, device) -> dict:
    cfg = getattr(Flux2DiTConfig, preset)()
    with meta_build():  # the full model's exact bytes, nothing allocated
        full = Flux2DiT(cfg)
        if mode != "bf16":
            store_weights(full.to(torch.bfloat16), "float8_e4m3fn")
        else:
            full = full.to(torch.bfloat16)
    weights = module_weight_bytes(full)
    row = dict(weights=weights, peak=None, estimated=True)
    if mode.endswith("offload"):
        from diffsynth_templates.pipelines.offload import plan_offload

        row["resident"] = plan_offload(full, int(args.vram_limit * GiB), 1)[0].peak_weight_bytes
    # one double + one single block at full width, materialized for real and timed
    dit = build(preset, mode, device, blocks=(1, 1))
    if mode.endswith("offload"):  # a limit below the two blocks: both stream through the host copies
        fixed = module_weight_bytes(dit) - sum(module_weight_bytes(b) for _, b in find_blocks(dit))
        largest = max(module_weight_bytes(b) for _, b in find_blocks(dit))
        BlockOffload(dit, device, fixed + largest, prefetch=0)
    call = inputs(dit.config, args.tokens, templates, device)
    spent = {"double": 0.0, "single": 0.0}
    for kind, block in (("double", dit.transformer_blocks[0]), ("single", dit.single_transformer_blocks[0])):
        clock = {}
        block.register_forward_pre_hook(lambda m, a, c=clock: c.__setitem__("t", time.perf_counter()))
        block.register_forward_hook(lambda m, a, o, c=clock, k=kind: spent.__setitem__(k, spent[k] + time.perf_counter() - c["t"]))  # fmt: skip
    with torch.no_grad():
        dit(**call)
        spent.update(double=0.0, single=0.0)
        start = time.perf_counter()
        for _ in range(args.steps):
            dit(**call)
    whole = (time.perf_counter() - start) / args.steps  # embedders + 1 double + 1 single + head
    double, single = spent["double"] / args.steps, spent["single"] / args.steps
    row.update(double_seconds=double, single_seconds=single)
    # every block costs what its timed sibling did; the rest (embedders, modulation, head) once
    row["seconds"] = whole - double - single + cfg.num_double_blocks * double + cfg.num_single_blocks * single
    del dit, call
    return row


def table(rows: list[tuple], device: torch.device, args) -> str:
    gpu = device.type == "cuda"
    head = ["model", "templates", "weights", "weight bytes (GiB)", "on device (GiB)",
            "peak allocated (GiB)" if gpu else "double / single block", "s / step"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for preset, templates, mode, r in rows:
        on_device = r.get("resident", r["weights"])
        measured = (
            f"{r['peak'] / GiB:.2f}" if gpu else f"{r['double_seconds']:.2f} s / {r['single_seconds']:.2f} s"
        )
        step = f"{r['seconds']:.3f}" + (" (est.)" if r["estimated"] else "")
        lines.append(f"| {preset} | {templates} | {mode} | {r['weights'] / GiB:.2f} | {on_device / GiB:.2f} | {measured} | {step} |")  # fmt: skip
    what = (
        f"{args.size}x{args.size} image ({(args.size // 16) ** 2} tokens)"
        if gpu
        else f"{args.tokens} image tokens"
    )
    note = (
        f"Machine: {machine(device)}. {what} + {TEXT_TOKENS} text tokens, one CFG side, bf16 compute; "
        f'offload rows: --vram_limit {args.vram_limit} GiB, prefetch 1 ("on device": the most weight bytes '
        "there at once: resident part + two streamed blocks). Templates: image-sized KV caches on every block."
    )
    if not gpu:
        note += (
            " CPU: weight bytes are the full model's, exact (built on the meta device); the timed blocks "
            "of the offload rows stream through host copies one at a time (prefetch 0: no side stream on "
            "a CPU), and a single run on a shared machine makes the timings noisy. FP8 on a CPU pays "
            "torch's scalar fp8 -> bf16 cast at every call; on a GPU that cast is memory-bound."
            f" Peak RSS of the benchmark process: {peak_rss() / GiB:.2f} GiB."
        )
    return note + "\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--presets", nargs="+", default=["klein_4b", "klein_9b"], choices=["klein_4b", "klein_9b"])
    p.add_argument("--templates", nargs="+", type=int, default=[0, 2])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument(
        "--vram_limit", type=float, default=2.0, help="GiB of weights on the device (offload rows)"
    )
    p.add_argument("--size", type=int, default=1024, help="GPU: image side in pixels (16 per token)")
    p.add_argument("--tokens", type=int, default=144, help="CPU: image tokens of the timed blocks")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--write", action="store_true", help="replace this benchmark's section of RESULTS.md")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    row_of = gpu_row if device.type == "cuda" else cpu_row
    rows = []
    for preset in args.presets:
        for templates in args.templates:
            for mode in args.modes:
                rows.append((preset, templates, mode, row_of(preset, mode, templates, args, device)))
                print(preset, templates, mode, {k: v for k, v in rows[-1][3].items()}, flush=True)
    text = table(rows, device, args)
    print(text)
    if args.write:
        kind = "GPU" if device.type == "cuda" else "CPU"
        section = f"## Low VRAM: FP8 weights and block offload ({kind})\n\n`python benchmarks/memory.py {' '.join(argv or sys.argv[1:])}`\n\n{text}"
        write_section(Path(__file__).with_name("RESULTS.md"), f"Low VRAM: FP8 weights and block offload ({kind})", section)  # fmt: skip


if __name__ == "__main__":
    main()
