"""Fuzz-style: seeded random mutations of examples/job.json through infer.py's job checks (reading,
schema validation, argument checks, template-input parsing; no generation). Only our own errors
(``DiffSynthTemplatesError``) may come out, or success."""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import infer  # noqa: E402
from diffsynth_templates.errors import DiffSynthTemplatesError  # noqa: E402

EXAMPLE = ROOT / "examples" / "job.json"
VALUES = [None, True, False, 0, -1, 1, 3, 2**70, -(2**70), 10**400, 1.5, -0.0, 1e308, float("nan"),
          float("inf"), float("-inf"), "", "x", "int8", "bf16", "a.png", "../../etc/passwd", "\x00", "é",
          [], {}, [1], ["a"], [{}], [{"model_id": 0}], [["nested"]], {"a": 1}, {"model_id": float("nan")}]  # fmt: skip


def mutate_object(job: dict, rng: random.Random, keys: list[str]) -> object:
    job = copy.deepcopy(job)
    kind = rng.randrange(7)
    if kind == 0:  # an unknown or near-miss key
        job[rng.choice(["guidance", "template", "seeds", "Steps", "prompt ", "trust_remote_code", "job"])] = 1
    elif kind == 1 and job:  # drop a key
        job.pop(rng.choice(sorted(job)))
    elif kind == 2:  # any known key, any value
        job[rng.choice(keys)] = rng.choice(VALUES)
    elif kind == 3 and job:  # an existing key, another type
        job[rng.choice(sorted(job))] = rng.choice(VALUES)
    elif kind == 4 and isinstance(job.get("template_inputs"), list) and job["template_inputs"]:
        entry = rng.choice(job["template_inputs"])
        if isinstance(entry, dict):
            entry[rng.choice(["model_id", "scale", "R", "image", "mask"])] = rng.choice(VALUES)
    elif kind == 5:  # the whole document another type
        return rng.choice(VALUES)
    else:  # list entries of the wrong kind
        job[rng.choice(list(infer.JOB_LISTS))] = [rng.choice(VALUES) for _ in range(rng.randrange(3))]
    return job


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return data[: rng.randrange(len(data))]  # truncated
    if kind == 1:
        i = rng.randrange(len(data))
        return data[:i] + bytes([rng.randrange(256)]) + data[i + 1 :]  # one byte flipped (maybe non-UTF-8)
    if kind == 2:
        return data.replace(b"0.8", rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"9" * 5000]))
    if kind == 3:
        return b"[" * 100_000 + b"]" * 100_000  # nesting past the recursion limit
    if kind == 4:
        return b"\xff\xfe" + data  # a byte-order mark / latin-1 garbage
    return data.replace(b'"seed": 0', rng.choice([b'"seed": 1.5', b'"seed": "x"', b'"seed": 1180591620717411303424']))  # fmt: skip


def check_job_file(path: Path) -> None:
    """What infer.generate does with a job before loading any model."""
    parser = infer.build_parser()
    job = infer.read_job(str(path), parser)
    parser.set_defaults(**{k: v for k, v in job.items() if k not in infer.JOB_LISTS})
    args = parser.parse_args(["--job", str(path)])
    infer.check_args(args)
    infer._template_job(args, job)


def run_case(path: Path, payload: bytes) -> str:
    path.write_bytes(payload)
    try:
        check_job_file(path)
    except DiffSynthTemplatesError:
        return "refused"
    except SystemExit as e:  # argparse converting a string default with a flag's type
        pytest.fail(f"argparse exit {e} for {payload[:200]!r}")
    except Exception as e:  # noqa: BLE001 - the point: anything else is a bug
        pytest.fail(f"{type(e).__name__}: {e} for {payload[:200]!r}")
    return "accepted"


def test_example_job_passes_the_checks(tmp_path):
    assert run_case(tmp_path / "job.json", EXAMPLE.read_bytes()) == "accepted"


def test_mutated_jobs_raise_only_our_errors(tmp_path):
    rng = random.Random(20)
    original = json.loads(EXAMPLE.read_text())
    keys = sorted(infer.job_keys(infer.build_parser()))
    outcomes = {"refused": 0, "accepted": 0}
    path = tmp_path / "job.json"
    for _ in range(300):
        mutated = mutate_object(original, rng, keys)
        for _ in range(rng.randrange(3)):  # sometimes several mutations at once
            mutated = mutate_object(mutated, rng, keys) if isinstance(mutated, dict) else mutated
        outcomes[run_case(path, json.dumps(mutated).encode())] += 1
    raw = EXAMPLE.read_bytes()
    for _ in range(100):
        outcomes[run_case(path, mutate_bytes(raw, rng))] += 1
    assert outcomes["refused"] > 100 and outcomes["accepted"] > 0, outcomes


def test_argparse_namespace_is_not_mutated_by_validation():
    """validate_job must not change the parser's own defaults (a second run starts clean)."""
    parser = infer.build_parser()
    infer.validate_job({"steps": 3}, "job.json", parser)
    assert parser.parse_args([]).num_inference_steps is None
    assert isinstance(parser.parse_args([]), argparse.Namespace)
