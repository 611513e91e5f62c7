"""The split modules keep their old import paths, and the one-helper-per-idea helpers (issue 21)."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth_templates.errors import DiffSynthTemplatesError
from diffsynth_templates.loading.image_files import ImageFileError, open_image
from diffsynth_templates.loading.json_io import to_json_value
from diffsynth_templates.loading.tensor_tree import detached_cpu, map_tensors, move_tensors
from diffsynth_templates.templates.cache import to_device
from diffsynth_templates.training.config import ConfigError
from diffsynth_templates.training.dataset import read_metadata
from diffsynth_templates.training.validation import check_validation_images

# old module -> the modules its jobs moved to; every public name must still import from the old one
SPLITS = {
    "diffsynth_templates.training.dataset": (
        "samples", "metadata", "rows", "images", "buckets",
    ),
    "diffsynth_templates.training.feature_cache": ("cache_index", "content_store", "cache_writer"),
    "diffsynth_templates.templates.processors": ("conditions",),
}  # fmt: skip


@pytest.mark.parametrize("old", sorted(SPLITS))
def test_old_import_paths_reexport_the_same_objects(old):
    module = importlib.import_module(old)
    package = old.rsplit(".", 1)[0]
    for name in module.__all__:
        value = getattr(module, name)
        homes = [importlib.import_module(f"{package}.{m}") for m in SPLITS[old]]
        for home in homes:
            if hasattr(home, name):
                assert getattr(home, name) is value, f"{old}.{name} is not {home.__name__}.{name}"


def test_dataset_keeps_every_name_it_exported_before_the_split():
    from diffsynth_templates.training import dataset

    before = {  # the public names of training/dataset.py before the split
        "IMAGE_EXTENSIONS", "KNOWN_FIELDS", "FORMATS", "BadRowPolicy", "Size", "DatasetError",
        "SampleLoadError", "BadRow", "Sample", "MetadataReport", "sample_seed", "read_metadata",
        "fit_to_pixel_budget", "to_rgb", "cover_crop", "load_image", "load_and_crop", "make_buckets",
        "assign_bucket", "BucketBatchSampler", "DatasetConfig", "TemplateDataset", "collate_as_lists",
    }  # fmt: skip
    assert before <= set(dataset.__all__)


def test_sample_ids_are_unchanged_by_the_split(tmp_path):
    """Ids are content hashes over paths relative to the base: pinned to the value before the split."""
    (tmp_path / "sub").mkdir()
    for name in ("a", "b", "sub/c"):
        Image.new("RGB", (40, 30), "red").save(tmp_path / f"{name}.png")
    rows = [
        {
            "image": "a.png",
            "prompt": "x",
            "edit_image": ["b.png", "sub/c.png"],
            "template_inputs": {"depth": "sub/c.png", "s": 0.5, "l": [1, "b.png", {"q": None}]},
        },
        {"image": "b.png", "prompt": ""},
    ]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    report = read_metadata(tmp_path / "m.json")
    assert [s.id for s in report.samples] == ["abbbfc583ee3b736", "4d6977e7f52f7733"]


# --- the tensor-tree mover ------------------------------------------------------------------------


def test_move_tensors_casts_only_floating_tensors_and_keeps_the_tree():
    tree = {"k": [torch.ones(2), (torch.arange(3), "name")], "n": 3, "mask": torch.tensor([True])}
    moved = move_tensors(tree, "cpu", torch.float16)
    assert moved["k"][0].dtype == torch.float16
    assert moved["k"][1][0].dtype == torch.int64 and isinstance(moved["k"][1], tuple)
    assert moved["k"][1][1] == "name" and moved["n"] == 3 and moved["mask"].dtype == torch.bool
    assert move_tensors(tree)["k"][0] is tree["k"][0]  # nothing asked: tensors are not copied


def test_template_cache_to_device_is_the_shared_mover():
    cache = {"kv": ((torch.ones(1, 2), torch.zeros(1, 2)),), "ids": torch.arange(2)}
    a, b = to_device(cache, torch.device("cpu"), torch.bfloat16), move_tensors(cache, "cpu", torch.bfloat16)
    assert a["kv"][0][0].dtype == b["kv"][0][0].dtype == torch.bfloat16 and a["ids"].dtype == torch.int64


def test_detached_cpu_and_map_tensors():
    x = torch.ones(2, 3, requires_grad=True) * 2
    out = detached_cpu({"x": [x.t()]})
    assert not out["x"][0].requires_grad and out["x"][0].is_contiguous()
    assert map_tensors([torch.ones(1), 5], lambda t: t + 1)[0].item() == 2.0


# --- the JSON converter ---------------------------------------------------------------------------


@dataclass
class _Config:
    size: tuple[int, int] = (3, 4)
    path: Path = Path("/data/x/y.png")
    extra: dict = field(default_factory=lambda: {"scale": np.float64(0.5), "n": np.int64(2)})


def test_to_json_value_converts_containers_paths_dataclasses_and_numbers():
    value = to_json_value(_Config(), base=Path("/data"))
    assert value == {"size": [3, 4], "path": "x/y.png", "extra": {"scale": 0.5, "n": "2"}}
    assert type(value["extra"]["scale"]) is float
    assert to_json_value(Path("/elsewhere/a.png"), base=Path("/data")) == "/elsewhere/a.png"
    json.dumps(value)  # really JSON


def test_to_json_value_fallbacks():
    assert to_json_value({"s": {1, 2}}, fallback=list) == {"s": [1, 2]}
    assert to_json_value([torch.float16]) == ["torch.float16"]
    image = Image.new("RGB", (1, 1))
    assert to_json_value({"i": image}, fallback=None)["i"] is image  # kept for a caller that checks later
    assert to_json_value([{"i": image, "t": (1,)}], fallback=lambda v: f"<{type(v).__name__}>") == [
        {"i": "<Image>", "t": [1]}
    ]


# --- the image-path loader ------------------------------------------------------------------------


def test_open_image_converts_and_names_bad_files(tmp_path):
    Image.new("RGBA", (4, 3), (1, 2, 3, 0)).save(tmp_path / "a.png")
    Image.new("L", (4, 3), 7).save(tmp_path / "m.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert open_image(tmp_path / "a.png").mode == "RGB"
    assert open_image(tmp_path / "m.png", mode=None).mode == "L"  # masks keep their mode
    with pytest.raises(ImageFileError, match=r"--input_image '.*missing.png' does not exist"):
        open_image(tmp_path / "missing.png", "--input_image")
    with pytest.raises(ImageFileError, match="cannot be read; it is not a readable image") as caught:
        open_image(tmp_path / "bad.png")
    assert isinstance(caught.value, DiffSynthTemplatesError)


def test_validation_inputs_with_a_missing_image_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--validation_inputs image .*nope.png"):
        check_validation_images([{"template_inputs": {"image": str(tmp_path / "nope.png")}}])
