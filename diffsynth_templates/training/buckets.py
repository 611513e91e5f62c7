"""Resolution buckets: training sizes under a pixel budget and the bucketed, rank-sharded batch sampler.

Sizes are ``(width, height)`` everywhere, like PIL.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from .samples import Size

logger = logging.getLogger(__name__)


def fit_to_pixel_budget(width: int, height: int, max_pixels: int, multiple: int = 16) -> Size:
    """The training size for a ``width x height`` image: both sides multiples of ``multiple``, area at
    most ``max_pixels``.

    Resolution and aspect ratio pull against each other on the ``multiple`` grid, so one objective
    trades them: maximize ``w * h * kept``, where ``kept = min(a'/a, a/a')`` is the fraction of the
    source that survives the center crop (``a`` the source aspect, ``a'`` the candidate's). The
    answer is therefore never beaten by a size that is both larger and closer in aspect. Small images
    are scaled up to the budget; ties go to the closer aspect.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return _fit_aspect(width / height, max_pixels, multiple)


def _fit_aspect(aspect: float, max_pixels: int, multiple: int) -> Size:
    if max_pixels < multiple * multiple:
        raise ValueError(f"max_pixels={max_pixels} is below one {multiple}x{multiple} tile")
    widths = np.arange(multiple, max_pixels // multiple + 1, multiple, dtype=np.int64)
    # for a fixed width the objective grows with height up to the aspect line and is flat above it,
    # so the best height is the first multiple at or above width / aspect, capped by the budget
    heights = np.minimum(
        np.ceil(widths / aspect / multiple).astype(np.int64) * multiple,
        max_pixels // widths // multiple * multiple,
    )
    heights = np.maximum(heights, multiple)
    error = np.abs(np.log(widths / heights) - math.log(aspect))
    score = widths * heights * np.exp(-error)
    best = np.flatnonzero(score >= score.max() * (1 - 1e-12))
    i = best[np.argmin(error[best])]
    return int(widths[i]), int(heights[i])


def make_buckets(
    max_pixels: int,
    multiple: int = 16,
    aspect_range: tuple[float, float] = (0.5, 2.0),
    num_aspects: int = 9,
) -> list[Size]:
    """Bucket sizes for ``num_aspects`` aspect ratios spaced evenly in log space over ``aspect_range``.

    Each is ``fit_to_pixel_budget`` of that aspect; portrait buckets are the landscape ones transposed,
    so the set is symmetric. Sorted from tallest to widest, duplicates removed.
    """
    low, high = aspect_range
    if not 0 < low <= 1 <= high:
        raise ValueError(f"aspect_range must contain 1.0 (width / height), got {aspect_range}")
    if num_aspects < 1:
        raise ValueError(f"num_aspects must be at least 1, got {num_aspects}")
    aspects = np.exp(np.linspace(math.log(low), math.log(high), num_aspects)) if num_aspects > 1 else [1.0]
    buckets: set[Size] = set()
    for aspect in aspects:
        wide = _fit_aspect(max(aspect, 1 / aspect), max_pixels, multiple)
        buckets.add(wide if aspect >= 1 else (wide[1], wide[0]))
    return sorted(buckets, key=lambda s: (s[0] / s[1], s[0]))


def warn_upscaling(samples: Sequence[Any], sizes: Sequence[Size], max_pixels: int) -> None:
    """Say so when images are blown up to their training size: usually --max_pixels is too large for them."""
    grown = [(s.size, z) for s, z in zip(samples, sizes) if z[0] * z[1] > 2 * s.size[0] * s.size[1]]
    if grown:
        (w, h), (bw, bh) = grown[0]
        logger.warning(
            "%d of %d images are upscaled more than 2x in area to their training size (e.g. %dx%d -> %dx%d) "
            "because --max_pixels is %d; pass a smaller --max_pixels (e.g. %d) to train at their own size",
            len(grown), len(samples), w, h, bw, bh, max_pixels, w * h,
        )  # fmt: skip


def assign_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
    """The bucket nearest in log aspect ratio (ties: the larger one). Images beyond the bucket range
    land in the most extreme bucket and are cropped more."""
    if not buckets:
        raise ValueError("no buckets to assign to")
    log_aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - log_aspect), -b[0] * b[1]))


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices whose samples share one size (bucket), for ``DataLoader(batch_sampler=...)``.

    Per epoch, with a generator seeded by ``(seed, epoch)``: each bucket's indices are shuffled and cut
    into batches, and the batch order is shuffled. Every rank builds the same global list and takes
    every ``num_replicas``-th batch starting at ``rank``, so shares are disjoint without communication.

    Uneven shares (the number of batches is not a multiple of ``num_replicas``):

    * ``drop_last=False``: nothing is padded or repeated; every sample appears exactly once across
      ranks. To keep ranks in lockstep (DDP needs equal step counts) the largest batches are split in
      two until the count divides evenly. Only when there are too few samples to do that do ranks get
      different numbers of batches (at most one apart); a warning says so.
    * ``drop_last=True``: partial batches are dropped, then trailing batches until the count divides
      evenly; all batches are full and ranks are even, and the dropped samples change every epoch.
    """

    def __init__(
        self,
        samples_sizes: Sequence[Size],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"rank must be in [0, num_replicas); got rank={rank}, num_replicas={num_replicas}"
            )
        if not samples_sizes:
            raise ValueError("samples_sizes is empty; there is nothing to sample")
        self.batch_size, self.seed, self.drop_last, self.shuffle = batch_size, seed, drop_last, shuffle
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        groups: dict[Size, list[int]] = defaultdict(list)
        for index, size in enumerate(samples_sizes):
            groups[(int(size[0]), int(size[1]))].append(index)
        self._groups = dict(sorted(groups.items()))  # fixed order: the plan must not depend on dict history
        # the number of batches per rank does not depend on the epoch, only their contents do
        shares = [len(self._global_batches(0)[r::num_replicas]) for r in range(num_replicas)]
        self._length = shares[rank]
        if shares[0] == 0:
            raise ValueError(
                f"{len(samples_sizes)} samples give no batch of {batch_size} per rank on {num_replicas} ranks; "
                "lower batch_size or set drop_last=False"
            )
        if len(set(shares)) > 1 and rank == 0:
            logger.warning(
                "too few samples to give %d ranks the same number of batches (%s); ranks are uneven",
                num_replicas,
                shares,
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self, epoch: int) -> list[list[int]]:
        # SeedSequence wants non-negative entries; masking keeps any int seed usable
        rng = np.random.default_rng([self.seed & (2**64 - 1), epoch & (2**64 - 1)])
        batches: list[list[int]] = []
        for indices in self._groups.values():
            order = rng.permutation(indices).tolist() if self.shuffle else indices
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.drop_last:
            return batches[: len(batches) // self.num_replicas * self.num_replicas]
        return _split_until_divisible(batches, self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._global_batches(self.epoch)[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        return self._length


def _split_until_divisible(batches: list[list[int]], parts: int) -> list[list[int]]:
    batches = list(batches)
    while len(batches) % parts:
        i = max(range(len(batches)), key=lambda j: len(batches[j]))
        if len(batches[i]) < 2:
            break
        half = (len(batches[i]) + 1) // 2
        batches[i : i + 1] = [batches[i][:half], batches[i][half:]]
    return batches
