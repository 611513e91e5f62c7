"""The toy world is product code in ``diffsynth_templates/toy``: ``python infer.py`` runs a library
function, the toy library sits beside infer.py in the layer table, and ``datasets/`` is a data folder
that no longer shadows Hugging Face's ``datasets`` library."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from diffsynth_templates.errors import DiffSynthTemplatesError
from diffsynth_templates.toy import demo
from diffsynth_templates.toy.models import ToyWorld

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "diffsynth_templates"
TOY = PACKAGE / "toy"
# what the toy library may import from the package: the layers below infer.py that it uses
TOY_MAY_IMPORT = {"toy", "pipelines", "templates", "loading", "backbones", "errors"}


def run_python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True
    )


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    return names


def calls_sys_path_insert(path: Path) -> bool:
    return any(
        isinstance(n, ast.Attribute) and n.attr == "insert" and ast.unparse(n.value) == "sys.path"
        for n in ast.walk(ast.parse(path.read_text()))
    )


# ---------------------------------------------------------------------------------------------------
# datasets/ is data, not code
# ---------------------------------------------------------------------------------------------------


def test_datasets_folder_holds_no_python():
    assert (ROOT / "datasets").is_dir(), "datasets/ stays the folder where datasets live"
    assert not list((ROOT / "datasets").rglob("*.py")), "datasets/ must not be an importable package"


def test_hugging_face_datasets_is_not_shadowed_from_the_repository_root(tmp_path):
    # a stand-in for HF's installed `datasets`, later on sys.path than the repository root (as
    # site-packages is): a script run from the root must get it, not the root's datasets/ folder
    site = tmp_path / "site"
    (site / "datasets").mkdir(parents=True)
    (site / "datasets" / "__init__.py").write_text("WHO = 'hugging face'\n")
    run = run_python("import datasets; print(datasets.WHO)", ROOT, PYTHONPATH=str(site))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "hugging face"


def test_old_generator_module_is_gone_and_the_new_one_takes_the_same_flags():
    old = run_python("import datasets.toy_world", ROOT)
    assert old.returncode != 0 and "ModuleNotFoundError" in old.stderr
    new = subprocess.run(
        [sys.executable, "-m", "diffsynth_templates.toy.world", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert new.returncode == 0, new.stderr
    assert "python -m diffsynth_templates.toy.world" in new.stdout
    for flag in ("--out", "--num_samples", "--seed", "--size", "--max_tint", "--overwrite"):
        assert flag in new.stdout


# ---------------------------------------------------------------------------------------------------
# Layers: the product path is free of tools
# ---------------------------------------------------------------------------------------------------


def test_toy_library_imports_only_the_layers_below_infer():
    for path in sorted(TOY.glob("*.py")):
        for name in imported_modules(path):
            top = name.split(".")[0]
            assert top not in {"scripts", "datasets", "infer", "train", "benchmarks", "tests"}, (path, name)
            if top == "diffsynth_templates" and "." in name:
                assert name.split(".")[1] in TOY_MAY_IMPORT, f"{path.name} imports {name}"


def test_nothing_in_the_library_imports_the_toy_world():
    for path in sorted(PACKAGE.rglob("*.py")):
        if TOY in path.parents:
            continue
        toy = [n for n in imported_modules(path) if n.startswith("diffsynth_templates.toy")]
        assert not toy, f"{path.relative_to(ROOT)} imports {toy}: the toy world sits above the library"


def test_infer_and_scripts_need_no_sys_path_hacks():
    for path in [ROOT / "infer.py", *sorted((ROOT / "scripts").glob("*.py"))]:
        assert not calls_sys_path_insert(path), f"{path.relative_to(ROOT)} edits sys.path"
        tools = [n for n in imported_modules(path) if n.split(".")[0] in {"datasets", "scripts"}]
        assert not tools, f"{path.relative_to(ROOT)} imports {tools}"


def test_infer_without_arguments_runs_the_library_demo(tmp_path):
    # in a fresh interpreter, from another folder (the grid lands in its outputs/): only library modules
    code = (
        "import sys, infer; [out] = infer.main([]); "
        "print(out); print(sorted(m for m in sys.modules if m.split('.')[0] in ('scripts', 'datasets')))"
    )
    run = run_python(code, tmp_path, PYTHONPATH=str(ROOT))
    assert run.returncode == 0, run.stderr[-3000:]
    out, tools = run.stdout.strip().splitlines()[-2:]
    assert json.loads(tools.replace("'", '"')) == []
    assert Path(out) == Path("outputs") / "toy_demo.png"
    grid = Image.open(tmp_path / out)
    assert grid.width == demo.COLUMNS * demo.CELL and grid.height > demo.CELL


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


def test_missing_templates_are_our_error_and_the_demo_cli_says_so(tmp_path, capsys):
    model = ROOT / "models" / "toy" / "base"
    with pytest.raises(DiffSynthTemplatesError, match="no toy templates under"):
        ToyWorld.load(model, tmp_path)
    assert (
        demo.main(["--model", str(model), "--templates", str(tmp_path), "--out", str(tmp_path / "g.png")])
        == 2
    )
    assert "error: no toy templates under" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()
