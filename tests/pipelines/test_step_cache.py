"""Step caching (pipelines/step_cache.py and the DiTs' block-cache hook): off is bit-identical, every
computed step is exact (templates' KV, LoRA branches, step windows), skipped blocks are counted,
the state is per CFG side and per batch row, and bad configs are named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffsynth_templates.pipelines.families import FAMILIES
from diffsynth_templates.pipelines.kv_schedule import ScheduledKVCache
from diffsynth_templates.pipelines.step_cache import (
    PRESETS,
    StepCacheConfig,
    StepCacheError,
    taylor_forecast,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIZE = {"flux2": 64, "zimage": 32}
LORA_MODULE = {"flux2": "single_transformer_blocks.0.attn.to_out", "zimage": "layers.0.attention.to_out.0"}
# never measures a change too big to skip: what is skipped is decided by max_skips and the ends alone
ALWAYS_SKIP = dict(threshold=1e9, warmup_steps=1, final_steps=1, max_skip_fraction=1.0)
NEVER_SKIP = StepCacheConfig(threshold=0.0)


def run(pipe, family: str, steps: int = 8, prompt="a photo of a cat", **kw) -> np.ndarray:
    kw = {"cfg_scale": 1.0, "seed": 3, "max_sequence_length": 16, **kw}
    size = SIZE[family]
    return pipe(prompt, height=size, width=size, num_inference_steps=steps, output_type="np", progress=False, **kw)  # fmt: skip


@pytest.fixture(params=list(FAMILIES), ids=list(FAMILIES))
def family(request) -> str:
    return request.param


def random_kv(dit, length: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        name: tuple(torch.randn(1, length, s.heads, s.head_dim, generator=g) for _ in range(2))
        for name, s in dit.kv_block_specs.items()
    }


def random_lora(dit, family: str, seed: int) -> dict:
    linear = dit.get_submodule(LORA_MODULE[family])
    g = torch.Generator().manual_seed(seed)
    return {
        f"{LORA_MODULE[family]}.lora_A.weight": 0.3 * torch.randn(2, linear.in_features, generator=g),
        f"{LORA_MODULE[family]}.lora_B.weight": 0.3 * torch.randn(linear.out_features, 2, generator=g),
    }


# --- off, and computed steps, are exact -----------------------------------------------------------


def test_off_is_the_default_and_leaves_no_stats(pipes, family):
    pipe = pipes[family]
    base = run(pipe, family)
    assert pipe.step_cache_stats is None
    assert np.array_equal(run(pipe, family, step_cache=None), base)
    assert getattr(pipe.dit, "block_cache", None) is None  # nothing left on the DiT


@pytest.mark.parametrize("probe_blocks", [0, 1])
def test_every_step_computed_is_bit_identical_to_off(pipes, family, probe_blocks):
    """With templates (KV on both CFG sides, a strength bias, a LoRA, a step window) and CFG batched or not: a cache
    that computes every step gives exactly the uncached image, so computed steps are untouched."""
    pipe = pipes[family]
    kv, negative_kv = random_kv(pipe.dit, 4, 0), random_kv(pipe.dit, 4, 1)
    late = ScheduledKVCache([(random_kv(pipe.dit, 3, 2), 0.5, 1.0)])
    config = StepCacheConfig(threshold=0.0, probe_blocks=probe_blocks)
    # a template at strength 0.5: its KV tokens carry a log-strength logit bias (DESIGN.md 4.7)
    weakened = {name: (k, v, torch.full((1, k.shape[1]), -0.69)) for name, (k, v) in kv.items()}
    calls = [
        dict(kv_cache=weakened, lora=random_lora(pipe.dit, family, 0)),
        dict(kv_cache=late, cfg_scale=3.0, negative_kv_cache=negative_kv, negative_prompt="blurry"),
    ]
    for batching in (True, False):
        pipe.cfg_batching = batching
        try:
            for call in calls:
                base = run(pipe, family, **call)
                assert np.array_equal(run(pipe, family, step_cache=config, **call), base)
                assert pipe.step_cache_stats.skipped_blocks == 0
        finally:
            pipe.cfg_batching = True


# --- what is skipped, and counted ----------------------------------------------------------------


@pytest.mark.parametrize("probe_blocks", [0, 1])
def test_skipped_blocks_are_counted(pipes, family, probe_blocks):
    """8 steps, at most 2 skips in a row, first and last computed: steps 0, 3, 6, 7 run the stack,
    1, 2, 4, 5 run only the probe blocks."""
    pipe = pipes[family]
    n = pipe.dit.num_blocks
    run(
        pipe,
        family,
        steps=8,
        step_cache=StepCacheConfig(**ALWAYS_SKIP, max_skips=2, probe_blocks=probe_blocks),
    )
    stats = pipe.step_cache_stats
    assert (stats.computed_steps, stats.skipped_steps) == (4, 4)
    assert stats.computed_blocks == 4 * n + 4 * probe_blocks
    assert stats.skipped_blocks == 4 * (n - probe_blocks)
    assert stats.total_blocks == 8 * n
    assert stats.reduction == pytest.approx(8 * n / (4 * n + 4 * probe_blocks))
    assert list(stats.streams) == ["cond"]


def test_skip_runs_shrink_with_the_step_count(pipes, family):
    """At most max_skip_fraction of the steps in a row: 20 steps at 0.1 allow 2, 50 steps allow 5."""
    pipe = pipes[family]
    config = StepCacheConfig(threshold=1e9, max_skips=6, max_skip_fraction=0.1, warmup_steps=1, final_steps=0)
    for steps, computed in ((20, 7), (50, 9), (8, 8)):  # every 3rd / 6th step; 8 steps: no skip allowed
        run(pipe, family, steps=steps, step_cache=config)
        assert pipe.step_cache_stats.computed_steps == computed, steps


def test_presets_skip_and_stay_close(pipes, family):
    pipe = pipes[family]
    base = run(pipe, family, steps=20)
    for name in PRESETS:
        image = run(pipe, family, steps=20, step_cache=name)
        stats = pipe.step_cache_stats
        assert stats.skipped_blocks > 0, name
        assert stats.total_blocks == 20 * pipe.dit.num_blocks
        assert np.isfinite(image).all()
        assert 0 < np.abs(image - base).max() < 0.25, name


@pytest.fixture(scope="module")
def toy_pipe():
    from diffsynth_templates.pipelines.auto import load_pipeline

    return load_pipeline(Path(__file__).resolve().parents[2] / "models" / "toy" / "base", device="cpu")


def test_forecast_beats_reusing_the_last_residual_on_the_toy_model(toy_pipe):
    """On a trained model (the bundled toy base) the Taylor forecast (order 1) lands nearer the
    uncached image than reusing the last residual (order 0) on the same skips."""
    call = dict(prompt="a red circle", height=64, width=64, num_inference_steps=20, cfg_scale=1.0, seed=0, output_type="np", progress=False)  # fmt: skip
    base = toy_pipe(**call)
    errors = [
        np.abs(toy_pipe(**call, step_cache=StepCacheConfig(**ALWAYS_SKIP, max_skips=3, order=order)) - base).mean()
        for order in (0, 1)
    ]  # fmt: skip
    assert errors[1] < 0.8 * errors[0]


# --- per CFG side, per batch row, per step window -------------------------------------------------


def test_cfg_sides_batched_or_not_make_the_same_decisions(pipes, family):
    pipe = pipes[family]
    call = dict(
        cfg_scale=4.0, negative_prompt="blurry", step_cache=StepCacheConfig(**ALWAYS_SKIP, max_skips=2)
    )
    batched = run(pipe, family, **call)
    both = pipe.step_cache_stats
    assert list(both.streams) == ["both"]
    pipe.cfg_batching = False
    try:
        separate = run(pipe, family, **call)
    finally:
        pipe.cfg_batching = True
    sides = pipe.step_cache_stats
    assert list(sides.streams) == ["cond", "uncond"]
    assert sides.streams["cond"] == sides.streams["uncond"] == both.streams["both"]
    np.testing.assert_allclose(separate, batched, atol=1e-4)
    assert np.abs(batched - run(pipe, family, cfg_scale=4.0, negative_prompt="blurry")).max() > 0


def test_batch_rows_keep_their_own_state(pipes, family):
    """Two prompts in one call give each row what it gets alone: residuals never mix between rows."""
    pipe = pipes[family]
    config = StepCacheConfig(**ALWAYS_SKIP, max_skips=3)
    prompts = ["a photo of a cat", "a red car"]
    size = SIZE[family]
    shape = {"flux2": (2, 128, size // 16, size // 16), "zimage": (2, 16, size // 2, size // 2)}[family]
    noise = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    together = run(pipe, family, prompt=prompts, step_cache=config, latents=noise)
    for row, prompt in enumerate(prompts):
        alone = run(pipe, family, prompt=prompt, step_cache=config, latents=noise[row : row + 1])
        np.testing.assert_allclose(together[row], alone[0], atol=1e-4)


def test_a_step_window_opening_restarts_the_history(pipes, family):
    """A KV template that starts halfway changes the conditioning: that step is computed afresh."""
    pipe = pipes[family]
    forever = StepCacheConfig(
        threshold=1e9, max_skips=100, max_skip_fraction=1.0, warmup_steps=1, final_steps=0
    )
    run(pipe, family, steps=10, step_cache=forever)
    assert pipe.step_cache_stats.computed_steps == 1
    late = ScheduledKVCache([(random_kv(pipe.dit, 3, 2), 0.5, 1.0)])
    run(pipe, family, steps=10, step_cache=forever, kv_cache=late)
    assert pipe.step_cache_stats.computed_steps == 2


def test_block_offload_streams_what_the_cache_skips(pipes, family):
    """Streamed blocks (pipe.enable_block_offload) see a forward that skips most of them on some
    steps: the image is bit-identical to the same step cache without offload."""
    from diffsynth_templates.loading.quantize import module_weight_bytes
    from diffsynth_templates.pipelines.offload import GiB, find_blocks, plan_offload

    pipe = pipes[family]
    config = StepCacheConfig(**ALWAYS_SKIP, max_skips=2)
    call = dict(cfg_scale=3.0, negative_prompt="blurry", step_cache=config)
    reference = run(pipe, family, **call)
    plan, _ = plan_offload(pipe.dit, 2**62, 0)
    tightest = plan.fixed + max(module_weight_bytes(b) for _, b in find_blocks(pipe.dit))  # one block
    pipe.enable_block_offload(vram_limit_gb=tightest / GiB, prefetch=0)
    try:
        assert np.array_equal(run(pipe, family, **call), reference)
        assert pipe.block_offload.groups and pipe.step_cache_stats.skipped_blocks > 0
    finally:
        pipe.disable_block_offload()


# --- the forecast, and bad values ----------------------------------------------------------------


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_taylor_forecast_is_exact_on_polynomials_of_its_order(order):
    coefficients = torch.randn(order + 1, 5, generator=torch.Generator().manual_seed(order))

    def poly(s: float) -> torch.Tensor:
        return sum(c * s**k for k, c in enumerate(coefficients))

    sigmas = [1.0, 0.9, 0.75, 0.6][: order + 1]
    forecast = taylor_forecast([(s, poly(s)) for s in sigmas], 0.3)
    torch.testing.assert_close(forecast, poly(0.3), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(threshold=-0.1), "threshold must be finite and >= 0"),
        (dict(threshold=float("nan")), "threshold must be finite"),
        (dict(threshold="0.1"), "threshold must be a number"),
        (dict(max_skips=-1), "max_skips must be an integer >= 0"),
        (dict(max_skip_fraction=1.5), r"max_skip_fraction must be in \[0, 1\], got 1.5"),
        (dict(probe_blocks=1.5), "probe_blocks must be an integer"),
        (dict(warmup_steps=0), "warmup_steps must be an integer >= 1"),
        (dict(order=4), "order must be 0..3"),
        (dict(order=True), "order must be an integer"),
    ],
)
def test_bad_config_values_are_named(kwargs, match):
    with pytest.raises(StepCacheError, match=match):
        StepCacheConfig(**kwargs)


def test_unknown_preset_is_refused_before_any_work(pipes):
    pipe = pipes["flux2"]
    with pytest.raises(StepCacheError, match=r"step_cache must be None, one of the presets \['balanced', 'fast', 'quality'\]"):  # fmt: skip
        run(pipe, "flux2", step_cache="turbo")
    with pytest.raises(ValueError, match="got 0.5"):
        run(pipe, "flux2", step_cache=0.5)
