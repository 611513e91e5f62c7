"""Built-in template architectures, by name, so declarative folders load with no code execution.

An architecture is a ``TemplateModel`` subclass with a dataclass ``config_class``; it is built as
``cls(config_class(**config))``. The zoo modules register theirs with ``@register_architecture``.
"""

from __future__ import annotations

import importlib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from typing import Any

import torch

from .base import TemplateError, TemplateModel

_ARCHITECTURES: dict[str, type[TemplateModel]] = {}
# modules that register the built-in zoo; imported on first lookup so the registry is always complete
_ZOO_MODULES = ("diffsynth_templates.templates.zoo",)


class UnknownArchitectureError(TemplateError):
    pass


class ArchitectureConfigError(TemplateError):
    """A config (from template.json or a training config) does not fit the architecture's config class."""


def register_architecture(name: str) -> Callable[[type[TemplateModel]], type[TemplateModel]]:
    def wrap(cls: type[TemplateModel]) -> type[TemplateModel]:
        if not is_dataclass(getattr(cls, "config_class", None)):
            raise TypeError(
                f"architecture {name!r} ({cls.__name__}) needs a dataclass `config_class` attribute"
            )
        if name in _ARCHITECTURES and _ARCHITECTURES[name] is not cls:
            raise ValueError(
                f"architecture name {name!r} is already registered by {_ARCHITECTURES[name].__name__}"
            )
        _ARCHITECTURES[name] = cls
        cls.architecture = name
        return cls

    return wrap


def _load_zoo() -> None:
    for module in _ZOO_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # the zoo exists but something it imports is missing: say so
                raise


def get_architecture(name: str) -> type[TemplateModel]:
    _load_zoo()
    if not isinstance(name, str) or name not in _ARCHITECTURES:
        raise UnknownArchitectureError(
            f"unknown template architecture {name!r}; built-in architectures are {sorted(_ARCHITECTURES)}"
        )
    return _ARCHITECTURES[name]


def available_architectures() -> list[str]:
    _load_zoo()
    return sorted(_ARCHITECTURES)


def build_architecture(
    name: str, config: dict[str, Any] | None = None, *, where: str | None = None
) -> TemplateModel:
    """Instantiate a registered architecture from its JSON config.

    Unknown keys, values of the wrong JSON type (checked against the config class's annotations) and
    values the config class rejects are an ``ArchitectureConfigError`` naming the key; ``where`` (e.g.
    ``"DIR/template.json 'config'"``) says where the config came from.
    """
    cls = get_architecture(name)
    where = where or f"config of architecture {name!r}"
    if config is not None and not isinstance(config, dict):
        raise ArchitectureConfigError(f"{where} must be an object of settings, got {config!r}")
    config = dict(config or {})
    known = {f.name for f in fields(cls.config_class)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ArchitectureConfigError(
            f"{where}: architecture {name!r} has no config field(s) {unknown}; its fields are {sorted(known)}"
        )
    hints = _config_hints(cls.config_class)
    for key, value in config.items():
        expected = _mismatch(hints.get(key, Any), value)
        if expected is not None:
            raise ArchitectureConfigError(
                f"{where}: {key!r} must be {expected}, got {value!r} ({type(value).__name__})"
            )
    try:
        return cls(cls.config_class(**config))
    except torch.OutOfMemoryError:
        raise
    except (TypeError, ValueError, OverflowError, ZeroDivisionError, IndexError, KeyError, RuntimeError) as e:
        # the config class's own checks, or a value the model cannot be built with (e.g. an absurd size)
        raise ArchitectureConfigError(f"{where} does not fit architecture {name!r}: {e}") from e


def _config_hints(config_class: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(config_class)
    except Exception:  # annotations that do not resolve: only the config class's own checks apply
        return {}


def _mismatch(hint: Any, value: Any) -> str | None:
    """What ``hint`` expects when ``value`` (parsed JSON) does not fit it, else None. Unknown hints fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or origin is typing.ClassVar:
        return None
    if origin in (typing.Union, types.UnionType):
        found = [_mismatch(a, value) for a in args]
        return None if None in found else " or ".join(f for f in found if f)
    if hint is type(None):
        return None if value is None else "null"
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            ok = ok and math.isfinite(float(value))
        except OverflowError:
            ok = False
        return None if ok else "a finite number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return f"a list ({_describe(hint)})"
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                return f"a list of {len(args)} items ({_describe(hint)})"
            items = list(zip(args, value))
        else:
            items = [(args[0], v) for v in value] if args else []
        for item_hint, item in items:
            if _mismatch(item_hint, item) is not None:
                return f"a list ({_describe(hint)})"
        return None
    if origin is dict or hint is dict:
        return None if isinstance(value, dict) else "an object"
    return None  # a type this check does not know: left to the config class


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "")
