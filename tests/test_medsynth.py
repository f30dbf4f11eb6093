"""The built-in synthetic suite: determinism, per-task appearance, boxes on lesions, family structure, cache."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import find_peaks
from scipy.stats import skew, wasserstein_distance

from megatron.config import validate_plugin_options
from megatron.errors import ConfigError
from megatron_plugins.datasets import medsynth, medsynth_scenes
from megatron_plugins.datasets.medsynth import (MEDSYNTH_FAMILIES, MEDSYNTH_SOURCES, MEDSYNTH_TARGET_NEIGHBOURS,
                                                MEDSYNTH_TASKS, MedSynthDataset)

N = 16  # images per task: enough for the statistics below, small enough to generate in ~3 s


def make(cache, **kw) -> MedSynthDataset:
    opts = {"images_per_task": N, "target_images": N, "cache_dir": cache, **kw}
    return MedSynthDataset(MedSynthDataset.Options(**opts))


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    tasks = make(tmp_path_factory.mktemp("medsynth")).load()
    return {t.name: t for t in tasks}


@pytest.fixture(scope="module")
def pixels(suite):
    return {name: np.stack([t.load_image(r) for r in t.records]) for name, t in suite.items()}


def histogram(images: np.ndarray) -> np.ndarray:
    """Mean grey-level histogram over values 1..254 (the method's similarity measure ignores 0 and 255)."""
    h = np.bincount(images.ravel(), minlength=256)[1:255].astype(np.float64)
    return h / h.sum()


def test_task_names_order_and_classes(suite):
    assert list(suite) == ["mammography", "chest_xray", "pneumonia_xray", "brain_mri", "breast_mri",
                           "breast_ultrasound", "eit"]
    for name, task in suite.items():
        assert len(task) == N and task.modality
        assert task.source.startswith("medsynth:")
        present = {int(lab) for r in task.records for lab in r.labels}
        assert len(task.categories) >= 2 and len(present) >= 2, (name, present)
        assert all(r.path is not None and r.path.suffix == ".png" for r in task.records)


def test_boxes_inside_images_and_some_empty_images(suite):
    empty = total = 0
    for task in suite.values():
        for r in task.records:
            total += 1
            empty += len(r.boxes) == 0
            if len(r.boxes):
                assert (r.boxes[:, 0] >= 0).all() and (r.boxes[:, 1] >= 0).all()
                assert (r.boxes[:, 2] <= r.width).all() and (r.boxes[:, 3] <= r.height).all()
                assert (r.boxes[:, 2:] - r.boxes[:, :2] >= 2).all()
            assert len(r.boxes) <= 4
    assert 0.02 <= empty / total <= 0.3


def _contrast(img: np.ndarray, box: np.ndarray) -> float:
    """|mean inside the box - mean of a ring around it| in grey levels."""
    x1, y1, x2, y2 = box.astype(int)
    h, w = img.shape
    m = max(3, (x2 - x1) // 3, (y2 - y1) // 3)
    outer = img[max(0, y1 - m):min(h, y2 + m), max(0, x1 - m):min(w, x2 + m)].astype(np.float64)
    inner = img[y1:y2, x1:x2].astype(np.float64)
    ring_mean = (outer.sum() - inner.sum()) / max(1, outer.size - inner.size)
    return abs(inner.mean() - ring_mean)


def test_boxes_sit_on_lesions(suite, pixels):
    """A box's contents differ from their surroundings far more than the same box moved elsewhere."""
    rng = np.random.default_rng(0)
    for name, task in suite.items():
        real, moved = [], []
        for r, img in zip(task.records, pixels[name]):
            for box in r.boxes:
                real.append(_contrast(img, box))
                w, h = box[2] - box[0], box[3] - box[1]
                x, y = rng.uniform(0, r.width - w), rng.uniform(0, r.height - h)
                moved.append(_contrast(img, np.array([x, y, x + w, y + h])))
        assert np.median(real) > 1.6 * np.median(moved), (name, np.median(real), np.median(moved))
        assert np.median(real) >= 3.0, name


def test_histograms_have_the_documented_shape(pixels):
    eit = pixels["eit"]
    assert np.mean((eit >= 120) & (eit <= 150)) > 0.85  # narrow mid-grey peak
    med = {name: float(np.median(p)) for name, p in pixels.items()}
    assert med["breast_ultrasound"] < med["mammography"] and med["breast_mri"] < med["mammography"]
    for dark in ("breast_ultrasound", "breast_mri"):  # skewed dark: mostly dark, long bright tail
        values = pixels[dark].ravel().astype(np.float64)
        assert med[dark] < 80 and skew(values) > 0.3, dark
    for multi in ("mammography", "brain_mri"):
        h = np.convolve(histogram(pixels[multi]), np.ones(9) / 9, mode="same")
        peaks, _ = find_peaks(h, prominence=0.002, distance=20)
        assert len(peaks) >= 2, (multi, peaks)
    assert len(find_peaks(np.convolve(histogram(eit), np.ones(9) / 9, mode="same"), prominence=0.002,
                          distance=20)[0]) == 1


def test_families_are_nearest_by_histogram_distance(pixels):
    """The design facts similarity tests rely on hold for the simplest metric (Wasserstein of histograms)."""
    v = np.arange(1, 255)
    hist = {name: histogram(p) for name, p in pixels.items()}

    def nearest(name, among):
        return min((t for t in among if t != name), key=lambda t: wasserstein_distance(v, v, hist[name], hist[t]))

    for members in MEDSYNTH_FAMILIES.values():
        for a in members:
            assert nearest(a, MEDSYNTH_SOURCES) in members, a
    assert nearest("eit", MEDSYNTH_SOURCES) == MEDSYNTH_TARGET_NEIGHBOURS["eit"][0]
    assert set(MEDSYNTH_TASKS) >= {t for m in MEDSYNTH_FAMILIES.values() for t in m}


def test_same_seed_same_bytes_different_seed_differs(tmp_path, suite):
    again = make(tmp_path / "again", tasks=["eit", "breast_mri"]).load()
    for task in again:
        first = suite[task.name]
        for a, b in zip(first.records, task.records):
            assert a.path.read_bytes() == b.path.read_bytes()
            np.testing.assert_array_equal(a.boxes, b.boxes)
    other = make(tmp_path / "other", seed=1, tasks=["eit"]).load()[0]
    assert any(a.path.read_bytes() != b.path.read_bytes() for a, b in zip(suite["eit"].records, other.records))


def test_options_subset_size_and_validation(tmp_path):
    [task] = make(tmp_path, tasks=["chest_xray"], images_per_task=3, image_size=96).load()
    assert task.name == "chest_xray" and len(task) == 3
    assert all((r.width, r.height) == (96, 96) for r in task.records)
    assert task.load_image(task.records[0]).shape == (96, 96)
    with pytest.raises(ConfigError, match="unknown task"):
        validate_plugin_options(MedSynthDataset, {"tasks": ["ct"]}, "data.datasets.0.options")
    with pytest.raises(ConfigError, match="unknown option"):
        validate_plugin_options(MedSynthDataset, {"n_images": 3}, "data.datasets.0.options")


def test_small_images_keep_every_lesion_boxed():
    for name in MEDSYNTH_TASKS:
        task, arrays = medsynth.generate_task(name, seed=0, n_images=8, size=64)
        assert sum(len(r.boxes) for r in task.records) >= 4, name
        for r in task.records:
            assert arrays[r.image_id].shape == (64, 64)
            if len(r.boxes):
                assert (r.boxes[:, 2:] > r.boxes[:, :2]).all() and (r.boxes >= 0).all() and (r.boxes <= 64).all()


def test_cache_is_reused_and_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    plugin = make(tmp_path, tasks=["eit"], target_images=4)
    calls = {"n": 0}
    real_render = medsynth_scenes.render

    def failing_render(task, seed, index, size):
        calls["n"] += 1
        if index == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C half-way
        return real_render(task, seed, index, size)

    monkeypatch.setattr(medsynth, "render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        plugin.load()
    assert list(tmp_path.iterdir()) == []  # neither a task folder nor a temp folder left behind
    monkeypatch.setattr(medsynth, "render", real_render)
    [task] = plugin.load()
    assert len(task) == 4 and plugin.task_folder("eit").is_dir()

    def must_not_render(*args):
        raise AssertionError("cached task was generated again")

    monkeypatch.setattr(medsynth, "render", must_not_render)
    [again] = plugin.load()
    assert [r.path for r in again.records] == [r.path for r in task.records]
    assert plugin.task_folder("eit") != make(tmp_path, tasks=["eit"], target_images=5).task_folder("eit")


def test_default_options_fit_the_method():
    o = MedSynthDataset.Options()
    assert o.images_per_task == 120 and o.image_size == 256
    assert o.target_images >= 40 + 40  # a 40-image pool and a held-out split of at least 40
