"""``paste_unmasked``: the input's own pixels outside the mask, resized the way the VAE saw them."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from diffsynth_templates.pipelines.image_io import paste_unmasked


def test_paste_unmasked_keeps_the_input_outside_and_blends_a_soft_mask():
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    generated = torch.zeros(2, 3, 16, 24)  # a batch of two; the input is resized to 16 x 24
    mask = np.zeros((32, 48), np.float32)  # at the input's size; placed onto 16 x 24 like the input
    mask[:, 24:] = 1.0  # regenerate the right half
    mask[:, 22:24] = 0.5  # a soft column (column 11 once halved)
    out = paste_unmasked(generated, source, mask)

    expected = np.asarray(source.resize((24, 16), Image.BILINEAR), np.float32) / 127.5 - 1
    got = out[1].permute(1, 2, 0).numpy()
    assert out.shape == generated.shape
    assert np.abs(got[:, :11] - expected[:, :11]).max() < 0.05  # the input (antialiased resize)
    assert np.array_equal(got[:, 12:], np.zeros_like(got[:, 12:]))  # the generated pixels
    # the soft column is half of each
    kept = paste_unmasked(generated, source, np.zeros((32, 48), np.float32))[0, :, :, 11]
    torch.testing.assert_close(out[0, :, :, 11], kept * 0.5)
