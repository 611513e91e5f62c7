"""Low-level file I/O names the file on every failure; loaded weights holding NaN/inf are refused."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from diffsynth_templates.errors import DiffSynthTemplatesError
from diffsynth_templates.loading import (
    CheckpointError,
    find_weight_files,
    iter_tensors,
    load_component,
    read_header_keys,
    save_safetensors_atomic,
    write_json_atomic,
)
from diffsynth_templates.loading.finite import NonFiniteError
from diffsynth_templates.loading.integrity import IntegrityError, verify_sha256
from diffsynth_templates.loading.safetensors_io import load_safetensors


def _linear() -> nn.Linear:
    return nn.Linear(3, 2)


def _write_linear(folder, weight: torch.Tensor | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    weight = torch.ones(2, 3) if weight is None else weight
    save_file({"weight": weight, "bias": torch.zeros(2)}, str(folder / "model.safetensors"))
    return folder / "model.safetensors"


@pytest.mark.parametrize("damage", ["truncated", "garbage header", "a folder"])
def test_unreadable_safetensors_name_the_file_and_keep_the_cause(tmp_path, damage):
    path = _write_linear(tmp_path / "c")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "garbage header":
        path.write_bytes(b"\xff" * 8 + b"not a header at all")
    else:
        path.unlink()
        path.mkdir()
    readers = [
        lambda: load_safetensors(path),
        lambda: read_header_keys([path]),
        lambda: list(iter_tensors([path])),
    ]
    for read in readers:
        with pytest.raises(CheckpointError, match=str(path)) as info:
            read()
        assert isinstance(info.value.__cause__, (SafetensorError, OSError))
        assert isinstance(info.value, DiffSynthTemplatesError)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "nope.safetensors")):
        load_safetensors(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("write", ["safetensors", "json"])
def test_a_full_disk_names_the_target_and_leaves_no_temp_file(tmp_path, monkeypatch, write):
    target = tmp_path / "out" / ("w.safetensors" if write == "safetensors" else "w.json")

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(CheckpointError, match=rf"cannot write '{target}'.*No space left") as info:
        if write == "safetensors":
            save_safetensors_atomic({"a": torch.ones(2)}, target)
        else:
            write_json_atomic({"a": 1}, target)
    assert info.value.__cause__.errno == errno.ENOSPC
    assert list((tmp_path / "out").iterdir()) == []  # neither the temp file nor a half target


def test_a_failing_writer_names_the_target_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import diffsynth_templates.loading.safetensors_io as io

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io, "save_file", half_written)
    target = tmp_path / "w.safetensors"
    with pytest.raises(CheckpointError, match=str(target)):
        save_safetensors_atomic({"a": torch.ones(2)}, target)
    assert list(tmp_path.iterdir()) == []


def test_a_write_into_an_unwritable_place_names_the_target(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file, not a folder")
    with pytest.raises(CheckpointError, match=str(blocker / "x.json")):
        write_json_atomic({}, blocker / "x.json")


@pytest.mark.parametrize(
    "weight_map, message",
    [
        ({"weight": "../outside.safetensors"}, "shards must be file names inside"),
        ({"weight": "/etc/passwd"}, "shards must be file names inside"),
        (["model-1.safetensors"], "must map tensor names to shard file names"),
        ({"weight": 5}, "must map tensor names to shard file names"),
    ],
)
def test_a_bad_shard_index_is_a_checkpoint_error(tmp_path, weight_map, message):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=message):
        find_weight_files(tmp_path, "model")
    (tmp_path / "model.safetensors.index.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(CheckpointError, match="is not a valid safetensors index"):
        find_weight_files(tmp_path, "model")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_loaded_weights_holding_nan_or_inf_are_named(tmp_path, bad):
    weight = torch.ones(2, 3)
    weight[1, 2] = bad
    _write_linear(tmp_path / "c", weight)
    with pytest.raises(NonFiniteError, match=rf"{tmp_path / 'c'}.*weight \(model.safetensors\)"):
        load_component(_linear, tmp_path / "c", stem="model")


def test_weights_out_of_range_for_the_target_dtype_are_named(tmp_path):
    _write_linear(tmp_path / "c", torch.full((2, 3), 1e6))  # finite in float32, inf in float16
    assert torch.equal(load_component(_linear, tmp_path / "c", stem="model").weight, torch.full((2, 3), 1e6))
    with pytest.raises(NonFiniteError, match=r"out of range for torch.float16"):
        load_component(_linear, tmp_path / "c", stem="model", torch_dtype=torch.float16)


def test_recorded_sha256_names_outside_the_folder_are_refused(tmp_path):
    digest = "0" * 64
    for name in ("../model.safetensors", "/etc/passwd"):
        (tmp_path / "template.json").write_text(json.dumps({"sha256": {name: digest}}))
        with pytest.raises(IntegrityError, match="sha256"):
            verify_sha256(tmp_path)
    (tmp_path / "template.json").write_bytes(b"\xff\xfe")
    with pytest.raises(IntegrityError, match="not valid JSON"):
        verify_sha256(tmp_path)
