"""The base models the trainer knows, one adapter each: FLUX.2-klein and Z-Image.

The backbone is read from the model folder (``transformer/config.json``'s ``_class_name``, see
``pipelines.families.detect_family``); no flag selects it. An adapter says how to

* load the DiT and the stage-I pipeline (text encoder + VAE + tokenizer, no DiT weights);
* encode a prompt into the ``[L, D]`` tensor stage I stores (latents are the pipeline's own
  ``encode_image`` output ``[C, h, w]`` for every backbone);
* build the flow-matching objective stage II optimizes (``objective.FamilyObjective``: the family's
  sigma draw and model-call adapter, ``pipelines.families``);
* rebuild a sampling pipeline around the DiT being trained, for validation images;

and what it cannot do (Z-Image: no reference/edit images), checked before any work starts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..pipelines.families import FAMILIES, Family, UnsupportedFeatureError, detect_family, family_of_dit
from ..pipelines.families.zimage import EDIT_IMAGES_UNSUPPORTED
from ..pipelines.flow_match import TRAINING_MU
from .config import TrainConfig
from .objective import FamilyObjective

logger = logging.getLogger(__name__)

__all__ = [
    "EDIT_IMAGES_UNSUPPORTED",
    "TrainingBackbone",
    "UnsupportedFeatureError",
    "backbone_of_dit",
    "detect_training_backbone",
    "get_backbone",
]


class TrainingBackbone:
    """What the trainer needs to know about one base model family (its ``Family`` record, plus how
    the trainer builds pipelines around it)."""

    def __init__(self, family: Family):
        self.family = family

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def dit_class(self) -> type[nn.Module]:
        return self.family.dit_class

    @property
    def supports_edit_images(self) -> bool:
        return self.family.supports_edit_images

    @property
    def title(self) -> str:
        return self.family.title

    def load_dit(self, folder: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
        return self.dit_class.from_pretrained(folder, torch_dtype=dtype, device=device)

    def load_pipeline(
        self, config: TrainConfig, folders: dict[str, Path], device, dtype, dit: nn.Module | None = None
    ):
        """Text encoder + VAE + tokenizer as a pipeline; ``dit`` may be None (stage I never runs it).

        ``folders`` (``pipelines.common.ComponentFolders``, resolved once per run) holds every
        component folder (``transformer`` included, for its config). The pipeline is built exactly as
        ``from_pretrained`` builds it (``FamilyPipeline.from_folders``).
        """
        cls = self.family.pipeline_class()
        return cls.from_folders(folders, device, dtype, dit=dit, name=str(config.model or config.transformer))

    def prompt_embeds(self, pipe, prompt: str, max_sequence_length: int) -> Tensor:
        """One prompt's text features ``[L, D]`` as stage I stores them."""
        return pipe.prompt_features(prompt, max_sequence_length)

    def objective(self, mu: float = TRAINING_MU) -> FamilyObjective:
        return FamilyObjective(self.family, mu)

    def runner(self, dit: nn.Module, pipe):
        """A sampling pipeline around ``dit`` (in its dtype) sharing ``pipe``'s text encoder and VAE."""
        return pipe.with_dit(dit)

    def check_samples(self, samples: Sequence[Any]) -> None:
        """Refuse, before any work, dataset rows this base model cannot train on (naming them)."""
        self.family.check_edit_images([s.line for s in samples if s.edit_images])


BACKBONES: dict[str, TrainingBackbone] = {name: TrainingBackbone(family) for name, family in FAMILIES.items()}


def get_backbone(name: str) -> TrainingBackbone:
    if name not in BACKBONES:
        raise UnsupportedFeatureError(f"the trainer knows the backbones {sorted(BACKBONES)}, not {name!r}")
    return BACKBONES[name]


def backbone_of_dit(dit: nn.Module) -> TrainingBackbone:
    return BACKBONES[family_of_dit(dit).name]


def detect_training_backbone(transformer_folder: Path, offline: bool = False) -> TrainingBackbone:
    """The backbone of the DiT the run trains on (its folder's ``config.json`` says which)."""
    return get_backbone(detect_family(transformer_folder, offline=True if offline else None).name)
