"""Hardening of dataset metadata reading (issue 20): undecodable files, bad row types and fuzzed rows give
``DatasetError`` (or a bad row with its line), never a raw ``UnicodeDecodeError``/``TypeError``/``RuntimeError``.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffsynth_templates.errors import DiffSynthTemplatesError
from diffsynth_templates.training.dataset import DatasetError, read_metadata
from diffsynth_templates.training.metrics import MetricsLog, read_metrics


@pytest.fixture
def base(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(root / "images" / name)
    return root


GOOD = {"image": "images/a.png", "prompt": "a cat", "template_inputs": {"scale": 0.5, "map": "images/b.png"}}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------------
# undecodable files
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["metadata.csv", "metadata.jsonl", "metadata.json"])
def test_non_utf8_metadata_is_a_dataset_error_naming_file_and_line(base: Path, name: str) -> None:
    lines = {
        "metadata.csv": [b"image,prompt", b"images/a.png,a cat", b"images/b.png,caf\xe9 au lait"],
        "metadata.jsonl": [b'{"image": "images/a.png", "prompt": "a cat"}', b"", b'{"image": "images/b.png", "prompt": "caf\xe9"}'],
        "metadata.json": [b'[{"image": "images/a.png", "prompt": "a cat"},', b"", b'{"image": "images/b.png", "prompt": "caf\xe9"}]'],
    }[name]  # fmt: skip
    path = base / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DatasetError, match=rf"{path} is not UTF-8 text: line 3 holds the byte b'\\xe9'.*save the file as UTF-8"):  # fmt: skip
        read_metadata(path)


def test_bad_bytes_far_into_a_big_csv_name_their_line(base: Path) -> None:
    path = base / "metadata.csv"
    rows = [b"image,prompt"] + [b"images/a.png,a cat number %d" % i for i in range(3000)]
    rows[2500] = b"images/a.png,\xff\xfe"
    path.write_bytes(b"\r\n".join(rows))
    with pytest.raises(DatasetError, match="line 2501 holds the byte"):
        read_metadata(path)


def test_byte_order_mark_is_still_ignored(base: Path) -> None:
    path = base / "metadata.csv"
    path.write_bytes(b"\xef\xbb\xbfimage,prompt\nimages/a.png,a cat\n")
    assert [s.prompt for s in read_metadata(path).samples] == ["a cat"]


def test_deeply_nested_rows_are_errors_not_recursion(base: Path) -> None:
    deep = '{"image": "images/a.png", "prompt": "x", "template_inputs": ' + "[" * 100000 + "]" * 100000 + "}"
    path = base / "metadata.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + deep + "\n")
    report = read_metadata(path)
    assert [(b.line, b.reason) for b in report.bad_rows] == [(2, "JSON nested too deeply to read")]
    path = base / "metadata.json"
    path.write_text("[" + json.dumps(GOOD) + ",\n" + deep + "]")
    with pytest.raises(DatasetError, match="row starting on line 2 is nested too deeply"):
        read_metadata(path)


# --------------------------------------------------------------------------------------------------
# bad rows: each one a BadRow with its line, never a raw exception
# --------------------------------------------------------------------------------------------------

BAD_ROWS = [
    ({"template_inputs": ["images/b.png"]}, "template_inputs must be a JSON object, got list"),
    ({"template_inputs": "scale"}, "template_inputs is not valid JSON"),
    ({"template_inputs": "[1, 2]"}, "template_inputs must be a JSON dict, got list"),
    ({"template_inputs": 5}, "template_inputs must be a JSON object, got number"),
    ({"template_inputs": {"scale": float("nan")}}, "template_inputs\\['scale'\\] is nan; template inputs must be finite"),
    ({"template_inputs": {"a": [{"b": float("inf")}]}}, "template_inputs\\['a'\\]\\[0\\]\\['b'\\] is inf"),
    ({"template_inputs": {"map": "images/missing.png"}}, "template_inputs\\['map'\\] file not found: .*missing.png"),
    ({"image": "images/missing.png"}, "image file not found: .*images/missing.png"),
    ({"image": "~no_such_user_xyz/a.png"}, "image file not found: .*~no_such_user_xyz/a.png"),
    ({"image": ["images/a.png"]}, "'image' must be a path, got list"),
    ({"image": "images/a\x00.png"}, "image file not found"),
    ({"prompt": ["a", "b"]}, "'prompt' must be a string, got list"),
    ({"edit_image": {"x": 1}}, "'edit_image' must be a path, got object"),
    ({"edit_image": [1.5]}, "'edit_image' must be a path, got number"),
]  # fmt: skip


@pytest.mark.parametrize("change, reason", BAD_ROWS, ids=[r[1][:40] for r in BAD_ROWS])
def test_bad_row_types_are_reported_with_their_line(base: Path, change: dict, reason: str) -> None:
    path = _jsonl(base / "metadata.jsonl", [GOOD, {**GOOD, **change}, GOOD])
    report = read_metadata(path)
    assert len(report.samples) == 2 and [b.line for b in report.bad_rows] == [2]
    assert __import__("re").search(reason, report.bad_rows[0].reason), report.bad_rows[0].reason
    with pytest.raises(DatasetError, match=r"line 2: "):
        read_metadata(path, on_bad_row="error")


def test_json_file_with_nan_and_huge_numbers_in_template_inputs(base: Path) -> None:
    path = base / "metadata.jsonl"
    path.write_text(
        '{"image": "images/a.png", "prompt": "x", "template_inputs": {"scale": NaN}}\n'
        '{"image": "images/a.png", "prompt": "y", "template_inputs": {"scale": 1e999}}\n'
        '{"image": "images/a.png", "prompt": "z", "template_inputs": {"seed": 123456789012345678901234567890}}\n'
    )
    report = read_metadata(path)
    assert [b.line for b in report.bad_rows] == [1, 2]
    assert report.samples[0].template_inputs == {"seed": 123456789012345678901234567890}


def test_an_image_outside_the_base_with_dotdot_is_allowed(base: Path) -> None:
    (base / "meta").mkdir()
    path = _jsonl(base / "meta" / "metadata.jsonl", [{"image": "../images/a.png", "prompt": "x"}])
    assert read_metadata(path).samples[0].image == base / "images" / "a.png"


def test_csv_with_wrong_cell_types_is_reported_per_line(base: Path) -> None:
    path = base / "metadata.csv"
    path.write_text(
        "image,prompt,template_inputs,edit_image\n"
        'images/a.png,ok,"{""scale"": 1}",\n'
        'images/a.png,list,"[""a""]",\n'
        "images/a.png,word,scale,\n"
        'images/a.png,edit,,"{""x"": 1}"\n'
        'images/a.png,edits,,"[1, 2]"\n'
    )
    report = read_metadata(path)
    assert [s.prompt for s in report.samples] == ["ok"]  # a non-list edit cell is one path: not found
    assert [b.line for b in report.bad_rows] == [3, 4, 5, 6]


# --------------------------------------------------------------------------------------------------
# fuzz: random rows give samples or bad rows or DatasetError, nothing else
# --------------------------------------------------------------------------------------------------

VALUES = [None, True, 0, -1, 1.5, 2**70, "", " ", "x", "images/a.png", "images/missing.png", "../images/b.png",
          "~nobody_here/a.png", "/", "\x00", "[1]", "{}", '{"a": "images/b.png"}', [], [1], ["images/a.png"], {},
          {"a": None}, {"a": ["images/b.png", {"b": 2}]}, float("nan"), float("inf")]  # fmt: skip


def test_fuzzed_rows_give_only_dataset_errors(base: Path) -> None:
    rng = random.Random(5)
    outcomes = {"samples": 0, "bad_rows": 0, "errors": 0}
    for _ in range(150):
        rows = []
        for _ in range(3):
            row = copy.deepcopy(GOOD)
            for _ in range(rng.randint(1, 3)):
                key = rng.choice(["image", "prompt", "edit_image", "template_inputs", "extra"])
                if rng.random() < 0.2:
                    row.pop(key, None)
                else:
                    row[key] = copy.deepcopy(rng.choice(VALUES))
            rows.append(row)
        fmt = rng.choice(["jsonl", "json", "csv"])
        path = base / f"metadata.{fmt}"
        if fmt == "jsonl":
            data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        elif fmt == "json":
            data = json.dumps(rows).encode()
        else:
            cell = lambda v: v if isinstance(v, str) else json.dumps(v)  # noqa: E731
            data = ("image,prompt,edit_image,template_inputs,extra\n" + "".join(
                ",".join(json.dumps(cell(r.get(k, ""))) for k in ("image", "prompt", "edit_image", "template_inputs", "extra")) + "\n"
                for r in rows)).encode()  # fmt: skip
        if rng.random() < 0.15:
            i = rng.randrange(len(data))
            data = data[:i] + bytes([rng.choice([0xFF, 0xC3, 0x00, 0x22, 0x0A])]) + data[i + 1 :]
        path.write_bytes(data)
        try:
            report = read_metadata(path, num_workers=1)
        except DiffSynthTemplatesError:
            outcomes["errors"] += 1
        else:
            outcomes["samples"] += len(report.samples)
            outcomes["bad_rows"] += len(report.bad_rows)
        path.unlink()
    assert all(outcomes.values()), outcomes


# --------------------------------------------------------------------------------------------------
# metrics.csv of an earlier run that cannot be read
# --------------------------------------------------------------------------------------------------


def test_unreadable_metrics_file_is_set_aside_not_fatal(tmp_path: Path, caplog) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "metrics.csv").write_bytes(b"step,epoch,loss\n1,0,0.5\nxx,\xff,\n3\n")
    log = MetricsLog(tmp_path, resume_step=2, tensorboard=False)
    log.log(3, 0, 0.25, 1e-3, None, 0.1)
    log.close()
    assert [r["step"] for r in read_metrics(logs / "metrics.csv")] == ["3"]
    assert (logs / "metrics.csv.unreadable").read_bytes().startswith(b"step,epoch,loss\n1,0")
    assert "metrics.csv" in caplog.text
