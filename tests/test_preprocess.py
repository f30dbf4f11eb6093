"""Preprocessing: intensity, letterbox, augmentations (box geometry checked against the pixels), cache, collate."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from megatron.data.preprocess import (
    Augmentations,
    DecodedImageCache,
    Preprocessor,
    collate,
    normalise_intensity,
    transform_boxes,
)
from megatron.errors import ConfigError, DataError
from megatron.types import ImageRecord, Task, to_original_coords

S = 256
NO_AUG = dict(hflip_prob=0.0, vflip_prob=0.0, rotate_deg=0.0, scale_range=(1.0, 1.0), translate_frac=0.0,
              brightness=0.0, contrast=0.0)


class FixedDraws:
    """Stands in for np.random.Generator: ``random(n)`` returns the given uniform draws, so a test can pick the
    exact transform. Order: hflip, vflip, angle, scale, tx, ty, contrast, brightness."""

    def __init__(self, hflip=0.99, vflip=0.99, angle=0.5, scale=0.5, tx=0.5, ty=0.5, contrast=0.5, brightness=0.5):
        self.u = np.array([hflip, vflip, angle, scale, tx, ty, contrast, brightness])

    def random(self, n):
        assert n == len(self.u)
        return self.u.copy()


def rect_image(h, w, box, value=255, dtype=np.uint8):
    img = np.zeros((h, w), dtype)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = value
    return img


def bright_bbox(sample, threshold=127):
    ys, xs = np.nonzero(sample.image[0].numpy() > threshold)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def aug_pre(**changes):
    return Preprocessor(S, augment=True, augmentations=Augmentations(**{**NO_AUG, **changes}))


# -- intensity ----------------------------------------------------------------------------------------------

def test_uint8_passes_through_unchanged():
    img = np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)
    out = normalise_intensity(img)
    assert out.dtype == np.uint8 and np.array_equal(out, img)
    rgb = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(normalise_intensity(rgb), rgb)


def test_12_bit_image_in_uint16_is_windowed_by_robust_percentiles():
    rng = np.random.default_rng(0)
    tissue = rng.integers(800, 1800, (200, 200)).astype(np.uint16)  # a 12-bit image uses a sliver of 0..65535
    tissue[0, :10] = 60000  # hot pixels / burnt-in text must not set the window
    out = normalise_intensity(tissue)
    assert out.dtype == np.uint8 and out.shape == tissue.shape
    body = out[1:]
    # the window follows the tissue, so the tissue spans (nearly) the full 8-bit range
    assert body.min() <= 3 and body.max() >= 252
    assert np.percentile(body, 50) == pytest.approx(127, abs=10)
    # monotone: brighter in, brighter (or equal) out
    order = np.argsort(tissue[1:].ravel())
    assert np.all(np.diff(body.ravel()[order].astype(int)) >= 0)
    # the integer fast path and the float path agree (up to the percentile interpolation)
    as_float = normalise_intensity(tissue.astype(np.float32)).astype(int)
    assert np.abs(as_float - out.astype(int)).max() <= 2
    assert np.array_equal(normalise_intensity(np.array([[-5, 0, 10]], np.int16)), [[0, 85, 255]])


def test_float_constant_nan_and_channel_variants():
    ramp = np.linspace(0.0, 1.0, 1000, dtype=np.float32).reshape(20, 50)
    out = normalise_intensity(ramp)
    assert out.min() == 0 and out.max() == 255
    assert not normalise_intensity(np.full((5, 5), 7.0)).any()  # constant: 0, not a division by zero
    with_nan = ramp.copy()
    with_nan[0, 0] = np.nan
    assert normalise_intensity(with_nan)[0, 0] == 0
    assert normalise_intensity(np.zeros((4, 5, 1), np.uint8)).shape == (4, 5)
    assert normalise_intensity(np.zeros((4, 5, 4), np.uint8)).shape == (4, 5, 3)
    with pytest.raises(DataError, match="shape"):
        normalise_intensity(np.zeros((4, 5, 2), np.uint8))


def test_grayscale_becomes_three_equal_channels_and_rgb_keeps_its_channels():
    pre = Preprocessor(64)
    gray = Preprocessor(64)(rect_image(64, 64, (10, 10, 20, 20)), np.zeros((0, 4)), [])
    assert gray.image.shape == (3, 64, 64) and gray.image.dtype == torch.float32
    assert torch.equal(gray.image[0], gray.image[1]) and torch.equal(gray.image[0], gray.image[2])
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0] = 200  # red stays in channel 0
    s = pre(rgb, np.zeros((0, 4)), [])
    assert s.image[0].mean() == pytest.approx(200, abs=1) and s.image[1].max() == 0
    assert 0 <= float(s.image.min()) and float(s.image.max()) <= 255


def test_clahe_raises_local_contrast_of_a_flat_image():
    rng = np.random.default_rng(0)
    flat = (120 + rng.integers(0, 8, (128, 128))).astype(np.uint8)
    plain = Preprocessor(128).prepare(flat)
    eq = Preprocessor(128, clahe=True).prepare(flat)
    assert eq.std() > 2 * plain.std()
    rgb = np.stack([flat, flat // 2, flat], -1)
    assert Preprocessor(128, clahe=True).prepare(rgb).shape == (128, 128, 3)


# -- letterbox -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("h,w,box,scale,pad", [
    (100, 200, (50, 20, 90, 40), 1.28, (0, 64)),  # wide: pad top/bottom
    (256, 128, (10, 30, 50, 100), 1.0, (64, 0)),  # tall, no scaling: pad left/right
    (1024, 512, (100, 200, 300, 600), 0.25, (64, 0)),  # large: area-downsampled at decode, then warped
])
def test_letterbox_moves_boxes_exactly_onto_their_pixels(h, w, box, scale, pad):
    pre = Preprocessor(S)
    s = pre(rect_image(h, w, box), np.array([box], np.float32), [1], image_id=7, task="t")
    x1, y1, x2, y2 = box
    expected = np.array([x1 * scale + pad[0], y1 * scale + pad[1], x2 * scale + pad[0], y2 * scale + pad[1]])
    np.testing.assert_allclose(s.boxes.numpy()[0], expected, atol=1e-4)
    assert s.meta["scale"] == pytest.approx(scale) and tuple(s.meta["pad"]) == pad
    assert s.meta["orig_size"] == (h, w) and s.meta["image_id"] == 7 and s.labels.tolist() == [1]
    np.testing.assert_allclose(bright_bbox(s), expected, atol=1.0)
    # to_original_coords inverts the letterbox exactly
    np.testing.assert_allclose(to_original_coords(s.boxes, s.meta)[0], box, atol=1e-3)
    # the padding is the pad value
    if pad[1]:
        assert float(s.image[:, : pad[1] - 1].max()) == 0
    if pad[0]:
        assert float(s.image[:, :, : pad[0] - 1].max()) == 0


def test_no_augmentation_without_rng_even_when_augment_is_on():
    pre = Preprocessor(S, augment=True)
    img = rect_image(100, 200, (50, 20, 90, 40))
    a, b = pre(img, [[50, 20, 90, 40]], [0]), Preprocessor(S)(img, [[50, 20, 90, 40]], [0])
    assert torch.equal(a.image, b.image) and torch.equal(a.boxes, b.boxes) and not a.meta["augmented"]


# -- augmentations, one at a time, with exact expected coordinates --------------------------------------

def test_horizontal_flip_exact():
    box = (50, 20, 90, 40)
    s = aug_pre(hflip_prob=1.0)(rect_image(100, 200, box), [box], [0], rng=FixedDraws(hflip=0.0))
    # flip in the original frame: x -> 200 - x, then letterbox (scale 1.28, pad top 64)
    expected = np.array([(200 - 90) * 1.28, 20 * 1.28 + 64, (200 - 50) * 1.28, 40 * 1.28 + 64])
    np.testing.assert_allclose(s.boxes.numpy()[0], expected, atol=1e-4)
    np.testing.assert_allclose(bright_bbox(s), expected, atol=1.0)


def test_vertical_flip_is_off_by_default_and_exact_when_on():
    assert Augmentations().vflip_prob == 0.0
    box = (50, 20, 90, 40)
    s = aug_pre(vflip_prob=1.0)(rect_image(100, 200, box), [box], [0], rng=FixedDraws(vflip=0.0))
    expected = np.array([50 * 1.28, (100 - 40) * 1.28 + 64, 90 * 1.28, (100 - 20) * 1.28 + 64])
    np.testing.assert_allclose(s.boxes.numpy()[0], expected, atol=1e-4)
    np.testing.assert_allclose(bright_bbox(s), expected, atol=1.0)


def test_scale_about_the_centre_exact():
    box = (96, 96, 160, 128)
    s = aug_pre(scale_range=(1.5, 1.5))(rect_image(S, S, box), [box], [0], rng=FixedDraws())
    expected = (np.array(box, float) - 128) * 1.5 + 128
    np.testing.assert_allclose(s.boxes.numpy()[0], expected, atol=1e-4)
    np.testing.assert_allclose(bright_bbox(s), expected, atol=1.0)


def test_translate_exact():
    box = (96, 96, 160, 128)
    # u = 1 -> +translate_frac * S, u = 0 -> -translate_frac * S
    s = aug_pre(translate_frac=0.1)(rect_image(S, S, box), [box], [0], rng=FixedDraws(tx=1.0, ty=0.0))
    expected = np.array(box, float) + [25.6, -25.6, 25.6, -25.6]
    np.testing.assert_allclose(s.boxes.numpy()[0], expected, atol=1e-4)
    np.testing.assert_allclose(bright_bbox(s), expected, atol=1.0)


def test_rotation_box_encloses_rotated_corners_and_matches_the_pixels():
    box = (100, 110, 160, 140)
    s = aug_pre(rotate_deg=30.0)(rect_image(S, S, box), [box], [0], rng=FixedDraws(angle=1.0))  # +30 degrees
    th = np.deg2rad(30.0)
    corners = np.array([[100, 110], [160, 110], [160, 140], [100, 140]], float) - 128
    # cv2's positive angle turns counter-clockwise on screen (y down): x' = c x + s y, y' = -s x + c y
    rot = np.stack([corners[:, 0] * np.cos(th) + corners[:, 1] * np.sin(th),
                    -corners[:, 0] * np.sin(th) + corners[:, 1] * np.cos(th)], 1) + 128
    expected = np.concatenate([rot.min(0), rot.max(0)])
    np.testing.assert_allclose(s.boxes.numpy()[0], expected, atol=1e-3)
    # for a rectangle the enclosing box of the corners is the enclosing box of the pixels
    np.testing.assert_allclose(bright_bbox(s), expected, atol=1.5)


def test_rotation_inflation_of_a_round_lesion_is_bounded_as_documented():
    yy, xx = np.mgrid[:S, :S]
    disc = (((xx + 0.5 - 128) ** 2 + (yy + 0.5 - 128) ** 2) <= 30 ** 2).astype(np.uint8) * 255
    box = (98, 98, 158, 158)
    s = aug_pre(rotate_deg=10.0)(disc, [box], [0], rng=FixedDraws(angle=1.0))
    width = float(s.boxes[0, 2] - s.boxes[0, 0])
    assert width == pytest.approx(60 * (np.cos(np.deg2rad(10)) + np.sin(np.deg2rad(10))), rel=1e-4)
    assert bright_bbox(s)[2] - bright_bbox(s)[0] == pytest.approx(60, abs=1.5)  # the lesion itself did not grow


def test_brightness_and_contrast_follow_the_lookup_table_and_keep_boxes():
    img = np.full((S, S), 100, np.uint8)
    img[:, 128:] = 200
    s = aug_pre(contrast=0.5, brightness=0.2)(img, [[0, 0, 10, 10]], [0], rng=FixedDraws(contrast=1.0, brightness=0.0))
    mean = 150.0
    left = np.clip((100 - mean) * 1.5 + mean - 51, 0, 255)
    right = np.clip((200 - mean) * 1.5 + mean - 51, 0, 255)
    assert float(s.image[0, 10, 10]) == pytest.approx(round(left))
    assert float(s.image[0, 10, 200]) == pytest.approx(round(right))
    np.testing.assert_allclose(s.boxes.numpy()[0], [0, 0, 10, 10])


def test_boxes_leaving_the_image_are_clipped_or_dropped():
    pre = aug_pre(translate_frac=0.25)
    boxes = np.array([[180, 100, 240, 140],  # partly pushed out on the right: clipped, most of it visible
                      [230, 20, 250, 60],  # pushed out entirely: dropped
                      [150, 200, 205, 220]], np.float32)  # ends up ~60% outside
    s = pre(np.zeros((S, S), np.uint8), boxes, [0, 1, 2], rng=FixedDraws(tx=1.0))  # +64 px to the right
    # box 0 -> (244, 100, 304, 140) clipped to (244, 100, 256, 140): 12/60 visible < 0.25 -> dropped
    # box 2 -> (214, 200, 269, 220) -> (214, 200, 256, 220): 42/55 visible -> kept, clipped
    assert s.labels.tolist() == [2]
    np.testing.assert_allclose(s.boxes.numpy(), [[214, 200, 256, 220]], atol=1e-4)
    lenient = Preprocessor(S, augment=True, min_visible_fraction=0.1,
                           augmentations=Augmentations(**{**NO_AUG, "translate_frac": 0.25}))
    s2 = lenient(np.zeros((S, S), np.uint8), boxes, [0, 1, 2], rng=FixedDraws(tx=1.0))
    assert s2.labels.tolist() == [0, 2]
    tiny = pre(np.zeros((S, S), np.uint8), [[10, 10, 11.5, 30]], [0], rng=FixedDraws())  # 1.5 px wide < 2 px
    assert len(tiny.labels) == 0 and tiny.boxes.shape == (0, 4)


def test_random_augmentations_keep_boxes_on_the_bright_region_and_are_deterministic():
    pre = Preprocessor(S, augment=True, augmentations=Augmentations(hflip_prob=0.5, vflip_prob=0.5,
                                                                     brightness=0.0, contrast=0.0))
    box = (60, 40, 120, 90)
    img = rect_image(200, 160, box)
    rng = np.random.default_rng(3)
    first = [pre(img, [box], [0], rng=rng) for _ in range(20)]
    checked = 0
    for s in first:
        if len(s.boxes) and float(s.boxes[0, 0]) > 0 and float(s.boxes[0, 2]) < S:
            ys_box = s.boxes.numpy()[0]
            if ys_box[1] > 0 and ys_box[3] < S:  # fully inside: the pixels must agree within interpolation
                np.testing.assert_allclose(bright_bbox(s), ys_box, atol=1.5)
                np.testing.assert_allclose(transform_boxes([box], np.array(s.meta["affine"]))[0], ys_box, atol=1e-3)
                checked += 1
    assert checked >= 15
    again = [pre(img, [box], [0], rng=np.random.default_rng(3)) for _ in range(1)]
    assert torch.equal(again[0].image, first[0].image) and torch.equal(again[0].boxes, first[0].boxes)
    other = pre(img, [box], [0], rng=np.random.default_rng(4))
    assert not torch.equal(other.boxes, first[0].boxes)


def test_invalid_settings_raise_config_errors():
    with pytest.raises(ConfigError, match="rotate_deg"):
        Augmentations(rotate_deg=90)
    with pytest.raises(ConfigError, match="scale_range"):
        Augmentations(scale_range=(1.2, 0.8))
    with pytest.raises(ConfigError, match="input_size"):
        Preprocessor(4)
    with pytest.raises(DataError, match="2 boxes but 1 labels"):
        Preprocessor(S)(np.zeros((8, 8), np.uint8), np.zeros((2, 4)), [0], image_id=3, task="x")


# -- decoded-image cache -----------------------------------------------------------------------------------

def counting_task(n=4, h=40, w=60, name="t"):
    calls = []

    def loader(record):
        calls.append(record.image_id)
        return np.full((h, w), record.image_id * 1000, np.uint16)

    records = [ImageRecord(i, None, w, h, np.zeros((0, 4)), np.zeros(0)) for i in range(n)]
    return Task(name, ["a"], records, image_loader=loader), calls


def test_cache_skips_decoding_and_is_bounded_lru():
    task, calls = counting_task()
    pre = Preprocessor(64, cache_size=2)
    first = pre.decode(task, task.records[0])
    assert pre.decode(task, task.records[0]) is first and calls == [0]
    with pytest.raises(ValueError):
        first[0, 0] = 1  # cached arrays are read-only
    pre.decode(task, task.records[1])
    pre.decode(task, task.records[0])  # 0 is now the most recent
    pre.decode(task, task.records[2])  # evicts 1
    pre.decode(task, task.records[0])
    pre.decode(task, task.records[1])
    assert calls == [0, 1, 2, 1] and len(pre.cache) == 2
    off = Preprocessor(64, cache_size=0)
    off.decode(task, task.records[3]), off.decode(task, task.records[3])
    assert calls[-2:] == [3, 3]
    # the evaluation twin shares the cache
    twin = pre.without_augment()
    assert twin.cache is pre.cache and not twin.augment
    # another task with the same name but another loader never gets these pixels
    other, other_calls = counting_task()
    pre.decode(other, other.records[0])
    assert other_calls == [0]


def test_decode_errors_name_the_task_and_record():
    def broken(record):
        raise OSError("disk on fire")

    task = Task("xray", ["a"], [ImageRecord(5, None, 10, 10, np.zeros((0, 4)), np.zeros(0), "img5.png")],
                image_loader=broken)
    with pytest.raises(DataError, match=r"task 'xray', image 5 \(img5.png\).*disk on fire"):
        Preprocessor(32).decode(task, task.records[0])
    wrong = Task("xray", ["a"], [ImageRecord(5, None, 12, 10, np.zeros((0, 4)), np.zeros(0), "img5.png")],
                 image_loader=lambda r: np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match="10x10.*annotation says 12x10"):
        Preprocessor(32).decode(wrong, wrong.records[0])


def test_preprocessor_pickles_for_worker_processes():
    pre = Preprocessor(64, clahe=True, augment=True)
    pre.prepare(np.zeros((10, 10), np.uint8))  # builds the cv2 CLAHE object, which does not pickle
    clone = pickle.loads(pickle.dumps(pre))
    assert clone.input_size == 64 and clone.clahe and clone.augment and len(clone.cache) == 0
    assert isinstance(clone.cache, DecodedImageCache)


# -- collate ------------------------------------------------------------------------------------------------

def test_collate_stacks_a_batch():
    pre = Preprocessor(64)
    samples = [pre(rect_image(50, 80, (10, 10, 30, 20)), [[10, 10, 30, 20]], [1], image_id=i) for i in range(3)]
    batch = collate(samples)
    assert batch.images.shape == (3, 3, 64, 64) and batch.images.dtype == torch.float32
    assert len(batch) == 3 and [m["image_id"] for m in batch.meta] == [0, 1, 2]
    assert batch.boxes[0].dtype == torch.float32 and batch.labels[2].dtype == torch.int64
    with pytest.raises(ValueError):
        collate([])
    with pytest.raises(ValueError, match="shapes"):
        collate([samples[0], Preprocessor(32)(np.zeros((8, 8), np.uint8), np.zeros((0, 4)), [])])
