"""Dataset similarity: known-answer tests for the metrics, the core ranking/selection, plots and the command."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron.errors import DataError, MegatronError
from megatron.api.similarity import SimilarityContext, to_gray_uint8
from megatron.similarity import pairwise_distances, rank_sources, select_sources
from megatron.types import ImageRecord, Task
from megatron_plugins.similarity.embedding import EmbeddingSimilarity, frechet_distance, ot_distance
from megatron_plugins.similarity.label_aware import LabelAwareSimilarity
from megatron_plugins.similarity.wasserstein import (WassersteinSimilarity, bin_centres, grey_level_histogram,
                                                     wasserstein_1d_hist)

torch.set_num_threads(1)


def make_task(name, images, boxes=None, size=None):
    """A task whose loader serves ``images`` (list of arrays); ``boxes[i]`` xyxy per image (default none)."""
    records = []
    for i, im in enumerate(images):
        h, w = im.shape[:2]
        b = np.zeros((0, 4)) if boxes is None else np.asarray(boxes[i], np.float32).reshape(-1, 4)
        records.append(ImageRecord(image_id=i + 1, path=None, width=w, height=h, boxes=b, labels=[0] * len(b),
                                   file_name=f"{name}_{i + 1}.png"))
    store = {r.image_id: im for r, im in zip(records, images)}
    return Task(name=name, categories=["lesion"], records=records, source="test",
                image_loader=lambda r: store[r.image_id])


def noise_images(seed, n=8, lo=60, hi=120, shape=(32, 40)):
    rng = np.random.default_rng(seed)
    return [rng.integers(lo, hi, size=shape).astype(np.uint8) for _ in range(n)]


def wass(**opts):
    return WassersteinSimilarity(WassersteinSimilarity.Options(**opts), SimilarityContext(seed=0))


# ---------------------------------------------------------------------------------------------- wasserstein
def test_wasserstein_identical_datasets_give_zero():
    images = noise_images(0)
    m = wass()
    a, b = make_task("a", images), make_task("b", [im.copy() for im in images])
    assert m.distance(m.summarize(a), m.summarize(b)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("d", [1, 7, 40])
def test_wasserstein_shift_by_d_grey_levels_gives_d(d):
    images = noise_images(1)
    m = wass()
    a = make_task("a", images)
    b = make_task("b", [im + np.uint8(d) for im in images])
    assert m.distance(m.summarize(a), m.summarize(b)) == pytest.approx(d, abs=1e-9)


def test_wasserstein_histogram_shift_in_bins_and_coarse_bins_keep_grey_level_unit():
    centres = bin_centres(254)
    h = np.zeros(254)
    h[[10, 20, 21]] = [0.5, 0.25, 0.25]
    for d in (1, 5, 100):
        assert wasserstein_1d_hist(h, np.roll(h, d), centres) == pytest.approx(d)
    # 127 bins of 2 grey levels: a shift of 3 bins is 6 grey levels
    coarse = np.zeros(127)
    coarse[[3, 50]] = 0.5
    assert wasserstein_1d_hist(coarse, np.roll(coarse, 3), bin_centres(127)) == pytest.approx(6.0)
    # end-to-end with coarse bins: a 10-level shift of images with even values stays 10 grey levels
    images = [(im // 2 * 2).astype(np.uint8) for im in noise_images(2)]
    m = wass(bins=127)
    a, b = make_task("a", images), make_task("b", [im + np.uint8(10) for im in images])
    assert m.distance(m.summarize(a), m.summarize(b)) == pytest.approx(10.0)


def test_wasserstein_ignores_pure_black_and_white_and_is_symmetric():
    images = noise_images(3)
    padded = [np.pad(im, 10, constant_values=0) for im in images]
    padded[0][0, :] = 255
    m = wass()
    a, b = m.summarize(make_task("a", images)), m.summarize(make_task("b", padded))
    assert m.distance(a, b) == pytest.approx(0.0, abs=1e-12)
    c = m.summarize(make_task("c", noise_images(4, lo=100, hi=200)))
    assert m.distance(a, c) == pytest.approx(m.distance(c, a))
    assert m.distance(a, c) > 30


def test_grey_level_histogram_counts_levels_1_to_254():
    img = np.array([[0, 1, 1, 254, 255, 128]], np.uint8)
    h = grey_level_histogram(img)
    assert h.shape == (254,) and h.sum() == 4 and h[0] == 2 and h[253] == 1 and h[127] == 1
    coarse = grey_level_histogram(img, bins=2)  # levels 1..127 and 128..254
    np.testing.assert_array_equal(coarse, [2, 2])


def test_to_gray_uint8_rgb_and_16_bit():
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 0] = 100
    assert to_gray_uint8(rgb)[0, 0] == round(0.299 * 100)
    img16 = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4096)
    full = to_gray_uint8(img16, window="full")
    assert full.dtype == np.uint8 and full[0, 0] == 0 and full[3, 3] == round(15 * 4096 * 255 / 65535)
    fixed = to_gray_uint8(img16, window="fixed", fixed_range=(0, 4096 * 15))
    assert fixed[3, 3] == 255 and fixed[0, 1] == 17
    pct = to_gray_uint8(img16, window="percentile", percentiles=(0, 100))
    np.testing.assert_array_equal(pct, fixed)


def test_wasserstein_16_bit_data_matches_its_8_bit_version_with_full_window():
    images = noise_images(5)
    m8, m16 = wass(), wass(intensity_window="full")
    a = m8.summarize(make_task("a", images))
    b = m16.summarize(make_task("b", [im.astype(np.uint16) * 257 for im in images]))
    assert m8.distance(a, b) == pytest.approx(0.0, abs=1e-12)


def test_wasserstein_options_are_validated():
    with pytest.raises(ValueError, match="fixed_range"):
        WassersteinSimilarity.Options(intensity_window="fixed")
    with pytest.raises(ValueError):
        WassersteinSimilarity.Options(bins=300)
    with pytest.raises(ValueError):
        WassersteinSimilarity.Options(colour="red")


# ---------------------------------------------------------------------------------------------- bad input
def test_empty_dataset_is_a_clear_error():
    empty = Task(name="nothing", categories=["x"], records=[], source="coco:/data/nothing")
    for metric in (wass(), LabelAwareSimilarity(), EmbeddingSimilarity()):
        with pytest.raises(DataError, match="'nothing'.*no images"):
            metric.summarize(empty)


def test_unreadable_image_names_the_file(tmp_path):
    from PIL import Image

    good = tmp_path / "good.png"
    Image.fromarray(noise_images(0, n=1)[0]).save(good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    records = [ImageRecord(image_id=i + 1, path=p, width=40, height=32, boxes=[[1, 1, 5, 5]], labels=[0],
                           file_name=p.name) for i, p in enumerate([good, bad])]
    task = Task(name="disk", categories=["lesion"], records=records, source="test")
    for metric in (wass(), LabelAwareSimilarity()):
        with pytest.raises(DataError, match="broken.png") as info:
            metric.summarize(task)
        assert "disk" in str(info.value)


def test_all_black_dataset_is_a_clear_error():
    task = make_task("black", [np.zeros((8, 8), np.uint8)] * 3)
    with pytest.raises(DataError, match="1..254"):
        wass().summarize(task)


# ---------------------------------------------------------------------------------------------- embedding
def test_ot_distance_of_a_translated_cloud_is_the_translation_length():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 6))
    v = np.array([3.0, 4.0, 0, 0, 0, 0])
    assert ot_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert ot_distance(a, a + v) == pytest.approx(5.0)
    b = rng.normal(size=(20, 6)) * 2
    assert ot_distance(a, b) == pytest.approx(ot_distance(b, a))


def test_frechet_distance_known_values_and_high_dimension():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # same covariance, mean shifted by (1, 2, 2): distance = |shift|^2 = 9
    assert frechet_distance(a, a + np.array([1.0, 2.0, 2.0])) == pytest.approx(9.0, rel=1e-6)
    # Gaussians N(0, I) vs N(0, 4 I) in 3-D: tr(I + 4I - 2*2I) = 3
    big = rng.normal(size=(20000, 3))
    assert frechet_distance(big, 2 * rng.normal(size=(20000, 3))) == pytest.approx(3.0, rel=0.05)
    # D (512) > n (20): PCA projection keeps it finite, symmetric and zero for identical clouds
    x, y = rng.normal(size=(20, 512)), rng.normal(size=(25, 512)) + 1.0
    d = frechet_distance(x, y)
    assert np.isfinite(d) and d > 0
    assert d == pytest.approx(frechet_distance(y, x), rel=1e-6)
    assert frechet_distance(x, x.copy()) == pytest.approx(0.0, abs=1e-4)


@pytest.fixture(scope="module")
def suite_small():
    """The built-in suite, rendered in memory (no disk cache): 24 images per task at 128 px."""
    medsynth = pytest.importorskip("megatron_plugins.datasets.medsynth")
    return {n: medsynth.generate_task(n, 0, 24, 128)[0] for n in medsynth.MEDSYNTH_TASKS}


def emb(**opts):
    opts = {"sample_size": 12, "input_size": 64, "extractor": "resnet18", **opts}
    return EmbeddingSimilarity(EmbeddingSimilarity.Options(**opts), SimilarityContext(seed=0))


def test_embedding_two_samples_of_one_dataset_are_closer_than_two_datasets(suite_small):
    xray = suite_small["chest_xray"]
    half_a, half_b = xray.subset(list(range(0, 24, 2)), "xray_a"), xray.subset(list(range(1, 24, 2)), "xray_b")
    m = emb()
    a, b = m.summarize(half_a).features, m.summarize(half_b).features
    others = {n: m.summarize(suite_small[n]).features for n in ("mammography", "brain_mri", "breast_ultrasound")}
    for distance in (ot_distance, frechet_distance):
        for name, o in others.items():
            assert distance(a, b) < distance(a, o), (distance.__name__, name)
            assert distance(a, o) == pytest.approx(distance(o, a), rel=1e-6)


def test_embedding_identical_dataset_gives_zero_and_says_weights_are_random(suite_small):
    m = emb()
    t = suite_small["eit"]
    # same name, same records: the same seeded sample, hence distance 0
    assert m.distance(m.summarize(t), m.summarize(t.subset(list(range(len(t)))))) == pytest.approx(0, abs=1e-9)
    assert "RANDOM" in m.describe()
    assert m.summarize(t).features.shape == (12, 512)


def test_embedding_uses_the_detector_extractor_when_lent(suite_small):
    calls = []

    def make():
        def extract(x):
            calls.append(tuple(x.shape))
            return x.mean(dim=(2, 3))  # (B, 3) mean colour: a stand-in "detector"
        return extract

    ctx = SimilarityContext(seed=0, make_feature_extractor=make, feature_extractor_desc="stub detector")
    m = EmbeddingSimilarity(EmbeddingSimilarity.Options(sample_size=4, input_size=32), ctx)
    s = m.summarize(suite_small["eit"])
    assert s.features.shape == (4, 3) and calls == [(4, 3, 32, 32)]
    assert "stub detector" in m.describe()


def test_embedding_weights_from_a_local_checkpoint(tmp_path):
    import torchvision

    torch.manual_seed(123)
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": net.state_dict()}, path)
    m = EmbeddingSimilarity(EmbeddingSimilarity.Options(extractor="resnet18", weights=path, input_size=32))
    assert str(path) in m.describe() and "RANDOM" not in m.describe()
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(MegatronError, match="not a ResNet-18"):
        EmbeddingSimilarity(EmbeddingSimilarity.Options(extractor="resnet18", weights=tmp_path / "bad.pth")).describe()
    with pytest.raises(MegatronError, match="does not exist"):
        EmbeddingSimilarity(EmbeddingSimilarity.Options(extractor="resnet18", weights=tmp_path / "no.pth")).describe()


# ---------------------------------------------------------------------------------------------- label-aware
def box_task(name, scale=1.0, n_boxes=1, seed=0, contrast=40):
    rng = np.random.default_rng(seed)
    images, boxes = [], []
    for _ in range(10):
        im = rng.integers(90, 110, size=(128, 128)).astype(np.uint8)
        bs = []
        for k in range(n_boxes):
            w = h = 8 * scale
            x, y = 10 + 40 * k, 20
            im[y:int(y + h), x:int(x + w)] += np.uint8(contrast)
            bs.append([x, y, x + w, y + h])
        images.append(im)
        boxes.append(bs)
    return make_task(name, images, boxes)


def test_label_aware_known_answers():
    m = LabelAwareSimilarity(LabelAwareSimilarity.Options(contrast=False))
    base = m.summarize(box_task("a"))
    assert m.distance(base, m.summarize(box_task("a2"))) == pytest.approx(0.0)
    # every box twice as wide and tall: mean log2 relative size +1 octave
    assert m.distance(base, m.summarize(box_task("big", scale=2.0))) == pytest.approx(1.0)
    # three boxes instead of one: log2(4) - log2(2) = 1 octave in the count feature
    assert m.distance(base, m.summarize(box_task("many", n_boxes=3))) == pytest.approx(1.0)


def test_label_aware_contrast_and_empty_images():
    m = LabelAwareSimilarity(LabelAwareSimilarity.Options(contrast=True, contrast_weight=1.0))
    bright, faint = m.summarize(box_task("bright", contrast=60)), m.summarize(box_task("faint", contrast=5))
    same = m.summarize(box_task("bright2", contrast=60))
    assert m.distance(bright, same) == pytest.approx(0.0)
    assert m.distance(bright, faint) > 1.0 and m.distance(bright, faint) == pytest.approx(m.distance(faint, bright))
    # images without any box: count difference 1 octave + empty_image_cost 1.0
    empty = m.summarize(make_task("empty", noise_images(0, n=10)))
    assert m.distance(bright, empty) == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------- core
def test_pairwise_matrix_symmetric_with_zero_diagonal_and_summaries_cached():
    tasks = [make_task(f"t{i}", noise_images(i, lo=40 + 20 * i, hi=100 + 20 * i)) for i in range(4)]
    m = wass()
    calls = []
    original = m.summarize
    m.summarize = lambda t: calls.append(t.name) or original(t)
    names, mat, timings = pairwise_distances(m, tasks)
    assert names == ["t0", "t1", "t2", "t3"]
    np.testing.assert_allclose(mat, mat.T)
    assert np.all(np.diag(mat) == 0) and np.all(mat[~np.eye(4, dtype=bool)] > 0)
    assert timings["n_pairs"] == 6 and timings["summarize_s"] > 0 and timings["distance_s"] >= 0
    assert set(timings["summarize_per_task_s"]) == set(names)
    # ranking after the matrix decodes nothing again, and agrees with the matrix row
    ranking = rank_sources(m, tasks[0], tasks[1:])
    assert calls == names
    assert [n for n, _ in ranking] == ["t1", "t2", "t3"]
    assert [d for _, d in ranking] == pytest.approx(list(mat[0, 1:]))


def test_select_sources_is_self_describing():
    tasks = [make_task(f"t{i}", noise_images(i, lo=40 + 20 * i, hi=100 + 20 * i)) for i in range(4)]
    sel = select_sources(wass(), tasks[0], tasks[1:], k=2)
    assert sel.chosen == ["t1", "t2"]
    d = sel.to_dict()
    assert d["metric"] == "wasserstein" and d["unit"] == "grey levels" and d["k"] == 2 and d["target"] == "t0"
    assert list(d["distances"]) == ["t1", "t2", "t3"] and d["distances"]["t1"] < d["distances"]["t3"]
    assert [r["chosen"] for r in d["ranking"]] == [True, True, False]
    for word in ("t1", "t2", "t3", "wasserstein", "grey levels", "'t0'"):
        assert word in d["reason"]
    json.dumps(d)
    everything = select_sources(wass(), tasks[0], tasks[1:], k=10)
    assert everything.chosen == ["t1", "t2", "t3"] and "only 3 available" in everything.reason
    with pytest.raises(MegatronError):
        select_sources(wass(), tasks[0], tasks[1:], k=0)


def test_sampling_is_seeded_and_per_task():
    images = noise_images(0, n=30)
    task = make_task("a", images)
    s1 = WassersteinSimilarity(WassersteinSimilarity.Options(sample_size=5), SimilarityContext(seed=1)).summarize(task)
    s2 = WassersteinSimilarity(WassersteinSimilarity.Options(sample_size=5), SimilarityContext(seed=1)).summarize(task)
    s3 = WassersteinSimilarity(WassersteinSimilarity.Options(sample_size=5), SimilarityContext(seed=2)).summarize(task)
    assert s1.image_ids == s2.image_ids and len(s1.image_ids) == 5 and s1.image_ids != s3.image_ids


# ---------------------------------------------------------------------------------------------- the built-in suite
@pytest.fixture(scope="module")
def suite():
    from megatron_plugins.datasets import medsynth  # a built-in: its absence is a failure, not a skip
    tasks = {n: medsynth.generate_task(n, 0, 50, 256)[0] for n in medsynth.MEDSYNTH_TASKS}
    return medsynth, tasks


def _nearest(names, matrix, name):
    i = names.index(name)
    return [names[j] for j in np.argsort(matrix[i], kind="stable") if j != i]


def test_wasserstein_ranks_the_suite_families_together(suite):
    medsynth, tasks = suite
    names, mat, _ = pairwise_distances(wass(sample_size=50), list(tasks.values()))
    for family, members in medsynth.MEDSYNTH_FAMILIES.items():
        for member in members:
            assert _nearest(names, mat, member)[0] in members, (family, member, _nearest(names, mat, member))
    for target, expected in medsynth.MEDSYNTH_TARGET_NEIGHBOURS.items():
        sources = [n for n in names if n != target]
        ranked = [n for n in _nearest(names, mat, target) if n in sources]
        assert ranked[:len(expected)] == list(expected)


@pytest.mark.slow
def test_embedding_ranks_the_targets_neighbours_first(suite):
    # random ResNet-18 features (no weights offline): we assert the target's neighbours, which they find
    medsynth, tasks = suite
    m = emb(sample_size=30, input_size=96)
    for target, expected in medsynth.MEDSYNTH_TARGET_NEIGHBOURS.items():
        sources = [t for n, t in tasks.items() if n != target]
        ranked = [n for n, _ in rank_sources(m, tasks[target], sources)]
        assert set(ranked[:len(expected)]) == set(expected), ranked
    xray = medsynth.MEDSYNTH_FAMILIES["xray"]
    ranked = [n for n, _ in rank_sources(m, tasks[xray[0]], [t for n, t in tasks.items() if n != xray[0]])]
    assert ranked[0] == xray[1]


# ---------------------------------------------------------------------------------------------- t-SNE and plots
def test_tsne_separates_two_well_separated_clusters():
    from megatron.similarity.plots import tsne

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (40, 30)), rng.normal(6, 1, (40, 30))])
    y = tsne(x, perplexity=15, n_iter=500, seed=0)
    assert y.shape == (80, 2) and np.all(np.isfinite(y))
    d = np.linalg.norm(y[:, None] - y[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    nn = d.argmin(1)
    assert np.all((nn < 40) == (np.arange(80) < 40))  # every nearest neighbour in its own cluster
    gap = np.linalg.norm(y[:40].mean(0) - y[40:].mean(0))
    assert gap > 3 * max(y[:40].std(0).max(), y[40:].std(0).max())


def test_plots_are_written(tmp_path):
    from megatron.similarity.plots import plot_heatmap, plot_histograms, plot_tsne

    m = wass()
    sums = {n: m.summarize(make_task(n, noise_images(i, lo=50 + 30 * i, hi=120 + 30 * i))) for i, n in enumerate("abc")}
    p1 = plot_histograms({n: (s.centres, s.hist) for n, s in sums.items()}, tmp_path / "h.png")
    p2 = plot_heatmap(list("abc"), np.array([[0, 1, 2], [1, 0, 3], [2, 3, 0.0]]), "wasserstein", "grey levels",
                      tmp_path / "sub" / "m.png")
    rng = np.random.default_rng(0)
    p3 = plot_tsne({"a": rng.normal(size=(10, 8)), "b": rng.normal(5, 1, size=(10, 8))}, tmp_path / "t.png")
    for p in (p1, p2, p3):
        assert p.is_file() and p.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------- the command
def test_similarity_command_json_and_pngs(tmp_path, capsys):
    from megatron.cli import main

    out = tmp_path / "sim"
    data = ("[{plugin: medsynth, options: {images_per_task: 6, target_images: 6, image_size: 64, "
            f"tasks: [chest_xray, pneumonia_xray, mammography, eit], cache_dir: '{tmp_path / 'cache'}'}}}}]")
    rc = main(["similarity", "--json", "--out", str(out), "--target", "eit",
               "--metrics", "wasserstein,embedding,label_aware",
               "--set", f"data.datasets={data}", "--set", "similarity.sample_size=4",
               "--set", "similarity.options={embedding: {extractor: resnet18, input_size: 32}}"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == "eit"
    assert set(result["metrics"]) == {"wasserstein", "embedding", "label_aware"}
    for name, entry in result["metrics"].items():
        ranked = [r["name"] for r in entry["ranking"]]
        assert sorted(ranked) == ["chest_xray", "mammography", "pneumonia_xray"]
        dists = [r["distance"] for r in entry["ranking"]]
        assert dists == sorted(dists)
        assert entry["unit"]
    assert "RANDOM" in result["metrics"]["embedding"]["note"]
    for png in ("heatmap_wasserstein.png", "heatmap_embedding.png", "heatmap_label_aware.png",
                "histograms_wasserstein.png", "tsne_embedding.png"):
        assert (out / png).is_file(), png
    assert json.loads((out / "similarity.json").read_text())["target"] == "eit"


def test_similarity_command_unknown_target_is_a_clear_error(tmp_path, capsys):
    from megatron.cli import main

    data = ("[{plugin: medsynth, options: {images_per_task: 2, target_images: 2, image_size: 64, "
            f"tasks: [chest_xray, eit], cache_dir: '{tmp_path / 'cache'}'}}}}]")
    rc = main(["similarity", "--target", "ct_scan", "--out", str(tmp_path / "o"), "--set", f"data.datasets={data}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "ct_scan" in err and "chest_xray" in err
