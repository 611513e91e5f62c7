"""Hardening of template folders (issue 20): template.json is validated in one place, every file it
names stays inside the folder, non-finite weights are refused, save_template_folder never replaces a
user's folder, and the same weights give the same numbers whatever file holds them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffsynth_templates.errors import DiffSynthTemplatesError
from diffsynth_templates.loading.finite import NonFiniteError
from diffsynth_templates.loading.paths import PathContainmentError
from diffsynth_templates.loading.write_safety import MARKER, UnsafeOutputError
from diffsynth_templates.templates import TemplateError, TemplatePipeline, TemplateSpec
from diffsynth_templates.templates.folder import (
    TemplateJSONError,
    is_template_output,
    load_template_folder,
    save_template_folder,
)
from diffsynth_templates.templates.registry import ArchitectureConfigError, build_architecture
from diffsynth_templates.templates.residency import HostStore
from tests.templates.helpers import ScalarKV, ScalarKVConfig, save_declarative, write_diffsynth_folder

BRIGHTNESS = Path(__file__).resolve().parents[2] / "models" / "toy" / "templates" / "brightness"


@pytest.fixture
def folder(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_declarative(tmp_path / "t", ScalarKV(ScalarKVConfig()))


def edit(folder: Path, **changes) -> None:
    data = json.loads((folder / "template.json").read_text())
    data.update(changes)
    (folder / "template.json").write_text(json.dumps(data))


def load_both_ways(folder: Path):
    """load_template_folder and TemplatePipeline.from_pretrained must fail the same (clear) way."""
    with pytest.raises(DiffSynthTemplatesError) as direct:
        load_template_folder(folder)
    with pytest.raises(DiffSynthTemplatesError):
        TemplatePipeline.from_pretrained([str(folder)], host_store=HostStore())
    return direct.value


# --- case 3: wrong types name the key and the expected type ----------------------------------------


@pytest.mark.parametrize(
    "changes, key, expected",
    [
        ({"format_version": "2"}, "format_version", "an integer"),
        ({"format_version": True}, "format_version", "an integer"),
        ({"format_version": 0}, "format_version", "an integer"),
        ({"weights": [1]}, "weights", "list of file names"),
        ({"weights": []}, "weights", "non-empty list"),
        ({"weights": {"a": 1}}, "weights", "list of file names"),
        ({"inputs": "scale"}, "inputs", "a list of input field objects"),
        ({"inputs": [{"name": "scale", "type": "double"}]}, "inputs[0].type", "one of"),
        ({"inputs": [{"name": "scale", "minimum": "0"}]}, "inputs[0].minimum", "a finite number"),
        ({"inputs": [{"name": "scale", "type": "float", "default": "x"}]}, "inputs[0]", "must be a number"),
        ({"inputs": [{"name": "scale", "colour": 1}]}, "inputs[0]", "unknown key"),
        ({"inputs": [5]}, "inputs[0]", "an object"),
        ({"data_processor": ["brightness"]}, "data_processor", "an object"),
        (
            {"data_processor": {"name": "brightness", "config": ["rec709"]}},
            "data_processor.config",
            "an object",
        ),
        ({"data_processor": {"name": "nope"}}, "data_processor", "unknown data processor"),
        (
            {"data_processor": {"name": "brightness", "config": {"standard": 5}}},
            "data_processor",
            "brightness",
        ),
        ({"data_processor": {"name": "brightness", "config": {"colour": 1}}}, "data_processor", "no option"),
        ({"architecture": ["test_scalar_kv"]}, "architecture", "a string"),
        ({"architecture": "nope"}, "nope", "built-in architectures"),
        ({"config": [1, 2]}, "config", "an object"),
        ({"config": {"heads": "2"}}, "heads", "an integer"),
        ({"config": {"heads": 2.5}}, "heads", "an integer"),
        ({"config": {"block_names": "single_0"}}, "block_names", "a list"),
        ({"config": {"block_names": [1]}}, "block_names", "a list"),
        ({"config": {"colour": 1}}, "colour", "config field"),
        ({"name": 5}, "name", "a string or null"),
        ({"cache_keys": "kv_cache"}, "cache_keys", "a list of strings"),
        ({"description": ["x"]}, "description", "a string"),
        ({"sha256": ["abc"]}, "sha256", "an object"),
    ],
)
def test_wrong_types_are_template_errors_naming_the_key(folder, changes, key, expected):
    edit(folder, **changes)
    error = load_both_ways(folder)
    assert isinstance(error, TemplateError) or "data_processor" not in changes, error
    assert key in str(error) and expected in str(error), str(error)
    assert str(folder / "template.json") in str(error) or key == "nope"


def test_value_kv_config_types_and_values(tmp_path):
    for config, key in [
        ({"dim": "192"}, "dim"),
        ({"ranges": [[0, "x"]]}, "ranges"),
        ({"num_heads": 0}, "num_heads"),
    ]:
        with pytest.raises(ArchitectureConfigError, match=key):
            build_architecture("value_kv", {"values": ["scale"], "block_names": ["single_0"], **config})
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ArchitectureConfigError, match="a finite number"):
            build_architecture("image_kv", {"rope_theta": bad})


@pytest.mark.parametrize(
    "content, says",
    [
        (b"\xff\xfe{\x00", "not UTF-8"),
        (b'{"architecture": "test_scalar_kv", ', "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b'{"config": {}}', "no 'architecture' key"),
        (b"[" * 100000 + b"]" * 100000, "not valid JSON"),
        (b'{"architecture": "test_scalar_kv", "format_version": 1' + b"0" * 5000 + b"}", "not valid JSON"),
    ],
    ids=["non-utf8", "truncated", "list", "null", "no-architecture", "deep", "huge-int"],
)
def test_unreadable_template_json_names_the_file(folder, content, says):
    (folder / "template.json").write_bytes(content)
    error = load_both_ways(folder)
    assert (
        isinstance(error, TemplateJSONError)
        and says in str(error)
        and str(folder / "template.json") in str(error)
    )


# --- case 2: containment -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry", ["../../x.safetensors", "ABS", "link.safetensors", "sub/../../x.safetensors"]
)
def test_weights_outside_the_folder_are_refused(folder, tmp_path, entry):
    outside = tmp_path / "x.safetensors"
    outside.write_bytes((folder / "model.safetensors").read_bytes())
    (tmp_path / "t" / "sub").mkdir()
    if entry == "ABS":
        entry = str(outside)
    elif entry == "link.safetensors":
        os.symlink(outside, folder / entry)
    edit(folder, weights=[entry])
    error = load_both_ways(folder)
    assert isinstance(error, PathContainmentError) and repr(entry) in str(error)


def test_template_json_symlinked_from_outside_is_refused(folder, tmp_path):
    real = tmp_path / "elsewhere.json"
    (folder / "template.json").rename(real)
    os.symlink(real, folder / "template.json")
    assert isinstance(load_both_ways(folder), PathContainmentError)


@pytest.mark.parametrize("path", ["ABS", "'../x.safetensors'", "['model.safetensors', 3]", "{'a': 1}"])
def test_diffsynth_template_model_path_outside_is_refused(tmp_path, path):
    from diffsynth_templates.pipelines.random_init import random_flux2_pipeline

    src = write_diffsynth_folder(tmp_path / "ds", random_flux2_pipeline().dit)
    outside = tmp_path / "x.safetensors"
    outside.write_bytes((src / "model.safetensors").read_bytes())
    if path == "ABS":
        path = repr(str(outside))
    code = (src / "model.py").read_text().replace('TEMPLATE_MODEL_PATH = "model.safetensors"', "")
    (src / "model.py").write_text(code + f"\nTEMPLATE_MODEL_PATH = {path}\n")
    with pytest.raises(DiffSynthTemplatesError, match="TEMPLATE_MODEL_PATH"):
        load_template_folder(src, trust_remote_code=True)


# --- finite weights ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_file_and_tensors(folder, bad):
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["proj.single_0.bias"][3] = bad
    save_file(tensors, str(folder / "model.safetensors"))
    error = load_both_ways(folder)
    assert isinstance(error, NonFiniteError)
    assert (
        "model.safetensors" in str(error) and "proj.single_0.bias" in str(error) and str(folder) in str(error)
    )


# --- case 1: save_template_folder through write_folder -----------------------------------------------


def test_save_template_folder_never_replaces_a_user_folder(tmp_path):
    model = ScalarKV(ScalarKVConfig())
    spec = lambda: TemplateSpec("test_scalar_kv")  # noqa: E731 - it is edited by each save

    # a path that does not exist yet (what training/checkpoint.py passes) is created
    new = save_template_folder(tmp_path / "run" / ".checkpoint-1.partial", model, spec())
    assert (new / "template.json").is_file() and (new / MARKER).is_file()
    load_template_folder(new)

    # ours: replaced only with overwrite=True
    with pytest.raises(UnsafeOutputError, match="already exists; pass --overwrite"):
        save_template_folder(new, model, spec())
    save_template_folder(new, model, spec(), overwrite=True)

    # a user's folder with a template.json and other files: never, even with overwrite
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "template.json").write_text("{}")
    (mine / "notes.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(UnsafeOutputError, match="not written by diffsynth_templates"):
            save_template_folder(mine, model, spec(), overwrite=overwrite)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "template.json"]

    # the cwd, '.', and an empty folder
    os.chdir(tmp_path)
    try:
        for out in (".", tmp_path):
            with pytest.raises(UnsafeOutputError):
                save_template_folder(out, model, spec(), overwrite=True)
    finally:
        os.chdir(Path(__file__).resolve().parents[2])
    (tmp_path / "empty").mkdir()
    save_template_folder(tmp_path / "empty", model, spec())


def test_folders_written_before_the_marker_are_recognised_only_when_nothing_else_is_in_them(tmp_path):
    old = save_template_folder(tmp_path / "old", ScalarKV(ScalarKVConfig()), TemplateSpec("test_scalar_kv"))
    (old / MARKER).unlink()
    assert is_template_output(old)
    (old / "samples").mkdir()
    (old / "samples" / "a.png").write_bytes(b"png")
    assert is_template_output(old)
    (old / "training_data.csv").write_text("x")
    assert not is_template_output(old)


# --- case 6: the same weights give the same numbers, whatever file holds them ----------------------


def test_same_weights_in_differently_laid_out_files_compute_identically(tmp_path):
    """safetensors hands out views at the file's data offset; unaligned weights took other CPU kernel
    paths (~1e-6 apart). Loaded templates own aligned memory, so the header no longer matters."""
    torch.manual_seed(0)
    model = ScalarKV(ScalarKVConfig(heads=4, head_dim=32, length=16))
    a = save_declarative(tmp_path / "a", model)
    b = save_declarative(tmp_path / "b", model)
    tensors = load_file(str(b / "model.safetensors"))
    for pad in range(1, 9):  # metadata of several lengths: data offsets that are not multiples of 64
        save_file(tensors, str(b / "model.safetensors"), metadata={"pad": "x" * pad})
        loaded = [load_template_folder(f).model for f in (a, b)]
        for m in loaded:
            assert all(p.data_ptr() % 64 == 0 for p in m.parameters())
        features = loaded[0].process_inputs(scale=0.37)
        out = [m(**features)["kv_cache"] for m in loaded]
        assert all(torch.equal(out[0][k][i], out[1][k][i]) for k in out[0] for i in (0, 1))


def test_shipped_brightness_template_still_loads(tmp_path):
    loaded = load_template_folder(BRIGHTNESS)
    assert loaded.spec.architecture == "value_kv" and loaded.kind == "declarative"


def test_sha256_names_outside_the_folder_are_refused_before_hashing(folder, tmp_path):
    from diffsynth_templates.hub.package import VerificationError, verify_package

    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not yours to hash")
    os.symlink(secret, folder / "link.bin")
    for name in ("link.bin", "../secret.bin", str(secret)):
        edit(folder, sha256={name: "0" * 64})
        error = load_both_ways(folder)
        assert isinstance(error, (PathContainmentError, TemplateError)) and "sha256" in str(error)
        with pytest.raises(VerificationError, match="sha256"):
            verify_package(folder)
