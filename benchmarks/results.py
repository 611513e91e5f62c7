"""``benchmarks/RESULTS.md`` holds one section per benchmark; each script replaces only its own."""

from __future__ import annotations

from pathlib import Path

HEADER = "# Benchmark results\n"


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace the section of ``path`` whose ``## `` heading starts with ``heading`` (or append
    ``section``); everything else in the file is kept. ``section`` starts with its own heading."""
    text = path.read_text() if path.is_file() else HEADER
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith(f"## {heading}")), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        rest = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + rest if rest else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # written whole, then renamed: never half a file
    tmp.write_text(new)
    tmp.replace(path)
