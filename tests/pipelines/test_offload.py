"""Block-level offload (pipelines/offload.py, ``pipe.enable_block_offload``): on the CPU the same code
path runs as on a GPU (groups copied in before use, released after, prefetched one group ahead), so the
image must be bit-identical to no offload at every limit, with CFG, template KV and a runtime LoRA;
never more than ``prefetch + 1`` groups are loaded; too small a limit and training are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from diffsynth_templates.loading.quantize import module_weight_bytes
from diffsynth_templates.pipelines.families import FAMILIES
from diffsynth_templates.pipelines.offload import BlockOffload, GiB, OffloadError, find_blocks, plan_offload

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROOTS = {"flux2": ("tiny_klein_root", 64), "zimage": ("tiny_zimage_root", 32)}


def load(request, family: str):
    root = request.getfixturevalue(ROOTS[family][0])
    return FAMILIES[family].pipeline_class().from_pretrained(root, torch_dtype=torch.float32, device="cpu")


def conditioning(pipe, seed: int = 0) -> dict:
    """Template KV on every block and a LoRA on a Linear of the last block (the first to stream)."""
    g = torch.Generator().manual_seed(seed)
    kv = {
        n: tuple(torch.randn(1, 4, s.heads, s.head_dim, generator=g) for _ in range(2))
        for n, s in pipe.dit.kv_block_specs.items()
    }
    name, block = find_blocks(pipe.dit)[-1]
    sub, layer = next((n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear))
    lora = {
        f"{name}.{sub}.lora_A.weight": torch.randn(2, layer.in_features, generator=g) * 0.3,
        f"{name}.{sub}.lora_B.weight": torch.randn(layer.out_features, 2, generator=g) * 0.3,
    }
    return dict(kv_cache=kv, lora=lora)


def generate(pipe, family: str, **kw):
    size = ROOTS[family][1]
    args = dict(prompt="a red cat", negative_prompt="blurry", height=size, width=size, num_inference_steps=3)
    args.update(cfg_scale=2.0, seed=7, output_type="np", progress=False, max_sequence_length=32)
    return pipe(**{**args, **kw})


def limits(dit, prefetch: int) -> dict[str, float]:
    """The smallest limit that works, one that keeps some blocks resident, and one above the total."""
    plan, _ = plan_offload(dit, 2**62, prefetch)
    sizes = sorted(module_weight_bytes(b) for _, b in find_blocks(dit))  # FP8 scales included
    least = plan.fixed + (prefetch + 1) * sizes[-1]
    out = {"tightest": least / GiB, "all": 1.0}
    if least + sizes[0] < plan.resident_bytes:  # room for a block beside the window, not for all
        out["some_resident"] = (least + sizes[0]) / GiB
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_offload_is_bit_identical_at_every_limit(request, family):
    pipe = load(request, family)
    extra = conditioning(pipe)
    reference = generate(pipe, family, **extra)
    assert np.abs(reference - generate(pipe, family)).max() > 1e-3  # the KV and LoRA matter
    cases = {prefetch: limits(pipe.dit, prefetch) for prefetch in (0, 1, 2)}  # sized before any offload
    total, streamed = plan_offload(pipe.dit, 2**62)[0].resident_bytes, 0
    for prefetch, by_label in cases.items():
        for label, limit in by_label.items():
            pipe.enable_block_offload(vram_limit_gb=limit, prefetch=prefetch)
            offload = pipe.block_offload
            out = generate(pipe, family, **extra)
            assert np.array_equal(out, reference), (family, prefetch, label)
            streamed += bool(offload.groups)
            if limit * GiB >= total:
                assert not offload.groups  # everything fits: nothing streams
            else:
                assert offload.groups and offload.loads > 0, (prefetch, label)
                assert 1 <= offload.max_loaded <= prefetch + 1, (prefetch, label, offload.max_loaded)
                assert offload.plan.peak_weight_bytes <= limit * GiB
                assert not any(g.loaded for g in offload.groups)  # released after the last block
    assert streamed  # the tightest limits stream some blocks (the toy test below: deeper prefetch)
    pipe.disable_block_offload()
    assert np.array_equal(generate(pipe, family, **extra), reference)


@pytest.mark.parametrize("prefetch", [1, 2])
def test_toy_model_prefetches_and_never_exceeds_the_window(prefetch):
    """The toy base model (6 blocks): groups stream ``prefetch`` ahead, the image is bit-identical."""
    pipe, args = toy()
    reference = pipe(**args)
    limit = limits(pipe.dit, prefetch)["tightest"]
    pipe.enable_block_offload(vram_limit_gb=limit, prefetch=prefetch)
    offload = pipe.block_offload
    assert len(offload.groups) > prefetch + 1
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, a: seen.append(offload.loaded_bytes())) for _, b in find_blocks(pipe.dit)]  # fmt: skip
    assert np.array_equal(pipe(**args), reference)
    for h in handles:
        h.remove()
    assert offload.max_loaded == prefetch + 1
    assert max(seen) <= offload.plan.window
    assert offload.plan.resident_bytes + max(seen) <= limit * GiB
    # the order (registration order until a call shows it; the last group is followed by the first):
    # each group is copied once per DiT call, the later ones ahead of their use; after the last step
    # the first ``prefetch`` groups were fetched for a step that never came (released with the phase)
    assert len(offload.next_of) == len(offload.groups)
    assert offload.loads == len(offload.groups) * args["num_inference_steps"] + prefetch
    assert offload.loaded_bytes() == 0


def toy(steps: int = 4):
    from diffsynth_templates.pipelines.auto import load_pipeline

    args = dict(prompt="a red circle", height=64, width=64, num_inference_steps=steps, cfg_scale=1.0, seed=1)
    args.update(output_type="np", progress=False, max_sequence_length=40)
    return load_pipeline("models/toy/base", device="cpu"), args


def test_released_blocks_keep_their_device_and_dtype_and_fp8_streams_too():
    pipe, args = toy(3)
    reference = pipe.enable_layerwise_casting(torch.float8_e4m3fn)(**args)
    pipe.enable_block_offload(vram_limit_gb=limits(pipe.dit, 1)["tightest"], prefetch=1)
    assert pipe.block_offload.groups
    for group in pipe.block_offload.groups:
        for t, master in zip(group.tensors, group.masters):
            assert t.numel() == 0 and t.device == torch.device("cpu") and t.dtype == master.dtype
    assert any(m.dtype == torch.float8_e4m3fn for g in pipe.block_offload.groups for m in g.masters)
    assert np.array_equal(pipe(**args), reference)


def test_a_limit_below_the_largest_block_is_refused(request):
    pipe = load(request, "flux2")
    least = limits(pipe.dit, 1)["tightest"]
    with pytest.raises(OffloadError, match=r"vram_limit_gb=.* is too small.*pass vram_limit_gb >=") as e:
        pipe.enable_block_offload(vram_limit_gb=least * 0.9, prefetch=1)
    suggested = float(str(e.value).split("vram_limit_gb >= ")[1].split(",")[0])
    pipe.enable_block_offload(vram_limit_gb=suggested, prefetch=1)  # the limit it suggests works
    pipe.disable_block_offload()
    for bad in (0, -1, "2", True, float("nan")):
        with pytest.raises(OffloadError, match="vram_limit_gb must be"):
            pipe.enable_block_offload(vram_limit_gb=bad)
    with pytest.raises(OffloadError, match="prefetch must be"):
        pipe.enable_block_offload(vram_limit_gb=1.0, prefetch=-1)


def test_offload_refuses_a_forward_that_needs_gradients():
    blocks = nn.Sequential(nn.Linear(8, 8), nn.ModuleList([nn.Linear(8, 8) for _ in range(4)]))
    offload = BlockOffload(blocks, "cpu", limit_bytes=600, prefetch=0)
    assert offload.groups
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(OffloadError, match="inference"):
        blocks[1][0](x)
    with torch.no_grad():
        blocks[1][0](x)  # fine without gradients
    offload.remove()
    assert all(p.numel() > 0 for p in blocks.parameters())


def test_find_blocks_takes_the_outermost_module_lists_only(pipes):
    names = [n for n, _ in find_blocks(pipes["flux2"].dit)]
    assert names[0] == "transformer_blocks.0" and names[-1].startswith("single_transformer_blocks.")
    assert not any(".to_out." in n for n in names)  # a ModuleList inside a block is not a block list
    with pytest.raises(OffloadError, match="no nn.ModuleList"):
        plan_offload(nn.Linear(4, 4), 1)


class Reversed(nn.Module):
    """Blocks that run in the reverse of their registration order (the offload's first guess)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(6))

    def forward(self, x):
        for block in reversed(self.blocks):
            x = torch.tanh(block(x))
        return x


def test_any_execution_order_is_learnt_and_stays_exact():
    model = Reversed().requires_grad_(False)
    x = torch.randn(3, 16)
    reference = model(x)
    block = 16 * 16 * 4 + 16 * 4
    offload = BlockOffload(model, "cpu", limit_bytes=2 * block, prefetch=1)
    assert len(offload.groups) == 6
    for _ in range(3):
        assert torch.equal(model(x), reference)
        assert offload.max_loaded <= 2
    assert offload.next_of == {i: (i - 1) % 6 for i in range(6)}  # learnt: 5 -> 4 -> ... -> 0 -> 5
    offload.remove()
    assert torch.equal(model(x), reference)
