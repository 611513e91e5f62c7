"""Fixtures of the pipeline tests: the tiny official-layout klein folder loaded by us and by diffusers
(``pipe`` and ``reference``, once per test module; a module defining its own keeps it)."""

from __future__ import annotations

import pytest
import torch

from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline


@pytest.fixture(scope="module")
def pipe(tiny_klein_root):
    return Flux2ImagePipeline.from_pretrained(tiny_klein_root, torch_dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_klein_root):
    from tests.tiny_klein import diffusers_klein_pipeline

    return diffusers_klein_pipeline(tiny_klein_root)
