"""The toy world's shipped models loaded together: the base pipeline and the templates by name."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffsynth_templates.templates.base import TemplateError
from diffsynth_templates.toy import world

TEMPLATES = ("brightness", "color", "structure", "inpaint", "super_resolution", "sharpness")


class ToyTemplatesMissingError(TemplateError):
    """No toy template folder where the toy world's templates were expected."""


@dataclass
class ToyWorld:
    """The base pipeline, the templates by name, and the generation settings every measurement shares."""

    pipe: Any
    templates: Any  # TemplatePipeline over the available templates, names = folder names
    names: tuple[str, ...]
    steps: int = 20
    size: int = world.TOY_SIZE

    @classmethod
    def load(cls, model: str | Path, templates: str | Path, steps: int = 20) -> ToyWorld:
        from diffsynth_templates.pipelines.auto import load_pipeline
        from diffsynth_templates.templates import TemplatePipeline

        pipe = load_pipeline(model, device="cpu")
        folders = [
            Path(templates) / n for n in TEMPLATES if (Path(templates) / n / "template.json").is_file()
        ]
        if not folders:
            raise ToyTemplatesMissingError(
                f"no toy templates under {templates}: expected some of the folders {TEMPLATES}, each "
                "with a template.json (rebuild them with scripts/train_toy.sh)"
            )
        names = tuple(f.name for f in folders)
        tp = TemplatePipeline.from_pretrained([str(f) for f in folders], names=list(names), device="cpu")
        return cls(pipe, tp, names, steps)

    def generate(self, prompts: Sequence[str], seed: int, inputs: Sequence[dict] = ()) -> list[Image.Image]:
        """One image per prompt (one batch, noise from ``seed``), with the given template inputs."""
        call = dict(
            prompt=list(prompts),
            height=self.size,
            width=self.size,
            num_inference_steps=self.steps,
            cfg_scale=1.0,  # the toy DiT is trained without caption dropout: no unconditional branch
            seed=seed,
            max_sequence_length=40,
            progress=False,
        )
        if not inputs:
            return self.pipe(**call)
        return self.templates(self.pipe, template_inputs=list(inputs), **call)

    def vae_round_trip(self, image: Image.Image) -> Image.Image:
        """``image`` encoded and decoded by the base model's VAE, as the pipeline would output it."""
        from diffsynth_templates.pipelines.image_io import tensor_to_output

        with torch.no_grad():
            latents = self.pipe.encode_image(image, self.size, self.size)
            return tensor_to_output(self.pipe.decode_latents(latents).float(), "pil")[0]


def inpaint_mask(scene_index: int, size: int) -> np.ndarray:
    """The fixed box mask (bool ``[size, size]``) the demo and the evaluation inpaint scene ``scene_index`` with."""
    from diffsynth_templates.templates.processors import random_inpaint_mask

    return random_inpaint_mask(size, size, 0.25, "box", seed=1000 + scene_index) > 127
