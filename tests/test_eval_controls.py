"""The measurements scripts/eval_controls.py reports: checked against references and ground truth."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage, stats  # installed with scikit-image (the test extra)

from diffsynth_templates.toy import world as toy_world
from diffsynth_templates.toy.metrics import (
    composed_ok,
    foreign_partners,
    interior,
    iou,
    monotone,
    named_color,
    psnr,
    shape_mask,
    spearman,
)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.integers(0, 6, 30).astype(float)  # many ties
        y = x + rng.normal(0, 2, 30)
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_psnr():
    a = np.full((4, 4, 3), 100, np.uint8)
    b = a.copy()
    assert psnr(a, b) == float("inf")
    b[0, 0, 0] = 110  # one error of 10/255 over 48 values
    assert psnr(a, b) == pytest.approx(10 * np.log10(1 / ((10 / 255) ** 2 / 48)))
    where = np.zeros((4, 4), bool)
    where[1:] = True
    assert psnr(a, b, where) == float("inf")  # the error is outside the measured pixels


def test_shape_mask_recovers_the_rendered_silhouettes():
    """On the toy world's own renders (the ground truth), the segmentation the structure metric uses
    finds the shapes: IoU with the true silhouette is high for every fixed evaluation scene."""
    scores = []
    for _, spec in toy_world.fixed_eval_prompts(8):
        rendered = toy_world.render(spec)
        scores.append(iou(shape_mask(rendered.image), rendered.mask > 127))
    assert min(scores) > 0.8, scores


def test_composed_within_tolerance():
    assert composed_ok("brightness_spearman", 0.95, 0.80) and not composed_ok(
        "brightness_spearman", 0.95, 0.7
    )
    assert composed_ok("color_mae", 0.05, 0.059) and not composed_ok("color_mae", 0.05, 0.07)


def test_named_color_reads_rendered_shapes_at_any_brightness():
    """The base model's color metric on ground truth: every shape of the fixed scenes, rendered dark
    and bright, reads as the color its caption names; a shape drawn in another color does not. (Above
    about 1.3x, clipping at 255 turns orange into yellow for real, so the sweep stops at 1.25.)"""
    for _, spec in toy_world.fixed_eval_prompts(8):
        for factor in (0.5, 1.0, 1.25):
            rendered = toy_world.render(dataclasses.replace(spec, brightness=factor))
            rgb = np.asarray(rendered.image, dtype=np.float64) / 255
            for shape, mask in zip(spec.shapes, rendered.shape_masks):
                inner = interior(mask > 127)
                assert named_color(rgb[inner].mean(axis=0)) == shape.color, (shape, factor)
    assert named_color([0.9, 0.1, 0.1]) == "red" and named_color([0.45, 0.05, 0.05]) == "red"
    assert named_color([0.1, 0.1, 0.8]) != "red"


def test_interior_matches_scipy_binary_erosion():
    rng = np.random.default_rng(0)
    mask = rng.random((20, 24)) > 0.3
    expected = ndimage.binary_erosion(mask, border_value=0)
    assert np.array_equal(interior(mask), expected) and expected.any()
    lone = np.zeros((5, 5), bool)
    lone[2, 2] = True
    assert np.array_equal(interior(lone), lone)  # nothing would remain: the silhouette itself


def test_foreign_partners_pick_another_scene_whose_shapes_are_elsewhere():
    """The foreign-silhouette measure pairs each fixed scene's prompt with another scene's map; on the
    evaluation's scenes the two silhouettes never overlap, so following the prompt scores 0 IoU with
    the map and only a template that moves the shapes can score."""
    masks = [toy_world.render(spec).mask > 127 for _, spec in toy_world.fixed_eval_prompts(8)]
    partners = foreign_partners(masks)
    assert all(j != i for i, j in enumerate(partners)) and len(set(partners)) > 4
    assert all(iou(masks[i], masks[j]) == 0 for i, j in enumerate(partners))
    # the ground truth of the measure: the foreign scene itself scores 1, the prompt's own scene 0
    for i, j in enumerate(partners):
        foreign = toy_world.render(toy_world.fixed_eval_prompts(8)[j][1])
        assert iou(shape_mask(foreign.image), masks[j]) > 0.8
        assert iou(masks[i], masks[j]) == 0
    assert foreign_partners(masks[:2]) == [1, 0]
    with pytest.raises(ValueError, match="at least 2 scenes"):
        foreign_partners(masks[:1])


def test_monotone_allows_only_the_tolerance():
    assert monotone([0.1, 0.3, 0.3, 0.6]) and not monotone([0.1, 0.3, 0.29, 0.6])
    assert monotone([0.1, 0.3, 0.29, 0.6], tolerance=0.01) and not monotone([0.5, 0.4], tolerance=0.01)
