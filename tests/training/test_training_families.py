"""The trainer behaviour both backbones must keep, one test body each, parametrized over the families
(ids ``flux2`` / ``zimage``), on each family's tiny random base (tests/training/conftest.py): stage I
then stage II equals one full run, a run killed after a checkpoint resumes exactly, and an ImageKV
template with an edge processor trains through the family's VAE and steers its pipeline. What only one
backbone has (FLUX.2 edit images, DDP and stage-I recovery on FLUX.2; Z-Image's refusals, sigma grid and
cross-backbone caches) stays in tests/training/test_trainer.py and test_zimage_training.py."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import tests.training.archs  # noqa: F401  registers the test architectures build_architecture reads
from diffsynth_templates.pipelines.families import FAMILIES
from diffsynth_templates.templates import TemplatePipeline, build_architecture
from diffsynth_templates.templates.zoo import ImageKVConfig
from diffsynth_templates.training.config import parse_args
from diffsynth_templates.training.feature_cache import open_cache
from diffsynth_templates.training.metrics import read_metrics
from diffsynth_templates.training.trainer import FAULT_STEPS_ENV, run
from tests.training.helpers import MASKED_KV, SMALL, run_cli

# each family's base-model fixture, the MaskedKV config that fits its tiny DiT ({}: the arch's FLUX.2
# defaults), its tiny ImageKV config, and the shape of a 32x32 condition through its VAE
BASES = {"flux2": "base_model", "zimage": "zimage_base"}
MASKED_KV_CONFIG = {"flux2": {}, "zimage": {"block_names": ["block_0", "block_1"], "head_dim": 32}}
TINY_IMAGE_KV = {"flux2": ImageKVConfig.tiny, "zimage": ImageKVConfig.tiny_zimage}
CONDITION_LATENTS = {"flux2": (1, 128, 2, 2), "zimage": (1, 16, 16, 16)}
# the DiT LoRA targets of the resume test, and a key they must produce in the last block
LORA_TARGETS = {
    "flux2": ("to_q,to_v,attn.to_out", "single_transformer_blocks.1.attn.to_out.lora_B.weight"),
    "zimage": ("to_q,to_v,to_out.0", "layers.1.attention.to_out.0.lora_B.weight"),
}
CALL = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, cfg_scale=1.0, seed=0, output_type="np", progress=False)  # fmt: skip


@pytest.fixture(params=list(FAMILIES), ids=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture
def base(request, family):
    return request.getfixturevalue(BASES[family])


def config(*args):
    return parse_args([str(a) for a in args])


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_every_family_has_a_tiny_base():
    assert (
        set(BASES)
        == set(FAMILIES)
        == set(MASKED_KV_CONFIG)
        == set(TINY_IMAGE_KV)
        == set(CONDITION_LATENTS)
        == set(LORA_TARGETS)
    )


def test_stage_one_then_two_equals_full(family, base, dataset, tmp_path):
    common = [
        "--model",
        base,
        "--dataset_metadata_path",
        dataset,
        *SMALL,
        *masked_kv_args(family),
        "--seed",
        3,
    ]
    training = ["--batch_size", 2, "--max_steps", 5, "--learning_rate", 3e-3, "--warmup_steps", 2, "--lr_scheduler", "linear"]  # fmt: skip

    processed = run(config("--task", "data_process", "--cache_path", tmp_path / "cache", *common))
    assert processed.complete and processed.num_samples == 6 and processed.num_skipped == 0
    staged = run(config("--task", "train", "--cache_path", tmp_path / "cache", "--output_path", tmp_path / "staged", *common, *training))  # fmt: skip
    full = run(config("--task", "full", "--output_path", tmp_path / "full", *common, *training))

    assert len(staged.losses) == len(full.losses) == 5
    np.testing.assert_allclose(staged.losses, full.losses, rtol=0, atol=1e-5)
    trained = load_file(str(staged.checkpoint / "model.safetensors"))
    assert max_difference(trained, load_file(str(full.checkpoint / "model.safetensors"))) <= 1e-6
    # the masks really are random per sample (so agreeing required per-sample seeding)
    _, cached = open_cache(tmp_path / "cache")
    coverages = [cached[i].template["coverage"] for i in range(len(cached))]
    assert len(set(coverages)) == len(coverages)
    # and the template learned something: its weights moved
    torch.manual_seed(3)
    initial = build_architecture("test_masked_kv", MASKED_KV_CONFIG[family]).state_dict()
    assert max_difference(trained, initial) > 1e-4


def masked_kv_args(family: str) -> list[str]:
    arch_config = MASKED_KV_CONFIG[family]
    return [*MASKED_KV, *(["--architecture_config", json.dumps(arch_config)] if arch_config else [])]


def test_training_killed_after_a_checkpoint_resumes_exactly(family, base, dataset, tmp_path):
    cache, masked_kv = tmp_path / "cache", masked_kv_args(family)
    targets, lora_key = LORA_TARGETS[family]
    run(config("--task", "data_process", "--model", base, "--dataset_metadata_path", dataset, "--cache_path", cache, *SMALL, *masked_kv))  # fmt: skip
    args = [str(a) for a in [
        "--task", "train", "--model", base, "--cache_path", cache, *SMALL, *masked_kv,
        "--trainable_models", "template,dit_lora", "--lora_rank", 2, "--lora_alpha", 3,
        "--lora_target_modules", targets, "--batch_size", 2, "--gradient_accumulation_steps", 2,
        "--max_steps", 6, "--save_steps", 2, "--warmup_steps", 2, "--lr_scheduler", "cosine", "--learning_rate", 0.02,
    ]]  # fmt: skip

    reference = run(config(*args, "--output_path", tmp_path / "reference"))
    killed = run_cli([*args, "--output_path", str(tmp_path / "run")], env={FAULT_STEPS_ENV: "3"})
    assert killed.returncode == 17, killed.stderr[-4000:]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = run(config(*args, "--output_path", tmp_path / "run", "--resume", "auto"))

    assert resumed.step == 6 and len(resumed.losses) == 4
    np.testing.assert_allclose(resumed.losses, reference.losses[2:], rtol=0, atol=1e-6)
    for name in ("model.safetensors", "dit_lora.safetensors"):
        ours = load_file(str(resumed.checkpoint / name))
        assert max_difference(ours, load_file(str(reference.checkpoint / name))) <= 1e-6
    logged = read_metrics(tmp_path / "run" / "logs" / "metrics.csv")
    assert [int(r["step"]) for r in logged] == [1, 2, 3, 4, 5, 6]  # the killed run's step 3 was redone, once
    np.testing.assert_allclose([float(r["loss"]) for r in logged], reference.losses, rtol=1e-6)

    lora = load_file(str(resumed.checkpoint / "dit_lora.safetensors"))
    assert lora_key in lora
    pipe = FAMILIES[family].pipeline_class().from_pretrained(base, device="cpu")
    assert np.abs(pipe(**CALL, lora=lora) - pipe(**CALL)).max() > 1e-5


def test_image_kv_with_an_edge_processor_trains(family, base, dataset, tmp_path):
    image_kv = ["--architecture", "image_kv", "--architecture_config", json.dumps(asdict(TINY_IMAGE_KV[family]())),
                "--data_processor", "structure"]  # fmt: skip
    common = ["--model", base, "--dataset_metadata_path", dataset, *SMALL, *image_kv, "--seed", 1]
    training = ["--batch_size", 2, "--max_steps", 3, "--learning_rate", 1e-2]
    run(config("--task", "data_process", "--cache_path", tmp_path / "cache", *common))
    _, cached = open_cache(tmp_path / "cache")
    assert cached[0].template["latents"].shape == CONDITION_LATENTS[family]  # the edge map through its VAE
    staged = run(config("--task", "train", "--cache_path", tmp_path / "cache", "--output_path", tmp_path / "a", *common, *training))  # fmt: skip
    full = run(config("--task", "full", "--output_path", tmp_path / "b", *common, *training))
    np.testing.assert_allclose(staged.losses, full.losses, rtol=0, atol=1e-5)
    assert all(np.isfinite(staged.losses))

    trained = load_file(str(staged.checkpoint / "model.safetensors"))
    assert any(k.startswith("proj_v.") and v.abs().max() > 0 for k, v in trained.items())  # zero at start
    pipe = FAMILIES[family].pipeline_class().from_pretrained(base, device="cpu")
    templates = TemplatePipeline.from_pretrained([staged.checkpoint], device="cpu")
    edges = np.zeros((32, 32, 3), dtype=np.uint8)
    edges[8:24, 15:17] = 255
    image = templates(pipe, template_inputs=[{"image": Image.fromarray(edges)}], **CALL)
    assert np.abs(image - pipe(**CALL)).max() > 1e-4
