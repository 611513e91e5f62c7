"""Image measurements for the toy world's controllability evaluation (``scripts/eval_controls.py``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from diffsynth_templates.toy import world

COMPOSED_TOLERANCE = 0.2


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(v: Sequence[float]) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # ties share their mean rank
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    """PSNR in dB of images in [0, 255] (optionally over the pixels where ``where`` is true)."""
    diff = (a.astype(np.float64) - b.astype(np.float64)) / 255.0
    if where is not None:
        diff = diff[where]
    mse = float(np.mean(diff**2))
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def background_rows(image: np.ndarray, border: int = 3) -> np.ndarray:
    """Per-row background color ``[H, 3]``: the median of the leftmost and rightmost columns (toy
    backgrounds are solid or vertical gradients; shapes keep a margin from the border)."""
    edges = np.concatenate([image[:, :border], image[:, -border:]], axis=1).astype(np.float64)
    return np.median(edges, axis=1)


def shape_mask(image: Image.Image, threshold: float = 40.0) -> np.ndarray:
    """Pixels whose color differs from the row's background by more than ``threshold`` (of 255)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    return np.abs(rgb - background_rows(rgb)[:, None, :]).max(axis=-1) > threshold


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def named_color(rgb: Sequence[float], choices: Sequence[str] = world.SHAPE_COLORS) -> str:
    """The palette color nearest to a measured mean RGB (on [0, 1]), allowing any brightness factor in
    the toy world's range: the base model draws brightness freely, so "dark red" still reads as red."""
    low, high = world.BRIGHTNESS_RANGE
    m = np.asarray(rgb, dtype=np.float64)

    def error(name: str) -> float:
        c = np.asarray(world.COLORS[name], dtype=np.float64) / 255
        scale = float(np.clip(m @ c / max(c @ c, 1e-12), low, high))
        return float(np.abs(m - scale * c).sum())

    return min(choices, key=error)


def interior(mask: np.ndarray) -> np.ndarray:
    """A silhouette without its one-pixel anti-aliased rim (whose colors mix with the background)."""
    padded = np.pad(mask, 1)  # outside the image counts as background
    inner = mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return inner if inner.any() else mask


def composed_ok(metric: str, solo: float, composed: float) -> bool:
    """Within 20% of solo: an error metric (MAE) may grow by at most 20% of the solo value, any other
    metric may drop by at most 20% of its magnitude."""
    margin = COMPOSED_TOLERANCE * abs(solo)
    if metric.endswith("_mae"):
        return composed <= solo + margin
    return composed >= solo - margin


def foreign_partners(masks: Sequence[np.ndarray]) -> list[int]:
    """For each silhouette, the index of another one that overlaps it least (ties: the next one after
    it, cyclically, so the maps vary): the control map a foreign-silhouette test pairs with its
    scene's prompt, so that following the prompt and following the map draw different pixels."""
    if len(masks) < 2:
        raise ValueError(f"a foreign silhouette needs at least 2 scenes, got {len(masks)}")
    return [
        min(
            (j for j in range(len(masks)) if j != i),
            key=lambda j: (iou(masks[i], masks[j]), (j - i) % len(masks)),
        )
        for i in range(len(masks))
    ]


def monotone(values: Sequence[float], tolerance: float = 0.0) -> bool:
    """Non-decreasing, allowing each step to drop by at most ``tolerance``."""
    return all(b >= a - tolerance for a, b in zip(values, values[1:]))
