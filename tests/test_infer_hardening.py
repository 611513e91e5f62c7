"""infer.py hardening (issue 20): trust only from the command line, job files checked against a schema,
limits and --output checked before anything is loaded, inpainting through templates, model defaults,
and every bad value an ``error: ...`` with exit code 2 instead of a traceback or a silent no-op."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import infer  # noqa: E402
from diffsynth_templates.errors import DiffSynthTemplatesError  # noqa: E402
from diffsynth_templates.pipelines.defaults import (  # noqa: E402
    GenerationDefaultsError,
    recommended_defaults,
)

TOY = ROOT / "models" / "toy" / "base"
TOY_TEMPLATES = ROOT / "models" / "toy" / "templates"
FAST = ["--model", str(TOY), "--steps", "2", "--quiet", "--device", "cpu", "--max_sequence_length", "32"]


def fails(argv: list[str], capsys) -> str:
    """Run infer.main; it must exit 2 with ``error: ...`` (ours) or argparse's usage error, no traceback."""
    with pytest.raises(SystemExit) as info:
        infer.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    return err


def write_job(tmp_path: Path, job, name: str = "job.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(job) if not isinstance(job, str) else job)
    return path


@pytest.fixture
def hollow_model(tmp_path) -> Path:
    """A model folder with the toy's config files but no weights: any attempt to load it fails, so an
    error about something else proves the check ran before loading or allocating anything."""
    folder = tmp_path / "hollow"
    folder.mkdir()
    shutil.copy(TOY / "model_index.json", folder)
    shutil.copy(TOY / "generation_defaults.json", folder)
    return folder


# -- 1. trust_remote_code only from the command line ------------------------------------------------


def evil_template(tmp_path: Path) -> tuple[Path, Path]:
    """A DiffSynth-format template whose model.py writes a file the moment it is executed."""
    folder, marker = tmp_path / "evil", tmp_path / "model_py_was_executed"
    folder.mkdir()
    (folder / "model.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('pwned')\n")
    return folder, marker


def test_job_cannot_set_trust_remote_code(tmp_path, capsys):
    folder, marker = evil_template(tmp_path)
    job = write_job(tmp_path, {"trust_remote_code": True, "templates": [str(folder)]})
    err = fails([*FAST, "--job", str(job), "--output", str(tmp_path / "x.png")], capsys)
    assert "'trust_remote_code'" in err and "--trust_remote_code" in err
    assert not marker.exists()
    assert not (tmp_path / "x.png").exists()


def test_template_with_code_is_refused_without_the_flag(tmp_path, capsys):
    folder, marker = evil_template(tmp_path)
    job = write_job(tmp_path, {"templates": [str(folder)], "template_inputs": [{"model_id": 0}]})
    err = fails([*FAST, "--height", "32", "--width", "32", "--job", str(job),
                 "--output", str(tmp_path / "x.png")], capsys)  # fmt: skip
    assert "trust_remote_code" in err
    assert not marker.exists()


# -- 2. job files against a schema ------------------------------------------------------------------


def job_error(job, tmp_path=None) -> str:
    with pytest.raises(infer.JobFileError) as info:
        infer.validate_job(job, "job.json")
    return str(info.value)


def test_unknown_job_key_is_named_with_the_known_ones():
    msg = job_error({"guidance": 7})
    assert "'guidance'" in msg and "cfg_scale" in msg and "known keys" in msg
    assert "did you mean 'templates'" in job_error({"template": ["x"]})


def test_job_types_are_checked():
    msg = job_error({"dtype": "int8"})
    assert "'int8'" in msg and "bfloat16" in msg
    assert "must be a list" in job_error({"templates": "bright"})
    assert "must be a list" in job_error({"templates": [5]})
    assert "list of objects" in job_error({"template_inputs": {"model_id": 0}})
    assert "list of objects" in job_error({"template_inputs": ["model_id=0"]})
    assert "an integer" in job_error({"steps": 2.5})
    assert "true or false" in job_error({"offload": "yes"})
    assert "finite" in job_error({"template_inputs": [{"scale": float("nan")}]})
    assert "twice" in job_error({"steps": 1, "num_inference_steps": 2})
    assert "JSON object" in job_error(["steps", 2])
    for prompt in ([], [1], 5, None):
        assert "non-empty list of strings" in job_error({"prompt": prompt})
    # valid: flag names and their destinations, nulls where the flag has no default
    assert infer.validate_job({"steps": 3, "cfg_scale": 1, "variant": None}, "job.json") == {
        "num_inference_steps": 3,
        "cfg_scale": 1.0,
        "variant": None,
    }


@pytest.mark.parametrize("seed", [2**70, "x", 1.5, -(2**63) - 1, True])
def test_bad_job_seed_names_the_value_and_range(seed):
    msg = job_error({"seed": seed})
    assert repr(seed) in msg and "torch.manual_seed" in msg


@pytest.mark.parametrize("seed", [str(2**70), "x", "1.5"])
def test_bad_flag_seed_names_the_value_and_range(seed, tmp_path, capsys):
    err = fails([*FAST, "--seed", seed, "--output", str(tmp_path / "x.png")], capsys)
    assert seed in err and "torch.manual_seed" in err


def test_last_seed_must_stay_in_range(tmp_path, capsys):
    err = fails(
        [*FAST, "--seed", str(2**64 - 1), "--num_images", "2", "--output", str(tmp_path / "x.png")], capsys
    )
    assert "torch.manual_seed" in err and str(2**64) in err


def test_unreadable_job_files_are_named(tmp_path, capsys):
    binary = tmp_path / "latin1.json"
    binary.write_bytes('{"prompt": "caf\xe9"}'.encode("latin-1"))
    err = fails([*FAST, "--job", str(binary)], capsys)
    assert str(binary) in err and "UTF-8" in err
    broken = write_job(tmp_path, '{"steps": 2', "broken.json")
    err = fails([*FAST, "--job", str(broken)], capsys)
    assert str(broken) in err and "not valid JSON" in err
    err = fails([*FAST, "--job", str(tmp_path / "missing.json")], capsys)
    assert "missing.json" in err


def test_list_of_prompts_gives_images_per_prompt(tmp_path):
    prompts = ["a large red circle on a gray background", "a small blue square on a yellow background"]
    job = write_job(tmp_path, {"prompt": prompts, "num_images": 2, "height": 32, "width": 32})
    written = infer.main([*FAST, "--job", str(job), "--output", str(tmp_path / "out.png")])
    assert [p.name for p in written] == ["out_0.png", "out_1.png", "out_2.png", "out_3.png"]
    params = [json.loads(Image.open(p).text["parameters"]) for p in written]
    assert [(p["prompt"], p["seed"]) for p in params] == [(prompts[0], 0), (prompts[0], 1), (prompts[1], 0), (prompts[1], 1)]  # fmt: skip
    pixels = [np.asarray(Image.open(p)).astype(int) for p in written]
    assert np.abs(pixels[0] - pixels[2]).max() > 0  # same seed, other prompt


# -- 3. counts, sizes and --output, all before loading -----------------------------------------------


@pytest.mark.parametrize("count", ["0", "-2", "65"])
def test_num_images_out_of_range(count, hollow_model, tmp_path, capsys):
    err = fails(
        ["--model", str(hollow_model), "--num_images", count, "--output", str(tmp_path / "x.png")], capsys
    )
    assert "--num_images" in err
    assert not any(tmp_path.glob("x*.png"))


def test_huge_sizes_are_refused_before_loading(hollow_model, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    err = fails(
        ["--model", str(hollow_model), "--height", "100000", "--width", "100000", "--output", out], capsys
    )
    assert "--height 100000" in err and "--max_size" in err
    err = fails(["--model", str(hollow_model), "--height", "8192", "--width", "8192", "--max_size", "8192",
                 "--output", out], capsys)  # fmt: skip
    assert "--max_pixels" in err and str(8192 * 8192) in err
    err = fails(["--model", str(hollow_model), "--steps", "5000", "--output", out], capsys)
    assert "--steps 5000" in err and "--max_steps" in err
    # raising the limit lets the value through: the next failure is loading the hollow model's weights
    with pytest.raises((DiffSynthTemplatesError, OSError, ValueError)) as info:
        infer.generate(
            ["--model", str(hollow_model), "--steps", "5000", "--max_steps", "5000", "--output", out]
        )
    assert "max_steps" not in str(info.value)


def test_size_must_be_a_multiple_of_16_like_help_says(hollow_model, tmp_path, capsys):
    err = fails(["--model", str(hollow_model), "--height", "60", "--output", str(tmp_path / "x.png")], capsys)
    assert "height=60 is not a multiple of 16" in err and "48 or 64" in err
    assert "a multiple of 16" in infer.build_parser().format_help()


@pytest.mark.parametrize("flag", ["--cfg_scale", "--denoising_strength"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_name_the_flag(flag, value, hollow_model, tmp_path, capsys):
    extra = ["--input_image", str(tmp_path / "x.png")] if flag == "--denoising_strength" else []
    err = fails(
        ["--model", str(hollow_model), f"{flag}={value}", *extra, "--output", str(tmp_path / "x.png")], capsys
    )
    assert flag in err and value in err


def test_output_is_checked_before_generating(hollow_model, tmp_path, capsys):
    base = ["--model", str(hollow_model)]
    err = fails([*base, "--output", str(tmp_path / "x.txt")], capsys)
    assert "x.txt" in err and ".png" in err
    folder = tmp_path / "taken.png"
    folder.mkdir()
    err = fails([*base, "--output", str(folder)], capsys)
    assert "existing folder" in err
    (tmp_path / "file").write_text("not a folder")
    err = fails([*base, "--output", str(tmp_path / "file" / "sub" / "x.png")], capsys)
    assert "cannot create the folder" in err
    assert (tmp_path / "file").read_text() == "not a folder"


def test_errors_are_ours_and_exit_2(tmp_path, capsys):
    err = fails(
        [*FAST, "--inpaint_mask", str(tmp_path / "m.png"), "--output", str(tmp_path / "x.png")], capsys
    )
    assert err.startswith("error: ") and "--input_image" in err
    err = fails(
        [*FAST, "--input_image", str(tmp_path / "nope.png"), "--output", str(tmp_path / "x.png")], capsys
    )
    assert err.startswith("error: ") and "nope.png" in err
    not_image = tmp_path / "text.png"
    not_image.write_text("hello")
    err = fails([*FAST, "--input_image", str(not_image), "--output", str(tmp_path / "x.png")], capsys)
    assert "not a readable image" in err
    err = fails([*FAST, "--template_input", "scale", "--output", str(tmp_path / "x.png")], capsys)
    assert "KEY=VALUE" in err
    for value in ("NaN", "1e999", "[1, -Infinity]"):
        err = fails([*FAST, "--template", str(TOY_TEMPLATES / "brightness"), "--template_input",
                     f"model_id=0 scale={value.replace(' ', '')}", "--output", str(tmp_path / "x.png")], capsys)  # fmt: skip
        assert "template_input[0].scale" in err and "finite" in err


# -- 4. inpainting from the command line ------------------------------------------------------------


def inpaint_files(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:40, 24:56] = 255  # white: regenerate
    image_path, mask_path = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray(pixels).save(image_path)
    Image.fromarray(mask).save(mask_path)
    return image_path, mask_path, pixels, mask


def test_inpaint_template_with_force_inpaint_keeps_the_unmasked_pixels(tmp_path):
    image_path, mask_path, pixels, mask = inpaint_files(tmp_path)
    out = infer.main([*FAST, "--template", str(TOY_TEMPLATES / "inpaint"), "--template_input",
                      f"model_id=0 image={image_path} mask={mask_path} force_inpaint=true",
                      "--output", str(tmp_path / "out.png")])[0]  # fmt: skip
    result = np.asarray(Image.open(out).convert("RGB"))
    assert result.shape == pixels.shape
    keep = mask == 0
    assert np.array_equal(result[keep], pixels[keep])
    assert np.abs(result[~keep].astype(int) - pixels[~keep]).mean() > 1  # the masked part was regenerated


def test_inpaint_mask_flag_with_input_image(tmp_path):
    image_path, mask_path, pixels, mask = inpaint_files(tmp_path)
    out = infer.main([*FAST, "--input_image", str(image_path), "--inpaint_mask", str(mask_path),
                      "--output", str(tmp_path / "out.png")])[0]  # fmt: skip
    result = np.asarray(Image.open(out).convert("RGB"))
    keep = mask == 0
    assert np.array_equal(result[keep], pixels[keep])
    assert np.abs(result[~keep].astype(int) - pixels[~keep]).mean() > 1


def test_inpaint_mask_of_another_size_needs_resize_mask(tmp_path, capsys):
    image_path, mask_path, pixels, mask = inpaint_files(tmp_path)
    Image.fromarray(mask).resize((32, 32), Image.NEAREST).save(mask_path)  # half the image's size
    args = [*FAST, "--input_image", str(image_path), "--inpaint_mask", str(mask_path)]
    with pytest.raises(SystemExit) as e:
        infer.main([*args, "--output", str(tmp_path / "refused.png")])
    assert e.value.code == 2 and "64" in capsys.readouterr().err
    assert not (tmp_path / "refused.png").exists()
    out = infer.main([*args, "--resize_mask", "--output", str(tmp_path / "out.png")])[0]
    result = np.asarray(Image.open(out).convert("RGB"))
    # the stretched mask is soft at its edges: compare the kept pixels 2 px away from the masked box
    keep = np.ones_like(mask, dtype=bool)
    keep[14:42, 22:58] = False
    assert np.array_equal(result[keep], pixels[keep])
    assert np.abs(result[20:36, 28:52].astype(int) - pixels[20:36, 28:52]).mean() > 1


# -- 5. defaults that fit the model ----------------------------------------------------------------


def test_toy_model_defaults_are_used_and_logged(tmp_path, caplog):
    caplog.set_level("INFO")
    out = infer.main([*FAST, "--output", str(tmp_path / "x.png")])[0]
    image = Image.open(out)
    params = json.loads(image.text["parameters"])
    assert image.size == (64, 64)
    assert (params["height"], params["width"], params["num_inference_steps"], params["cfg_scale"]) == (
        64,
        64,
        2,
        1.0,
    )
    lines = [r.getMessage() for r in caplog.records if "model defaults" in r.getMessage()]
    assert len(lines) == 1 and "generation_defaults.json" in lines[0] and "--height 64" in lines[0]
    assert "--steps" not in lines[0]  # given on the command line


def model_folder(
    tmp_path: Path, name: str, index: dict | None = None, transformer: dict | None = None
) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    if index is not None:
        (folder / "model_index.json").write_text(json.dumps(index))
    if transformer is not None:
        (folder / "transformer").mkdir()
        (folder / "transformer" / "config.json").write_text(json.dumps(transformer))
    return folder


def test_recommended_defaults_per_model(tmp_path):
    def values(folder, **kw):
        d = recommended_defaults(folder, **kw)
        return d.height, d.width, d.num_inference_steps, d.cfg_scale

    assert values(TOY) == (64, 64, 20, 1.0)
    klein = {"_class_name": "Flux2KleinPipeline"}
    assert values(model_folder(tmp_path, "klein-base", {**klein, "is_distilled": False})) == (
        1024,
        1024,
        50,
        4.0,
    )
    assert values(model_folder(tmp_path, "klein", {**klein, "is_distilled": True})) == (1024, 1024, 4, 1.0)
    zimage = {"_class_name": "ZImagePipeline"}
    assert values(model_folder(tmp_path, "Z-Image-Turbo", zimage)) == (1024, 1024, 8, 1.0)
    base = model_folder(tmp_path, "Z-Image", zimage)
    assert values(base) == (1024, 1024, 50, 5.0)
    assert values(base, variant="turbo")[2] == 8
    transformer_only = model_folder(tmp_path, "zt", None, {"_class_name": "ZImageTransformer2DModel"})
    assert values(transformer_only, variant="turbo") == (1024, 1024, 8, 1.0)
    assert values(model_folder(tmp_path, "other", {"_class_name": "Flux2Pipeline"})) == (1024, 1024, 50, 4.0)
    # the folder's own file wins field by field over what its configs say
    own = model_folder(tmp_path, "own", {**klein, "is_distilled": True})
    (own / "generation_defaults.json").write_text(json.dumps({"height": 512, "width": 768}))
    assert values(own) == (512, 768, 4, 1.0)


@pytest.mark.parametrize(
    "content", ['{"height": 0}', '{"steps": 4}', '{"cfg_scale": NaN}', "[1]", "{", '{"width": true}']
)
def test_bad_generation_defaults_file_is_named(tmp_path, content):
    folder = model_folder(tmp_path, "m", {"_class_name": "Flux2KleinPipeline"})
    (folder / "generation_defaults.json").write_text(content)
    with pytest.raises(GenerationDefaultsError, match="generation_defaults.json"):
        recommended_defaults(folder)


# -- the example job file ---------------------------------------------------------------------------


def test_example_job_is_valid_and_runs(tmp_path):
    job = infer.read_job(str(ROOT / "examples" / "job.json"))
    assert job["templates"] and job["template_inputs"] and isinstance(job["prompt"], list)
    # as written but 2 steps and another output folder (flags override the job)
    written = infer.main(["--job", str(ROOT / "examples" / "job.json"), "--steps", "2", "--quiet",
                          "--output", str(tmp_path / "job.png")])  # fmt: skip
    assert len(written) == len(job["prompt"]) * job.get("num_images", 1)
    params = json.loads(Image.open(written[0]).text["parameters"])
    assert [Path(t).name for t in params["template"]] == [Path(t).name for t in job["templates"]]
