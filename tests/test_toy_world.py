"""The toy-world generator: determinism, captions, masks, controls and the on-disk dataset format."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffsynth_templates.loading.write_safety import MARKER, UnsafeOutputError
from diffsynth_templates.toy import world as tw

REPO_ROOT = Path(__file__).resolve().parents[1]


def _scene(**overrides) -> tw.SceneSpec:
    spec = tw.SceneSpec(
        background="white",
        shapes=(
            tw.ShapeSpec("circle", "red", "large", "top left"),
            tw.ShapeSpec("square", "blue", "medium", "bottom right"),
        ),
    )
    return dataclasses.replace(spec, **overrides)


def _neutral_specs(n: int, seed: int = 7) -> list[tw.SceneSpec]:
    return [tw.sample_scene(tw.sample_rng(seed, i), photometric=False) for i in range(n)]


# ---------------------------------------------------------------------------------------------------
# Dataset on disk
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory) -> Path:
    return tw.generate(tmp_path_factory.mktemp("toy") / "ds", num_samples=50, seed=0, size=128)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(toy_dataset, tmp_path):
    again = tw.generate(tmp_path / "again", num_samples=8, seed=0, size=128)
    other = tw.generate(tmp_path / "other", num_samples=8, seed=1, size=128)
    first_rows = (toy_dataset / "metadata.jsonl").read_text().splitlines()[:8]
    assert (again / "metadata.jsonl").read_text().splitlines() == first_rows  # sample i ignores num_samples
    for sub in ("images", "masks", "edges", "lowres"):
        assert (again / sub / "00005.png").read_bytes() == (toy_dataset / sub / "00005.png").read_bytes()
    assert (other / "metadata.jsonl").read_bytes() != (again / "metadata.jsonl").read_bytes()
    assert (other / "images" / "00005.png").read_bytes() != (again / "images" / "00005.png").read_bytes()


def test_max_tint_widens_only_the_tints(toy_dataset, tmp_path):
    wide = tw.generate(tmp_path / "wide", num_samples=50, seed=0, size=128, max_tint=0.5)
    base_rows = [json.loads(r) for r in (toy_dataset / "metadata.jsonl").read_text().splitlines()]
    wide_rows = [json.loads(r) for r in (wide / "metadata.jsonl").read_text().splitlines()]
    tinted = 0
    for a, b in zip(base_rows, wide_rows, strict=True):
        # the same scene and caption; only the tint strength (and so the image) may differ
        assert a["prompt"] == b["prompt"]
        assert {**a["spec"], "tint_strength": 0} == {**b["spec"], "tint_strength": 0}
        if b["spec"]["tint"] is not None:
            tinted += 1
            assert tw.MIN_TINT_STRENGTH <= a["spec"]["tint_strength"] <= tw.MAX_TINT_STRENGTH
            assert tw.MIN_TINT_STRENGTH <= b["spec"]["tint_strength"] <= 0.5
            assert b["spec"]["tint_strength"] > a["spec"]["tint_strength"]  # the same draw, scaled wider
    assert tinted >= 5
    for bad in (0.01, 1.5):
        with pytest.raises(ValueError, match=f"max_tint {bad} outside"):
            tw.generate(tmp_path / f"bad{bad}", num_samples=2, max_tint=bad)


def test_metadata_rows_are_valid_and_point_at_existing_files(toy_dataset):
    lines = (toy_dataset / "metadata.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 50
    assert json.loads((toy_dataset / "metadata.json").read_text()) == rows
    for i, row in enumerate(rows):
        assert row["image"] == f"images/{i:05d}.png"
        assert isinstance(row["prompt"], str) and row["prompt"]
        assert isinstance(row["template_inputs"], dict)
        for key in ("image", "mask", "edges", "lowres"):
            assert (toy_dataset / row[key]).is_file(), (i, key)
        for key in ("brightness", "sharpness_level", "mean_rgb", "mask", "edges", "lowres"):
            assert row["template_inputs"][key] == row[key]
        assert 0.0 <= row["brightness"] <= 1.0
        assert len(row["mean_rgb"]) == 3 and all(0.0 <= v <= 1.0 for v in row["mean_rgb"])
    # Nothing but the dataset was left next to it (the temp folder was renamed, not copied).
    assert [p.name for p in toy_dataset.parent.iterdir()] == [toy_dataset.name]


def test_annotations_match_the_files_and_the_spec_rerenders_the_image(toy_dataset):
    rows = [json.loads(line) for line in (toy_dataset / "metadata.jsonl").read_text().splitlines()]
    for row in rows[:10]:
        image = Image.open(toy_dataset / row["image"])
        assert image.mode == "RGB" and image.size == (128, 128)
        assert row["brightness"] == pytest.approx(tw.measure_brightness(image), abs=1e-4)
        assert row["mean_rgb"] == pytest.approx(tw.measure_mean_rgb(image), abs=1e-4)
        spec = tw.SceneSpec.from_dict(row["spec"])
        assert row["prompt"] == tw.caption(spec)
        assert row["sharpness_level"] == spec.blur_sigma
        rerendered = tw.render(spec, 128)
        np.testing.assert_array_equal(np.asarray(rerendered.image), np.asarray(image))
        np.testing.assert_array_equal(rerendered.mask, np.asarray(Image.open(toy_dataset / row["mask"])))


def test_lowres_is_exactly_a_quarter(toy_dataset):
    assert Image.open(toy_dataset / "lowres" / "00000.png").size == (32, 32)
    image = tw.render(_scene(), 64).image
    assert tw.lowres(image).size == (16, 16)
    with pytest.raises(ValueError, match="not divisible"):
        tw.lowres(image.resize((62, 62)))


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    out = tw.generate(tmp_path / "ds", num_samples=2, seed=0)
    with pytest.raises(UnsafeOutputError, match="overwrite"):
        tw.generate(out, num_samples=3, seed=0)
    tw.generate(out, num_samples=3, seed=0, overwrite=True)
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_overwrite_never_replaces_a_folder_we_did_not_write(tmp_path, monkeypatch):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    for out in [user, tmp_path, "."]:  # a user folder, its parent, the current directory
        monkeypatch.chdir(user)
        with pytest.raises(UnsafeOutputError):
            tw.generate(out, num_samples=2, seed=0, overwrite=True)
        with pytest.raises(SystemExit) as e:
            tw.main(["--out", str(out), "--num_samples", "2", "--overwrite"])
        assert e.value.code == 2
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    assert (user / "notes.txt").read_text() == "mine"


def test_a_dataset_written_before_the_marker_is_still_replaceable(tmp_path):
    out = tw.generate(tmp_path / "ds", num_samples=2, seed=0)
    (out / MARKER).unlink()  # as written by an older version
    tw.generate(out, num_samples=3, seed=0, overwrite=True)
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 3


def test_interrupted_run_leaves_no_dataset(tmp_path, monkeypatch):
    real_write = tw._write_sample

    def write_then_fail(root, index, spec, size):
        if index == 3:
            raise KeyboardInterrupt  # what a user's Ctrl-C looks like halfway through
        return real_write(root, index, spec, size)

    monkeypatch.setattr(tw, "_write_sample", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        tw.generate(tmp_path / "ds", num_samples=6, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_cli_help_and_run(tmp_path):
    help_run = subprocess.run(
        [sys.executable, "-m", "diffsynth_templates.toy.world", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert help_run.returncode == 0, help_run.stderr
    assert "--num_samples" in help_run.stdout and "--seed" in help_run.stdout
    out = tw.main(["--out", str(tmp_path / "cli"), "--num_samples", "3", "--seed", "2", "--size", "64"])
    assert Image.open(out / "images" / "00002.png").size == (64, 64)
    assert Image.open(out / "lowres" / "00002.png").size == (16, 16)


# ---------------------------------------------------------------------------------------------------
# Scenes, captions and masks
# ---------------------------------------------------------------------------------------------------


def test_caption_names_every_shape_and_the_background():
    assert (
        tw.caption(_scene())
        == "a large red circle at the top left and a medium blue square at the bottom right on a white background"
    )
    for i in range(100):
        spec = tw.sample_scene(tw.sample_rng(3, i))
        text = tw.caption(spec)
        for shape in spec.shapes:
            assert f"a {shape.size} {shape.color} {shape.kind} at the {shape.position}" in text
        assert text.endswith("background") and f" {spec.background} " in text
        if spec.background_bottom is not None:
            assert f"{spec.background} to {spec.background_bottom} gradient" in text
        # Photometric controls are left to templates, never named in the caption.
        assert not {"bright", "dark", "blurry", "tint", "warm", "cool", "lime", "magenta"} & set(text.split())


def test_sampled_scenes_vary_along_every_axis():
    specs = [tw.sample_scene(tw.sample_rng(0, i)) for i in range(300)]
    shapes = [s for spec in specs for s in spec.shapes]
    assert {s.kind for s in shapes} == set(tw.SHAPE_KINDS)
    assert {s.color for s in shapes} == set(tw.SHAPE_COLORS)
    assert {s.size for s in shapes} == set(tw.SIZES)
    assert {s.position for s in shapes} == set(tw.POSITIONS)
    assert {len(spec.shapes) for spec in specs} == {1, 2}
    assert any(spec.background_bottom for spec in specs) and any(spec.tint for spec in specs)
    brightness = [spec.brightness for spec in specs]
    assert min(brightness) < 0.6 and max(brightness) > 1.4
    assert any(spec.blur_sigma == 0 for spec in specs) and max(spec.blur_sigma for spec in specs) > 2.5
    for spec in specs:  # a shape never hides in a background of its own color
        assert all(s.color not in (spec.background, spec.background_bottom) for s in spec.shapes)


def test_shape_masks_hold_the_shape_color_and_the_union_is_the_object_mask():
    for spec in _neutral_specs(40):
        rendered = tw.render(spec, 128)
        rgb = np.asarray(rendered.image, dtype=np.float64)
        union = np.zeros((128, 128), dtype=bool)
        for shape, mask in zip(spec.shapes, rendered.shape_masks):
            inside = mask == 255
            assert set(np.unique(mask)) <= {0, 255}
            assert not (union & inside).any(), "sampled shapes must not overlap"
            union |= inside
            area = SHAPE_AREA[shape.kind] * (tw.SIZES[shape.size] * 128) ** 2
            assert inside.sum() == pytest.approx(area, rel=0.12), (shape, inside.sum(), area)
            # Median: thin rings are mostly anti-aliased edge pixels, which pull a mean off.
            median = np.median(rgb[inside], axis=0)
            assert np.abs(median - np.array(tw.COLORS[shape.color])).max() <= 2, (shape, median)
        np.testing.assert_array_equal(rendered.mask == 255, union)
        if spec.background_bottom is None:  # outside the shapes and their soft edges: pure background
            outside = ~_dilate(union, 2)
            assert np.abs(rgb[outside] - np.array(tw.COLORS[spec.background])).max() <= 1


# Area of each kind relative to r^2 (r the nominal radius), from the renderer's geometry.
SHAPE_AREA = {
    "circle": np.pi,
    "ring": np.pi * (1 - 0.55**2),
    "square": (2 * 0.85) ** 2,
    "triangle": 3 * np.sqrt(3) / 4 * 1.1**2,
    "star": 5 * 0.45 * np.sin(np.deg2rad(36)),
}


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    import cv2

    kernel = np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def test_sampled_shapes_never_overlap_nor_touch_the_border():
    for i in range(300):
        spec = tw.sample_scene(tw.sample_rng(4, i), photometric=False)
        mask = tw.render(spec, 128).mask
        assert not (mask[:2].any() or mask[-2:].any() or mask[:, :2].any() or mask[:, -2:].any()), spec
        if len(spec.shapes) == 2:  # full footprints, each shape rendered alone
            a, b = (tw.render(dataclasses.replace(spec, shapes=(s,)), 128).mask > 0 for s in spec.shapes)
            assert not (_dilate(a, 1) & b).any(), spec


def test_later_shapes_occlude_earlier_ones():
    big = tw.ShapeSpec("circle", "red", "large", "center")
    small = tw.ShapeSpec("square", "blue", "small", "center")
    rendered = tw.render(tw.SceneSpec("white", (big, small)), 128)
    circle, square = (m == 255 for m in rendered.shape_masks)
    alone = tw.render(tw.SceneSpec("white", (big,)), 128).mask == 255
    assert not (circle & square).any() and square.sum() > 0
    np.testing.assert_array_equal(circle | square, alone)
    np.testing.assert_array_equal(rendered.mask == 255, alone)
    assert np.asarray(rendered.image)[64, 64].tolist() == list(tw.COLORS["blue"])


def test_position_and_jitter_place_the_shape():
    for position, (cx, cy) in tw.POSITIONS.items():
        for jitter in ((0.0, 0.0), (0.04, -0.03)):
            shape = tw.ShapeSpec("circle", "red", "small", position, jitter)
            mask = tw.render(tw.SceneSpec("white", (shape,)), 128).mask == 255
            ys, xs = np.nonzero(mask)
            # Pixel centers sit at i + 0.5; small circles near the border are not clamped.
            assert xs.mean() + 0.5 == pytest.approx((cx + jitter[0]) * 128, abs=0.5), position
            assert ys.mean() + 0.5 == pytest.approx((cy + jitter[1]) * 128, abs=0.5), position


def test_red_shape_is_red_inside_its_mask():
    spec = _scene()
    rendered = tw.render(spec, 128)
    r, g, b = np.asarray(rendered.image, dtype=np.float64)[rendered.shape_masks[0] == 255].mean(axis=0)
    assert r > 180 and g < 80 and b < 80
    r, g, b = np.asarray(rendered.image, dtype=np.float64)[rendered.shape_masks[1] == 255].mean(axis=0)
    assert b > 180 and r < 80 and g < 120


def test_edges_trace_the_shape_outlines():
    for spec in _neutral_specs(10, seed=11):
        if spec.background_bottom is not None:
            continue
        rendered = tw.render(spec, 128)
        edges = np.asarray(tw.edge_map(tw.render_clean(spec, 128))) > 0
        boundary = _dilate(rendered.mask == 255, 2) & ~(_erode(rendered.mask == 255, 2))
        assert edges.sum() > 20
        assert not (edges & ~boundary).any(), "edges away from any shape outline"


def _erode(mask: np.ndarray, pixels: int) -> np.ndarray:
    return ~_dilate(~mask, pixels)


def test_invalid_specs_say_what_is_allowed():
    with pytest.raises(ValueError, match="circle"):
        tw.ShapeSpec("hexagon", "red", "large", "center")
    with pytest.raises(ValueError, match="top left"):
        tw.ShapeSpec("circle", "red", "large", "upper left")
    with pytest.raises(ValueError, match="brightness"):
        _scene(brightness=3.0)
    with pytest.raises(ValueError, match="multiple of 4"):
        tw.render(_scene(), 130)


# ---------------------------------------------------------------------------------------------------
# Controls
# ---------------------------------------------------------------------------------------------------


def test_brightness_factor_orders_measured_brightness():
    for spec in [_scene(background="gray"), *_neutral_specs(5, seed=5)]:
        images = tw.render_prompt_variants(
            spec, [{"brightness": 0.5}, {"brightness": 1.0}, {"brightness": 1.5}]
        )
        dark, mid, bright = (tw.measure_brightness(r.image) for r in images)
        assert dark < mid <= bright and dark < bright - 0.05
        np.testing.assert_array_equal(images[0].mask, images[2].mask)  # content unchanged
    gray = [
        tw.measure_brightness(r.image)
        for r in tw.render_prompt_variants(_scene(background="gray"), [{}, {"brightness": 1.5}])
    ]
    assert gray[1] > gray[0] + 0.1


def test_blur_lowers_sharpness():
    spec = _scene()
    sharp, soft, softer = (
        tw.measure_sharpness(r.image)
        for r in tw.render_prompt_variants(
            spec, [{"blur_sigma": 0.0}, {"blur_sigma": 1.0}, {"blur_sigma": 3.0}]
        )
    )
    assert sharp > soft > softer
    assert sharp > 3 * softer


def test_tint_shifts_mean_color_toward_the_tint():
    spec = _scene(background="gray")
    plain, warm, cool = (
        tw.measure_mean_rgb(r.image)
        for r in tw.render_prompt_variants(
            spec, [{}, {"tint": "warm", "tint_strength": 0.3}, {"tint": "cool", "tint_strength": 0.3}]
        )
    )
    assert warm[0] - warm[2] > plain[0] - plain[2] + 0.1
    assert cool[2] - cool[0] > plain[2] - plain[0] + 0.1


def test_fixed_eval_prompts_are_fixed_and_neutral():
    prompts = tw.fixed_eval_prompts(12, seed=1)
    assert prompts == tw.fixed_eval_prompts(12, seed=1)
    assert tw.fixed_eval_prompts(5, seed=1) == prompts[:5]
    assert [c for c, _ in tw.fixed_eval_prompts(12, seed=2)] != [c for c, _ in prompts]
    assert len({c for c, _ in prompts}) == 12
    for text, spec in prompts:
        assert text == tw.caption(spec)
        assert (spec.brightness, spec.blur_sigma, spec.tint) == (1.0, 0.0, None)
