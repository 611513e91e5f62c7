"""Per-sample noise and sigma for the flow-matching objective, drawn from a private seeded generator.

Each family draws sigma the way DiffSynth-Studio trains it (its record's ``draw_noise``):

* FLUX.2-klein (``families.flux2.draw_noise``): ``u ~ U[0, 1)``, then klein's exponential time shift
  at ``mu`` (0.8);
* Z-Image (``families.zimage.draw_shifted_noise``): a timestep index uniform over the 1000-step
  training grid ``linspace(1, 0, 1001)[:-1]``, warped by the static shift ``s * x / (1 + (s - 1) * x)``
  with ``s = 3``, so sigma lies in ``[0.003, 1]``.

The seed comes from ``(seed, step, micro-batch, sample id)``: independent of device, rank, batch
position and DataLoader workers, so a resumed run, stage II from a cache and ``--task full`` all draw
exactly the same numbers.
"""

from __future__ import annotations

import hashlib

from ..pipelines.families.flux2 import draw_noise
from ..pipelines.families.zimage import ZIMAGE_TRAINING_SHIFT, draw_shifted_noise, shifted_training_sigmas

__all__ = [
    "ZIMAGE_TRAINING_SHIFT",
    "draw_noise",
    "draw_shifted_noise",
    "noise_seed",
    "shifted_training_sigmas",
]


def noise_seed(seed: int, step: int, micro: int, sample_id: str) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:{micro}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
