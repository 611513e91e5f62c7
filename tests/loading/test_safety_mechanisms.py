"""The shared safety mechanisms: path containment, write-safety, finite checks, the error base class."""

from __future__ import annotations

import math
import os

import pytest
import torch

from diffsynth_templates.errors import DiffSynthTemplatesError
from diffsynth_templates.loading.finite import (
    NonFiniteError,
    check_finite_number,
    check_finite_state,
    check_finite_tensor,
)
from diffsynth_templates.loading.paths import PathContainmentError, resolve_inside
from diffsynth_templates.loading.write_safety import (
    MARKER,
    UnsafeOutputError,
    check_output_folder,
    remove_our_folder,
    write_folder,
)


def test_resolve_inside_accepts_relative_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.safetensors").write_bytes(b"x")
    assert resolve_inside(tmp_path, "sub/w.safetensors") == tmp_path / "sub" / "w.safetensors"


@pytest.mark.parametrize(
    "entry", ["../x.safetensors", "a/../../x", "/etc/passwd", "", 1, None, ["a"], "C:\\x"]
)
def test_resolve_inside_refuses_escapes_and_non_strings(tmp_path, entry):
    with pytest.raises(PathContainmentError) as e:
        resolve_inside(tmp_path, entry, "template.json 'weights' entry")
    assert "template.json 'weights' entry" in str(e.value)


def test_resolve_inside_refuses_a_symlink_out(tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"x")
    folder = tmp_path / "folder"
    folder.mkdir()
    os.symlink(outside, folder / "w.safetensors")
    with pytest.raises(PathContainmentError, match="outside"):
        resolve_inside(folder, "w.safetensors")


def test_write_folder_writes_atomically_and_marks(tmp_path):
    out = tmp_path / "out"
    with write_folder(out) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "a" and (out / MARKER).is_file()
    # ours, but no overwrite: refused, untouched
    with pytest.raises(UnsafeOutputError, match="--overwrite"):
        with write_folder(out) as tmp:
            pass
    with write_folder(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folders left behind


def test_write_folder_failure_leaves_the_old_folder(tmp_path):
    out = tmp_path / "out"
    with write_folder(out) as tmp:
        (tmp / "a.txt").write_text("a")
    with pytest.raises(RuntimeError):
        with write_folder(out, overwrite=True) as tmp:
            (tmp / "b.txt").write_text("b")
            raise RuntimeError("disk full")
    assert (out / "a.txt").is_file() and not (out / "b.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_user_folders_are_never_replaced(tmp_path, monkeypatch):
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    with pytest.raises(UnsafeOutputError, match="not written by"):
        check_output_folder(user, overwrite=True)
    assert remove_our_folder(user) is False and (user / "thesis.tex").is_file()
    monkeypatch.chdir(user)
    for out in [".", "..", str(user), "/", str(tmp_path)]:
        with pytest.raises(UnsafeOutputError):
            check_output_folder(out, overwrite=True)
    assert (user / "thesis.tex").read_text() == "precious"


def test_source_and_its_relatives_are_refused(tmp_path):
    src = tmp_path / "src"
    (src / "inner").mkdir(parents=True)
    for out in [src, src / "inner", src / "new", tmp_path]:
        with pytest.raises(UnsafeOutputError):
            check_output_folder(out, sources=[src], overwrite=True)
    check_output_folder(tmp_path / "sibling", sources=[src])


def test_finite_checks_name_the_value():
    assert check_finite_number("cfg_scale", 4) == 4.0
    for bad in [math.nan, math.inf, -math.inf, "4", None, True, 10**400]:
        with pytest.raises(NonFiniteError, match="cfg_scale"):
            check_finite_number("cfg_scale", bad)
    check_finite_tensor("latents", torch.zeros(2))
    with pytest.raises(NonFiniteError, match="latents"):
        check_finite_tensor("latents", torch.tensor([0.0, math.nan]))
    check_finite_state({"a": torch.zeros(1), "ids": torch.tensor([1])}, "x.safetensors")
    with pytest.raises(NonFiniteError, match=r"x.safetensors.*'b'"):
        check_finite_state({"a": torch.zeros(1), "b": torch.tensor([math.inf])}, "x.safetensors")


def test_every_error_class_derives_from_the_base():
    import diffsynth_templates.hub.package  # noqa: F401  (imports every layer)
    import diffsynth_templates.training.trainer  # noqa: F401

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    ours = [
        c
        for c in subclasses(BaseException)
        if c.__module__.startswith("diffsynth_templates") and c.__name__.endswith("Error")
    ]
    assert len(ours) > 20
    assert [c.__name__ for c in ours if not issubclass(c, DiffSynthTemplatesError)] == []
