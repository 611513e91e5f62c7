"""infer.py --lora PATH[:SCALE] and --transformer FILE.safetensors on the tiny official-layout klein."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import infer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tiny_klein_root, tmp_path_factory):
    from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline
    from tests.pipelines.test_lora_files import as_layout, bfl_lora
    from tests.pipelines.test_single_file import to_bfl

    folder = tmp_path_factory.mktemp("files")
    dit = Flux2ImagePipeline.from_pretrained(tiny_klein_root, torch_dtype=torch.float32, device="cpu").dit
    save_file(as_layout(bfl_lora(dit), "kohya"), str(folder / "style.safetensors"))
    save_file(to_bfl(dit), str(folder / "klein_bfl.safetensors"))
    return folder


def generate(root, tmp_path, name, *extra) -> np.ndarray:
    out = tmp_path / f"{name}.png"
    infer.main(["--model", str(root), "--prompt", "a red car", "--height", "32", "--width", "32", "--steps", "2",
                "--cfg_scale", "2", "--max_sequence_length", "16", "--output", str(out), "--quiet",
                "--device", "cpu", *extra])  # fmt: skip
    return np.asarray(Image.open(out)).astype(np.int16)


def test_lora_flag_scales(tiny_klein_root, files, tmp_path):
    lora = str(files / "style.safetensors")
    base = generate(tiny_klein_root, tmp_path, "base")
    full = generate(tiny_klein_root, tmp_path, "full", "--lora", f"{lora}:1.0")
    assert np.abs(full - base).max() > 10
    assert np.array_equal(generate(tiny_klein_root, tmp_path, "zero", "--lora", f"{lora}:0"), base)
    half = generate(tiny_klein_root, tmp_path, "half", "--lora", f"{lora}:0.5")
    assert not np.array_equal(half, full) and not np.array_equal(half, base)
    # two halves add up to the whole LoRA (up to 8-bit rounding)
    twice = generate(tiny_klein_root, tmp_path, "twice", "--lora", f"{lora}:0.5", "--lora", lora + ":0.5")
    assert np.abs(twice - full).max() <= 2
    meta = Image.open(tmp_path / "twice.png").text["parameters"]
    assert "style.safetensors:0.5" in meta


def test_transformer_single_file_flag(tiny_klein_root, files, tmp_path):
    base = generate(tiny_klein_root, tmp_path, "base")
    single = generate(
        tiny_klein_root, tmp_path, "single", "--transformer", str(files / "klein_bfl.safetensors")
    )
    assert np.array_equal(single, base)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("missing.safetensors", "not an existing file"),
        ("x.safetensors:inf", "finite"),
        (":0.5", "names no file"),
        ("owner", "not an existing file and not a ModelScope file"),
    ],
)
def test_bad_lora_flags_are_named(tiny_klein_root, tmp_path, capsys, value, match):
    with pytest.raises(SystemExit) as e:
        generate(tiny_klein_root, tmp_path, "bad", "--lora", value)
    assert e.value.code == 2
    assert match in capsys.readouterr().err
