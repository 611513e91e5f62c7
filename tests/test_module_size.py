"""Module size and copy-paste checks over the package (issue 21: one home per idea).

* No module of ``diffsynth_templates`` is longer than ``MAX_LINES`` lines.
* No two modules (or two places in one module) share a run of ``WINDOW`` or more identical lines, after
  stripping whitespace and dropping blank and comment-only lines. A shared run is a helper that
  should exist once.
Known offenders owned by other work in flight are listed explicitly below, so any NEW one fails.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffsynth_templates"
MAX_LINES = 650
WINDOW = 10

# Modules allowed over MAX_LINES, each with the reason. Keep empty: split a module by job instead.
OVERSIZED: dict[str, str] = {}

# Module pairs known to share runs, with the reason; remove an entry once the duplicate is gone.
KNOWN_DUPLICATES: dict[frozenset[str], str] = {}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _name(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


def normalized_lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of every line that is neither blank nor only a comment."""
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            out.append((number, stripped))
    return out


def shared_runs(files: dict[str, str], window: int = WINDOW) -> dict[frozenset[str], list[str]]:
    """Pairs of files (a pair of one file: a run repeated inside it) sharing ``window`` consecutive
    normalized lines, each with where the shared runs start. Windows are hashed into one map."""
    seen: dict[bytes, list[tuple[str, int]]] = defaultdict(list)
    for name, text in files.items():
        lines = normalized_lines(text)
        for i in range(len(lines) - window + 1):
            chunk = "\n".join(line for _, line in lines[i : i + window])
            seen[hashlib.sha1(chunk.encode()).digest()].append((name, lines[i][0]))
    found: dict[frozenset[str], list[str]] = defaultdict(list)
    for places in seen.values():
        for i, (name_a, line_a) in enumerate(places):
            for name_b, line_b in places[i + 1 :]:
                found[frozenset((name_a, name_b))].append(f"{name_a}:{line_a} == {name_b}:{line_b}")
    return dict(found)


def test_no_module_over_the_line_limit():
    too_long = {_name(p): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    unexpected = {name: n for name, n in too_long.items() if name not in OVERSIZED}
    assert not unexpected, (
        f"modules over {MAX_LINES} lines: {unexpected}; split each by job (one module per job), "
        "keeping the old import path working by re-exporting its public names"
    )
    stale = sorted(set(OVERSIZED) - set(too_long))
    assert not stale, f"{stale} are within {MAX_LINES} lines now; remove them from OVERSIZED"


def test_no_two_modules_share_a_run_of_identical_lines():
    runs = shared_runs({_name(p): p.read_text() for p in _modules()})
    new = {pair: where for pair, where in runs.items() if pair not in KNOWN_DUPLICATES}
    report = "\n".join(
        f"  {sorted(pair)}: first at {where[0]} ({len(where)} windows)" for pair, where in new.items()
    )
    assert not new, (
        f"runs of {WINDOW}+ identical non-blank, non-comment lines in more than one place:\n{report}\n"
        "move the shared code into one helper and call it from both places"
    )
    fixed = sorted(sorted(pair) for pair in set(KNOWN_DUPLICATES) - set(runs))
    assert not fixed, f"{fixed} no longer share code; remove them from KNOWN_DUPLICATES"


# --- the checker itself ---------------------------------------------------------------------------


def _block(tag: str, n: int = WINDOW) -> str:
    return "\n".join(f"value_{tag}_{i} = compute({i})" for i in range(n))


def test_checker_finds_a_shared_run_across_files_despite_whitespace_blanks_and_comments():
    shared = _block("s")
    spaced = "\n\n".join(f"    {line}" for line in shared.splitlines())  # indented, blank lines between
    a = f"import x\n{shared}\nother_a = 1\n"
    b = f"def f():\n    # a comment\n{spaced}\n"
    runs = shared_runs({"a.py": a, "b.py": b})
    assert set(runs) == {frozenset({"a.py", "b.py"})}
    assert runs[frozenset({"a.py", "b.py"})][0] == "a.py:2 == b.py:3"


def test_checker_ignores_runs_shorter_than_the_window_and_finds_repeats_in_one_file():
    short = _block("t", WINDOW - 1)
    assert shared_runs({"a.py": short + "\nx = 1\n", "b.py": short + "\ny = 2\n"}) == {}
    one = _block("r") + "\nsplit = 0\n" + _block("r")
    assert set(shared_runs({"a.py": one})) == {frozenset({"a.py"})}


@pytest.mark.parametrize("text", ["", "# only\n# comments\n", "\n\n\n"])
def test_normalized_lines_drop_blank_and_comment_lines(text):
    assert normalized_lines(text) == []
