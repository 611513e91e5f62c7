"""Declared template inputs: names, types, ranges; validated before a template runs."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import DiffSynthTemplatesError

FIELD_TYPES = ("float", "int", "bool", "str", "image", "mask", "list[float]", "list[int]", "any")
#: keys the template framework reads itself; never passed to a template
RESERVED_KEYS = ("model_id", "step_start", "step_end")


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
        if self.type not in FIELD_TYPES:
            raise ValueError(
                f"input field {self.name!r} has type {self.type!r}; expected one of {FIELD_TYPES}"
            )
        if self.name in RESERVED_KEYS:
            raise ValueError(f"input field name {self.name!r} is reserved by the framework ({RESERVED_KEYS})")

    def check(self, value: Any, template: str) -> Any:
        where = f"{template}: input {self.name!r}"
        if self.type in ("float", "int"):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TemplateInputError(f"{where} must be a number, got {value!r}")
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
        known = {f.name: f for f in self.fields}
        unknown = [k for k in inputs if k not in known and k not in RESERVED_KEYS]
        if unknown and not self.allow_extra:
            raise TemplateInputError(
                f"{template}: unknown input(s) {unknown}; this template takes {sorted(known)}"
            )
        out = {k: v for k, v in inputs.items() if k not in RESERVED_KEYS}
        for f in self.fields:
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
        if data is None:
            return None
        if isinstance(data, dict):  # {"fields": [...], "allow_extra": bool}
            return cls(
                [InputField(**f) for f in data.get("fields", [])], bool(data.get("allow_extra", False))
            )
        return cls([InputField(**f) for f in data])


def _range_text(f: InputField) -> str:
    if f.minimum is None and f.maximum is None:
        return ""
    return f" in [{f.minimum if f.minimum is not None else '-inf'}, {f.maximum if f.maximum is not None else 'inf'}]"
