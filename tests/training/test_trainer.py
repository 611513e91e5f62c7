"""The two-stage trainer end to end, on a tiny random FLUX.2 stack and a six-image dataset.

Stage I + II == full, resume after a kill, and an ImageKV trained with an edge processor are tested on
both backbones in tests/training/test_training_families.py."""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import tests.training.archs  # noqa: F401  registers the test architectures build_architecture reads
from diffsynth_templates.backbones.flux2_dit import Flux2DiT
from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline
from diffsynth_templates.templates import TemplatePipeline, build_architecture
from diffsynth_templates.training import trainer
from diffsynth_templates.training.config import ConfigError, parse_args
from diffsynth_templates.training.feature_cache import (
    FAULT_ENV,
    FeatureCacheError,
    open_cache,
    read_index,
    read_shard_entries,
)
from diffsynth_templates.training.metrics import read_metrics
from diffsynth_templates.training.objective import TrainingModule
from diffsynth_templates.training.trainer import run
from tests.training.helpers import MASKED_KV, SMALL, free_port, run_cli, write_dataset

SCALAR_KV = ["--architecture", "test_scalar_kv", "--architecture_config", '{"block_names": ["double_0", "single_1"]}',
             "--data_processor", "brightness"]  # fmt: skip


def config(*args):
    return parse_args([str(a) for a in args])


def shard_ids(cache: Path) -> Counter:
    return Counter(
        e["id"] for path in (cache / "shards").glob("*.safetensors") for e in read_shard_entries(path)
    )


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_two_processes_shard_stage_one_and_train_with_ddp(base_model, dataset, tmp_path):
    def launcher():
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", str(free_port())]  # fmt: skip

    env = {"ACCELERATE_USE_CPU": "1"}  # accelerate's CPU DDP: gloo backend
    cache, output = tmp_path / "cache", tmp_path / "run"
    common = [str(a) for a in ["--model", base_model, "--dataset_metadata_path", dataset, "--cache_path", cache, *SMALL, *SCALAR_KV]]  # fmt: skip

    stage_one = run_cli(["--task", "data_process", *common, "--cache_chunk_size", "2"], env, launcher())
    assert stage_one.returncode == 0, stage_one.stderr[-4000:]
    assert "on this rank of 2" in stage_one.stderr
    index = read_index(cache)
    assert index["complete"] and index["num_samples"] == 6
    counts = shard_ids(cache)
    assert sorted(counts.values()) == [1] * 6  # every sample exactly once
    assert {Path(s["file"]).name[:4] for s in index["shards"]} == {"r000", "r001"}  # each rank wrote its own

    stage_two = run_cli(["--task", "train", *common, "--output_path", str(output), "--max_steps", "3",
                         "--learning_rate", "0.05"], env, launcher())  # fmt: skip
    assert stage_two.returncode == 0, stage_two.stderr[-4000:]
    assert len(read_metrics(output / "logs" / "metrics.csv")) == 3
    checkpoint = output / "checkpoint-3"
    assert {p.name for p in (checkpoint / "training_state").glob("rng-rank*.json")} == {
        "rng-rank0.json",
        "rng-rank1.json",
    }

    torch.manual_seed(0)
    initial = build_architecture("test_scalar_kv", {"block_names": ["double_0", "single_1"]}).state_dict()
    assert max_difference(load_file(str(checkpoint / "model.safetensors")), initial) > 1e-4

    pipe = Flux2ImagePipeline.from_pretrained(base_model, device="cpu")
    call = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, cfg_scale=1.0, seed=0, output_type="np", progress=False)  # fmt: skip
    templates = TemplatePipeline.from_pretrained([checkpoint], device="cpu")
    with_template = templates(pipe, template_inputs=[{"scale": 0.5}], **call)
    assert np.abs(with_template - pipe(**call)).max() > 1e-4


def test_stage_one_killed_midway_is_completed_by_a_rerun(base_model, dataset, tmp_path):
    cache = tmp_path / "cache"
    args = [str(a) for a in ["--task", "data_process", "--model", base_model, "--dataset_metadata_path", dataset,
                             "--cache_path", cache, "--cache_chunk_size", 2, *SMALL, *MASKED_KV]]  # fmt: skip

    killed = run_cli(args, env={FAULT_ENV: "5"})  # exits like a kill after 5 samples: 2 chunks committed
    assert killed.returncode == 17, killed.stderr[-4000:]
    assert not read_index(cache)["complete"]
    with pytest.raises(FeatureCacheError, match="incomplete"):
        open_cache(cache)
    assert sum(shard_ids(cache).values()) == 4  # the 5th sample was in an uncommitted chunk
    # damage on top: a half-written temp file and a committed shard that got truncated
    (cache / "shards" / ".r000-dead-00009.safetensors.tmp-1").write_bytes(b"half a file")
    damaged = sorted((cache / "shards").glob("*.safetensors"))[0]
    damaged.write_bytes(damaged.read_bytes()[:100])

    rerun = run(config(*args))
    assert rerun.complete and rerun.num_samples == 6
    counts = shard_ids(cache)
    assert sorted(counts.values()) == [1] * 6
    assert not list((cache / "shards").glob(".*tmp*"))
    assert (cache / "shards" / (damaged.name + ".corrupt")).is_file()  # set aside, never listed
    index, rerun_features = open_cache(cache)
    assert all(not s["file"].endswith(".corrupt") for s in index["shards"])

    reference = tmp_path / "reference"
    run(config(*[reference if a == str(cache) else a for a in args]))
    _, reference_features = open_cache(reference)
    assert [s["id"] for s in index["samples"]] == [s["id"] for s in read_index(reference)["samples"]]
    for a, b in zip(rerun_features, reference_features):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.prompt_embeds, b.prompt_embeds)
        assert torch.equal(a.template["pooled"], b.template["pooled"])


def test_stale_cache_is_refused_with_a_clear_message(base_model, dataset, tmp_path):
    cache = tmp_path / "cache"
    data = tmp_path / "data"
    metadata = write_dataset(data)
    stage_one = ["--task", "data_process", "--model", base_model, "--dataset_metadata_path", metadata, "--cache_path", cache, *SMALL]  # fmt: skip
    run(config(*stage_one, *SCALAR_KV))
    train = ["--task", "train", "--model", base_model, "--cache_path", cache, "--output_path", tmp_path / "out", "--max_steps", 1, *SMALL]  # fmt: skip
    run(config(*train, *SCALAR_KV))  # the matching configuration trains

    other_config = [*SCALAR_KV[:3], '{"block_names": ["double_0", "single_1"], "length": 5}', *SCALAR_KV[4:]]
    with pytest.raises(FeatureCacheError, match=r"different inputs.*template \(config"):
        run(config(*train, *other_config))
    other_processor = [*SCALAR_KV[:5], "sharpness"]
    with pytest.raises(
        FeatureCacheError, match=r"data_processor: .*BrightnessProcessor.* -> .*SharpnessProcessor"
    ):
        run(config(*train, *other_processor))
    with pytest.raises(FeatureCacheError, match="Use a new --cache_path"):  # stage I never mixes either
        run(config(*stage_one, *other_processor))

    metadata.write_text("".join(metadata.read_text().splitlines(keepends=True)[:-1]))  # a row removed
    with pytest.raises(FeatureCacheError, match=r"dataset \(metadata"):
        run(config(*train, *SCALAR_KV, "--dataset_metadata_path", metadata))

    from diffsynth_templates.pipelines.random_init import RandomPipelineSpec, random_flux2_pipeline

    other_base = random_flux2_pipeline(RandomPipelineSpec(seed=1)).save_pretrained(tmp_path / "other-base")
    with pytest.raises(FeatureCacheError, match=r"base_model \(text_encoder: .*vae: "):
        run(config(*train, *SCALAR_KV, "--model", other_base))


@pytest.mark.parametrize("condition_size, tokens", [("target", 4), ("original", 2)])
def test_condition_size_decides_the_size_template_images_are_read_at(base_model, tmp_path, condition_size, tokens):  # fmt: skip
    # super-resolution reads a 16 px image and encodes it at 2x: at its own size that is 32 px (2 x 2
    # tokens of 16 px); cover-cropped to the 32 px target first, it would be 64 px (4 x 4 tokens)
    from dataclasses import asdict

    from diffsynth_templates.templates.zoo import ImageKVConfig

    data = tmp_path / "data"
    write_dataset(data)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        Image.open(data / row["image"]).resize((16, 16), Image.Resampling.BOX).save(data / f"low{i}.png")
        row["template_inputs"] = {"image": f"low{i}.png"}
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sr = json.dumps(asdict(ImageKVConfig.tiny(upscale=2.0)))
    run(config("--task", "data_process", "--model", base_model, "--dataset_metadata_path", data / "metadata.jsonl",
               "--cache_path", tmp_path / "cache", "--architecture", "image_kv", "--architecture_config", sr,
               "--condition_size", condition_size, *SMALL))  # fmt: skip
    _, cached = open_cache(tmp_path / "cache")
    assert {tuple(cached[i].template["latents"].shape) for i in range(len(cached))} == {
        (1, 128, tokens, tokens)
    }


@pytest.mark.parametrize("template_init", ["dit", "random"])
def test_template_init_starts_a_fresh_template_from_the_dit(base_model, dataset, tmp_path, template_init):
    from dataclasses import asdict

    from diffsynth_templates.templates.zoo import ImageKVConfig

    structure = json.dumps(asdict(ImageKVConfig.tiny(key_norm=True)))
    common = ["--model", base_model, "--dataset_metadata_path", dataset, "--architecture", "image_kv",
              "--architecture_config", structure, "--data_processor", "inpaint", *SMALL]  # fmt: skip
    # one step at a negligible learning rate: the checkpoint holds the start
    run(config("--task", "full", "--output_path", tmp_path / "out", "--max_steps", 1, "--learning_rate", 1e-12,
               "--weight_decay", 0, "--template_init", template_init, *common))  # fmt: skip
    trained = load_file(tmp_path / "out" / "checkpoint-1" / "model.safetensors")
    dit = load_file(Path(base_model) / "transformer" / "diffusion_pytorch_model.safetensors")
    name = "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight"
    fused_k = dit[name][dit[name].shape[1] : 2 * dit[name].shape[1]]
    same = [
        torch.allclose(trained[name].float(), dit[name].float(), atol=1e-6),
        torch.allclose(trained["proj_k.single_0.weight"].float(), fused_k.float(), atol=1e-6),
    ]
    assert same == ([True, True] if template_init == "dit" else [False, False])


def test_condition_size_must_be_known():
    with pytest.raises(
        ConfigError, match=r"--condition_size must be one of \['target', 'original'\], got 'native'"
    ):
        config("--task", "full", "--model", "m", "--condition_size", "native")


BAD_ROWS = [
    ('{"image": "missing.png", "prompt": "a cat"}', "missing.png"),
    ('{"image": "broken.png", "prompt": "a cat"}', "not a readable image"),
    ('{"image": "0.png"}', "missing 'prompt'"),
    (
        '{"image": "1.png", "prompt": "a cat", "template_inputs": "{not json"}',
        "template_inputs is not valid JSON",
    ),
    (
        '{"image": "1.png", "prompt": "a cat", "template_inputs": [1, 2]}',
        "template_inputs must be a JSON object",
    ),
    ("{this line is not json", "malformed JSON"),
]


def test_bad_rows_are_reported_with_line_numbers_and_skipped(base_model, tmp_path, caplog):
    metadata = write_dataset(tmp_path / "data")
    (tmp_path / "data" / "broken.png").write_bytes(b"this is not a png")
    with metadata.open("a") as f:
        f.write("".join(row + "\n" for row, _ in BAD_ROWS))
    caplog.set_level("WARNING")
    result = run(config("--task", "data_process", "--model", base_model, "--dataset_metadata_path", metadata, "--cache_path", tmp_path / "cache", *SMALL, *MASKED_KV))  # fmt: skip
    assert result.complete and result.num_samples == 6
    for line, (_, reason) in enumerate(BAD_ROWS, start=7):
        assert any(f"line {line}: " in r.getMessage() and reason in r.getMessage() for r in caplog.records), (
            line,
            reason,
        )


def test_an_image_deleted_after_indexing_is_skipped_with_a_warning(base_model, tmp_path, caplog, monkeypatch):
    data = tmp_path / "data"
    metadata = write_dataset(data)
    shutil.copy(data / "2.png", tmp_path / "2.png")
    real = trainer.read_metadata

    def read_then_lose_an_image(*args, **kwargs):  # the file disappears after the metadata was checked
        report = real(*args, **kwargs)
        (data / "2.png").unlink()
        return report

    monkeypatch.setattr(trainer, "read_metadata", read_then_lose_an_image)
    caplog.set_level("WARNING")
    common = ["--model", base_model, "--dataset_metadata_path", metadata, *SMALL, *MASKED_KV]
    result = run(config("--task", "data_process", "--cache_path", tmp_path / "cache", *common))
    assert result.complete and result.num_samples == 5 and result.num_skipped == 1
    skipped = read_index(tmp_path / "cache")["skipped"]
    assert skipped[0]["line"] == 3 and "2.png" in skipped[0]["reason"]
    assert any("line 3" in r.getMessage() and "2.png" in r.getMessage() for r in caplog.records)

    shutil.copy(tmp_path / "2.png", data / "2.png")
    caplog.clear()
    full = run(config("--task", "full", "--output_path", tmp_path / "out", "--max_steps", 6, *common))
    assert full.step == 6 and all(np.isfinite(full.losses))
    assert any("skipping sample" in r.getMessage() and "2.png" in r.getMessage() for r in caplog.records)


def _fixed_loss(dit: Flux2DiT, cache: Path) -> float:
    """Mean loss over the cache with fixed noise: the same numbers for any DiT."""
    _, samples = open_cache(cache)
    module = TrainingModule(dit.float())
    with torch.no_grad():
        losses = [module([samples[i]], [1000 * r + i]) for i in range(len(samples)) for r in range(8)]
    return float(torch.stack(losses).mean())


def test_full_dit_training_from_scratch_reduces_the_loss(base_model, dataset, tmp_path):
    cache = tmp_path / "cache"
    common = ["--model", base_model, "--cache_path", cache, "--trainable_models", "dit", *SMALL]
    run(config("--task", "data_process", "--dataset_metadata_path", dataset, *common))
    result = run(config("--task", "train", "--output_path", tmp_path / "out", "--batch_size", 3, "--max_steps", 60,
                        "--learning_rate", 3e-3, "--use_gradient_checkpointing", *common))  # fmt: skip

    trained = Flux2DiT.from_pretrained(result.checkpoint / "transformer")
    initial = Flux2DiT.from_pretrained(base_model / "transformer")
    before, after = _fixed_loss(initial, cache), _fixed_loss(trained, cache)
    assert after < 0.8 * before, (before, after)
    assert not (result.checkpoint / "model.safetensors").exists()  # only what was trained is saved


def test_config_file_validation_images_and_logs(base_model, dataset, tmp_path):
    (tmp_path / "run.yaml").write_text(
        f"task: full\nmodel: {base_model}\ndataset_metadata_path: {dataset}\noutput_path: {tmp_path / 'out'}\n"
        "max_steps: 50\nmax_pixels: 1024\nmax_sequence_length: 24\n"
        "architecture: test_scalar_kv\narchitecture_config: {block_names: [single_0]}\ndata_processor: brightness\n"
        "validation_steps: 2\nvalidation_inputs:\n"
        "  - {prompt: a red circle, template_inputs: {scale: 0.2}, height: 32, width: 32, num_inference_steps: 2}\n"
        "  - {prompt: a blue square, template_inputs: {scale: 0.9}, height: 32, width: 48, num_inference_steps: 2}\n"
    )
    # flags win; --import_modules runs code, so only the command line may give it
    result = run(parse_args(["--config", str(tmp_path / "run.yaml"), "--max_steps", "2", "--import_modules", "tests.training.archs"]))  # fmt: skip
    assert result.step == 2
    from PIL import Image

    with Image.open(tmp_path / "out" / "validation" / "step-2.png") as grid:
        assert grid.size == (2 * 48, 32)
    assert len(read_metrics(tmp_path / "out" / "logs" / "metrics.csv")) == 2
    assert list((tmp_path / "out" / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    saved = json.loads((result.checkpoint / "training_args.json").read_text())
    assert saved["max_steps"] == 2 and saved["architecture_config"] == {"block_names": ["single_0"]}


def test_shared_feature_store_is_reused_across_templates(base_model, dataset, tmp_path):
    store = tmp_path / "store"
    common = ["--task", "data_process", "--model", base_model, "--dataset_metadata_path", dataset, "--shared_feature_cache", store, *SMALL]  # fmt: skip
    run(config(*common, "--cache_path", tmp_path / "a", *SCALAR_KV))
    files = {p: p.stat().st_mtime_ns for p in store.rglob("*.safetensors")}
    assert len(files) == 12  # six prompts + six images
    run(config(*common, "--cache_path", tmp_path / "b", *MASKED_KV))
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*.safetensors")} == files  # nothing recomputed
    assert not (tmp_path / "b" / "store").exists()
    result = run(config("--task", "train", "--model", base_model, "--cache_path", tmp_path / "b", "--output_path", tmp_path / "out", "--max_steps", 1, *SMALL, *MASKED_KV))  # fmt: skip
    assert result.step == 1


def test_edit_images_and_a_lora_template_without_processor(base_model, tmp_path):
    data = tmp_path / "data"
    write_dataset(data)
    rows = [
        {"image": "0.png", "prompt": "make it red", "edit_image": ["1.png", "2.png"], "template_inputs": {"gain": 0.5}},
        {"image": "3.png", "prompt": "make it blue", "edit_image": "4.png", "template_inputs": {"gain": 1.0}},
        {"image": "5.png", "prompt": "make it green", "edit_image": "0.png", "template_inputs": {"gain": 0.8}},
    ]  # fmt: skip
    metadata = data / "edit.jsonl"
    metadata.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = ["--architecture", "test_constant_lora", "--architecture_config", '{"in_features": 128, "out_features": 32}',
                "--trainable_models", "template,dit_lora", "--lora_rank", 2]  # fmt: skip
    common = ["--model", base_model, "--dataset_metadata_path", metadata, *SMALL, *template]
    run(config("--task", "data_process", "--cache_path", tmp_path / "cache", *common))
    _, cached = open_cache(tmp_path / "cache")
    assert sorted(len(cached[i].edit_latents) for i in range(3)) == [1, 1, 2]
    assert cached[0].edit_latents[0].shape == (128, 2, 2)
    training = ["--batch_size", 3, "--max_steps", 3, "--learning_rate", 0.05]
    staged = run(config("--task", "train", "--cache_path", tmp_path / "cache", "--output_path", tmp_path / "a", *common, *training))  # fmt: skip
    full = run(config("--task", "full", "--output_path", tmp_path / "b", *common, *training))
    np.testing.assert_allclose(staged.losses, full.losses, rtol=0, atol=1e-5)
    trained = load_file(str(staged.checkpoint / "model.safetensors"))
    torch.manual_seed(0)
    initial = build_architecture("test_constant_lora", {"in_features": 128, "out_features": 32}).state_dict()
    assert max_difference(trained, initial) > 1e-3
