from __future__ import annotations

import pytest


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
