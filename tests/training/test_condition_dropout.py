"""Condition dropout (issue 25): --caption_dropout, --unaligned_prompt, --template_dropout.

Each choice is drawn from the sample's own seed: reproducible across runs and row orders, the same in
stage I and --task full, and with every share at 0 the dataset, its items and the cache fingerprint
are exactly what they were before the options existed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tests.training.archs  # noqa: F401  registers the test architectures
from diffsynth_templates.training.config import ConfigError, parse_args
from diffsynth_templates.training.dataset import (
    DatasetConfig,
    DatasetError,
    TemplateDataset,
    read_metadata,
    sample_draw,
    sample_seed,
)
from diffsynth_templates.training.feature_cache import FeatureCacheError, open_cache
from diffsynth_templates.training.features import FeatureError, blank_images
from diffsynth_templates.training.trainer import dataset_fingerprint, run
from tests.training.helpers import MASKED_KV, SMALL

NUM_ROWS = 40


def config(*args):
    return parse_args([str(a) for a in args])


@pytest.fixture(scope="module")
def rows_dataset(tmp_path_factory) -> Path:
    """40 tiny images, each row with its own prompt and an unaligned one."""
    root = tmp_path_factory.mktemp("dropout-data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(NUM_ROWS):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "prompt": f"a red circle at the left number {i}",
                     "prompt_unaligned": f"a red circle number {i}"})  # fmt: skip
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "reversed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    return root


def dataset_of(root: Path, name: str = "metadata.jsonl", **options) -> TemplateDataset:
    report = read_metadata(root / name, root)
    return TemplateDataset.from_report(report, DatasetConfig(max_pixels=1024, **options))


def prompts_by_id(dataset: TemplateDataset) -> dict[str, str]:
    return {dataset[i]["id"]: dataset[i]["prompt"] for i in range(len(dataset))}


def test_draws_are_reproducible_independent_per_purpose_and_uniform():
    seeds = [sample_seed(f"sample-{i}", 0) for i in range(4000)]
    prompt = [sample_draw(s, "prompt") for s in seeds]
    assert prompt == [sample_draw(s, "prompt") for s in seeds]  # the same in every run
    template = [sample_draw(s, "template_dropout") for s in seeds]
    assert all(0 <= d < 1 for d in prompt + template)
    assert abs(np.mean(prompt) - 0.5) < 0.02 and abs(np.mean(template) - 0.5) < 0.02
    assert abs(np.corrcoef(prompt, template)[0, 1]) < 0.05  # the two purposes draw independently
    # a share P of the samples falls below P
    assert abs(np.mean(np.asarray(prompt) < 0.3) - 0.3) < 0.03


def test_caption_dropout_and_unaligned_prompts_take_their_shares_per_sample(rows_dataset):
    options = {"caption_dropout": 0.4, "unaligned_prompt": 0.3}
    chosen = prompts_by_id(dataset_of(rows_dataset, **options))
    again = prompts_by_id(dataset_of(rows_dataset, "reversed.jsonl", **options))
    assert chosen == again  # a sample's choice follows its id, not its row or the run
    kinds = [("empty" if p == "" else "unaligned" if "left" not in p else "own") for p in chosen.values()]
    counts = {k: kinds.count(k) for k in ("empty", "unaligned", "own")}
    assert counts["empty"] + counts["unaligned"] + counts["own"] == NUM_ROWS
    assert 8 <= counts["empty"] <= 24 and 4 <= counts["unaligned"] <= 20 and counts["own"] >= 4, counts
    # exactly the samples whose one draw falls in each share
    for sample_id, prompt in chosen.items():
        draw = sample_draw(sample_seed(sample_id, 0), "prompt")
        expected = "" if draw < 0.4 else ("unaligned" if draw < 0.7 else "own")
        assert (prompt if prompt == "" else "unaligned" if "left" not in prompt else "own") == expected
    # a larger share drops a superset: the shares nest (P=0.4 drops what P=0.2 drops, and more)
    fewer = prompts_by_id(dataset_of(rows_dataset, caption_dropout=0.2))
    assert {i for i, p in fewer.items() if p == ""} <= {i for i, p in chosen.items() if p == ""}


def test_all_dropout_off_gives_exactly_todays_items_and_fingerprint(rows_dataset, tmp_path):
    today = dataset_of(rows_dataset)
    off = dataset_of(rows_dataset, caption_dropout=0.0, unaligned_prompt=0.0, template_dropout=0.0)
    for i in range(len(today)):
        a, b = today[i], off[i]
        assert a.keys() == b.keys() and "drop_template" not in a
        assert a["prompt"] == b["prompt"] and a["seed"] == b["seed"]
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    args = ["--task", "data_process", "--model", "m", "--cache_path", tmp_path / "c",
            "--dataset_metadata_path", rows_dataset / "metadata.jsonl", "--architecture", "image_kv"]  # fmt: skip
    plain = config(*args)
    assert plain.condition_dropout() == {}
    assert set(dataset_fingerprint(plain)) == {"metadata", "max_pixels", "buckets"}
    assert dataset_fingerprint(plain) == dataset_fingerprint(config(*args, "--caption_dropout", 0))
    on = dataset_fingerprint(config(*args, "--caption_dropout", 0.5, "--unaligned_prompt", 0.2))
    assert on == {**dataset_fingerprint(plain), "caption_dropout": 0.5, "unaligned_prompt": 0.2,
                  "unaligned_prompt_field": "prompt_unaligned"}  # fmt: skip


def test_unaligned_prompt_needs_its_column(tmp_path, rows_dataset):
    with pytest.raises(DatasetError, match=r"needs a 'layout_free' string in every row.*lines \[1, 2"):
        dataset_of(rows_dataset, unaligned_prompt=0.5, unaligned_prompt_field="layout_free")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--caption_dropout", 1.5], r"--caption_dropout is a share of the samples, from 0 to 1; got 1.5"),
        (["--template_dropout", -0.1], r"--template_dropout is a share .* got -0.1"),
        (["--caption_dropout", "nan"], r"--caption_dropout must be a finite number"),
        (["--caption_dropout", 0.6, "--unaligned_prompt", 0.5], r"is over 1: a sample gets one prompt"),
        (["--unaligned_prompt_field", " "], r"--unaligned_prompt_field must name a metadata column"),
    ],
)
def test_bad_dropout_flags_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        config("--task", "full", "--model", "m", "--dataset_metadata_path", "d.jsonl", "--output_path", "o",
               "--max_steps", 1, "--architecture", "image_kv", *flags)  # fmt: skip


def test_template_dropout_needs_a_template():
    with pytest.raises(ConfigError, match="--template_dropout drops a template's inputs"):
        config("--task", "data_process", "--model", "m", "--dataset_metadata_path", "d.jsonl",
               "--cache_path", "c", "--template_dropout", 0.5)  # fmt: skip


def test_blank_images_keeps_sizes_and_modes_and_refuses_inputs_without_images():
    inputs = {"image": Image.new("RGB", (8, 4), "red"), "mask": [Image.new("L", (8, 4), 255)], "scale": 0.5}
    blank = blank_images(inputs, "row 1")
    assert blank["scale"] == 0.5 and inputs["image"].getpixel((0, 0)) == (255, 0, 0)  # input untouched
    assert (
        blank["image"].size == (8, 4)
        and blank["image"].mode == "RGB"
        and not np.asarray(blank["image"]).any()
    )
    assert blank["mask"][0].mode == "L" and not np.asarray(blank["mask"][0]).any()
    with pytest.raises(FeatureError, match=r"row 1: --template_dropout .* inputs \['scale'\] hold no image"):
        blank_images({"scale": 0.5}, "row 1")


def test_stage_one_and_full_make_the_same_choices(base_model, rows_dataset, tmp_path):
    """Stage I caches, per sample, the empty prompt's embedding where the draw dropped the caption and
    a black template input where it dropped the template; --task full draws the same, so its losses
    equal stage II's from that cache. A stage II asking for other shares refuses the cache."""
    dropout = ["--caption_dropout", 0.4, "--unaligned_prompt", 0.3, "--template_dropout", 0.5]
    common = ["--model", base_model, "--dataset_metadata_path", rows_dataset / "metadata.jsonl", *SMALL,
              *MASKED_KV, *dropout]  # fmt: skip
    run(config("--task", "data_process", "--cache_path", tmp_path / "cache", *common))
    index, cached = open_cache(tmp_path / "cache")
    text_of = {cached[i].id: cached[i].keys["text"] for i in range(len(cached))}
    expected = prompts_by_id(dataset_of(rows_dataset, caption_dropout=0.4, unaligned_prompt=0.3))
    empty = {i for i, p in expected.items() if p == ""}
    assert 0 < len(empty) < NUM_ROWS
    # the dropped samples share one text key (the empty prompt's), every other sample has its own
    assert len({text_of[i] for i in empty}) == 1
    assert len({text_of[i] for i in set(text_of) - empty}) == NUM_ROWS - len(empty)
    # template dropout: black image and mask for exactly the drawn samples
    for i in range(len(cached)):
        dropped = sample_draw(sample_seed(cached[i].id, 0), "template_dropout") < 0.5
        assert (not cached[i].template["pooled"].any()) == dropped
    training = ["--batch_size", 4, "--max_steps", 3, "--learning_rate", 0.05]
    staged = run(config("--task", "train", "--cache_path", tmp_path / "cache", "--output_path", tmp_path / "a",
                        *common, *training))  # fmt: skip
    full = run(config("--task", "full", "--output_path", tmp_path / "b", *common, *training))
    np.testing.assert_allclose(staged.losses, full.losses, rtol=0, atol=1e-5)
    other = [*common[:-6], "--caption_dropout", 0.2, "--unaligned_prompt", 0.3, "--template_dropout", 0.5]
    with pytest.raises(FeatureCacheError, match="caption_dropout"):
        run(config("--task", "train", "--cache_path", tmp_path / "cache", "--output_path", tmp_path / "c",
                   *other, *training))  # fmt: skip
    assert index["num_samples"] == NUM_ROWS
