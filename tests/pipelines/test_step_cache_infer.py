"""infer.py --step_cache: the preset reaches the pipeline and the PNG's parameters; bad values are
refused before anything loads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import infer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def args_for(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(root), "--prompt", "a red car", "--height", "64", "--width", "64", "--steps", "12",
            "--cfg_scale", "1", "--max_sequence_length", "16", "--output", str(out), "--quiet", "--device", "cpu",
            *extra]  # fmt: skip


def test_step_cache_flag_reaches_the_pipeline(tiny_klein_root, tmp_path):
    plain = infer.main(args_for(tiny_klein_root, tmp_path / "plain.png"))[0]
    cached = infer.main(args_for(tiny_klein_root, tmp_path / "fast.png", "--step_cache", "fast"))[0]
    assert json.loads(Image.open(cached).text["parameters"])["step_cache"] == "fast"
    assert json.loads(Image.open(plain).text["parameters"])["step_cache"] is None
    difference = np.abs(np.asarray(Image.open(cached), float) - np.asarray(Image.open(plain), float))
    assert 0 < difference.max() < 255 * 0.25  # the forecast steps changed the image, a little


def test_unknown_preset_is_refused(tiny_klein_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        infer.main(args_for(tiny_klein_root, tmp_path / "x.png", "--step_cache", "turbo"))
    assert exit_info.value.code == 2
    assert "invalid choice: 'turbo'" in capsys.readouterr().err


def test_unknown_preset_in_a_job_file_is_refused_before_loading(tmp_path, capsys):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"step_cache": "turbo"}))
    with pytest.raises(SystemExit) as exit_info:
        infer.main(
            ["--model", str(tmp_path / "missing"), "--job", str(job), "--output", str(tmp_path / "x.png")]
        )
    assert exit_info.value.code == 2
    assert (
        "'step_cache' must be one of ['balanced', 'fast', 'quality'], got 'turbo'" in capsys.readouterr().err
    )
