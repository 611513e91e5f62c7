"""Reading DiffSynth-style training metadata into validated ``Sample`` records.

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
import os
import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..loading.json_io import to_json_value
from .images import inspect_image
from .rows import normalize_row
from .samples import FORMATS, BadRow, BadRowPolicy, DatasetError, MetadataReport, ParsedRow, RawRow, Sample

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Reading the three formats
# ---------------------------------------------------------------------------------------------------

_JSON_WS = re.compile(r"[ \t\n\r]*")


def _read_json_list(text: str, path: Path) -> Iterator[RawRow]:
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
            yield RawRow(line, value)
        else:
            yield RawRow(line, None, f"row is a JSON {type(value).__name__}, expected an object")
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


def _read_jsonl(text: str) -> Iterator[RawRow]:
    # split on "\n" only: str.splitlines would also split on U+2028, which JSON strings may contain
    for line, content in enumerate(text.split("\n"), start=1):
        if not content.strip():
            continue
        try:
            value = json.loads(content)
        except json.JSONDecodeError as err:
            yield RawRow(line, None, f"malformed JSON ({err.msg} at column {err.colno})")
            continue
        except RecursionError:
            yield RawRow(line, None, "JSON nested too deeply to read")
            continue
        if isinstance(value, dict):
            yield RawRow(line, value)
        else:
            yield RawRow(line, None, f"row is a JSON {type(value).__name__}, expected an object")


def _read_csv(text: str, path: Path) -> Iterator[RawRow]:
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
                yield RawRow(
                    start,
                    None,
                    f"has {len(record)} fields but the header has {len(header)}; "
                    "quote fields that contain commas",
                    from_csv=True,
                )
                continue
            yield RawRow(start, dict(zip(header, record)), from_csv=True)
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


def _raw_rows(path: Path, fmt: str) -> list[RawRow]:
    text = _read_text(path)
    if fmt == "csv":
        return list(_read_csv(text, path))
    return list(_read_json_list(text, path) if fmt == "json" else _read_jsonl(text))


# ---------------------------------------------------------------------------------------------------
# Normalizing one row


def _content_id(row: ParsedRow, base: Path) -> str:
    normalized = {
        "image": row.image,
        "prompt": row.prompt,
        "edit_image": row.edit_images,
        "template_inputs": row.template_inputs,
    }
    normalized = to_json_value(normalized, base=base)  # paths relative to the base: the folder may move
    text = json.dumps(normalized, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
    parsed = [normalize_row(raw, base) for raw in raw_rows]
    bad_rows = [row for row in parsed if isinstance(row, BadRow)]
    good = [row for row in parsed if isinstance(row, ParsedRow)]

    unique = list(dict.fromkeys(p for row in good for _, p in row.images_to_check))
    if not verify_images:  # still need the target's size for buckets
        unique = list(dict.fromkeys(row.image for row in good))
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        infos = dict(zip(unique, pool.map(lambda p: inspect_image(p, verify_images), unique)))

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
