"""``infer.py --vram_limit GB`` and ``--weight_dtype``: the same image under a tight limit, FP8 close to
full precision, templates included; refusals exit 2 with one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffsynth_templates.toy.metrics import psnr

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

COMMON = ["--prompt", "a red circle", "--steps", "6", "--quiet", "--device", "cpu",
          "--template", "models/toy/templates/brightness", "--template_input", "scale=0.8"]  # fmt: skip


def image(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_vram_limit_gives_the_same_image_and_weight_dtype_a_close_one(tmp_path):
    import infer

    plain = infer.main([*COMMON, "--output", str(tmp_path / "plain.png")])[0]
    limited = infer.main([*COMMON, "--vram_limit", "0.011", "--output", str(tmp_path / "limit.png")])[0]
    assert np.array_equal(image(plain), image(limited))
    fp8 = infer.main(
        [
            *COMMON,
            "--weight_dtype",
            "float8_e4m3fn",
            "--vram_limit",
            "0.006",
            "--output",
            str(tmp_path / "f.png"),
        ]
    )[0]
    assert psnr(image(plain), image(fp8)) >= 30  # one image, templates stored in FP8 too


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--vram_limit", "0.0001"], "is too small"),
        (["--vram_limit", "0"], "--vram_limit must be"),
        (["--vram_limit", "1", "--offload"], "two offload modes"),
    ],
)
def test_refusals_exit_2_with_one_line(tmp_path, capsys, flags, message):
    import infer

    with pytest.raises(SystemExit) as e:
        infer.main([*COMMON, *flags, "--output", str(tmp_path / "x.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
