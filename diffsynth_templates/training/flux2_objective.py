"""Moved: FLUX.2's half of the objective is its family's adapter (``pipelines.families.flux2``), which
``training.objective.FamilyObjective`` drives; these names stay importable from here."""

from __future__ import annotations

from ..pipelines.families.flux2 import FLUX2, Flux2Sample
from ..pipelines.flow_match import TRAINING_MU
from .objective import FamilyObjective

__all__ = ["Flux2Objective", "Flux2Sample"]


def Flux2Objective(mu: float = TRAINING_MU) -> FamilyObjective:  # noqa: N802 - the old class's name
    return FamilyObjective(FLUX2, mu)
