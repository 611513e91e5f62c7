"""Fixtures for trainer tests: tiny random base models (FLUX.2, Z-Image) on disk and a tiny image dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.training.helpers import write_dataset


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> Path:
    """The random tiny FLUX.2-klein pipeline in the official layout (its DiT is randomly initialized)."""
    from diffsynth_templates.pipelines.random_init import random_flux2_pipeline

    root = tmp_path_factory.mktemp("base") / "model"
    random_flux2_pipeline().save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def zimage_base(tmp_path_factory) -> Path:
    """The random tiny Z-Image (Turbo) pipeline in the official layout."""
    from diffsynth_templates.pipelines.random_init import random_zimage_pipeline

    root = tmp_path_factory.mktemp("zbase") / "tiny-z-image-turbo"
    random_zimage_pipeline().save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A read-only tiny dataset (six 32x32 images); tests that edit files write their own."""
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def one_thread():
    """The two CPU cores are shared with other processes; one intra-op thread avoids spin-wait stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
