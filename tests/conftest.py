from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_klein_root(tmp_path_factory):
    """A tiny FLUX.2-klein model folder in the official layout (see tests/tiny_klein.py)."""
    from tests.tiny_klein import build_tiny_klein

    return build_tiny_klein(tmp_path_factory.mktemp("tiny-klein"))


@pytest.fixture(scope="session")
def tiny_zimage_root(tmp_path_factory):
    """A tiny Z-Image folder in the official layout (see tests/tiny_zimage.py); its name contains
    "turbo", so the pipeline picks the Turbo defaults."""
    from tests.tiny_zimage import build_tiny_zimage

    return build_tiny_zimage(tmp_path_factory.mktemp("zimage") / "Tiny-Z-Image-Turbo")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run several times faster on one intra-op thread, and the two CPU cores are shared:
    a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipes():
    """One tiny random pipeline per family, keyed like ``FAMILIES``."""
    from diffsynth_templates.pipelines.random_init import random_flux2_pipeline, random_zimage_pipeline

    return {"flux2": random_flux2_pipeline(), "zimage": random_zimage_pipeline()}
