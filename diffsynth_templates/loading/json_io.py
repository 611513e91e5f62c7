"""The one converter from Python values to JSON values (configs, fingerprints, content ids, job records)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import PurePath
from typing import Any

_SCALARS = (str, bool, type(None))


def to_json_value(
    value: Any, *, base: PurePath | None = None, fallback: Callable[[Any], Any] | None = str, _depth: int = 0
) -> Any:
    """``value`` with every container made a JSON container, recursively.

    Mappings become dicts (keys kept), lists and tuples become lists, dataclass instances become
    dicts of their fields, paths become POSIX strings (relative to ``base`` when they lie inside it),
    ints and floats become plain ``int``/``float`` (numpy scalars included). Any other value is
    replaced by ``fallback(value)``, converted in turn: ``str`` (default) names it, ``list`` expands an
    iterable; ``None`` leaves it as is (for a caller that checks or refuses it later).
    """
    if _depth > 200:
        raise ValueError("the value is nested more than 200 levels deep (or contains itself)")
    convert = lambda v: to_json_value(v, base=base, fallback=fallback, _depth=_depth + 1)  # noqa: E731
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, PurePath):
        if base is not None:
            try:
                return value.relative_to(base).as_posix()
            except ValueError:
                pass
        return value.as_posix()
    if isinstance(value, Mapping):
        return {k: convert(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [convert(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if fallback is None:
        return value
    replaced = fallback(value)
    return replaced if replaced is value else convert(replaced)
