"""The tiny diffusers reference DiTs, built once per session and shared by the per-backbone files and
the twin tests (tests/backbones/test_dit_families.py)."""

from __future__ import annotations

import pytest

from tests.backbones.dit_cases import DIT_CASES


@pytest.fixture(scope="session")
def flux2_dit_reference(tmp_path_factory):
    return DIT_CASES["flux2"].reference(tmp_path_factory.mktemp("flux2-transformer"))


@pytest.fixture(scope="session")
def zimage_dit_reference(tmp_path_factory):
    return DIT_CASES["zimage"].reference(tmp_path_factory.mktemp("zimage-transformer"))
