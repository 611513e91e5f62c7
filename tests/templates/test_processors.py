"""Data processors on real photos (skimage.data): measurements move the right way, conditions are
well-formed, random processors are reproducible from their seed, and bad inputs fail clearly."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

skimage_data = pytest.importorskip("skimage.data")

from diffsynth_templates.templates.processors import (  # noqa: E402
    MASK_COVERAGE_TOLERANCE,
    PROCESSORS,
    TemplateProcessor,
    aesthetic_lora_id,
    canny_edges,
    content_reference,
    degrade_for_super_resolution,
    depth_or_edges,
    get_processor,
    mean_luminance,
    mean_rgb,
    random_inpaint_mask,
    register_processor,
    sharpness,
    upsample_bicubic,
)

PHOTOS = ("astronaut", "chelsea", "coffee")


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {name: Image.fromarray(getattr(skimage_data, name)()) for name in PHOTOS}


@pytest.fixture(scope="module")
def photo(photos) -> Image.Image:
    """A smaller photo for the processor tests (chelsea is 451x300: odd sizes on purpose)."""
    return photos["chelsea"]


def same(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


# ---------------------------------------------------------------------------------- measurements


@pytest.mark.parametrize("name", PHOTOS)
def test_brightened_photo_has_higher_luminance(photos, name):
    image = photos[name]
    base = mean_luminance(image)
    brighter = mean_luminance(ImageEnhance.Brightness(image).enhance(1.3))
    darker = mean_luminance(ImageEnhance.Brightness(image).enhance(0.7))
    assert 0.0 < darker < base < brighter < 1.0
    assert brighter - base > 0.05
    # numpy input and Rec. 601 give a close but not identical answer
    assert mean_luminance(np.asarray(image)) == pytest.approx(base)
    assert mean_luminance(image, "rec601") != base
    assert mean_luminance(image, "rec601") == pytest.approx(base, abs=0.05)


def test_luminance_extremes_and_weights():
    black = np.zeros((8, 8, 3), np.uint8)
    assert mean_luminance(black) == 0.0
    assert mean_luminance(black + 255) == pytest.approx(1.0)
    green = np.zeros((8, 8, 3), np.uint8)
    green[..., 1] = 255
    assert mean_luminance(green) == pytest.approx(0.7152)
    assert mean_luminance(green, "rec601") == pytest.approx(0.587)
    with pytest.raises(ValueError, match="rec709"):
        mean_luminance(black, "rec2020")


@pytest.mark.parametrize("name", PHOTOS)
def test_blur_lowers_and_sharpening_raises_sharpness(photos, name):
    image = photos[name]
    scores = [sharpness(image.filter(ImageFilter.GaussianBlur(sigma))) for sigma in (4, 2, 1)]
    base = sharpness(image)
    sharpened = sharpness(image.filter(ImageFilter.UnsharpMask(radius=2, percent=150, threshold=3)))
    assert 0.0 <= scores[0] < scores[1] < scores[2] < base < sharpened <= 1.0
    assert base - scores[1] > 0.2  # a clear margin, not a rounding accident


def test_sharpness_of_flat_image_is_zero():
    assert sharpness(np.full((32, 32, 3), 128, np.uint8)) == 0.0


@pytest.mark.parametrize("name", PHOTOS)
def test_red_tint_raises_only_red(photos, name):
    array = np.asarray(photos[name]).astype(np.float64)
    tinted = array * np.array([1.25, 0.95, 0.95]) + np.array([20.0, 0.0, 0.0])
    tinted = Image.fromarray(np.clip(tinted, 0, 255).round().astype(np.uint8))
    r0, g0, b0 = mean_rgb(photos[name])
    r1, g1, b1 = mean_rgb(tinted)
    assert all(0.0 <= v <= 1.0 for v in (r0, g0, b0, r1, g1, b1))
    assert r1 > r0 + 0.05
    assert g1 <= g0 and b1 <= b0


# ------------------------------------------------------------------------------------ conditions


@pytest.mark.parametrize("name", PHOTOS)
def test_canny_edges_are_binary_and_non_empty(photos, name):
    edges = canny_edges(photos[name])
    assert edges.mode == "L" and edges.size == photos[name].size
    values = np.unique(np.asarray(edges))
    assert set(values.tolist()) == {0, 255}
    assert 0.01 < (np.asarray(edges) > 0).mean() < 0.5
    rgb = np.asarray(canny_edges(photos[name], mode="RGB"))
    assert rgb.shape[-1] == 3 and same(rgb[..., 0], edges) and same(rgb[..., 2], edges)
    # a looser threshold finds more edges
    assert (np.asarray(canny_edges(photos[name], 50, 100)) > 0).sum() > (np.asarray(edges) > 0).sum()


def test_canny_rejects_bad_thresholds(photo):
    with pytest.raises(ValueError, match="low < high"):
        canny_edges(photo, 200, 100)


def test_depth_or_edges_prefers_the_depth_map(photo):
    ramp = np.tile(np.linspace(1000, 3000, 64), (32, 1)).astype(np.uint16)  # 16-bit depth
    depth = depth_or_edges(Image.fromarray(ramp), photo)
    array = np.asarray(depth)
    assert depth.mode == "RGB" and depth.size == (64, 32)
    assert array.min() == 0 and array.max() == 255  # stretched, not clipped to 255 everywhere
    assert np.all(np.diff(array[0, :, 0].astype(int)) >= 0)
    assert same(depth_or_edges(None, photo), canny_edges(photo, mode="RGB"))
    with pytest.raises(ValueError, match="neither"):
        depth_or_edges(None, None)
    with pytest.raises(TypeError, match="load it first"):
        depth_or_edges("depth/0001.png", photo)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_super_resolution_degradation_size_and_quality(photos, scale):
    for image in (photos["astronaut"], photos["chelsea"]):  # 512x512 and 451x300
        low = degrade_for_super_resolution(image, scale, seed=3)
        assert low.mode == "RGB"
        assert low.size == (image.width // scale, image.height // scale)
        up = upsample_bicubic(low, image.size)
        assert up.size == image.size
        quality = psnr(up, image)
        flat = Image.new("RGB", image.size, tuple(round(255 * c) for c in mean_rgb(image)))
        assert quality < 40  # information was lost
        assert quality > 18 and quality > psnr(flat, image) + 5  # ... but it is the same photo


def test_super_resolution_larger_scale_loses_more(photos):
    image = photos["astronaut"]
    scores = [
        psnr(upsample_bicubic(degrade_for_super_resolution(image, s, 1.0, 90, seed=0), image.size), image)
        for s in (2, 4, 8)
    ]
    assert scores[0] > scores[1] > scores[2]


def test_super_resolution_is_deterministic_per_seed(photo):
    a = degrade_for_super_resolution(photo, 4, (0.2, 2.0), (20, 95), seed=7)
    b = degrade_for_super_resolution(photo, 4, (0.2, 2.0), (20, 95), seed=7)
    c = degrade_for_super_resolution(photo, 4, (0.2, 2.0), (20, 95), seed=8)
    assert same(a, b) and not same(a, c)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"scale": 1}, ValueError, "scale"),
        ({"scale": 2.5}, ValueError, "scale"),
        ({"jpeg_quality": 0}, ValueError, "jpeg_quality"),
        ({"blur_sigma": -1.0}, ValueError, "blur_sigma"),
        ({"blur_sigma": (2.0, 1.0)}, ValueError, "min <= max"),
    ],
)
def test_super_resolution_rejects_bad_arguments(photo, kwargs, error, match):
    with pytest.raises(error, match=match):
        degrade_for_super_resolution(photo, **{"seed": 0, **kwargs})


@pytest.mark.parametrize("kind", ["box", "brush", "mixed"])
@pytest.mark.parametrize("coverage", [0.05, 0.2, 0.45, 0.8])
def test_mask_reaches_requested_coverage(kind, coverage):
    for seed in range(5):
        mask = random_inpaint_mask(192, 256, coverage, kind, seed)
        assert mask.shape == (192, 256) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 255}
        assert abs((mask > 0).mean() - coverage) <= MASK_COVERAGE_TOLERANCE


@pytest.mark.parametrize("kind", ["box", "brush", "mixed"])
def test_mask_is_never_empty(kind):
    for seed in range(5):
        mask = random_inpaint_mask(128, 128, 0.01, kind, seed)
        assert 0 < (mask > 0).mean() <= 0.01 + MASK_COVERAGE_TOLERANCE


@pytest.mark.parametrize("kind", ["box", "brush", "mixed"])
def test_mask_honours_a_tight_tolerance(kind):
    for seed, coverage in enumerate((0.03, 0.15, 0.3, 0.5, 0.7)):
        mask = random_inpaint_mask(128, 160, coverage, kind, seed, tolerance=0.01)
        assert abs((mask > 0).mean() - coverage) <= 0.01


@pytest.mark.parametrize("kind", ["box", "brush", "mixed"])
def test_mask_coverage_range_and_determinism(kind):
    coverages = []
    for seed in range(20):
        mask = random_inpaint_mask(128, 128, (0.2, 0.6), kind, seed)
        assert same(mask, random_inpaint_mask(128, 128, (0.2, 0.6), kind, seed))
        coverages.append((mask > 0).mean())
    assert min(coverages) >= 0.2 - MASK_COVERAGE_TOLERANCE and max(coverages) <= 0.6 + MASK_COVERAGE_TOLERANCE
    assert max(coverages) - min(coverages) > 0.1  # the target is really sampled from the range
    masks = [random_inpaint_mask(128, 128, 0.3, kind, seed).tobytes() for seed in range(10)]
    assert len(set(masks)) == 10


def test_masks_of_different_kinds_differ_in_shape():
    # a box mask's white region fills its bounding boxes; strokes leave holes in theirs
    box = random_inpaint_mask(256, 256, 0.1, "box", 0)
    brush = random_inpaint_mask(256, 256, 0.1, "brush", 0)

    def fill_ratio(mask):
        ys, xs = np.nonzero(mask)
        return (mask > 0).sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))

    assert fill_ratio(brush) < fill_ratio(box)


def test_random_functions_leave_global_rng_alone(photo):
    np.random.seed(123)
    random.seed(123)
    np_state, py_state = np.random.get_state()[1].copy(), random.getstate()
    random_inpaint_mask(64, 64, 0.3, "mixed", 1)
    degrade_for_super_resolution(photo, 2, seed=1)
    content_reference(photo, seed=1)
    assert np.array_equal(np.random.get_state()[1], np_state) and random.getstate() == py_state


def test_generator_seeds_are_accepted_and_reproducible():
    a = random_inpaint_mask(64, 64, 0.3, "mixed", np.random.default_rng(5))
    b = random_inpaint_mask(64, 64, 0.3, "mixed", np.random.default_rng(5))
    assert same(a, b)
    with pytest.raises(TypeError, match="seed"):
        random_inpaint_mask(64, 64, 0.3, "mixed", 1.5)
    with pytest.raises(ValueError, match="non-negative"):
        random_inpaint_mask(64, 64, 0.3, "mixed", -1)


@pytest.mark.parametrize(
    "args, match",
    [
        ((64, 64, 0.0), "coverage"),
        ((64, 64, 1.0), "coverage"),
        ((64, 64, 1.5), "coverage"),
        ((64, 64, (0.6, 0.2)), "min <= max"),
        ((0, 64, 0.3), "height"),
        ((4, 4, 0.3), "larger mask"),
    ],
)
def test_mask_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        random_inpaint_mask(*args, seed=0)
    with pytest.raises(ValueError, match="'box', 'brush' or 'mixed'"):
        random_inpaint_mask(64, 64, 0.3, "circle", 0)


def test_content_reference(photo):
    a = content_reference(photo, seed=4)
    assert a.size == photo.size and a.mode == "RGB"
    assert same(a, content_reference(photo, seed=4))
    assert not same(a, content_reference(photo, seed=5))
    assert not same(a, photo)
    assert same(content_reference(photo, seed=4, crop_scale=1.0, flip=False), photo)
    mirrored = [content_reference(photo, seed=s, crop_scale=1.0) for s in range(8)]
    flipped = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert any(same(m, flipped) for m in mirrored) and any(same(m, photo) for m in mirrored)
    with pytest.raises(ValueError, match="crop_scale"):
        content_reference(photo, seed=0, crop_scale=(0.0, 1.0))


def test_aesthetic_lora_id():
    thresholds = (4.5, 5.5, 6.5)
    assert [aesthetic_lora_id(s, thresholds) for s in (1.0, 4.5, 5.0, 6.0, 6.5, 9.9)] == [0, 1, 1, 2, 3, 3]
    with pytest.raises(ValueError, match="strictly increasing"):
        aesthetic_lora_id(5.0, (5.0, 4.0))
    with pytest.raises(ValueError, match="finite"):
        aesthetic_lora_id(float("nan"), thresholds)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (np.zeros((8, 8), np.uint8), ValueError, r"\[H, W, 3\]"),
        (np.zeros((8, 8, 4), np.uint8), ValueError, r"\[H, W, 3\]"),
        (np.zeros((8, 8, 3), np.float32), ValueError, "uint8"),
        ([[1, 2, 3]], TypeError, "PIL image"),
        ("cat.png", TypeError, "load it first"),
    ],
)
def test_measurements_reject_non_images(bad, error, match):
    for fn in (mean_luminance, sharpness, mean_rgb, canny_edges):
        with pytest.raises(error, match=match):
            fn(bad)


# ------------------------------------------------------------------------------------ processors

EXPECTED_KEYS = {
    "brightness": {"scale"},
    "sharpness": {"scale"},
    "color": {"R", "G", "B"},
    "structure": {"image"},
    "super_resolution": {"image"},
    "inpaint": {"image", "mask"},
    "edit": {"image", "prompt"},
    "content_reference": {"image"},
    "aesthetic": {"lora_ids", "lora_scales"},
    "age": {"age"},
}
RANDOM_PROCESSORS = ("super_resolution", "inpaint", "content_reference")


@pytest.fixture(scope="module")
def row(photos) -> dict:
    return {
        "prompt": "make the cat wear a hat",
        "edit_image": photos["coffee"].resize((451, 300)),
        "aesthetic_score": 6.0,
        "age": 7,
    }


def test_registry_has_the_zoo_and_clear_errors():
    assert set(EXPECTED_KEYS) <= set(PROCESSORS)
    processor = get_processor("inpaint", coverage=(0.2, 0.3), kind="box")
    assert isinstance(processor, TemplateProcessor) and processor.config.kind == "box"
    with pytest.raises(ValueError, match="unknown data processor 'depthh'") as info:
        get_processor("depthh")
    assert all(name in str(info.value) for name in EXPECTED_KEYS)
    with pytest.raises(TypeError, match="coverage"):
        get_processor("inpaint", coverag=0.3)
    with pytest.raises(ValueError, match="scale"):
        get_processor("super_resolution", scale=1)
    with pytest.raises(ValueError, match="coverage"):
        get_processor("inpaint", coverage=1.2)


def test_register_processor(monkeypatch):
    monkeypatch.setattr("diffsynth_templates.templates.processors.PROCESSORS", dict(PROCESSORS))
    from diffsynth_templates.templates import processors

    @register_processor("constant")
    class Constant(TemplateProcessor):
        def process(self, row, image, seed, given):
            return {"value": 1}

    assert processors.PROCESSORS["constant"] is Constant and "constant" not in PROCESSORS
    assert get_processor("constant")({}, Image.new("RGB", (4, 4)), 0) == {"value": 1}
    with pytest.raises(ValueError, match="already taken"):
        register_processor("brightness")(Constant)


@pytest.mark.parametrize("name", sorted(EXPECTED_KEYS))
def test_processors_return_documented_keys(name, row, photo):
    out = get_processor(name)(row, photo, seed=0)
    assert set(out) == EXPECTED_KEYS[name]
    for key in ("scale", "R", "G", "B", "age"):
        if key in out:
            assert isinstance(out[key], float)
    for key in ("image", "mask"):
        if key in out:
            assert isinstance(out[key], Image.Image)


def test_processor_values(row, photo):
    assert get_processor("brightness")(row, photo, 0)["scale"] == pytest.approx(mean_luminance(photo))
    assert get_processor("sharpness")(row, photo, 0)["scale"] == pytest.approx(sharpness(photo))
    color = get_processor("color")(row, photo, 0)
    assert (color["R"], color["G"], color["B"]) == pytest.approx(mean_rgb(photo))
    assert same(get_processor("structure")(row, photo, 0)["image"], canny_edges(photo, mode="RGB"))
    assert get_processor("super_resolution", scale=3)(row, photo, 0)["image"].size == (150, 100)
    assert get_processor("super_resolution", upsample=True)(row, photo, 0)["image"].size == photo.size
    inpaint = get_processor("inpaint", coverage=0.3, force_inpaint=True)(row, photo, 0)
    assert inpaint["image"] is photo and inpaint["force_inpaint"] is True
    assert inpaint["mask"].mode == "L" and inpaint["mask"].size == photo.size
    assert abs((np.asarray(inpaint["mask"]) > 0).mean() - 0.3) <= MASK_COVERAGE_TOLERANCE
    edit = get_processor("edit")(row, photo, 0)
    assert same(edit["image"], row["edit_image"]) and edit["prompt"] == row["prompt"]
    assert get_processor("aesthetic")(row, photo, 0) == {"lora_ids": [2], "lora_scales": [1.0]}
    assert get_processor("aesthetic", thresholds=(7.0,), lora_scale=0.5)(row, photo, 0) == {
        "lora_ids": [0],
        "lora_scales": [0.5],
    }
    assert get_processor("age")(row, photo, 0) == {"age": 7.0}


@pytest.mark.parametrize("name", RANDOM_PROCESSORS)
def test_random_processors_are_deterministic_per_seed(name, row, photo):
    processor = get_processor(name)
    key = "mask" if name == "inpaint" else "image"
    a, b, c = (processor(row, photo, seed)[key] for seed in (11, 11, 12))
    assert same(a, b) and not same(a, c)


def test_row_template_inputs_take_precedence(row, photo):
    depth = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1)))
    given = {
        **row,
        "template_inputs": {"scale": 0.25, "image": depth, "mask": "given-mask", "note": "kept", "R": 0.9},
    }
    assert get_processor("brightness")(given, photo, 0) == {
        "scale": 0.25,
        "image": depth,
        "mask": "given-mask",
        "note": "kept",
        "R": 0.9,
    }
    structure = get_processor("structure")(given, photo, 0)["image"]
    assert structure.mode == "RGB" and same(structure.convert("L"), depth)
    # the inpaint processor checks the row's mask against its image (same size), so give a real one
    mask = Image.new("L", depth.size, 255)
    inpaint = get_processor("inpaint")({**given, "template_inputs": {**given["template_inputs"], "mask": mask}}, photo, 0)  # fmt: skip
    assert inpaint["mask"] is mask and same(inpaint["image"], depth.convert("RGB"))
    color = get_processor("color")(given, photo, 0)
    assert color["R"] == 0.9 and color["G"] == pytest.approx(mean_rgb(photo)[1])
    # the aesthetic score is read from template_inputs and not passed on to the template
    aesthetic = get_processor("aesthetic")({"template_inputs": {"aesthetic_score": 9.0}}, photo, 0)
    assert aesthetic == {"lora_ids": [3], "lora_scales": [1.0]}


@pytest.mark.parametrize(
    "name, bad_row, match",
    [
        ("edit", {"prompt": "x"}, "'edit' needs the row field 'edit_image'"),
        ("edit", {"edit_image": Image.new("RGB", (8, 8))}, "'edit' needs the row field 'prompt'"),
        ("aesthetic", {"prompt": "x"}, "'aesthetic' needs the row field 'aesthetic_score'"),
        ("age", {"prompt": "x"}, "'age' needs the row field 'age'"),
        ("age", {"age": "old"}, "expected a finite number"),
        ("age", {"age": -3}, "non-negative"),
    ],
)
def test_missing_or_bad_row_fields(name, bad_row, match, photo):
    with pytest.raises(ValueError, match=match):
        get_processor(name)(bad_row, photo, 0)


def test_processors_reject_bad_calls(row, photo):
    processor = get_processor("brightness")
    with pytest.raises(TypeError, match="PIL image"):
        processor(row, None, 0)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        processor(row, np.zeros((8, 8), np.uint8), 0)
    with pytest.raises(TypeError, match="seed"):
        processor(row, photo, "0")
    with pytest.raises(TypeError, match="template_inputs"):
        processor({"template_inputs": [1]}, photo, 0)
    with pytest.raises(TypeError, match="load it first"):
        get_processor("edit")({"prompt": "x", "edit_image": "a.png"}, photo, 0)
