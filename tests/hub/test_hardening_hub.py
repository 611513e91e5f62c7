"""Hardening of ``python -m diffsynth_templates`` (issue 20): no user file is ever deleted, no file
outside a folder is read or packaged, bad flags are clear errors (exit 2, no traceback)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffsynth_templates.__main__ import main
from diffsynth_templates.hub.convert import convert_diffsynth_folder
from diffsynth_templates.hub.package import PackageError, package_template, parse_size
from diffsynth_templates.hub.upload import OfflineError, upload_package
from diffsynth_templates.loading.paths import PathContainmentError
from diffsynth_templates.loading.write_safety import MARKER, UnsafeOutputError
from tests.hub.test_hub import REPO, TOKEN, write_value_folder
from tests.templates.helpers import ScalarKV, ScalarKVConfig, save_declarative


def tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones, links, folders too) -> its content hash: "untouched"."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    return save_declarative(tmp_path / "work" / "checkpoint", ScalarKV(ScalarKVConfig()))


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A working folder holding a DiffSynth-format source and a user's file next to it (the cwd)."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    src = write_value_folder(work / "brightness")
    (work / "notes.txt").write_text("my notes")
    monkeypatch.chdir(work)
    return work, src


def refused(argv: list[str], capsys, *must_say: str) -> str:
    """Run the CLI, expect exit 2 and ``error: ...`` on stderr (no traceback); return the message."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for text in must_say:
        assert text in err, err
    return err


# --- case 1: convert/publish never replace what they did not write --------------------------------


@pytest.mark.parametrize(
    "out",
    [
        lambda work, src: str(work),  # --out "$PWD"
        lambda work, src: ".",  # used to fail with "PosixPath('.') has an empty name"
        lambda work, src: str(src.parent),  # the source's parent (here also the cwd)
        lambda work, src: str(src),  # the source itself
        lambda work, src: str(src / "inside"),  # inside the source
        lambda work, src: str(Path.home()),
        lambda work, src: "/",
    ],
    ids=["cwd", "dot", "parent", "source", "inside-source", "home", "root"],
)
def test_convert_refuses_unsafe_out_and_changes_nothing(out, workspace, capsys):
    work, src = workspace
    before = tree(work)
    path = out(work, src)
    refused(
        ["convert", str(src), "--out", path, "--overwrite"],
        capsys,
        "names no new folder" if path in (".", "/") else "refusing to write",
    )
    assert tree(work) == before  # the source, its neighbours and the cwd byte for byte


def test_convert_source_parent_outside_cwd(tmp_path, capsys, monkeypatch):
    """--out = the source's parent when that parent is not the cwd: refused as the source's parent."""
    monkeypatch.chdir(tmp_path)
    parent = tmp_path / "models"
    src = write_value_folder(parent / "brightness")
    (parent / "other.txt").write_text("keep")
    before = tree(parent)
    refused(["convert", str(src), "--out", str(parent), "--overwrite"], capsys, "contains the source")
    assert tree(parent) == before


def test_convert_replaces_only_its_own_folder_and_only_with_overwrite(workspace, capsys):
    work, src = workspace
    out = work / "converted"
    assert main(["convert", str(src), "--out", str(out)]) == 0
    capsys.readouterr()
    assert (out / MARKER).is_file() and (out / "template.json").is_file()
    first = tree(out)

    # it exists: without --overwrite nothing changes
    refused(["convert", str(src), "--out", str(out)], capsys, "already exists; pass --overwrite")
    assert tree(out) == first
    assert main(["convert", str(src), "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()

    # a user's folder (not written by us) is never replaced, even with --overwrite
    mine = work / "mine"
    mine.mkdir()
    (mine / "template.json").write_text("{}")  # a template.json alone does not make it ours
    (mine / "data.csv").write_text("a,b\n")
    before = tree(work)
    refused(
        ["convert", str(src), "--out", str(mine), "--overwrite"], capsys, "not written by diffsynth_templates"
    )
    assert tree(work) == before


def test_publish_out_with_template_json_and_user_files_is_kept(checkpoint, tmp_path, capsys):
    """publish --out DIR where DIR holds a template.json plus the user's other files deleted them."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "template.json").write_text(json.dumps({"architecture": "value_kv"}))
    (out / "model.safetensors").write_bytes(b"not really")
    (out / "thesis.tex").write_text("years of work")
    before, source = tree(tmp_path), tree(checkpoint)
    for extra in ([], ["--overwrite"]):
        argv = ["publish", str(checkpoint), "--repo", REPO, "--dry-run", "--out", str(out), *extra]
        refused(argv, capsys, "refusing to replace", str(out))
        assert tree(tmp_path) == before and tree(checkpoint) == source


def test_publish_replaces_its_own_package_and_an_old_unmarked_one_with_overwrite(
    checkpoint, tmp_path, capsys
):
    out = tmp_path / "pkg"
    argv = ["publish", str(checkpoint), "--repo", REPO, "--dry-run", "--out", str(out)]
    assert main(argv) == 0
    refused(argv, capsys, "already exists; pass --overwrite")
    assert main([*argv, "--overwrite"]) == 0
    # a package written before the marker file existed: only files a package holds -> still replaceable
    (out / MARKER).unlink()
    assert main([*argv, "--overwrite"]) == 0 and (out / MARKER).is_file()
    # ... but not once the user added a file of their own
    (out / MARKER).unlink()
    (out / "my-notes.md").write_text("mine")
    before = tree(tmp_path)
    refused([*argv, "--overwrite"], capsys, "refusing to replace")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("where", ["source", "inside", "parent", "cwd", "dot"])
def test_publish_refuses_unsafe_out(where, checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(checkpoint.parent)
    (checkpoint.parent / "notes.txt").write_text("next to the checkpoint")
    out = {
        "source": checkpoint,
        "inside": checkpoint / "package",
        "parent": checkpoint.parent,
        "cwd": Path.cwd(),
        "dot": Path("."),
    }[where]
    before = tree(tmp_path)
    argv = ["publish", str(checkpoint), "--repo", REPO, "--dry-run", "--out", str(out), "--overwrite"]
    refused(argv, capsys, "refusing to write" if where != "dot" else "names no new folder")
    assert tree(tmp_path) == before


def test_python_api_refuses_the_same(checkpoint, tmp_path):
    src = write_value_folder(tmp_path / "dsrc")
    before = tree(tmp_path)
    with pytest.raises(UnsafeOutputError):
        convert_diffsynth_folder(src, src.parent, overwrite=True)
    with pytest.raises(UnsafeOutputError):
        package_template(checkpoint, checkpoint.parent, repo_id=REPO, overwrite=True)
    assert tree(tmp_path) == before


# --- case 2: nothing outside the folder is read, packaged or converted ------------------------------


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("entry", ["../outside.safetensors", "ABS", "link.safetensors"])
def test_publish_does_not_package_outside_weights(entry, checkpoint, tmp_path, capsys):
    outside = tmp_path / "outside.safetensors"
    save_file({"secret": torch.ones(3)}, str(outside))
    if entry == "ABS":
        entry = str(outside)
    elif entry == "link.safetensors":
        os.symlink(outside, checkpoint / entry)
    _edit_json(checkpoint / "template.json", weights=[entry])
    out = tmp_path / "pkg"
    refused(["publish", str(checkpoint), "--repo", REPO, "--dry-run", "--out", str(out)], capsys, repr(entry))
    assert not out.exists()


def test_publish_does_not_package_a_sample_linked_from_outside(checkpoint, tmp_path, capsys):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG not for publishing")
    (checkpoint / "validation").mkdir()
    os.symlink(secret, checkpoint / "validation" / "step-1.png")
    out = tmp_path / "pkg"
    assert main(["publish", str(checkpoint), "--repo", REPO, "--dry-run", "--out", str(out)]) == 0
    assert not (out / "samples").exists()


@pytest.mark.parametrize(
    "path", ["ABS", "'../outside.safetensors'", "'link.safetensors'", "['model.safetensors', 5]"]
)
def test_convert_refuses_template_model_path_outside(path, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = write_value_folder(tmp_path / "src")
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((src / "model.safetensors").read_bytes())
    os.symlink(outside, src / "link.safetensors")
    if path == "ABS":
        path = repr(str(outside))
    code = (src / "model.py").read_text()
    (src / "model.py").write_text(code + f"\nTEMPLATE_MODEL_PATH = {path}\n")
    refused(["convert", str(src), "--out", str(tmp_path / "out")], capsys, "TEMPLATE_MODEL_PATH")
    assert not (tmp_path / "out").exists()


def test_convert_refuses_weights_found_by_name_that_link_outside(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = write_value_folder(tmp_path / "src")
    real = tmp_path / "elsewhere.safetensors"
    (src / "model.safetensors").rename(real)
    os.symlink(real, src / "model.safetensors")
    code = (src / "model.py").read_text().replace("TEMPLATE_MODEL_PATH", "UNUSED_PATH")
    (src / "model.py").write_text(code)
    with pytest.raises(PathContainmentError, match="outside"):
        convert_diffsynth_folder(src, tmp_path / "out")


# --- case 4: shard size, offline ---------------------------------------------------------------------


@pytest.mark.parametrize("size", ["0", "-1", "-2GB", "garbage", "0.0001", "1.5XB"])
def test_publish_refuses_bad_shard_size(size, checkpoint, tmp_path, capsys):
    out = tmp_path / "pkg"
    refused(
        ["publish", str(checkpoint), "--repo", REPO, "--dry-run", "--out", str(out), f"--shard_size={size}"],
        capsys,
        "shard size",
        size,
    )
    assert not out.exists()


def test_parse_size():
    assert parse_size(None) is None and parse_size("2GB") == 2 << 30 and parse_size(1) == 1
    for bad in (0, -5, True, 1.5, "0KB"):
        with pytest.raises(PackageError, match="shard size"):
            parse_size(bad)


@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.mark.parametrize("how", ["env", "flag"])
def test_offline_publish_refuses_to_connect(how, checkpoint, tmp_path, monkeypatch, capsys, no_network):
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", TOKEN)
    argv = ["publish", str(checkpoint), "--repo", REPO, "--out", str(tmp_path / "pkg")]
    if how == "env":
        monkeypatch.setenv("DIFFSYNTH_TEMPLATES_OFFLINE", "1")
    else:
        monkeypatch.delenv("DIFFSYNTH_TEMPLATES_OFFLINE", raising=False)
        argv.append("--offline")
    refused(argv, capsys, "offline mode is on", "--dry-run")
    assert no_network == [] and not (tmp_path / "pkg").exists()  # refused before packaging or connecting
    # a dry run needs no network and still works offline
    assert main([*argv, "--dry-run"]) == 0 and no_network == []


def test_offline_upload_package_refuses_in_python(checkpoint, tmp_path, monkeypatch, no_network):
    package = package_template(checkpoint, tmp_path / "pkg", repo_id=REPO)
    monkeypatch.setenv("DIFFSYNTH_TEMPLATES_OFFLINE", "yes")
    with pytest.raises(OfflineError, match="DIFFSYNTH_TEMPLATES_OFFLINE"):
        upload_package(package, REPO, token=TOKEN, endpoint="http://127.0.0.1:9")
    monkeypatch.delenv("DIFFSYNTH_TEMPLATES_OFFLINE")
    with pytest.raises(OfflineError, match="offline=True"):
        upload_package(package, REPO, token=TOKEN, endpoint="http://127.0.0.1:9", offline=True)
    assert no_network == []


# --- case 5: the CLI's error contract ---------------------------------------------------------------


def test_cli_prints_our_errors_with_exit_2_and_lets_bugs_propagate(tmp_path, capsys, monkeypatch):
    refused(["verify", str(tmp_path / "missing")], capsys, "missing")
    refused(["publish", str(tmp_path), "--repo", "bad id", "--dry-run"], capsys, "expected OWNER/NAME")
    refused(["verify", str(tmp_path), "--verify_input", "novalue"], capsys, "KEY=VALUE")

    from diffsynth_templates.hub import package as package_module

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setattr(package_module, "verify_package", bug)
    with pytest.raises(ZeroDivisionError):
        main(["verify", str(tmp_path)])
