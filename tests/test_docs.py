"""Docs that run as written: every shell command in README.md and docs/*.md is run here or listed.

Each ```bash block is split into commands (backslash continuations joined, comment lines skipped).
A command is, in this order:

- NOT_HERE: it cannot run on this machine; the entry says why (a hub download, a GPU, several
  processes, an upload). Keep this list small: a command that targets the toy world must run.
- COVERED: it runs elsewhere, named exactly: verbatim in ``.ci/run`` (installs into the environment,
  the whole test suite) or as a named test. The check below finds the command / the test there.
- otherwise it is run, from the root of a fresh copy of the repository (its tracked and unignored
  files, so outputs never land in the checkout), with that copy on PYTHONPATH. TINY appends flags
  that make a slow command small (argparse keeps the last value of a repeated flag).

A command added to the docs that fails, or that an entry lists but no longer matches, fails here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md")))]

# (regex searched in the normalised command, why it cannot run here)
NOT_HERE: list[tuple[str, str]] = [
    (r"--model black-forest-labs/", "downloads FLUX.2-klein (gigabytes) from ModelScope; sized for a GPU"),
    (r"--model Tongyi-MAI/", "downloads Z-Image (gigabytes) from ModelScope; sized for a GPU"),
    (
        r"^python train\.py --task (train|full) (--model )?\.\.\.",
        "elided flags (`...`) of the real-model command above",
    ),  # fmt: skip
    (r"^accelerate launch .*--num_processes 8 ", "8 GPUs (DDP through accelerate)"),
    (r"publish models/train/brightness/checkpoint-1000 .*--public", "uploads to ModelScope with a token"),
    (
        r"publish models/train/brightness/checkpoint-1000 .*--dry-run",
        "a checkpoint of a real-model training run; the toy equivalent runs in docs/training.md",
    ),
    (r"compare_reference\.py .*--sizes 256 512", "the full benchmark: tens of minutes; CI runs --quick"),
]

# normalised command (or a regex of it) -> where it runs: ".ci/run" (verbatim there) or "FILE::TEST"
COVERED: dict[str, str] = {
    # installs into the current environment (pip install -e . would point it at the temporary copy)
    r"^pip install torch==2\.13\.0 && pip install -e \. && python infer\.py$": ".ci/run",
    r"^pip install -e \.\[test\]$": ".ci/run",
    r"^python -m pytest tests -q$": ".ci/run",  # the whole suite, this file included
    # pip-installs DiffSynth-Studio from PyPI into .venv-ref, then minutes of benchmark
    r"^python benchmarks/make_ref_env\.py \.venv-ref$": ".ci/run",
    r"^python benchmarks/compare_reference\.py --diffsynth-python \.venv-ref/bin/python --quick$": ".ci/run",
    # a DiffSynth-format folder (model.py) is not bundled; the test builds one and converts it
    r"^python -m diffsynth_templates convert path/to/diffsynth_template ": (
        "tests/hub/test_hub.py::test_convert_value_template_without_running_it"
    ),
}

# normalised command -> flags appended when it runs here
TINY: dict[str, list[str]] = {
    "python benchmarks/cfg_batching.py --size 256": [
        "--size",
        "64",
        "--steps",
        "2",
        "--repeats",
        "1",
        "--text_len",
        "8",
    ],
}

# files the run commands must have written (relative to the copy's root), per document
EXPECTED_OUTPUTS: dict[str, list[str]] = {
    "README.md": [
        "outputs/toy_circle.png",
        "outputs/toy_circle_dark.png",
        "outputs/example_base.png",
        "outputs/example_bright.png",
        "outputs/example_dark.png",
    ],
    "docs/training.md": [
        "outputs/toy_brightness/run/checkpoint-4/template.json",
        "outputs/toy_brightness.png",
        "outputs/toy_brightness/package/template.json",
        "outputs/toy_script/run/latest.json",
    ],
}


def shell_commands(text: str) -> list[str]:
    """The commands of every ```bash block: continuations joined, blank and comment lines skipped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def normalise(command: str) -> str:
    """Words without quoting or trailing comments, single-spaced: what the lists above match."""
    return " ".join(shlex.split(command, comments=True))


def classify(command: str) -> tuple[str, str]:
    """("not_here", reason), ("covered", where) or ("run", "")."""
    words = normalise(command)
    for pattern, reason in NOT_HERE:
        if re.search(pattern, words):
            return "not_here", reason
    for pattern, where in COVERED.items():
        if re.search(pattern, words):
            return "covered", where
    return "run", ""


def all_commands() -> dict[str, list[str]]:
    return {doc: shell_commands((ROOT / doc).read_text()) for doc in DOCS}


def copy_repository(dest: Path) -> Path:
    """The tracked and unignored files of the checkout (no outputs/, no venvs) copied into ``dest``."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        files = [f for f in listed.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but outputs
        skip = {".git", "outputs", ".venv", ".venv-ref", "__pycache__", ".pytest_cache", ".ruff_cache"}
        files = [
            str(p.relative_to(ROOT))
            for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
        ]
    # a virtualenv inside the checkout under a name .gitignore does not know (e.g. venv/) stays out
    venvs = {cfg.parent.name for cfg in ROOT.glob("*/pyvenv.cfg")}
    for name in files:
        source = ROOT / name
        if Path(name).parts[0] in venvs:
            continue
        if source.is_file():  # a tracked file deleted in the working tree is left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def test_docs_have_commands_and_every_list_entry_is_used():
    commands = [c for doc in DOCS for c in all_commands()[doc]]
    assert len(commands) > 10, commands
    words = [normalise(c) for c in commands]
    for pattern, reason in NOT_HERE:
        assert reason and any(re.search(pattern, w) for w in words), (
            f"NOT_HERE entry {pattern!r} matches no command"
        )
    for pattern in COVERED:
        assert any(re.search(pattern, w) for w in words), f"COVERED entry {pattern!r} matches no command"
    for command in TINY:
        assert command in words, f"TINY entry {command!r} matches no command"


def test_no_reference_outside_the_repository():
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        assert "DESIGN.md" not in text and "../shared" not in text, doc
        for target in re.findall(r"\]\(([^)#]+)", text):  # relative markdown links must exist
            if not re.match(r"[a-z]+://", target):
                path = ((ROOT / doc).parent / target).resolve()
                assert path.is_relative_to(ROOT) and path.exists(), f"{doc} links to {target}"


def test_covered_commands_are_where_they_say():
    ci = (ROOT / ".ci" / "run").read_text()
    ci_lines = [normalise(line) for line in re.sub(r"\\\n\s*", "", ci).splitlines() if line.strip()]
    for doc, commands in all_commands().items():
        for command in commands:
            kind, where = classify(command)
            if kind != "covered":
                continue
            if where == ".ci/run":
                # each `&&` part, verbatim or with `python -m pip install -q` for `pip install`
                for part in normalise(command).split(" && "):
                    variants = {part, part.replace("pip install", "python -m pip install -q", 1)}
                    assert any(
                        line.startswith(v) or f"&& {v}" in line for line in ci_lines for v in variants
                    ), f"{doc}: {part!r} is not in .ci/run"
            else:
                file, name = where.split("::")
                assert re.search(rf"^def {name}\(", (ROOT / file).read_text(), flags=re.M), where


@pytest.mark.parametrize("doc", [d for d in DOCS if any(classify(c)[0] == "run" for c in all_commands()[d])])
def test_documented_commands_run(doc, tmp_path):
    """Runs the document's commands in order in one fresh copy (later ones use earlier outputs)."""
    repo = copy_repository(tmp_path / "repo")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "DIFFSYNTH_TEMPLATES_OFFLINE": "1",  # a documented command that would download fails instead
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    timings = []
    for command in all_commands()[doc]:
        kind, _ = classify(command)
        if kind != "run":
            continue
        if normalise(command) in TINY:
            command = f"{command.split(' #')[0]} {shlex.join(TINY[normalise(command)])}"
        start = time.perf_counter()
        out = subprocess.run(
            ["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True, timeout=600
        )
        timings.append((time.perf_counter() - start, command[:90]))
        assert out.returncode == 0, f"{doc}: `{command}` failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    for name in EXPECTED_OUTPUTS.get(doc, []):
        assert (repo / name).is_file(), f"{doc}: the commands did not write {name}"
    print("\n".join(f"{s:6.1f} s  {c}" for s, c in timings))


def test_make_ref_env_sees_this_interpreters_packages(tmp_path):
    """The README's reference env works from a virtualenv too: its python imports what this one does."""
    env = tmp_path / "ref"
    out = subprocess.run(
        [sys.executable, "benchmarks/make_ref_env.py", str(env), "--no-install"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    python = Path(out.stdout.strip().splitlines()[-1])
    assert python.parent.parent == env
    probe = "import sys, torch, diffusers, diffsynth_templates; print(sys.prefix, torch.__version__)"
    seen = subprocess.run([str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert seen.returncode == 0, seen.stderr[-2000:]
    prefix, version = seen.stdout.split()
    assert Path(prefix) == env and version == __import__("torch").__version__
