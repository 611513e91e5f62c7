"""Validating one metadata row: required fields, file paths and template inputs (rules: ``metadata``)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .samples import IMAGE_EXTENSIONS, KNOWN_FIELDS, BadRow, ParsedRow, RawRow


def _resolve(base: Path, value: str) -> Path:
    # normpath, not resolve(): "./a.png" and "a.png" are the same row, but symlinks stay as written
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # "~user/..." of an unknown user: a plain relative name, reported as not found
        path = Path(value)
    return Path(os.path.normpath(base / path))


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # names too long for the filesystem, NUL bytes: not a file
        return False


def has_image_extension(value: str | Path) -> bool:
    return Path(value).suffix.lower() in IMAGE_EXTENSIONS


def _resolve_template_inputs(
    value: Any, base: Path, label: str, reasons: list[str], images: list[tuple[str, Path]]
) -> Any:
    """Turn file-path strings into absolute Paths (the rule is in the module docstring)."""
    if isinstance(value, dict):
        return {
            k: _resolve_template_inputs(v, base, f"{label}[{k!r}]", reasons, images) for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            _resolve_template_inputs(v, base, f"{label}[{i}]", reasons, images) for i, v in enumerate(value)
        ]
    if isinstance(value, float) and not math.isfinite(value):  # JSON NaN, Infinity, 1e999
        reasons.append(f"{label} is {value}; template inputs must be finite numbers")
        return value
    if not isinstance(value, str) or not value.strip():
        return value
    path = _resolve(base, value)
    is_image_name = has_image_extension(value)
    if not is_image_name and not _is_file(path):
        return value
    if is_image_name:
        if not _is_file(path):
            reasons.append(f"{label} file not found: {path}")
        else:
            images.append((label, path))
    return path


def _parse_json_text(value: str, label: str, expected: type, reasons: list[str]) -> Any:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        reasons.append(f"{label} is not valid JSON ({err.msg} at column {err.colno})")
        return None
    if not isinstance(parsed, expected):
        reasons.append(f"{label} must be a JSON {expected.__name__}, got {_json_type(parsed)}")
        return None
    return parsed


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _image_path(value: Any, label: str, base: Path, reasons: list[str]) -> Path | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        reasons.append(f"missing '{label}'")
        return None
    if not isinstance(value, str):
        reasons.append(f"'{label}' must be a path, got {_json_type(value)}")
        return None
    path = _resolve(base, value)
    if not _is_file(path):
        reasons.append(f"{label} file not found: {path}")
        return None
    return path


def normalize_row(raw: RawRow, base: Path) -> ParsedRow | BadRow:
    if raw.fields is None:
        return BadRow(raw.line, raw.error)
    fields, reasons = raw.fields, []
    images: list[tuple[str, Path]] = []

    image = _image_path(fields.get("image"), "image", base, reasons)
    if image is not None:
        images.append(("image", image))

    prompt = fields.get("prompt")
    if "prompt" not in fields or prompt is None:
        reasons.append("missing 'prompt'")
    elif not isinstance(prompt, str):
        reasons.append(f"'prompt' must be a string, got {_json_type(prompt)}")

    edit_value = fields.get("edit_image")
    if raw.from_csv and isinstance(edit_value, str) and edit_value.strip().startswith("["):
        edit_value = _parse_json_text(edit_value, "edit_image", list, reasons)
    edit_values = (
        [] if edit_value in (None, "") else edit_value if isinstance(edit_value, list) else [edit_value]
    )
    edit_images = []
    for i, value in enumerate(edit_values):
        label = "edit_image" if len(edit_values) == 1 else f"edit_image[{i}]"
        path = _image_path(value, label, base, reasons)
        if path is not None:
            edit_images.append(path)
            images.append((label, path))

    inputs = fields.get("template_inputs")
    if isinstance(inputs, str):
        inputs = _parse_json_text(inputs, "template_inputs", dict, reasons) if inputs.strip() else {}
    elif inputs is None:
        inputs = {}
    elif not isinstance(inputs, dict):
        reasons.append(f"template_inputs must be a JSON object, got {_json_type(inputs)}")
        inputs = None
    if inputs is not None:
        inputs = _resolve_template_inputs(inputs, base, "template_inputs", reasons, images)

    if reasons:
        return BadRow(raw.line, "; ".join(reasons))
    extra = {k: v for k, v in fields.items() if k not in KNOWN_FIELDS}
    return ParsedRow(raw.line, image, prompt, edit_images, inputs, extra, images)


# ---------------------------------------------------------------------------------------------------
# Image checks and ids
# ---------------------------------------------------------------------------------------------------
