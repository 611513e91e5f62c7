"""Training-data records shared by metadata reading and the Dataset: samples, bad rows, errors.

Sizes are ``(width, height)`` everywhere, like PIL.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import DiffSynthTemplatesError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
KNOWN_FIELDS = ("image", "prompt", "edit_image", "template_inputs")
FORMATS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv"}
BadRowPolicy = Literal["skip", "error"]
Size = tuple[int, int]


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
class RawRow:
    line: int
    fields: dict[str, Any] | None  # None when the row could not be parsed at all
    error: str = ""
    from_csv: bool = False


@dataclass
class ParsedRow:
    line: int
    image: Path
    prompt: str
    edit_images: list[Path]
    template_inputs: dict[str, Any]
    extra: dict[str, Any]
    images_to_check: list[tuple[str, Path]]  # (field label, path) of every image the row uses


# ---------------------------------------------------------------------------------------------------
# Reading the three formats


def sample_seed(sample_id: str, seed: int) -> int:
    """A per-sample seed from the sample id and a global seed: independent of order, rank and worker.

    63 bits, so it fits int64 tensors, ``torch.Generator.manual_seed`` and ``numpy.random.default_rng``.
    """
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def sample_draw(seed: int, purpose: str) -> float:
    """A uniform number in [0, 1) from a per-sample seed, one independent stream per ``purpose``.

    The same sample gets the same draw in every run, rank, worker and stage (stage I, ``--task full``),
    and different purposes (caption dropout, template dropout) never share one.
    """
    digest = hashlib.sha256(f"{purpose}:{seed}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / 2.0**53
