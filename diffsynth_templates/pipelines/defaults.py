"""Recommended generation settings (size, steps, guidance) of a model folder.

    recommended_defaults("models/toy/base")            # 64 x 64, 20 steps, cfg 1.0 (its own JSON file)
    recommended_defaults("black-forest-labs/FLUX.2-klein-4B")  # distilled: 1024 x 1024, 4 steps, cfg 1.0

Sources, first match wins (per field):
1. ``generation_defaults.json`` in the folder (``height``, ``width``, ``num_inference_steps``,
   ``cfg_scale``; any subset), which our own folders carry;
2. the official models, recognised from their config files: FLUX.2-klein (``model_index.json``'s
   ``is_distilled``: distilled 4 steps without CFG, base 50 steps with cfg 4) and Z-Image (Turbo 8 steps
   without CFG, base 50 steps with CFG, like ``ZImagePipeline``'s variants);
3. the generic defaults, 1024 x 1024, 50 steps, cfg 4 (what the pipelines use when called bare).

Using a model at the wrong settings is not an error, only slow or poor (the toy model at 1024 px and 50
steps takes 40 minutes per image), so ``infer.py`` uses these whenever the user gives none.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import DiffSynthTemplatesError
from ..loading.finite import NonFiniteError, check_finite_number
from ..loading.resolve import resolve_model_path
from .families import FAMILIES
from .families.flux2 import KLEIN_BASE_SAMPLING, KLEIN_DISTILLED_SAMPLING

DEFAULTS_FILE = "generation_defaults.json"
FIELDS = ("height", "width", "num_inference_steps", "cfg_scale")


class GenerationDefaultsError(DiffSynthTemplatesError, ValueError):
    """A ``generation_defaults.json`` that is not a JSON object of the known fields with sane values."""


@dataclass(frozen=True)
class GenerationDefaults:
    """What to generate at when the user does not say; ``source`` says where the values came from."""

    height: int
    width: int
    num_inference_steps: int
    cfg_scale: float
    source: str

    def describe(self) -> str:
        return (
            f"{self.height}x{self.width}, {self.num_inference_steps} steps, cfg {self.cfg_scale:g} "
            f"({self.source})"
        )


GENERIC = GenerationDefaults(1024, 1024, 50, 4.0, "generic defaults")
KLEIN_BASE = GenerationDefaults(1024, 1024, *KLEIN_BASE_SAMPLING)
KLEIN_DISTILLED = GenerationDefaults(1024, 1024, *KLEIN_DISTILLED_SAMPLING)


def recommended_defaults(
    model: str | os.PathLike,
    *,
    variant: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
) -> GenerationDefaults:
    """The recommended settings of a local model folder or ModelScope id (see the module docstring).

    ``variant`` ("turbo" or "base") only matters for Z-Image; left out it is read from the name as
    ``ZImagePipeline.from_pretrained`` does.
    """
    root = resolve_model_path(
        model,
        allow_patterns=[DEFAULTS_FILE, "model_index.json", "transformer/config.json", "config.json"],
        revision=revision,
        cache_dir=cache_dir,
        offline=offline,
    )
    return defaults_of_folder(root, model, variant)


def defaults_of_folder(
    root: Path, model: str | os.PathLike | None = None, variant: str | None = None
) -> GenerationDefaults:
    """``recommended_defaults`` for a model folder resolved already (``model``: its name as given,
    which tells Z-Image's variants apart)."""
    known = _recognised(root, str(root if model is None else model), variant)
    own = _read_defaults_file(root / DEFAULTS_FILE)
    if own:
        return replace(known, **own, source=f"{root / DEFAULTS_FILE}")
    return known


def _recognised(root: Path, name: str, variant: str | None) -> GenerationDefaults:
    index = _json_object(root / "model_index.json")
    classes = {
        index.get("_class_name"),
        _json_object(root / "transformer" / "config.json").get("_class_name"),
        _json_object(root / "config.json").get("_class_name"),
    }
    for family in FAMILIES.values():  # each family recognises its own released models
        found = family.recommended_sampling(index, classes, name, variant)
        if found is not None:
            steps, cfg_scale, source = found
            return GenerationDefaults(1024, 1024, steps, cfg_scale, source)
    return GENERIC


def _json_object(path: Path) -> dict:
    """A config file's object, or ``{}`` when absent or unreadable (recognition is best effort: the
    pipeline's own loading reports broken configs with their path)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_defaults_file(path: Path) -> dict:
    """The validated fields of a ``generation_defaults.json`` (``{}`` when there is none)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError covers JSON and UTF-8 errors
        raise GenerationDefaultsError(f"cannot read {str(path)!r}: {e}") from e
    if not isinstance(data, dict):
        raise GenerationDefaultsError(f"{str(path)!r} must hold a JSON object with any of {list(FIELDS)}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise GenerationDefaultsError(f"{str(path)!r}: unknown key(s) {unknown}; known: {list(FIELDS)}")
    out = {}
    for key, value in data.items():
        if key == "cfg_scale":
            what = "a finite number >= 0"
            try:
                value = check_finite_number("cfg_scale", value)
            except NonFiniteError:
                raise GenerationDefaultsError(f"{str(path)!r}: {key} must be {what}, got {value!r}") from None
            ok = value >= 0
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            what = "an integer >= 1"
        if not ok:
            raise GenerationDefaultsError(f"{str(path)!r}: {key} must be {what}, got {value!r}")
        out[key] = float(value) if key == "cfg_scale" else value
    return out
