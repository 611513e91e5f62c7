"""The toy templates still control the toy base model with FP8 weights everywhere (base model and
templates): ``scripts/eval_controls.py --weight_dtype float8_e4m3fn --check`` on brightness and
structure (quick: 2 prompts x 1 seed; the full 8 x 2 run's table is in the README)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "eval_controls.py"


def test_brightness_and_structure_meet_their_targets_with_fp8_weights(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("eval_controls_fp8", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    out = tmp_path / "table.md"
    argv = ["--quick", "--check", "--tasks", "brightness", "structure", "--weight_dtype", "float8_e4m3fn"]
    assert module.main([*argv, "--out", str(out)]) == 0, out.read_text() if out.exists() else ""
    table = out.read_text()
    assert '"weight_dtype": "float8_e4m3fn"' in table and "MISS" not in table
