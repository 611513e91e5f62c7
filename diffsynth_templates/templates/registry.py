"""Built-in template architectures, by name, so declarative folders load with no code execution.

An architecture is a ``TemplateModel`` subclass with a dataclass ``config_class``; it is built as
``cls(config_class(**config))``. The zoo modules register theirs with ``@register_architecture``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from typing import Any

from .base import TemplateError, TemplateModel

_ARCHITECTURES: dict[str, type[TemplateModel]] = {}
# modules that register the built-in zoo; imported on first lookup so the registry is always complete
_ZOO_MODULES = ("diffsynth_templates.templates.zoo",)


class UnknownArchitectureError(TemplateError):
    pass


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
    if name not in _ARCHITECTURES:
        raise UnknownArchitectureError(
            f"unknown template architecture {name!r}; built-in architectures are {sorted(_ARCHITECTURES)}"
        )
    return _ARCHITECTURES[name]


def available_architectures() -> list[str]:
    _load_zoo()
    return sorted(_ARCHITECTURES)


def build_architecture(name: str, config: dict[str, Any] | None = None) -> TemplateModel:
    """Instantiate a registered architecture from its JSON config; unknown config keys are an error."""
    cls = get_architecture(name)
    config = dict(config or {})
    known = {f.name for f in fields(cls.config_class)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise TemplateError(
            f"architecture {name!r} has no config field(s) {unknown}; its fields are {sorted(known)}"
        )
    return cls(cls.config_class(**config))
