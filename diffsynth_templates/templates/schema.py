"""Declared template inputs: names, types, ranges; validated before a template runs.

Every number in a template's inputs must be finite, declared or not: NaN or inf in a scale turns the
whole image black. A schema with a ``mask`` field also accepts ``resize_mask`` (true / false, not
declared): a mask of another size than its image is an error unless ``resize_mask`` is true, which
stretches the mask to the image first (see ``pipelines.image_io.inpaint_pair``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import DiffSynthTemplatesError

FIELD_TYPES = ("float", "int", "bool", "str", "image", "mask", "list[float]", "list[int]", "any")
#: keys the template framework reads itself; never passed to a template
RESERVED_KEYS = ("model_id", "step_start", "step_end", "strength")
#: the framework's per-template strength (DESIGN.md 4.7) when an input does not give one
DEFAULT_STRENGTH = 1.0
#: the implied companion of a ``mask`` field (see the module docstring)
RESIZE_MASK = "resize_mask"


class TemplateInputError(DiffSynthTemplatesError, ValueError):
    """A template's inputs do not match its declared schema."""


@dataclass
class InputField:
    name: str
    type: str = "any"
    required: bool = True
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TemplateInputError(f"input field name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.type, str) or self.type not in FIELD_TYPES:
            raise TemplateInputError(
                f"input field {self.name!r} has type {self.type!r}; expected one of {FIELD_TYPES}"
            )
        if self.name in RESERVED_KEYS:
            raise TemplateInputError(
                f"input field name {self.name!r} is reserved by the framework ({RESERVED_KEYS})"
            )
        if not isinstance(self.required, bool):
            raise TemplateInputError(
                f"input field {self.name!r}: required must be true or false, got {self.required!r}"
            )
        for bound in ("minimum", "maximum"):
            value = getattr(self, bound)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            ):
                raise TemplateInputError(
                    f"input field {self.name!r}: {bound} must be a finite number or absent, got {value!r}"
                )
        if not isinstance(self.description, str):
            raise TemplateInputError(
                f"input field {self.name!r}: description must be a string, got {self.description!r}"
            )

    def check(self, value: Any, template: str) -> Any:
        where = f"{template}: input {self.name!r}"
        if self.type in ("float", "int"):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TemplateInputError(f"{where} must be a number, got {value!r}")
            if not _finite(value):
                raise TemplateInputError(f"{where} must be a finite number, got {value!r}")
            if self.type == "int" and int(value) != value:
                raise TemplateInputError(f"{where} must be an integer, got {value!r}")
            self._check_range(float(value), where)
            return int(value) if self.type == "int" else float(value)
        if self.type in ("list[float]", "list[int]"):
            values = value if isinstance(value, (list, tuple)) else [value]
            checked = [InputField(self.name, self.type[5:-1], minimum=self.minimum, maximum=self.maximum).check(v, template) for v in values]  # fmt: skip
            return checked
        if self.type == "bool" and not isinstance(value, bool):
            raise TemplateInputError(f"{where} must be true or false, got {value!r}")
        if self.type == "str" and not isinstance(value, str):
            raise TemplateInputError(f"{where} must be a string, got {value!r}")
        if self.type in ("image", "mask") and not isinstance(value, (Image.Image, np.ndarray, torch.Tensor)):
            raise TemplateInputError(
                f"{where} must be an image (PIL image, numpy array or tensor), got {type(value).__name__}"
            )
        return value

    def _check_range(self, value: float, where: str) -> None:
        if self.minimum is not None and value < self.minimum:
            raise TemplateInputError(f"{where} = {value} is below the minimum {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise TemplateInputError(f"{where} = {value} is above the maximum {self.maximum}")


@dataclass
class InputSchema:
    fields: list[InputField] = field(default_factory=list)
    allow_extra: bool = False

    def validate(self, inputs: dict[str, Any], template: str) -> dict[str, Any]:
        """Return the inputs with defaults filled in; raise naming the first bad, missing or unknown field."""
        if not isinstance(inputs, Mapping):
            raise TemplateInputError(f"{template}: inputs must be a dict of name -> value, got {inputs!r}")
        known = {f.name: f for f in self.fields}
        if RESIZE_MASK not in known and any(f.type == "mask" for f in self.fields):
            known[RESIZE_MASK] = InputField(RESIZE_MASK, "bool", required=False)
        unknown = [k for k in inputs if k not in known and k not in RESERVED_KEYS]
        if unknown and not self.allow_extra:
            raise TemplateInputError(
                f"{template}: unknown input(s) {unknown}; this template takes {sorted(known)}"
            )
        check_finite_inputs(inputs, template)
        out = {k: v for k, v in inputs.items() if k not in RESERVED_KEYS}
        for f in known.values():
            if f.name not in inputs:
                if f.required and f.default is None:
                    raise TemplateInputError(
                        f"{template}: missing input {f.name!r} ({f.type}{_range_text(f)}){': ' + f.description if f.description else ''}"
                    )  # fmt: skip
                if f.default is not None:
                    out[f.name] = f.default
                continue
            out[f.name] = f.check(inputs[f.name], template)
        return out

    def to_json(self) -> list[dict]:
        return [{k: v for k, v in asdict(f).items() if v not in (None, "")} for f in self.fields]

    @classmethod
    def from_json(cls, data: list[dict] | dict | None) -> InputSchema | None:
        """Read a template's ``inputs``: a list of fields, or ``{"fields": [...], "allow_extra": bool}``."""
        if data is None:
            return None
        allow_extra = False
        if isinstance(data, Mapping):  # {"fields": [...], "allow_extra": bool}
            unknown = sorted(set(data) - {"fields", "allow_extra"})
            if unknown:
                raise TemplateInputError(
                    f"inputs has unknown key(s) {unknown}; expected 'fields', 'allow_extra'"
                )
            allow_extra = data.get("allow_extra", False)
            if not isinstance(allow_extra, bool):
                raise TemplateInputError(f"inputs 'allow_extra' must be true or false, got {allow_extra!r}")
            data = data.get("fields", [])
        if not isinstance(data, (list, tuple)):
            raise TemplateInputError(
                f"inputs must be a list of input fields ({{'name': ..., 'type': ...}}), got {data!r}"
            )
        return cls([_field_from_json(i, f) for i, f in enumerate(data)], allow_extra)


_FIELD_KEYS = tuple(f.name for f in fields(InputField))


def _field_from_json(index: int, data: Any) -> InputField:
    if not isinstance(data, Mapping):
        raise TemplateInputError(f"inputs[{index}] must be an object with 'name' and 'type', got {data!r}")
    unknown = sorted(set(data) - set(_FIELD_KEYS))
    if unknown or "name" not in data:
        raise TemplateInputError(
            f"inputs[{index}] ({data.get('name')!r}) has unknown key(s) {unknown} or no 'name'; "
            f"an input field takes {list(_FIELD_KEYS)}"
        )
    return InputField(**data)


def read_strength(item: Mapping[str, Any], template: str) -> float:
    """A template input's ``strength`` (default 1): a finite number >= 0, else an error naming it."""
    value = item.get("strength", DEFAULT_STRENGTH)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _finite(value) or value < 0:
        raise TemplateInputError(
            f"{template}: strength must be a finite number >= 0 (0: without this template, 1: as trained, "
            f"above 1: amplified), got {value!r}"
        )
    return float(value)


def check_finite_inputs(inputs: Mapping[str, Any], template: str) -> None:
    """Refuse NaN / inf anywhere in template inputs (numbers, lists, dicts, arrays, tensors), declared
    or not, naming the template and the input."""
    for name, value in inputs.items():
        if not _finite(value):
            raise TemplateInputError(
                f"{template}: input {name!r} holds NaN or inf ({_short(value)}); pass finite values"
            )


def _finite(value: Any) -> bool:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return True
    if isinstance(value, numbers.Real):
        try:
            return math.isfinite(value)
        except OverflowError:  # an int too large for a float
            return False
    if isinstance(value, torch.Tensor):
        return not (value.is_floating_point() or value.is_complex()) or bool(torch.isfinite(value).all())
    if isinstance(value, np.ndarray):
        return not np.issubdtype(value.dtype, np.inexact) or bool(np.isfinite(value).all())
    if isinstance(value, Mapping):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return True


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, (torch.Tensor, np.ndarray)) else f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def _range_text(f: InputField) -> str:
    if f.minimum is None and f.maximum is None:
        return ""
    return f" in [{f.minimum if f.minimum is not None else '-inf'}, {f.maximum if f.maximum is not None else 'inf'}]"
