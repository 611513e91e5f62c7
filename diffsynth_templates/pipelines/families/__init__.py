"""The backbone families this library knows, one record each (``Family``), and how to find one.

Adding a backbone: its ``nn.Module``s under ``backbones/``, one family file here (its adapter, KV
layout, sigma draw, capabilities), its pipeline module, and one line in ``FAMILIES``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from ...loading.resolve import resolve_model_path
from ..common import PipelineInputError
from .base import Family, KVLayout, UnsupportedFeatureError
from .flux2 import FLUX2
from .zimage import ZIMAGE

__all__ = [
    "FAMILIES",
    "Family",
    "KVLayout",
    "UnsupportedFeatureError",
    "detect_family",
    "family_of_config",
    "family_of_dit",
    "family_of_folder",
    "get_family",
]

FAMILIES: dict[str, Family] = {"flux2": FLUX2, "zimage": ZIMAGE}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise PipelineInputError(f"unknown backbone {name!r}; expected one of {tuple(FAMILIES)}")
    return FAMILIES[name]


def family_of_dit(dit: nn.Module) -> Family:
    for family in FAMILIES.values():
        if isinstance(dit, family.dit_class):
            return family
    names = " or a ".join(f.dit_class.__name__ for f in FAMILIES.values())
    raise PipelineInputError(f"expected a {names}, got {type(dit).__name__}")


def family_of_config(config: object) -> Family | None:
    """The family of a DiT config, or None when it is none of ours."""
    for family in FAMILIES.values():
        if isinstance(config, family.dit_config_class):
            return family
    return None


def _class_name(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise PipelineInputError(f"{str(path)!r} is not a JSON object: {e}") from e


def detect_family(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
) -> Family:
    """The family of a local model folder or a ModelScope id (or a transformer folder), read from
    ``model_index.json``'s ``_class_name`` (what diffusers writes), else ``transformer/config.json``'s
    (or ``config.json``'s); anything else is an error that says what was found."""
    root = resolve_model_path(
        source,
        allow_patterns=["model_index.json", "transformer/config.json", "config.json"],
        revision=revision,
        cache_dir=cache_dir,
        offline=offline,
    )
    return family_of_folder(root, source)


def family_of_folder(root: Path, source: str | os.PathLike | None = None) -> Family:
    """``detect_family`` for a folder resolved already (``source``: what the user named, for messages)."""
    source = root if source is None else source
    by_class = {name: family for family in FAMILIES.values() for name in family.class_names}
    found = []
    for path in (root / "model_index.json", root / "transformer" / "config.json", root / "config.json"):
        name = _class_name(path)
        if name is None:
            continue
        found.append(f"{path.relative_to(root)}: {name!r}")
        if name in by_class:
            return by_class[name]
    raise PipelineInputError(
        f"cannot tell which backbone {str(source)!r} is: "
        f"{'; '.join(found) if found else 'it has no model_index.json, transformer/config.json or config.json'}. "
        f"Known classes: {sorted(by_class)}"
    )
