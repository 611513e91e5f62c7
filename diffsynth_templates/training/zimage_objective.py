"""Moved: Z-Image's half of the objective is its family's adapter (``pipelines.families.zimage``), which
``training.objective.FamilyObjective`` drives; these names stay importable from here."""

from __future__ import annotations

from ..pipelines.families import UnsupportedFeatureError
from ..pipelines.families.zimage import EDIT_IMAGES_UNSUPPORTED, ZIMAGE, ZImageSample
from .objective import FamilyObjective

__all__ = ["EDIT_IMAGES_UNSUPPORTED", "UnsupportedFeatureError", "ZImageObjective", "ZImageSample"]


def ZImageObjective() -> FamilyObjective:  # noqa: N802 - the old class's name
    return FamilyObjective(ZIMAGE)
