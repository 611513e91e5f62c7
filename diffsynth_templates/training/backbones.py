"""The base models the trainer knows, one adapter each: FLUX.2-klein and Z-Image.

The backbone is read from the model folder (``transformer/config.json``'s ``_class_name``, see
``pipelines.auto.detect_backbone``); no flag selects it. An adapter says how to

* load the DiT and the stage-I pipeline (text encoder + VAE + tokenizer, no DiT weights);
* encode a prompt into the ``[L, D]`` tensor stage I stores (latents are the pipeline's own
  ``encode_image`` output ``[C, h, w]`` for every backbone);
* build the flow-matching objective stage II optimizes (``flux2_objective`` / ``zimage_objective``);
* rebuild a sampling pipeline around the DiT being trained, for validation images;

and what it cannot do (Z-Image: no reference/edit images), checked before any work starts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..backbones.autoencoder_kl import AutoencoderKL
from ..backbones.flux2_dit import Flux2DiT
from ..backbones.flux2_vae import Flux2VAE
from ..backbones.qwen3 import Qwen3TextEncoder
from ..backbones.zimage_dit import ZImageDiT, ZImageDiTConfig
from ..loading import read_config
from ..pipelines.auto import BACKBONE_TITLES, detect_backbone
from ..pipelines.flow_match import TRAINING_MU
from ..pipelines.flux2_pipeline import Flux2ImagePipeline
from ..pipelines.flux2_prompt import Flux2PromptEncoder, load_tokenizer, read_tokenizer_settings
from ..pipelines.zimage_pipeline import ZImagePipeline, ZImagePromptEncoder, _read_shift
from .config import TrainConfig
from .flux2_objective import Flux2Objective
from .zimage_objective import EDIT_IMAGES_UNSUPPORTED, UnsupportedFeatureError, ZImageObjective

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
    """What the trainer needs to know about one base model family."""

    name: ClassVar[str]
    dit_class: ClassVar[type[nn.Module]]
    supports_edit_images: ClassVar[bool]

    @property
    def title(self) -> str:
        return BACKBONE_TITLES.get(self.name, self.name)

    def load_dit(self, folder: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
        return self.dit_class.from_pretrained(folder, torch_dtype=dtype, device=device)

    def load_pipeline(
        self, config: TrainConfig, folders: dict[str, Path], device, dtype, dit: nn.Module | None = None
    ):
        """Text encoder + VAE + tokenizer as a pipeline; ``dit`` may be None (stage I never runs it).

        ``folders`` holds every component folder (``transformer`` included, for its config).
        """
        raise NotImplementedError

    def prompt_embeds(self, pipe, prompt: str, max_sequence_length: int) -> Tensor:
        """One prompt's text features ``[L, D]`` as stage I stores them."""
        raise NotImplementedError

    def objective(self, mu: float = TRAINING_MU):
        raise NotImplementedError

    def runner(self, dit: nn.Module, pipe):
        """A sampling pipeline around ``dit`` (in its dtype) sharing ``pipe``'s text encoder and VAE."""
        raise NotImplementedError

    def check_samples(self, samples: Sequence[Any]) -> None:
        """Refuse, before any work, dataset rows this base model cannot train on (naming them)."""
        if self.supports_edit_images:
            return
        lines = [s.line for s in samples if s.edit_images]
        if lines:
            shown = ", ".join(map(str, lines[:10])) + (
                f" and {len(lines) - 10} more" if len(lines) > 10 else ""
            )
            raise UnsupportedFeatureError(
                f"metadata lines {shown} have an edit_image, but the base model is {self.title}: "
                f"{EDIT_IMAGES_UNSUPPORTED}"
            )


class Flux2Backbone(TrainingBackbone):
    name = "flux2"
    dit_class = Flux2DiT
    supports_edit_images = True

    def load_pipeline(self, config, folders, device, dtype, dit=None) -> Flux2ImagePipeline:
        text_encoder = Qwen3TextEncoder.from_pretrained(
            folders["text_encoder"], torch_dtype=dtype, device=device
        )
        vae = Flux2VAE.from_pretrained(folders["vae"], torch_dtype=dtype, device=device)
        tokenizer = load_tokenizer(folders["tokenizer"])
        pad_token, padding_side = read_tokenizer_settings(folders["tokenizer"])
        prompt_encoder = Flux2PromptEncoder(
            tokenizer, text_encoder, pad_token=pad_token, padding_side=padding_side
        )
        return Flux2ImagePipeline(dit, vae, text_encoder, tokenizer, device, dtype, prompt_encoder)

    def prompt_embeds(self, pipe, prompt, max_sequence_length) -> Tensor:
        embeds, _ = pipe.encode_prompt([prompt], max_sequence_length)
        return embeds[0]

    def objective(self, mu: float = TRAINING_MU) -> Flux2Objective:
        return Flux2Objective(mu)

    def runner(self, dit, pipe) -> Flux2ImagePipeline:
        return Flux2ImagePipeline(
            dit, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.device,
            next(dit.parameters()).dtype, pipe.prompt_encoder,
        )  # fmt: skip


class ZImageBackbone(TrainingBackbone):
    name = "zimage"
    dit_class = ZImageDiT
    supports_edit_images = False

    def load_pipeline(self, config, folders, device, dtype, dit=None) -> ZImagePipeline:
        text_encoder = Qwen3TextEncoder.from_pretrained(
            folders["text_encoder"], torch_dtype=dtype, device=device
        )
        vae = AutoencoderKL.from_pretrained(folders["vae"], torch_dtype=dtype, device=device)
        tokenizer = load_tokenizer(folders["tokenizer"])
        pad_token, padding_side = read_tokenizer_settings(folders["tokenizer"])
        prompt_encoder = ZImagePromptEncoder(
            tokenizer, text_encoder, pad_token=pad_token, padding_side=padding_side
        )
        if dit is None:  # the pipeline reads its patch size off the DiT: a weightless skeleton stands in
            dit_config = ZImageDiTConfig.from_diffusers(read_config(folders["transformer"]))
            with torch.device("meta"):
                dit = ZImageDiT(dit_config)
        source = config.model or config.transformer
        variant = "turbo" if "turbo" in Path(str(source)).name.lower() else "base"
        shift = _read_shift(source, None, None, True if config.offline else None)
        return ZImagePipeline(
            dit, vae, text_encoder, tokenizer, device, dtype, prompt_encoder, variant=variant, shift=shift
        )

    def prompt_embeds(self, pipe, prompt, max_sequence_length) -> Tensor:
        return pipe.encode_prompt([prompt], max_sequence_length)[0]

    def objective(self, mu: float = TRAINING_MU) -> ZImageObjective:
        return ZImageObjective()  # klein's mu does not apply: Z-Image trains on its static shift

    def runner(self, dit, pipe) -> ZImagePipeline:
        return ZImagePipeline(
            dit, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.device, next(dit.parameters()).dtype,
            pipe.prompt_encoder, variant=pipe.variant, shift=pipe.shift,
        )  # fmt: skip


BACKBONES: dict[str, TrainingBackbone] = {b.name: b for b in (Flux2Backbone(), ZImageBackbone())}


def get_backbone(name: str) -> TrainingBackbone:
    if name not in BACKBONES:
        raise ValueError(f"the trainer knows the backbones {sorted(BACKBONES)}, not {name!r}")
    return BACKBONES[name]


def backbone_of_dit(dit: nn.Module) -> TrainingBackbone:
    for backbone in BACKBONES.values():
        if isinstance(dit, backbone.dit_class):
            return backbone
    raise TypeError(f"the trainer trains on a Flux2DiT or a ZImageDiT, got {type(dit).__name__}")


def detect_training_backbone(transformer_folder: Path, offline: bool = False) -> TrainingBackbone:
    """The backbone of the DiT the run trains on (its folder's ``config.json`` says which)."""
    return get_backbone(detect_backbone(transformer_folder, offline=True if offline else None))
