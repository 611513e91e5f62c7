"""infer.py: the command line writes PNGs whose metadata reproduces them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_option():
    out = subprocess.run(
        [sys.executable, "infer.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    for flag in ("--model", "--prompt", "--negative_prompt", "--height", "--width", "--steps", "--cfg_scale",
                 "--seed", "--dtype", "--device", "--output", "--offload", "--input_image", "--inpaint_mask"):  # fmt: skip
        assert flag in out.stdout, flag


def test_generates_png_with_parameters(tiny_klein_root, tmp_path):
    sys.path.insert(0, str(ROOT))
    import infer

    out = tmp_path / "out" / "img.png"
    args = ["--model", str(tiny_klein_root), "--prompt", "a red car", "--height", "64", "--width", "48",
            "--steps", "2", "--cfg_scale", "2", "--seed", "3", "--max_sequence_length", "32",
            "--output", str(out), "--quiet", "--device", "cpu"]  # fmt: skip
    written = infer.main(args)
    assert written == [out]
    image = Image.open(out)
    assert image.size == (48, 64)
    params = json.loads(image.text["parameters"])
    assert params["prompt"] == "a red car" and params["seed"] == 3 and params["cfg_scale"] == 2.0
    # the same arguments (seed included) reproduce the image exactly
    again = infer.main([*args[:-5], "--output", str(tmp_path / "again.png"), "--quiet", "--device", "cpu"])
    assert np.array_equal(np.asarray(Image.open(again[0])), np.asarray(image))


def test_two_images_get_suffixes(tiny_klein_root, tmp_path):
    import infer

    args = ["--model", str(tiny_klein_root), "--height", "32", "--width", "32", "--steps", "1",
            "--max_sequence_length", "8", "--num_images", "2", "--output", str(tmp_path / "x.png"), "--quiet"]  # fmt: skip
    written = infer.main(args)
    assert [p.name for p in written] == ["x_0.png", "x_1.png"]
    assert not np.array_equal(np.asarray(Image.open(written[0])), np.asarray(Image.open(written[1])))


def test_bad_size_is_a_clear_error(tiny_klein_root, tmp_path):
    out = subprocess.run(
        [sys.executable, "infer.py", "--model", str(tiny_klein_root), "--height", "50", "--steps", "1",
         "--output", str(tmp_path / "x.png"), "--quiet"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode != 0
    assert "height=50 is not a multiple of 16" in out.stderr


def test_templates_from_flags_and_job(tiny_klein_root, tmp_path):
    """--template with KEY=VALUE inputs, and the same through a JSON job file, give the same image."""
    import torch

    import infer
    from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline
    from tests.templates.helpers import ScalarKV, ScalarKVConfig, save_declarative

    dit = Flux2ImagePipeline.from_pretrained(tiny_klein_root, device="cpu").dit
    torch.manual_seed(0)
    spec = dit.kv_block_specs["single_0"]
    folder = save_declarative(
        tmp_path / "kv", ScalarKV(ScalarKVConfig(heads=spec.heads, head_dim=spec.head_dim))
    )
    common = ["--model", str(tiny_klein_root), "--height", "32", "--width", "32", "--steps", "2",
              "--max_sequence_length", "16", "--quiet", "--device", "cpu"]  # fmt: skip
    plain = infer.main([*common, "--output", str(tmp_path / "plain.png")])[0]
    flags = infer.main([*common, "--template", str(folder), "--template_input", "model_id=0 scale=0.8",
                        "--output", str(tmp_path / "flags.png")])[0]  # fmt: skip
    job = tmp_path / "job.json"
    job.write_text(
        json.dumps({"templates": ["kv"], "template_inputs": [{"model_id": 0, "scale": 0.8}], "steps": 1})
    )
    from_job = infer.main([*common, "--job", str(job), "--output", str(tmp_path / "job.png")])[0]
    a, b, c = (np.asarray(Image.open(p)).astype(int) for p in (plain, flags, from_job))
    assert np.array_equal(b, c)  # explicit --steps 2 overrode the job's steps 1
    assert np.abs(a - b).max() > 0
    params = json.loads(Image.open(flags).text["parameters"])
    assert params["template"] == [str(folder)] and params["template_inputs"] == [
        {"model_id": 0, "scale": 0.8}
    ]


def test_zimage_folder_selects_the_zimage_pipeline(tmp_path):
    """The backbone comes from the folder: Turbo defaults (8 steps, no CFG), templates on Z-Image work,
    and FLUX.2-only flags are refused with a message naming the backbone."""
    import torch

    import infer
    from diffsynth_templates.pipelines.random_init import random_zimage_pipeline
    from diffsynth_templates.templates import save_template_folder
    from diffsynth_templates.templates.zoo import ValueKV, ValueKVConfig, template_spec
    from tests.templates.zoo_cases import perturb_zeros

    root = random_zimage_pipeline().save_pretrained(tmp_path / "tiny-z-image-turbo")
    torch.manual_seed(0)
    model = ValueKV(ValueKVConfig.tiny_zimage())
    perturb_zeros(model)
    folder = save_template_folder(tmp_path / "bright", model, template_spec(model))
    common = ["--model", str(root), "--height", "32", "--width", "32", "--max_sequence_length", "16",
              "--quiet", "--device", "cpu"]  # fmt: skip
    plain = infer.main([*common, "--output", str(tmp_path / "plain.png")])[0]
    params = json.loads(Image.open(plain).text["parameters"])
    assert params["num_inference_steps"] == 8 and params["cfg_scale"] == 1.0  # Turbo's, recorded

    pipe = infer_pipeline(root)
    expected = pipe("a photo of a cat", height=32, width=32, max_sequence_length=16, seed=0, progress=False)
    expected = expected[0]
    assert np.array_equal(np.asarray(Image.open(plain)), np.asarray(expected))  # 8 steps, cfg 1

    steered = infer.main([*common, "--template", str(folder), "--template_input", "scale=0.9",
                          "--output", str(tmp_path / "steered.png")])[0]  # fmt: skip
    assert np.abs(np.asarray(Image.open(plain)).astype(int) - np.asarray(Image.open(steered))).max() > 0

    out = subprocess.run(
        [sys.executable, "infer.py", *common, "--edit_image", str(plain), "--output", str(tmp_path / "x.png")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode != 0 and "--edit_image is not supported by Z-Image pipelines" in out.stderr


def infer_pipeline(root):
    from diffsynth_templates.pipelines.zimage_pipeline import ZImagePipeline

    return ZImagePipeline.from_pretrained(root, device="cpu")
