"""Training data: DiffSynth-style metadata, image preparation, resolution buckets and the Dataset.

Metadata (DESIGN.md 4.6) is read once, up front, into validated ``Sample`` records; every problem is
collected as a ``BadRow`` with its 1-based line number instead of surfacing hours into a run.

Rules worth knowing (they are part of the contract):

* **Formats** by extension: ``.json`` (a list of objects), ``.jsonl`` (one object per line; blank
  lines are ignored) and ``.csv`` (header row with at least ``image`` and ``prompt`` columns). Files
  are read as UTF-8; a byte-order mark is ignored.
* **Fields**: ``image`` (path, required), ``prompt`` (string, required; ``""`` is allowed, it is the
  unconditional prompt), ``edit_image`` (a path or a list of paths; in CSV a JSON list string or one
  path; empty means none), ``template_inputs`` (a JSON object; in CSV a JSON object string; a JSON
  object string is also accepted in ``.json``/``.jsonl``; empty means ``{}``). Any other field is
  kept in ``Sample.extra``. Relative paths resolve against the dataset base path.
* **Paths inside template_inputs**: a string value anywhere in the object (nested lists and objects
  included) is a file path when it has an image extension (``IMAGE_EXTENSIONS``, case-insensitive)
  or when ``base_path / value`` is an existing file. Such values become absolute ``Path`` objects;
  an image-extension value whose file does not exist makes the row bad. URLs are not supported.
  Every other value (numbers, plain strings like ``"a cat"``) is kept as is.
* **Image checks** are eager: ``read_metadata`` opens every referenced image (target, edit images,
  image files in template_inputs), reads its size and EXIF orientation and runs PIL's ``verify()``.
  That catches missing files, non-images and broken PNG/GIF files before training; some damage
  (e.g. a truncated JPEG body) only shows when decoding, and then ``TemplateDataset`` raises
  ``SampleLoadError`` for that sample.
* **Sample ids** are a content hash of the normalized fields (paths relative to the base path,
  prompt, edit images, template inputs); extra fields are not part of it, they do not change what is
  trained. Identical rows get ``-1``, ``-2``... suffixes so ids stay unique. Reordering rows or
  moving the dataset folder does not change ids.

Sizes are ``(width, height)`` everywhere, like PIL.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Sampler

from ..errors import DiffSynthTemplatesError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
KNOWN_FIELDS = ("image", "prompt", "edit_image", "template_inputs")
FORMATS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv"}
BadRowPolicy = Literal["skip", "error"]
Size = tuple[int, int]

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # these rotate by 90 degrees: width and height swap


class DatasetError(DiffSynthTemplatesError):
    """The dataset metadata or one of its files cannot be used; the message says what to fix."""


class SampleLoadError(DatasetError):
    """One sample failed to load at ``__getitem__`` time; the trainer skips it and goes on.

    Constructible from the message alone, because DataLoader workers re-raise exceptions that way.
    """

    def __init__(
        self, message: str, *, path: Path | None = None, line: int | None = None, sample_id: str | None = None
    ):
        super().__init__(message)
        self.path, self.line, self.sample_id = path, line, sample_id


# ---------------------------------------------------------------------------------------------------
# Metadata records
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadRow:
    line: int  # 1-based line in the metadata file where the row starts
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass(frozen=True)
class Sample:
    index: int  # 0-based position among the valid rows
    line: int  # 1-based line in the metadata file where the row starts
    id: str  # content hash of the normalized fields; stable under row reordering
    image: Path  # absolute
    prompt: str
    edit_images: list[Path] = field(default_factory=list)
    template_inputs: dict[str, Any] = field(default_factory=dict)  # file values are absolute Paths
    size: Size = (0, 0)  # (width, height) of the image as displayed, i.e. after EXIF orientation
    extra: dict[str, Any] = field(default_factory=dict)  # unknown fields, kept verbatim


@dataclass
class MetadataReport:
    path: Path
    base_path: Path
    format: str  # "json" | "jsonl" | "csv"
    samples: list[Sample]
    bad_rows: list[BadRow]
    num_rows: int  # rows seen in the file, good and bad

    @property
    def fingerprint(self) -> str:
        """Hash of the sample ids, independent of row order (for the stage-I feature cache)."""
        return hashlib.sha256("\n".join(sorted(s.id for s in self.samples)).encode()).hexdigest()

    def describe_bad_rows(self) -> str:
        return "\n".join(f"  {bad}" for bad in self.bad_rows)


@dataclass
class _RawRow:
    line: int
    fields: dict[str, Any] | None  # None when the row could not be parsed at all
    error: str = ""
    from_csv: bool = False


@dataclass
class _ParsedRow:
    line: int
    image: Path
    prompt: str
    edit_images: list[Path]
    template_inputs: dict[str, Any]
    extra: dict[str, Any]
    images_to_check: list[tuple[str, Path]]  # (field label, path) of every image the row uses


# ---------------------------------------------------------------------------------------------------
# Reading the three formats
# ---------------------------------------------------------------------------------------------------

_JSON_WS = re.compile(r"[ \t\n\r]*")


def _read_json_list(text: str, path: Path) -> Iterator[_RawRow]:
    """Walk a JSON list element by element so each row knows the line its object starts on."""
    decoder = json.JSONDecoder()
    pos = _JSON_WS.match(text, 0).end()
    if not text.startswith("[", pos):
        found = "a JSON object" if text.startswith("{", pos) else "no JSON list"
        raise DatasetError(
            f"{path} holds {found}; a .json metadata file must be a list of objects [{{...}}, {{...}}]. "
            "If it has one object per line, rename it to .jsonl."
        )
    line, line_pos = 1, 0  # line number of line_pos, advanced incrementally (no O(n^2) recount)
    pos = _JSON_WS.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return
    while True:
        line += text.count("\n", line_pos, pos)
        line_pos = pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DatasetError(
                f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
                "a broken .json list cannot be read past that point, fix the file"
            ) from None
        except RecursionError:
            raise DatasetError(
                f"{path}: the row starting on line {line} is nested too deeply to read; fix the file"
            ) from None
        if isinstance(value, dict):
            yield _RawRow(line, value)
        else:
            yield _RawRow(line, None, f"row is a JSON {type(value).__name__}, expected an object")
        pos = _JSON_WS.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _JSON_WS.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            break
        else:
            line += text.count("\n", line_pos, pos)
            raise DatasetError(f"{path} is not valid JSON: expected ',' or ']' at line {line}")
    if _JSON_WS.match(text, pos + 1).end() != len(text):
        raise DatasetError(f"{path} has extra data after the closing ']' of the list; remove it")


def _read_jsonl(text: str) -> Iterator[_RawRow]:
    # split on "\n" only: str.splitlines would also split on U+2028, which JSON strings may contain
    for line, content in enumerate(text.split("\n"), start=1):
        if not content.strip():
            continue
        try:
            value = json.loads(content)
        except json.JSONDecodeError as err:
            yield _RawRow(line, None, f"malformed JSON ({err.msg} at column {err.colno})")
            continue
        except RecursionError:
            yield _RawRow(line, None, "JSON nested too deeply to read")
            continue
        if isinstance(value, dict):
            yield _RawRow(line, value)
        else:
            yield _RawRow(line, None, f"row is a JSON {type(value).__name__}, expected an object")


def _read_csv(text: str, path: Path) -> Iterator[_RawRow]:
    with io.StringIO(text, newline="") as file:  # newline="": quoted fields keep their line breaks
        reader = csv.reader(file)
        header: list[str] | None = None
        while True:
            start = reader.line_num + 1  # a quoted field may span lines: report where the record starts
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                raise DatasetError(f"{path} is not valid CSV near line {start}: {err}") from None
            if not record or all(not cell.strip() for cell in record):
                continue
            if header is None:
                header = [name.strip() for name in record]
                _check_csv_header(header, path)
                continue
            if len(record) != len(header):
                yield _RawRow(
                    start,
                    None,
                    f"has {len(record)} fields but the header has {len(header)}; "
                    "quote fields that contain commas",
                    from_csv=True,
                )
                continue
            yield _RawRow(start, dict(zip(header, record)), from_csv=True)
    if header is None:
        raise DatasetError(f"{path} is empty; expected a header row with at least 'image' and 'prompt'")


def _check_csv_header(header: list[str], path: Path) -> None:
    duplicates = sorted(name for name, count in Counter(header).items() if count > 1)
    if duplicates:
        raise DatasetError(
            f"{path}: the CSV header repeats columns {duplicates}; column names must be unique"
        )
    missing = [name for name in ("image", "prompt") if name not in header]
    if missing:
        raise DatasetError(
            f"{path}: the CSV header {header} lacks the required columns {missing}; "
            "the first row must name the columns, e.g. image,prompt,edit_image,template_inputs"
        )


def _read_text(path: Path) -> str:
    """The metadata file as text (UTF-8, a byte-order mark ignored); errors name the file and line."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"cannot read metadata file {path}: {err}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DatasetError(
            f"{path} is not UTF-8 text: line {line} holds the byte {data[err.start : err.start + 1]!r} "
            f"({err.reason}); save the file as UTF-8"
        ) from None


def _raw_rows(path: Path, fmt: str) -> list[_RawRow]:
    text = _read_text(path)
    if fmt == "csv":
        return list(_read_csv(text, path))
    return list(_read_json_list(text, path) if fmt == "json" else _read_jsonl(text))


# ---------------------------------------------------------------------------------------------------
# Normalizing one row
# ---------------------------------------------------------------------------------------------------


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


def _has_image_extension(value: str | Path) -> bool:
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
    is_image_name = _has_image_extension(value)
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


def _normalize_row(raw: _RawRow, base: Path) -> _ParsedRow | BadRow:
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
    return _ParsedRow(raw.line, image, prompt, edit_images, inputs, extra, images)


# ---------------------------------------------------------------------------------------------------
# Image checks and ids
# ---------------------------------------------------------------------------------------------------


def _is_transposed(image: Image.Image) -> bool:
    """Whether the EXIF orientation swaps width and height, read without decoding the pixels."""
    if image.format == "PNG":
        # PNG's getexif() decodes the whole image to find a late eXIf chunk; an early one is in info
        raw = image.info.get("exif")
        if not raw:
            return False
        exif = Image.Exif()
        exif.load(raw)
    else:
        exif = image.getexif()
    return exif.get(_EXIF_ORIENTATION) in _TRANSPOSED_ORIENTATIONS


@dataclass(frozen=True)
class _ImageInfo:
    size: Size = (0, 0)
    error: str = ""


def _inspect_image(path: Path, verify: bool) -> _ImageInfo:
    """Displayed size (EXIF orientation applied) and, with ``verify``, PIL's integrity check."""
    try:
        if verify:  # verify() must come straight after open and leaves the image unusable: open twice
            with Image.open(path) as image:
                image.verify()
        with Image.open(path) as image:
            width, height = image.size
            if _is_transposed(image):
                width, height = height, width
    except (
        Exception
    ) as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error... all mean "unusable"
        return _ImageInfo(error=f"{type(err).__name__}: {err}")
    return _ImageInfo((width, height))


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def _jsonable(value: Any, base: Path) -> Any:
    if isinstance(value, Path):
        return _relative(value, base)
    if isinstance(value, dict):
        return {k: _jsonable(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v, base) for v in value]
    return value


def _content_id(row: _ParsedRow, base: Path) -> str:
    normalized = {
        "image": _relative(row.image, base),
        "prompt": row.prompt,
        "edit_image": [_relative(p, base) for p in row.edit_images],
        "template_inputs": _jsonable(row.template_inputs, base),
    }
    text = json.dumps(normalized, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sample_seed(sample_id: str, seed: int) -> int:
    """A per-sample seed from the sample id and a global seed: independent of order, rank and worker.

    63 bits, so it fits int64 tensors, ``torch.Generator.manual_seed`` and ``numpy.random.default_rng``.
    """
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# ---------------------------------------------------------------------------------------------------
# read_metadata
# ---------------------------------------------------------------------------------------------------


def read_metadata(
    path: str | os.PathLike,
    base_path: str | os.PathLike | None = None,
    *,
    on_bad_row: BadRowPolicy = "skip",
    verify_images: bool = True,
    num_workers: int = 8,
) -> MetadataReport:
    """Read ``path`` (.json / .jsonl / .csv) into validated samples; paths resolve against ``base_path``.

    ``base_path`` defaults to the metadata file's folder. Bad rows never stop reading: with
    ``on_bad_row="skip"`` they are logged (each with its line) and left out; with ``"error"`` one
    ``DatasetError`` lists them all. A file that cannot be read as its format at all, or that yields no
    usable row, raises ``DatasetError`` in either mode. ``verify_images=False`` only reads image
    headers (sizes) and skips ``verify()``; ``num_workers`` threads open the images.
    """
    if on_bad_row not in ("skip", "error"):
        raise ValueError(f"on_bad_row must be 'skip' or 'error', got {on_bad_row!r}")
    path = Path(path).expanduser().absolute()
    base = Path(os.path.normpath(Path(base_path).expanduser().absolute() if base_path else path.parent))
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DatasetError(f"{path}: unknown metadata format {path.suffix!r}; use one of {sorted(FORMATS)}")
    if not path.is_file():
        raise DatasetError(f"metadata file {path} does not exist; check --dataset_metadata_path")
    if not base.is_dir():
        raise DatasetError(f"dataset base path {base} is not a folder; check --dataset_base_path")

    raw_rows = _raw_rows(path, fmt)
    parsed = [_normalize_row(raw, base) for raw in raw_rows]
    bad_rows = [row for row in parsed if isinstance(row, BadRow)]
    good = [row for row in parsed if isinstance(row, _ParsedRow)]

    unique = list(dict.fromkeys(p for row in good for _, p in row.images_to_check))
    if not verify_images:  # still need the target's size for buckets
        unique = list(dict.fromkeys(row.image for row in good))
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        infos = dict(zip(unique, pool.map(lambda p: _inspect_image(p, verify_images), unique)))

    samples: list[Sample] = []
    seen: Counter[str] = Counter()
    for row in good:
        broken = [
            f"{label} is not a readable image ({p}): {infos[p].error}"
            for label, p in row.images_to_check
            if p in infos and infos[p].error
        ]
        if broken:
            bad_rows.append(BadRow(row.line, "; ".join(broken)))
            continue
        content_id = _content_id(row, base)
        duplicates = seen[content_id]
        seen[content_id] += 1
        sample_id = content_id if duplicates == 0 else f"{content_id}-{duplicates}"
        samples.append(
            Sample(
                index=len(samples),
                line=row.line,
                id=sample_id,
                image=row.image,
                prompt=row.prompt,
                edit_images=row.edit_images,
                template_inputs=row.template_inputs,
                size=infos[row.image].size,
                extra=row.extra,
            )
        )

    bad_rows.sort(key=lambda bad: bad.line)
    report = MetadataReport(path, base, fmt, samples, bad_rows, num_rows=len(raw_rows))
    if bad_rows:
        if on_bad_row == "error":
            raise DatasetError(
                f"{path}: {len(bad_rows)} of {len(raw_rows)} rows are bad:\n{report.describe_bad_rows()}\n"
                f"Fix them, or pass on_bad_row='skip' to train on the {len(samples)} good rows."
            )
        logger.warning(
            "%s: skipping %d of %d rows:\n%s", path, len(bad_rows), len(raw_rows), report.describe_bad_rows()
        )
    if not samples:
        raise DatasetError(f"{path} has no usable rows ({len(raw_rows)} rows read); see the bad rows above")
    num_duplicates = sum(count - 1 for count in seen.values())
    if num_duplicates:
        logger.info("%s: %d rows repeat an earlier row; they get suffixed ids", path, num_duplicates)
    return report


# ---------------------------------------------------------------------------------------------------
# Image preparation
# ---------------------------------------------------------------------------------------------------


def fit_to_pixel_budget(width: int, height: int, max_pixels: int, multiple: int = 16) -> Size:
    """The training size for a ``width x height`` image: both sides multiples of ``multiple``, area at
    most ``max_pixels``.

    Resolution and aspect ratio pull against each other on the ``multiple`` grid, so one objective
    trades them: maximize ``w * h * kept``, where ``kept = min(a'/a, a/a')`` is the fraction of the
    source that survives the center crop (``a`` the source aspect, ``a'`` the candidate's). The
    answer is therefore never beaten by a size that is both larger and closer in aspect. Small images
    are scaled up to the budget; ties go to the closer aspect.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return _fit_aspect(width / height, max_pixels, multiple)


def _fit_aspect(aspect: float, max_pixels: int, multiple: int) -> Size:
    if max_pixels < multiple * multiple:
        raise ValueError(f"max_pixels={max_pixels} is below one {multiple}x{multiple} tile")
    widths = np.arange(multiple, max_pixels // multiple + 1, multiple, dtype=np.int64)
    # for a fixed width the objective grows with height up to the aspect line and is flat above it,
    # so the best height is the first multiple at or above width / aspect, capped by the budget
    heights = np.minimum(
        np.ceil(widths / aspect / multiple).astype(np.int64) * multiple,
        max_pixels // widths // multiple * multiple,
    )
    heights = np.maximum(heights, multiple)
    error = np.abs(np.log(widths / heights) - math.log(aspect))
    score = widths * heights * np.exp(-error)
    best = np.flatnonzero(score >= score.max() * (1 - 1e-12))
    i = best[np.argmin(error[best])]
    return int(widths[i]), int(heights[i])


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode to RGB: transparency composited on ``background``, 16-bit grey scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        array = np.asarray(image, dtype=np.float64)
        if array.max() > 255:  # 16-bit data: plain convert() would clip it to white
            array = array / 257.0
        return Image.fromarray(np.clip(array.round(), 0, 255).astype(np.uint8), "L").convert("RGB")
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))  # paste with alpha mask = "over" compositing
        return canvas
    return image.convert("RGB")  # L, P, CMYK, YCbCr, 1, ...


def cover_crop(image: Image.Image, size: Size) -> Image.Image:
    """Resize to cover ``size`` and center-crop, in one LANCZOS resampling of the centered box.

    LANCZOS because training images are mostly downscaled and it aliases least; resampling the
    crop box directly (rather than resize, then crop) keeps the crop exactly centered.
    """
    target_w, target_h = size
    w, h = image.size
    if (w, h) == (target_w, target_h):
        return image.copy()
    if w * target_h > h * target_w:  # source is wider than the target: trim left and right
        crop_w = h * target_w / target_h
        box = ((w - crop_w) / 2, 0.0, (w + crop_w) / 2, float(h))
    else:
        crop_h = w * target_h / target_w
        box = (0.0, (h - crop_h) / 2, float(w), (h + crop_h) / 2)
    # reducing_gap: a cheap integer reduce() first for big downscales; the result is visually identical
    return image.resize((target_w, target_h), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def _draft_size(image: Image.Image, size: Size) -> Size:
    """The smallest stored-orientation size that still covers ``size`` after EXIF rotation."""
    w, h = image.size
    rotated = _is_transposed(image)
    if rotated:
        w, h = h, w
    scale = max(size[0] / w, size[1] / h)
    need = (math.ceil(w * scale), math.ceil(h * scale))
    return (need[1], need[0]) if rotated else need


def load_image(path: str | os.PathLike, size: Size | None = None) -> Image.Image:
    """Open an image as RGB with EXIF orientation applied; with ``size``, cover-crop it to that size."""
    with Image.open(path) as image:
        if size is not None:
            # JPEG can decode at 1/2, 1/4, 1/8 scale; a large speed-up for big photos, never below `size`
            image.draft(None, _draft_size(image, size))
        image = ImageOps.exif_transpose(image)
        image = to_rgb(image)
        return cover_crop(image, size) if size is not None else image.copy()


def load_and_crop(path: str | os.PathLike, size: Size) -> Image.Image:
    """RGB image of exactly ``size``: EXIF orientation, mode conversion, resize to cover, center-crop."""
    return load_image(path, size)


# ---------------------------------------------------------------------------------------------------
# Resolution buckets
# ---------------------------------------------------------------------------------------------------


def make_buckets(
    max_pixels: int,
    multiple: int = 16,
    aspect_range: tuple[float, float] = (0.5, 2.0),
    num_aspects: int = 9,
) -> list[Size]:
    """Bucket sizes for ``num_aspects`` aspect ratios spaced evenly in log space over ``aspect_range``.

    Each is ``fit_to_pixel_budget`` of that aspect; portrait buckets are the landscape ones transposed,
    so the set is symmetric. Sorted from tallest to widest, duplicates removed.
    """
    low, high = aspect_range
    if not 0 < low <= 1 <= high:
        raise ValueError(f"aspect_range must contain 1.0 (width / height), got {aspect_range}")
    if num_aspects < 1:
        raise ValueError(f"num_aspects must be at least 1, got {num_aspects}")
    aspects = np.exp(np.linspace(math.log(low), math.log(high), num_aspects)) if num_aspects > 1 else [1.0]
    buckets: set[Size] = set()
    for aspect in aspects:
        wide = _fit_aspect(max(aspect, 1 / aspect), max_pixels, multiple)
        buckets.add(wide if aspect >= 1 else (wide[1], wide[0]))
    return sorted(buckets, key=lambda s: (s[0] / s[1], s[0]))


def _warn_upscaling(samples: Sequence[Any], sizes: Sequence[Size], max_pixels: int) -> None:
    """Say so when images are blown up to their training size: usually --max_pixels is too large for them."""
    grown = [(s.size, z) for s, z in zip(samples, sizes) if z[0] * z[1] > 2 * s.size[0] * s.size[1]]
    if grown:
        (w, h), (bw, bh) = grown[0]
        logger.warning(
            "%d of %d images are upscaled more than 2x in area to their training size (e.g. %dx%d -> %dx%d) "
            "because --max_pixels is %d; pass a smaller --max_pixels (e.g. %d) to train at their own size",
            len(grown), len(samples), w, h, bw, bh, max_pixels, w * h,
        )  # fmt: skip


def assign_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
    """The bucket nearest in log aspect ratio (ties: the larger one). Images beyond the bucket range
    land in the most extreme bucket and are cropped more."""
    if not buckets:
        raise ValueError("no buckets to assign to")
    log_aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - log_aspect), -b[0] * b[1]))


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices whose samples share one size (bucket), for ``DataLoader(batch_sampler=...)``.

    Per epoch, with a generator seeded by ``(seed, epoch)``: each bucket's indices are shuffled and cut
    into batches, and the batch order is shuffled. Every rank builds the same global list and takes
    every ``num_replicas``-th batch starting at ``rank``, so shares are disjoint without communication.

    Uneven shares (the number of batches is not a multiple of ``num_replicas``):

    * ``drop_last=False``: nothing is padded or repeated; every sample appears exactly once across
      ranks. To keep ranks in lockstep (DDP needs equal step counts) the largest batches are split in
      two until the count divides evenly. Only when there are too few samples to do that do ranks get
      different numbers of batches (at most one apart); a warning says so.
    * ``drop_last=True``: partial batches are dropped, then trailing batches until the count divides
      evenly; all batches are full and ranks are even, and the dropped samples change every epoch.
    """

    def __init__(
        self,
        samples_sizes: Sequence[Size],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"rank must be in [0, num_replicas); got rank={rank}, num_replicas={num_replicas}"
            )
        if not samples_sizes:
            raise ValueError("samples_sizes is empty; there is nothing to sample")
        self.batch_size, self.seed, self.drop_last, self.shuffle = batch_size, seed, drop_last, shuffle
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        groups: dict[Size, list[int]] = defaultdict(list)
        for index, size in enumerate(samples_sizes):
            groups[(int(size[0]), int(size[1]))].append(index)
        self._groups = dict(sorted(groups.items()))  # fixed order: the plan must not depend on dict history
        # the number of batches per rank does not depend on the epoch, only their contents do
        shares = [len(self._global_batches(0)[r::num_replicas]) for r in range(num_replicas)]
        self._length = shares[rank]
        if shares[0] == 0:
            raise ValueError(
                f"{len(samples_sizes)} samples give no batch of {batch_size} per rank on {num_replicas} ranks; "
                "lower batch_size or set drop_last=False"
            )
        if len(set(shares)) > 1 and rank == 0:
            logger.warning(
                "too few samples to give %d ranks the same number of batches (%s); ranks are uneven",
                num_replicas,
                shares,
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self, epoch: int) -> list[list[int]]:
        # SeedSequence wants non-negative entries; masking keeps any int seed usable
        rng = np.random.default_rng([self.seed & (2**64 - 1), epoch & (2**64 - 1)])
        batches: list[list[int]] = []
        for indices in self._groups.values():
            order = rng.permutation(indices).tolist() if self.shuffle else indices
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.drop_last:
            return batches[: len(batches) // self.num_replicas * self.num_replicas]
        return _split_until_divisible(batches, self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._global_batches(self.epoch)[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        return self._length


def _split_until_divisible(batches: list[list[int]], parts: int) -> list[list[int]]:
    batches = list(batches)
    while len(batches) % parts:
        i = max(range(len(batches)), key=lambda j: len(batches[j]))
        if len(batches[i]) < 2:
            break
        half = (len(batches[i]) + 1) // 2
        batches[i : i + 1] = [batches[i][:half], batches[i][half:]]
    return batches


# ---------------------------------------------------------------------------------------------------
# The Dataset
# ---------------------------------------------------------------------------------------------------


@dataclass
class DatasetConfig:
    max_pixels: int = 1024 * 1024
    multiple: int = 16
    buckets: bool = True  # off: each image gets its own fit_to_pixel_budget size (use batch size 1)
    aspect_range: tuple[float, float] = (0.5, 2.0)
    num_aspects: int = 9
    seed: int = 0  # global seed mixed into every sample's seed
    # "target": edit images and template-input images are cover-cropped to the target's size, so
    # spatially aligned inputs (depth, edges, masks) stay aligned; "original": RGB at native size
    condition_size: Literal["target", "original"] = "target"

    def __post_init__(self) -> None:
        if self.multiple < 1 or self.max_pixels < self.multiple**2:
            raise ValueError(f"max_pixels={self.max_pixels} must hold at least one {self.multiple}^2 tile")
        if self.condition_size not in ("target", "original"):
            raise ValueError(f"condition_size must be 'target' or 'original', got {self.condition_size!r}")


class TemplateDataset(torch.utils.data.Dataset):
    """Samples as training dicts::

        {"id": str, "image": PIL RGB (bucket size), "prompt": str, "edit_images": [PIL RGB],
         "template_inputs": dict (image files loaded as PIL RGB, other files left as Path), "seed": int}

    ``sizes[i]`` is sample ``i``'s output size; pass ``sizes`` to ``BucketBatchSampler`` (or use
    ``batch_sampler``). An image that fails to load here (deleted or damaged after indexing) raises
    ``SampleLoadError`` naming the file and the metadata line; the trainer catches it and skips the
    sample (inside a DataLoader, the whole batch). Use ``collate_as_lists`` as the collate function.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        config: DatasetConfig | None = None,
        source: str | os.PathLike | None = None,
    ):
        self.samples = list(samples)
        self.config = config or DatasetConfig()
        self.source = source  # the metadata file, for error messages
        cfg = self.config
        if cfg.buckets:
            self.buckets: list[Size] | None = make_buckets(
                cfg.max_pixels, cfg.multiple, cfg.aspect_range, cfg.num_aspects
            )
            self.sizes = [assign_bucket(*s.size, self.buckets) for s in self.samples]
        else:
            self.buckets = None
            self.sizes = [fit_to_pixel_budget(*s.size, cfg.max_pixels, cfg.multiple) for s in self.samples]
        _warn_upscaling(self.samples, self.sizes, cfg.max_pixels)

    @classmethod
    def from_report(cls, report: MetadataReport, config: DatasetConfig | None = None) -> TemplateDataset:
        return cls(report.samples, config, source=report.path)

    def batch_sampler(self, batch_size: int, **kwargs: Any) -> BucketBatchSampler:
        return BucketBatchSampler(self.sizes, batch_size, **{"seed": self.config.seed, **kwargs})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample, size = self.samples[index], self.sizes[index]
        condition_size = size if self.config.condition_size == "target" else None
        return {
            "id": sample.id,
            "image": self._load(sample, sample.image, size),
            "prompt": sample.prompt,
            "edit_images": [self._load(sample, path, condition_size) for path in sample.edit_images],
            "template_inputs": self._load_inputs(sample, sample.template_inputs, condition_size),
            "seed": sample_seed(sample.id, self.config.seed),
        }

    def _load_inputs(self, sample: Sample, value: Any, size: Size | None) -> Any:
        if isinstance(value, dict):
            return {k: self._load_inputs(sample, v, size) for k, v in value.items()}
        if isinstance(value, list):
            return [self._load_inputs(sample, v, size) for v in value]
        if isinstance(value, Path) and _has_image_extension(value):
            return self._load(sample, value, size)
        return value

    def _load(self, sample: Sample, path: Path, size: Size | None) -> Image.Image:
        try:
            return load_image(path, size)
        except Exception as err:  # any decoder failure means the same thing: this sample is unusable now
            where = f"{self.source}, line {sample.line}" if self.source else f"metadata line {sample.line}"
            raise SampleLoadError(
                f"cannot load {path} ({where}, sample {sample.id}): {type(err).__name__}: {err}. "
                "The sample is skipped; restore the file or remove the row.",
                path=path,
                line=sample.line,
                sample_id=sample.id,
            ) from err


def collate_as_lists(batch: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """DataLoader collate for ``TemplateDataset``: PIL images cannot be stacked, so keep lists per key."""
    return {key: [item[key] for item in batch] for key in batch[0]}
