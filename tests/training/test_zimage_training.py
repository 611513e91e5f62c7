"""Training templates on a Z-Image base with the same commands as on FLUX.2 (issue 10's acceptance).

The backbone is read from the model folder: nothing on the command line says "Z-Image". Stage I + II ==
full and ImageKV with an edge processor run on both backbones in tests/training/test_training_families.py.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffsynth_templates.backbones.zimage_dit import ZImageDiT
from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline
from diffsynth_templates.pipelines.random_init import random_zimage_pipeline
from diffsynth_templates.pipelines.zimage_pipeline import ZImagePipeline
from diffsynth_templates.templates import TemplateError, TemplatePipeline
from diffsynth_templates.templates.zoo import ValueKV, ValueKVConfig
from diffsynth_templates.training.backbones import UnsupportedFeatureError
from diffsynth_templates.training.components import TemplateSetupError
from diffsynth_templates.training.config import parse_args
from diffsynth_templates.training.feature_cache import FeatureCacheError, open_cache, read_index
from diffsynth_templates.training.features import SampleFeatures
from diffsynth_templates.training.noise import draw_shifted_noise, shifted_training_sigmas
from diffsynth_templates.training.objective import TrainingModule
from diffsynth_templates.training.trainer import run
from tests.training.helpers import SMALL, run_cli, write_dataset

VALUE_KV = ["--architecture", "value_kv", "--architecture_config", json.dumps(asdict(ValueKVConfig.tiny_zimage())),
            "--data_processor", "brightness"]  # fmt: skip
CALL = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, cfg_scale=1.0, seed=0, output_type="np", progress=False)  # fmt: skip


def config(*args):
    return parse_args([str(a) for a in args])


@pytest.fixture(scope="module")
def trained_value_kv(zimage_base, dataset, tmp_path_factory) -> Path:
    """``train.py`` stage I then stage II on the tiny Z-Image: the checkpoint folder."""
    root = tmp_path_factory.mktemp("zimage-value-kv")
    common = ["--model", str(zimage_base), "--cache_path", str(root / "cache"), *SMALL, *VALUE_KV]
    stage_one = run_cli(["--task", "data_process", "--dataset_metadata_path", str(dataset), *common])
    assert stage_one.returncode == 0, stage_one.stderr[-4000:]
    stage_two = run_cli(["--task", "train", "--output_path", str(root / "run"), "--max_steps", "4",
                         "--learning_rate", "0.01", *common])  # fmt: skip
    assert stage_two.returncode == 0, stage_two.stderr[-4000:]
    return root / "run" / "checkpoint-4"


def test_value_kv_trained_on_zimage_loads_and_changes_the_image(trained_value_kv, zimage_base):
    spec = json.loads((trained_value_kv / "template.json").read_text())
    assert spec["base_backbone"] == "zimage" and spec["base_model"] == str(zimage_base)
    weights = load_file(str(trained_value_kv / "model.safetensors"))
    trained = [k for k in weights if "prefer_value_embedder.2.weight" in k]  # zero before training
    assert trained and all(weights[k].abs().max() > 0 for k in trained)

    pipe = ZImagePipeline.from_pretrained(zimage_base, device="cpu")
    templates = TemplatePipeline.from_pretrained([trained_value_kv], device="cpu")
    base = pipe(**CALL)
    dark, bright = (templates(pipe, template_inputs=[{"scale": s}], **CALL) for s in (0.1, 0.9))
    assert np.abs(dark - base).max() > 1e-4
    assert np.abs(dark - bright).max() > 1e-6  # the trained tokens depend on the value


def test_zimage_template_is_refused_on_a_flux2_base(trained_value_kv, zimage_base, base_model):
    flux = Flux2ImagePipeline.from_pretrained(base_model, device="cpu")
    templates = TemplatePipeline.from_pretrained([trained_value_kv], device="cpu")
    with pytest.raises(TemplateError) as refused:
        templates(flux, template_inputs=[{"scale": 0.5}], **CALL)
    message = str(refused.value)
    assert str(zimage_base) in message and str(base_model) in message
    assert "Z-Image" in message and "FLUX.2" in message


def _sample(i: int, scale: float) -> SampleFeatures:
    g = torch.Generator().manual_seed(i)
    return SampleFeatures(
        id=f"s{i}",
        order=i,
        line=i + 1,
        size=(32, 32),
        latents=torch.randn(16, 8, 8, generator=g),
        prompt_embeds=torch.randn(5 + i, 32, generator=g),  # ragged captions batch together
        template={"value": torch.tensor([scale])},
    )


def test_zimage_stage_two_loss_decreases_on_a_fixed_batch():
    dit = random_zimage_pipeline().dit
    torch.manual_seed(0)
    template = ValueKV(ValueKVConfig.tiny_zimage())
    module = TrainingModule(dit, template)
    batch, seeds = [_sample(0, 0.1), _sample(1, 0.5), _sample(2, 0.9)], [3, 4, 5]
    with torch.no_grad():
        alone = torch.stack([module([s], [seed]) for s, seed in zip(batch, seeds)]).mean()
        before = module(batch, seeds)
    torch.testing.assert_close(before, alone, rtol=1e-5, atol=1e-6)  # one DiT call == three

    optimizer = torch.optim.AdamW(template.parameters(), lr=1e-2)
    for _ in range(30):
        loss = module(batch, seeds)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.grad is None for p in dit.parameters())  # the base model stays frozen
    with torch.no_grad():
        after = module(batch, seeds)
    assert after < 0.95 * before, (before.item(), after.item())


def test_zimage_sigmas_follow_diffsynth_training_grid():
    sigmas = shifted_training_sigmas()
    assert len(sigmas) == 1000 and sigmas[0] == 1.0
    torch.testing.assert_close(sigmas[-1], torch.tensor(3 * 0.001 / (1 + 2 * 0.001)))
    drawn = torch.stack([draw_shifted_noise(seed, (1,))[0] for seed in range(200)])
    assert all(torch.isin(drawn, sigmas))
    assert drawn.mean() > 0.6  # the shift pushes training towards high noise (unshifted mean: 0.5)


def test_a_flux2_cache_is_never_reused_for_zimage(base_model, zimage_base, dataset, tmp_path):
    cache = tmp_path / "cache"
    common = ["--cache_path", cache, "--trainable_models", "dit", *SMALL]
    run(config("--task", "data_process", "--model", base_model, "--dataset_metadata_path", dataset, *common))
    train = ["--task", "train", "--output_path", tmp_path / "out", "--max_steps", 1, *common]
    with pytest.raises(FeatureCacheError, match=r"backbone: flux2 -> zimage"):
        run(config(*train, "--model", zimage_base))
    with pytest.raises(FeatureCacheError, match=r"backbone: flux2 -> zimage.*Use a new --cache_path"):
        run(
            config(
                "--task", "data_process", "--model", zimage_base, "--dataset_metadata_path", dataset, *common
            )
        )

    # a cache written before Z-Image existed has no backbone entry: it holds FLUX.2 features
    index = json.loads((cache / "index.json").read_text())
    del index["fingerprint"]["backbone"]
    (cache / "index.json").write_text(json.dumps(index))
    assert run(config(*train, "--model", base_model)).step == 1
    with pytest.raises(FeatureCacheError, match=r"backbone: flux2 -> zimage"):
        run(config(*train, "--model", zimage_base))


def test_text_and_latents_are_never_shared_between_backbones(base_model, zimage_base, dataset, tmp_path):
    store = tmp_path / "store"
    common = ["--task", "data_process", "--dataset_metadata_path", dataset, "--shared_feature_cache", store,
              "--trainable_models", "dit", *SMALL]  # fmt: skip
    run(config(*common, "--model", base_model, "--cache_path", tmp_path / "flux"))
    run(config(*common, "--model", zimage_base, "--cache_path", tmp_path / "zimage"))
    assert len(list(store.rglob("*.safetensors"))) == 24  # six prompts + six images, per backbone
    _, cached = open_cache(tmp_path / "zimage")
    assert cached[0].latents.shape == (16, 16, 16)  # Z-Image VAE latents [16, h/2, w/2] (tiny VAE)
    assert cached[0].prompt_embeds.ndim == 2 and cached[0].prompt_embeds.shape[-1] == 32
    assert read_index(tmp_path / "zimage")["fingerprint"]["backbone"] == "zimage"


def test_dit_and_dit_lora_train_on_zimage_and_validation_images(zimage_base, dataset, tmp_path):
    common = ["--task", "full", "--model", zimage_base, "--dataset_metadata_path", dataset, *SMALL,
              "--max_steps", 2, "--learning_rate", 1e-2]  # fmt: skip
    lora = run(config(*common, "--output_path", tmp_path / "lora", "--trainable_models", "dit_lora",
                      "--lora_rank", 2, "--lora_target_modules", "to_q,to_out.0", "--validation_steps", 2,
                      "--validation_inputs", '[{"prompt": "a red circle", "height": 32, "width": 32, "num_inference_steps": 2}]'))  # fmt: skip
    assert (tmp_path / "lora" / "validation" / "step-2.png").is_file()
    weights = load_file(str(lora.checkpoint / "dit_lora.safetensors"))
    assert "layers.0.attention.to_q.lora_B.weight" in weights
    pipe = ZImagePipeline.from_pretrained(zimage_base, device="cpu")
    assert np.abs(pipe(**CALL, lora=weights) - pipe(**CALL)).max() > 1e-5

    full = run(config(*common, "--output_path", tmp_path / "dit", "--trainable_models", "dit"))
    trained = ZImageDiT.from_pretrained(full.checkpoint / "transformer")
    initial = ZImageDiT.from_pretrained(zimage_base / "transformer")
    moved = [
        (a - b).abs().max() for a, b in zip(trained.state_dict().values(), initial.state_dict().values())
    ]
    assert max(moved) > 1e-4


def test_what_zimage_cannot_train_on_is_a_clear_error(zimage_base, dataset, tmp_path):
    data = tmp_path / "data"
    write_dataset(data)
    rows = [
        {"image": "0.png", "prompt": "make it red"},
        {"image": "1.png", "prompt": "make it blue", "edit_image": "2.png"},
        {"image": "3.png", "prompt": "make it green", "edit_image": ["4.png", "5.png"]},
    ]
    metadata = data / "edit.jsonl"
    metadata.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", zimage_base, "--dataset_metadata_path", metadata, *SMALL, *VALUE_KV]
    for task in (["--task", "data_process", "--cache_path", tmp_path / "cache"], ["--task", "full", "--output_path", tmp_path / "o", "--max_steps", 1]):  # fmt: skip
        with pytest.raises(UnsupportedFeatureError, match=r"metadata lines 2, 3 have an edit_image.*Z-Image"):
            run(config(*task, *common))

    cli = run_cli([str(a) for a in ["--task", "data_process", "--cache_path", tmp_path / "c3", *common]])
    assert cli.returncode == 2 and "error: " in cli.stderr and "Traceback" not in cli.stderr
    assert "metadata lines 2, 3 have an edit_image" in cli.stderr

    flux_config = json.dumps(asdict(ValueKVConfig.tiny()))  # FLUX.2 block names on a Z-Image base
    plain = ["--model", zimage_base, "--dataset_metadata_path", dataset, *SMALL, *VALUE_KV]
    with pytest.raises(TemplateSetupError, match=r"names blocks of a FLUX.2 DiT \(double_0.*is Z-Image"):
        run(config("--task", "data_process", "--cache_path", tmp_path / "c2", *plain, "--architecture_config", flux_config))  # fmt: skip
