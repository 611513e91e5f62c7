from __future__ import annotations

import csv
import json
import logging
import math
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from diffsynth_templates.training.dataset import (
    BadRow,
    BucketBatchSampler,
    DatasetConfig,
    DatasetError,
    SampleLoadError,
    TemplateDataset,
    assign_bucket,
    collate_as_lists,
    fit_to_pixel_budget,
    load_and_crop,
    load_image,
    make_buckets,
    read_metadata,
    sample_seed,
)

# ---------------------------------------------------------------------------------------------------
# helpers: tiny real images and the three metadata formats
# ---------------------------------------------------------------------------------------------------


def _noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A dataset folder with a few PNG/JPEG images of different aspect ratios and a non-image file."""
    root = tmp_path / "data"
    _save(_noise(64, 48, 0), root / "images" / "a.png")
    _save(_noise(40, 80, 1), root / "images" / "b.jpg")
    _save(_noise(48, 48, 2), root / "images" / "c.png")
    _save(_noise(64, 48, 3), root / "edits" / "a_src.png")
    _save(_noise(64, 48, 4), root / "edits" / "a_src2.jpg")
    _save(_noise(64, 48, 5), root / "maps" / "depth_a.png")
    (root / "notes.txt").write_text("not an image")
    return root


ROWS = [
    {
        "image": "images/a.png",
        "prompt": "a red cat, sitting",
        "edit_image": "edits/a_src.png",
        "template_inputs": {"depth": "maps/depth_a.png", "scale": 0.5, "text": 'a "quoted" word'},
    },
    {
        "image": "images/b.jpg",
        "prompt": "",
        "edit_image": ["edits/a_src.png", "edits/a_src2.jpg"],
        "template_inputs": {"refs": ["images/c.png", "./images/a.png"], "notes": "notes.txt"},
    },
    {"image": "images/c.png", "prompt": "multi\nline prompt"},
]


def _write(path: Path, rows: list[dict], fmt: str) -> Path:
    """Write rows as .json (indented list), .jsonl or .csv (JSON strings for list/object cells)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        path.write_text(json.dumps(rows, indent=2))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        columns = ["image", "prompt", "edit_image", "template_inputs"]
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(columns)
            for row in rows:
                cells = []
                for column in columns:
                    value = row.get(column, "")
                    cells.append(json.dumps(value) if isinstance(value, list | dict) else value)
                writer.writerow(cells)
    return path


def _summary(samples) -> list[tuple]:
    return [(s.id, s.image, s.prompt, s.edit_images, s.template_inputs, s.size) for s in samples]


# ---------------------------------------------------------------------------------------------------
# reading metadata
# ---------------------------------------------------------------------------------------------------


def test_three_formats_give_the_same_samples(base: Path, tmp_path: Path) -> None:
    reports = {
        fmt: read_metadata(_write(tmp_path / "meta" / f"metadata.{fmt}", ROWS, fmt), base)
        for fmt in ("json", "jsonl", "csv")
    }
    expected = _summary(reports["jsonl"].samples)
    assert len(expected) == 3
    for fmt, report in reports.items():
        assert report.format == fmt and report.bad_rows == [] and report.num_rows == 3
        assert _summary(report.samples) == expected, fmt
    first, second, third = reports["csv"].samples
    assert [s.index for s in reports["csv"].samples] == [0, 1, 2]
    assert first.image == base / "images" / "a.png" and first.image.is_absolute()
    assert first.edit_images == [base / "edits" / "a_src.png"]
    assert second.edit_images == [base / "edits" / "a_src.png", base / "edits" / "a_src2.jpg"]
    assert third.edit_images == [] and third.template_inputs == {} and third.prompt == "multi\nline prompt"
    assert first.size == (64, 48) and second.size == (40, 80)
    assert len({s.id for s in reports["csv"].samples}) == 3


def test_ids_are_stable_under_reordering_and_duplicates_get_suffixes(base: Path, tmp_path: Path) -> None:
    forward = read_metadata(_write(tmp_path / "f.jsonl", ROWS, "jsonl"), base).samples
    backward = read_metadata(_write(tmp_path / "b.jsonl", ROWS[::-1], "jsonl"), base).samples
    assert {s.id: s.image for s in forward} == {s.id: s.image for s in backward}
    assert [s.line for s in backward] == [1, 2, 3]

    duplicated = read_metadata(_write(tmp_path / "d.jsonl", [ROWS[2], ROWS[0], ROWS[2]], "jsonl"), base)
    ids = [s.id for s in duplicated.samples]
    assert ids[2] == f"{ids[0]}-1" and len(set(ids)) == 3
    # moving the dataset folder keeps ids (they hash paths relative to the base path)
    moved = tmp_path / "moved"
    shutil.copytree(base, moved)
    relocated = read_metadata(_write(tmp_path / "m.jsonl", ROWS, "jsonl"), moved).samples
    assert [s.id for s in relocated] == [s.id for s in forward]
    assert relocated[0].image == moved / "images" / "a.png"
    # a changed prompt is a different sample
    changed = read_metadata(_write(tmp_path / "c.jsonl", [{**ROWS[2], "prompt": "other"}], "jsonl"), base)
    assert changed.samples[0].id != ids[0]


def test_template_inputs_resolve_against_the_base_path(base: Path, tmp_path: Path) -> None:
    rows = [
        {
            "image": "images/a.png",
            "prompt": "p",
            "template_inputs": {
                "depth": "maps/depth_a.png",
                "notes": "notes.txt",  # existing file without an image extension
                "text": "images",  # a folder, not a file: stays a string
                "caption": "a cat on a mat",
                "scale": 0.25,
                "nested": {"refs": ["images/c.png", "./images/b.jpg"], "flag": True},
            },
            "source": "laion",
        }
    ]
    # the metadata lives outside the base path: paths must not resolve against its folder
    report = read_metadata(_write(tmp_path / "elsewhere" / "metadata.jsonl", rows, "jsonl"), base)
    inputs = report.samples[0].template_inputs
    assert inputs["depth"] == base / "maps" / "depth_a.png"
    assert inputs["notes"] == base / "notes.txt"
    assert inputs["text"] == "images" and inputs["caption"] == "a cat on a mat" and inputs["scale"] == 0.25
    assert inputs["nested"] == {"refs": [base / "images" / "c.png", base / "images" / "b.jpg"], "flag": True}
    assert report.samples[0].extra == {"source": "laion"}

    dataset = TemplateDataset.from_report(report, DatasetConfig(max_pixels=32 * 32))
    item = dataset[0]
    size = dataset.sizes[0]
    assert item["image"].size == size
    assert isinstance(item["template_inputs"]["depth"], Image.Image)
    assert item["template_inputs"]["depth"].size == size and item["template_inputs"]["depth"].mode == "RGB"
    assert [im.size for im in item["template_inputs"]["nested"]["refs"]] == [size, size]
    assert item["template_inputs"]["notes"] == base / "notes.txt"
    assert item["template_inputs"]["caption"] == "a cat on a mat"


def _bad_jsonl_lines(base: Path) -> tuple[list[str], dict[int, str]]:
    (base / "broken.png").write_bytes(b"this is not a PNG")
    good = _noise(32, 32, 9)
    good.save(base / "whole.png")
    data = (base / "whole.png").read_bytes()
    (base / "truncated.png").write_bytes(data[: len(data) // 2])
    damaged = bytearray(data)  # same length, header intact, pixel data fails its checksum
    damaged[data.index(b"IDAT") + 20] ^= 0xFF
    (base / "bad_crc.png").write_bytes(bytes(damaged))
    lines = [
        json.dumps({"image": "images/a.png", "prompt": "good one"}),  # 1
        json.dumps({"image": "images/missing.png", "prompt": "x"}),  # 2
        json.dumps({"image": "broken.png", "prompt": "x"}),  # 3
        json.dumps({"image": "images/a.png"}),  # 4
        json.dumps({"image": "images/a.png", "prompt": 7}),  # 5
        json.dumps({"image": "images/a.png", "prompt": "x", "template_inputs": [1, 2]}),  # 6
        '{"image": "images/a.png", "prompt": ',  # 7
        "",  # 8: blank lines are not rows
        json.dumps({"image": "images/c.png", "prompt": "good two"}),  # 9
        json.dumps({"image": "images/a.png", "prompt": "x", "template_inputs": {"depth": "gone.png"}}),  # 10
        json.dumps({"image": "truncated.png", "prompt": "x"}),  # 11
        json.dumps({"image": "images/a.png", "prompt": "x", "edit_image": ["edits/nope.jpg"]}),  # 12
        json.dumps(["not", "an", "object"]),  # 13
        json.dumps({"image": "images/a.png", "prompt": "x", "template_inputs": "{broken"}),  # 14
        json.dumps({"image": "bad_crc.png", "prompt": "x"}),  # 15
    ]
    expected = {
        2: "image file not found",
        3: "not a readable image",
        4: "missing 'prompt'",
        5: "'prompt' must be a string, got number",
        6: "template_inputs must be a JSON object, got list",
        7: "malformed JSON",
        10: "template_inputs['depth'] file not found",
        11: "not a readable image",
        12: "edit_image file not found",
        13: "expected an object",
        14: "template_inputs is not valid JSON",
        15: "not a readable image",
    }
    return lines, expected


def test_each_bad_row_kind_is_reported_with_its_line(base: Path, caplog) -> None:
    lines, expected = _bad_jsonl_lines(base)
    path = base / "metadata.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        report = read_metadata(path, base)
    assert [s.prompt for s in report.samples] == ["good one", "good two"]
    assert [(s.index, s.line) for s in report.samples] == [(0, 1), (1, 9)]
    assert [bad.line for bad in report.bad_rows] == sorted(expected)
    for bad in report.bad_rows:
        assert expected[bad.line] in bad.reason, bad
    assert report.num_rows == 14
    # the warning lists every bad row with its line
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for line in expected:
        assert f"line {line}:" in warning


def test_policy_error_raises_once_listing_every_bad_row(base: Path) -> None:
    lines, expected = _bad_jsonl_lines(base)
    path = base / "metadata.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(DatasetError) as info:
        read_metadata(path, base, on_bad_row="error")
    message = str(info.value)
    for line, reason in expected.items():
        assert f"line {line}: " in message and reason in message
    assert "line 1:" not in message and "line 9:" not in message
    with pytest.raises(ValueError, match="on_bad_row"):
        read_metadata(path, base, on_bad_row="ignore")


def test_json_list_bad_rows_report_the_line_their_object_starts_on(base: Path) -> None:
    rows = [
        {"image": "images/a.png", "prompt": "good"},
        {"image": "images/missing.png", "prompt": "x"},
        "not an object",
        {"image": "images/a.png", "prompt": None, "template_inputs": {"k": [1, 2, 3]}},
        {"image": "images/c.png", "prompt": "good too", "edit_image": ["edits/a_src.png"]},
    ]
    path = base / "metadata.json"
    text = json.dumps(rows, indent=2)
    path.write_text(text)
    # independent oracle: with indent=2 every element opens on a line indented by exactly two spaces
    starts = [i for i, line in enumerate(text.split("\n"), start=1) if line.startswith(("  {", '  "'))]
    assert len(starts) == len(rows)
    report = read_metadata(path, base)
    assert [s.line for s in report.samples] == [starts[0], starts[4]]
    assert report.bad_rows == [
        BadRow(starts[1], f"image file not found: {base / 'images' / 'missing.png'}"),
        BadRow(starts[2], "row is a JSON str, expected an object"),
        BadRow(starts[3], "missing 'prompt'"),
    ]


def test_csv_bad_rows_use_physical_lines(base: Path) -> None:
    (base / "broken.jpg").write_bytes(b"\xff\xd8 garbage")
    text = (
        "image,prompt,edit_image,template_inputs\n"  # 1
        'images/a.png,"a prompt that\nspans two lines",,\n'  # 2-3
        'images/a.png,x,,"{not json"\n'  # 4
        'images/a.png,x,,"[1, 2]"\n'  # 5
        "\n"  # 6: blank
        "images/a.png,x,too,many,fields\n"  # 7
        "broken.jpg,x,,\n"  # 8
        'images/c.png,"good, with comma","[""edits/a_src.png""]","{""s"": 1}"\n'  # 9
        "images/b.jpg,single edit,edits/a_src2.jpg,\n"  # 10
    )
    path = base / "metadata.csv"
    path.write_text(text)
    report = read_metadata(path, base)
    assert [(s.line, s.prompt) for s in report.samples] == [
        (2, "a prompt that\nspans two lines"),
        (9, "good, with comma"),
        (10, "single edit"),
    ]
    assert report.samples[1].edit_images == [base / "edits" / "a_src.png"]
    assert report.samples[1].template_inputs == {"s": 1}
    assert report.samples[2].edit_images == [base / "edits" / "a_src2.jpg"]
    reasons = {bad.line: bad.reason for bad in report.bad_rows}
    assert sorted(reasons) == [4, 5, 7, 8]
    assert "template_inputs is not valid JSON" in reasons[4]
    assert "template_inputs must be a JSON dict, got list" in reasons[5]
    assert "has 5 fields but the header has 4" in reasons[7]
    assert "not a readable image" in reasons[8]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("metadata.json", '{"image": "images/a.png", "prompt": "x"}', "rename it to .jsonl"),
        ("metadata.json", '[{"image": "images/a.png", "prompt": "x"},\n {"image": }]', "line 2"),
        ("metadata.json", '[{"image": "images/a.png", "prompt": "x"}] trailing', "extra data"),
        (
            "metadata.csv",
            "image,caption\nimages/a.png,x\n",
            re.escape("lacks the required columns ['prompt']"),
        ),
        ("metadata.csv", "", "is empty"),
        ("metadata.yaml", "- image: a.png", "unknown metadata format"),
        ("metadata.jsonl", '{"image": "nope.png", "prompt": "x"}\n', "no usable rows"),
    ],
)
def test_unusable_files_raise_naming_the_file(base: Path, name: str, content: str, message: str) -> None:
    path = base / name
    path.write_text(content)
    with pytest.raises(DatasetError, match=message) as info:
        read_metadata(path, base)
    assert str(path) in str(info.value)


def test_missing_metadata_file_and_base_path(base: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        read_metadata(tmp_path / "nope.jsonl", base)
    path = _write(tmp_path / "m.jsonl", ROWS, "jsonl")
    with pytest.raises(DatasetError, match="not a folder"):
        read_metadata(path, tmp_path / "no-such-dir")


# ---------------------------------------------------------------------------------------------------
# sizes and buckets
# ---------------------------------------------------------------------------------------------------


def _dominated(result: tuple[int, int], width: int, height: int, budget: int, multiple: int = 16) -> bool:
    """Brute force: is there a grid size within budget that is both larger and at least as close in aspect?"""
    log_aspect = math.log(width / height)
    area, error = result[0] * result[1], abs(math.log(result[0] / result[1]) - log_aspect)
    for w in range(multiple, budget // multiple + 1, multiple):
        for h in range(multiple, budget // w + 1, multiple):
            if w * h > area and abs(math.log(w / h) - log_aspect) <= error - 1e-12:
                return True
    return False


@pytest.mark.parametrize("budget", [256 * 256, 512 * 512, 1024 * 1024])
@pytest.mark.parametrize(
    "size", [(1000, 1000), (4000, 3000), (1920, 1080), (1080, 1920), (1700, 1000), (37, 91)]
)
def test_fit_to_pixel_budget(size: tuple[int, int], budget: int) -> None:
    w, h = fit_to_pixel_budget(*size, budget)
    assert w % 16 == 0 and h % 16 == 0 and w * h <= budget
    assert w * h >= 0.9 * budget  # moderate aspect ratios use most of the budget
    assert abs(math.log(w / h) - math.log(size[0] / size[1])) < 0.06  # within a few % of the aspect
    if budget <= 512 * 512:
        assert not _dominated((w, h), *size, budget)


def test_fit_to_pixel_budget_edge_cases() -> None:
    assert fit_to_pixel_budget(512, 512, 1024 * 1024) == (1024, 1024)  # small images scale up
    # 48x16 (exact 3:1) and 56x16 (larger, more cropped) score the same: the closer aspect wins
    assert fit_to_pixel_budget(3, 1, 32 * 32, multiple=8) == (48, 16)
    w, h = fit_to_pixel_budget(100, 10000, 64 * 64)  # extreme aspect: clamps to one tile wide
    assert (w, h) == (16, 256)
    with pytest.raises(ValueError, match="below one"):
        fit_to_pixel_budget(10, 10, 100)


def test_buckets_and_assignment() -> None:
    budget = 512 * 512
    buckets = make_buckets(budget, aspect_range=(0.5, 2.0), num_aspects=9)
    assert (512, 512) in buckets and len(buckets) == 9
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0 and 0.9 * budget <= w * h <= budget
        assert (h, w) in buckets  # symmetric
        assert 0.5 * 0.95 <= w / h <= 2.0 * 1.05
    aspects = [w / h for w, h in buckets]
    assert aspects == sorted(aspects)
    assert assign_bucket(1000, 1000, buckets) == (512, 512)
    assert assign_bucket(2000, 1000, buckets) == buckets[-1]
    assert assign_bucket(100, 5000, buckets) == buckets[0]  # beyond the range: the most extreme bucket
    # nearest in log aspect: 1.1 is closer to 2.0 than to 0.5 in log space (but not linearly)
    assert assign_bucket(110, 100, [(32, 64), (64, 32)]) == (64, 32)
    w, h = assign_bucket(1600, 1200, buckets)
    assert abs(math.log(w / h) - math.log(4 / 3)) < 0.1


def _bucketed_sizes() -> list[tuple[int, int]]:
    sizes = [(64, 32)] * 7 + [(32, 64)] * 5 + [(48, 48)] * 3 + [(16, 128)]
    random.Random(0).shuffle(sizes)
    return sizes


def _epoch(sampler: BucketBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_bucket_sampler_covers_every_sample_once_across_ranks(batch_size: int, replicas: int) -> None:
    sizes = _bucketed_sizes()
    for epoch in (0, 1):
        seen = []
        shares = []
        for rank in range(replicas):
            sampler = BucketBatchSampler(sizes, batch_size, seed=5, num_replicas=replicas, rank=rank)
            batches = _epoch(sampler, epoch)
            assert len(batches) == len(sampler)
            shares.append(len(batches))
            for batch in batches:
                assert 1 <= len(batch) <= batch_size
                assert len({sizes[i] for i in batch}) == 1  # one bucket per batch
            seen += [i for batch in batches for i in batch]
        assert sorted(seen) == list(range(len(sizes)))  # exactly once
        if batch_size > 1:  # with batch size 1 there is nothing to split: 16 samples cannot split 3 ways
            assert len(set(shares)) == 1  # ranks stay in lockstep
        assert max(shares) - min(shares) <= 1


def test_bucket_sampler_is_deterministic_per_seed_and_epoch() -> None:
    sizes = _bucketed_sizes()

    def run(seed: int, epoch: int) -> list[list[int]]:
        return _epoch(BucketBatchSampler(sizes, 2, seed=seed), epoch)

    assert run(1, 0) == run(1, 0)
    assert run(1, 3) == run(1, 3)
    assert run(1, 0) != run(1, 1)
    assert run(1, 0) != run(2, 0)
    ordered = _epoch(BucketBatchSampler(sizes, 2, shuffle=False), 0)
    assert ordered == _epoch(BucketBatchSampler(sizes, 2, shuffle=False), 7)
    assert all(batch == sorted(batch) for batch in ordered)


def test_bucket_sampler_drop_last_and_uneven_fallback(caplog) -> None:
    sizes = _bucketed_sizes()
    for rank in range(2):
        sampler = BucketBatchSampler(sizes, 3, seed=0, drop_last=True, num_replicas=2, rank=rank)
        batches = list(sampler)
        assert all(len(b) == 3 for b in batches) and len(batches) == len(sampler) == 2
    # 3 samples, batch 1, 2 ranks: nothing to split, so ranks differ by one batch; nothing repeats
    with caplog.at_level(logging.WARNING):
        shares = [list(BucketBatchSampler([(16, 16)] * 3, 1, num_replicas=2, rank=r)) for r in range(2)]
    assert sorted(i for share in shares for b in share for i in b) == [0, 1, 2]
    assert [len(s) for s in shares] == [2, 1]
    assert "ranks are uneven" in caplog.text
    with pytest.raises(ValueError, match="no batch"):
        BucketBatchSampler([(16, 16)] * 3, 4, drop_last=True)


# ---------------------------------------------------------------------------------------------------
# the Dataset
# ---------------------------------------------------------------------------------------------------


def test_dataset_items_batches_and_seeds(base: Path, tmp_path: Path) -> None:
    rows = ROWS + [{"image": "images/a.png", "prompt": f"copy {i}"} for i in range(3)]
    config = DatasetConfig(max_pixels=32 * 32, seed=123)
    forward = TemplateDataset.from_report(
        read_metadata(_write(tmp_path / "f.jsonl", rows, "jsonl"), base), config
    )
    backward = TemplateDataset.from_report(
        read_metadata(_write(tmp_path / "b.csv", rows[::-1], "csv"), base), config
    )
    item = forward[0]
    assert set(item) == {"id", "image", "prompt", "edit_images", "template_inputs", "seed"}
    assert item["image"].mode == "RGB" and item["image"].size == forward.sizes[0]
    assert [im.size for im in item["edit_images"]] == [forward.sizes[0]]
    assert forward.sizes[0] in forward.buckets and forward.sizes[1] in forward.buckets

    # seeds depend on the sample, not on its position, format or rank
    seeds = {forward[i]["id"]: forward[i]["seed"] for i in range(len(forward))}
    assert seeds == {backward[i]["id"]: backward[i]["seed"] for i in range(len(backward))}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds.values())
    assert sample_seed(item["id"], 124) != item["seed"]

    collected = {}
    for rank in range(2):
        loader = DataLoader(
            forward,
            batch_sampler=forward.batch_sampler(2, num_replicas=2, rank=rank),
            collate_fn=collate_as_lists,
        )
        for batch in loader:
            assert len({im.size for im in batch["image"]}) == 1
            collected.update(zip(batch["id"], batch["seed"]))
    assert collected == seeds

    # without buckets every image gets its own budget size
    free = TemplateDataset(forward.samples, DatasetConfig(max_pixels=32 * 32, buckets=False))
    assert free.buckets is None
    assert free.sizes == [fit_to_pixel_budget(*s.size, 32 * 32) for s in forward.samples]
    assert free[1]["image"].size == free.sizes[1]
    original = TemplateDataset(forward.samples, DatasetConfig(max_pixels=32 * 32, condition_size="original"))
    assert [im.size for im in original[1]["edit_images"]] == [(64, 48), (64, 48)]


def test_image_lost_after_indexing_raises_naming_file_and_line(base: Path, tmp_path: Path) -> None:
    path = _write(tmp_path / "metadata.jsonl", ROWS, "jsonl")
    report = read_metadata(path, base)
    dataset = TemplateDataset.from_report(report, DatasetConfig(max_pixels=32 * 32))
    (base / "images" / "b.jpg").unlink()
    data = (base / "maps" / "depth_a.png").read_bytes()
    (base / "maps" / "depth_a.png").write_bytes(data[:40])  # damaged after indexing
    for index, name, line in ((1, "b.jpg", 2), (0, "depth_a.png", 1)):
        with pytest.raises(SampleLoadError) as info:
            dataset[index]
        err = info.value
        assert isinstance(err, DatasetError)
        assert name in str(err) and f"line {line}" in str(err) and str(path) in str(err)
        assert err.line == line and err.sample_id == report.samples[index].id and err.path.name == name
    assert dataset[2]["image"].size == dataset.sizes[2]  # the others still load
    # DataLoader workers rebuild exceptions from the message alone
    assert str(SampleLoadError("just a message")) == "just a message"


# ---------------------------------------------------------------------------------------------------
# image modes and EXIF
# ---------------------------------------------------------------------------------------------------


def _rgb_at(image: Image.Image, x: int, y: int) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)[y, x]


def test_modes_load_as_rgb_of_the_requested_size(tmp_path: Path) -> None:
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[:, :16] = (255, 0, 0, 0)  # fully transparent red: must become the white background
    rgba[:, 16:] = (0, 0, 255, 255)
    paths = {
        "RGBA": _save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png"),
        "LA": _save(Image.new("LA", (40, 30), (80, 255)), tmp_path / "la.png"),
        "L": _save(Image.new("L", (40, 30), 80), tmp_path / "l.png"),
        "P": _save(_noise(40, 30, 7).quantize(16), tmp_path / "p.png"),
        "P+transparency": _save(Image.fromarray(rgba, "RGBA").quantize(4), tmp_path / "pt.png"),
        "CMYK": _save(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), tmp_path / "cmyk.jpg"),
        "I;16": _save(Image.fromarray(np.full((30, 40), 128 * 257, dtype=np.uint16)), tmp_path / "i16.png"),
        "RGB": _save(_noise(40, 30, 8), tmp_path / "rgb.jpg"),
    }
    for mode, path in paths.items():
        for size in ((16, 16), (32, 48), (48, 16)):
            image = load_and_crop(path, size)
            assert image.mode == "RGB" and image.size == size, mode
    rgba_out = load_and_crop(paths["RGBA"], (32, 32))
    assert (_rgb_at(rgba_out, 2, 16) >= 250).all() and tuple(_rgb_at(rgba_out, 29, 16)) == (0, 0, 255)
    assert tuple(_rgb_at(load_and_crop(paths["LA"], (16, 16)), 8, 8)) == (80, 80, 80)
    assert tuple(_rgb_at(load_and_crop(paths["I;16"], (16, 16)), 8, 8)) == (128, 128, 128)
    red = _rgb_at(load_and_crop(paths["CMYK"], (16, 16)), 8, 8)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    palette = np.asarray(load_image(paths["P"]), dtype=np.int16)
    assert np.abs(palette - np.asarray(Image.open(paths["P"]).convert("RGB"), dtype=np.int16)).max() == 0


def test_exif_orientation_is_applied_everywhere(tmp_path: Path) -> None:
    stored = np.zeros((40, 60, 3), dtype=np.uint8)  # 60 wide, 40 tall as stored
    stored[:, :30] = (255, 0, 0)
    stored[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored left edge becomes the top
    path = tmp_path / "images" / "rotated.jpg"
    path.parent.mkdir()
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)

    upright = load_image(path)
    assert upright.size == (40, 60)
    top, bottom = _rgb_at(upright, 20, 5), _rgb_at(upright, 20, 54)
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    cropped = load_and_crop(path, (16, 32))
    assert cropped.size == (16, 32) and _rgb_at(cropped, 8, 2)[0] > 200 and _rgb_at(cropped, 8, 29)[2] > 200

    meta = _write(tmp_path / "m.jsonl", [{"image": "images/rotated.jpg", "prompt": "p"}], "jsonl")
    sample = read_metadata(meta, tmp_path).samples[0]
    assert sample.size == (40, 60)  # buckets see the displayed shape
    dataset = TemplateDataset([sample], DatasetConfig(max_pixels=32 * 32))
    w, h = dataset.sizes[0]
    assert h > w and dataset[0]["image"].size == (w, h)
