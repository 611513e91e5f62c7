"""Fuzzing ``template.json`` (issue 20): a few hundred seeded random mutations of a real declarative
template (the shipped toy brightness one). Loading either succeeds or raises one of our own errors
(``DiffSynthTemplatesError``); a TypeError / KeyError / AttributeError / UnicodeDecodeError / ... is a
validation gap in ``validate_template_json`` or ``build_architecture``."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from diffsynth_templates.errors import DiffSynthTemplatesError
from diffsynth_templates.templates import TemplatePipeline
from diffsynth_templates.templates.folder import load_template_folder
from diffsynth_templates.templates.residency import HostStore

BRIGHTNESS = Path(__file__).resolve().parents[2] / "models" / "toy" / "templates" / "brightness"
CASES = 300
SEED = 20


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("fuzz")
    folder = root / "brightness"
    shutil.copytree(BRIGHTNESS, folder)
    shutil.copy(folder / "model.safetensors", root / "outside.safetensors")
    os.symlink(root / "outside.safetensors", folder / "link.safetensors")  # a symlink out of the folder
    return folder, json.loads((folder / "template.json").read_text())


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every position in a JSON tree (keys and list indices)."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _random_value(rng: random.Random, outside: str) -> Any:
    return rng.choice(
        [
            "x",
            "",
            "scale",
            "value_kv",
            0,
            -1,
            1,
            3,
            10**30,
            -(10**30),
            2**63,
            0.5,
            -1e308,
            1e308,
            float("nan"),
            float("inf"),
            float("-inf"),
            True,
            False,
            None,
            [],
            [1],
            ["x"],
            [[0.0, 1.0]],
            [None],
            {},
            {"a": 1},
            {"name": "x"},
            "../model.safetensors",
            "../../x.safetensors",
            outside,
            "/etc/passwd",
            "link.safetensors",
            "model.safetensors\x00",
            "sub/../../model.safetensors",
            "ünïcode",
            [[[[[]]]]],
        ]
    )


def _set(tree: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return tree


def _delete(tree: Any, path: tuple) -> Any:
    if not path:
        return tree
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    return tree


def mutate(rng: random.Random, valid: dict, outside: str) -> tuple[bytes, str]:
    """One to three mutations of ``valid``; returns the file's bytes and a description."""
    data = copy.deepcopy(valid)
    steps = []
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(_paths(data))
        kind = rng.random()
        if kind < 0.25 and path:
            data = _delete(data, path)
            steps.append(f"del {list(path)}")
        elif kind < 0.35 and path and path[0] == "weights":
            data["weights"] = [rng.choice(["../outside.safetensors", outside, "link.safetensors"])]
            steps.append(f"weights={data['weights']}")
        else:
            value = _random_value(rng, outside)
            data = _set(data, path, value)
            steps.append(f"{list(path)}={value!r}")
    text = json.dumps(data).encode()
    kind = rng.random()
    if kind < 0.08:  # truncated
        text = text[: rng.randrange(len(text))]
        steps.append("truncated")
    elif kind < 0.14:  # not UTF-8
        at = rng.randrange(len(text))
        text = text[:at] + bytes([rng.choice([0x80, 0xFF, 0xC3, 0xFE])]) + text[at:]
        steps.append(f"byte at {at}")
    return text, "; ".join(steps)


def test_template_json_mutations_raise_only_our_errors(template):
    folder, valid = template
    rng = random.Random(SEED)
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(CASES):
        text, what = mutate(rng, valid, str(folder.parent / "outside.safetensors"))
        (folder / "template.json").write_bytes(text)
        try:
            if case % 5:
                load_template_folder(folder)
            else:
                TemplatePipeline.from_pretrained([str(folder)], host_store=HostStore())
            outcomes["loaded"] += 1
        except DiffSynthTemplatesError:
            outcomes["refused"] += 1
        except Exception as e:  # noqa: BLE001 - the point of the test: name the leak and the mutation
            pytest.fail(f"case {case} ({what}) leaked {type(e).__name__}: {e}")
    assert outcomes["refused"] > CASES // 2 and outcomes["loaded"] > 0, outcomes
