"""Episodes, batches and the few-shot target split (synthetic tasks: a custom image_loader, no files)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from megatron.data.episodes import EpisodeSampler, iterate_batches, load_batch, split_target
from megatron.data.preprocess import Preprocessor
from megatron.errors import ConfigError, DataError
from megatron.types import ImageRecord, Task

SIZE = 64


def make_task(n=30, classes=("mass", "calcification", "cyst"), empty_every=5, name="mammo", seed=0, loaded=None):
    """``n`` 48x64 images; every ``empty_every``-th has no finding; the others hold 1-2 boxes of varied classes.

    The loader draws pixels from the image id (so an image is recognisable) and logs every id it decodes.
    """
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        if empty_every and i % empty_every == 0:
            boxes, labels = np.zeros((0, 4)), np.zeros(0)
        else:
            k = 1 + i % 2
            x1 = rng.uniform(0, 40, k)
            y1 = rng.uniform(0, 30, k)
            boxes = np.stack([x1, y1, x1 + 10, y1 + 8], 1)
            labels = rng.integers(0, len(classes), k)
        records.append(ImageRecord(100 + i, None, 64, 48, boxes, labels, f"img{i}.png"))

    def loader(record):
        if loaded is not None:
            loaded.append(record.image_id)
        return np.full((48, 64), record.image_id % 256, np.uint8)

    return Task(name, list(classes), records, modality="mammography", source="test", image_loader=loader)


def ids(batch):
    return [m["image_id"] for m in batch.meta]


# -- batches --------------------------------------------------------------------------------------------------

def test_iterate_batches_visits_every_image_once_and_shuffles_reproducibly():
    task = make_task(n=10)
    pre = Preprocessor(SIZE)
    batches = list(iterate_batches(task, 4, pre))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sum((ids(b) for b in batches), []) == [r.image_id for r in task.records]
    # pixels and boxes come from the right record
    b0 = batches[0]
    assert float(b0.images[1, 0, 32, 32]) == 101 % 256
    np.testing.assert_allclose(b0.boxes[1].numpy(), task.records[1].boxes * 1.0 + [0, 8, 0, 8], atol=1e-4)
    shuffled = [ids(b) for b in iterate_batches(task, 4, pre, np.random.default_rng(1), shuffle=True)]
    again = [ids(b) for b in iterate_batches(task, 4, pre, np.random.default_rng(1), shuffle=True)]
    assert shuffled == again and sorted(sum(shuffled, [])) == sorted(r.image_id for r in task.records)
    assert sum(shuffled, []) != [r.image_id for r in task.records]
    with pytest.raises(ValueError, match="rng"):
        next(iterate_batches(task, 4, pre, shuffle=True))


def test_empty_task_is_a_data_error_naming_it():
    empty = Task("eit", ["a"], [], source="medsynth")
    with pytest.raises(DataError, match="'eit'.*no images"):
        next(iterate_batches(empty, 2, Preprocessor(SIZE)))
    with pytest.raises(DataError, match="'eit'.*no images"):
        EpisodeSampler(2, 2, Preprocessor(SIZE), seed=0).episode(empty)
    with pytest.raises(DataError, match="'eit'.*no images"):
        split_target(empty, 20, None, seed=0)


# -- image-level episodes -----------------------------------------------------------------------------------

def test_episode_support_and_query_are_disjoint_and_deterministic():
    task = make_task()
    a = EpisodeSampler(4, 4, Preprocessor(SIZE, augment=True), seed=3)
    b = EpisodeSampler(4, 4, Preprocessor(SIZE, augment=True), seed=3)
    for _ in range(5):
        ea, eb = a.episode(task), b.episode(task)
        assert len(ea.support) == 4 and len(ea.query) == 4
        assert not set(ids(ea.support)) & set(ids(ea.query))
        assert ea.categories == task.categories and ea.label_map is None and ea.task_name == "mammo"
        assert ids(ea.support) == ids(eb.support) and torch.equal(ea.query.images, eb.query.images)
        assert all(m["augmented"] for m in ea.support.meta)
    c = EpisodeSampler(4, 4, Preprocessor(SIZE), seed=4).episode(task)
    assert ids(c.support) != ids(EpisodeSampler(4, 4, Preprocessor(SIZE), seed=3).episode(task).support)


def test_sampler_state_round_trips_so_a_resumed_run_draws_the_same_episodes():
    task = make_task()
    sampler = EpisodeSampler(3, 2, Preprocessor(SIZE, augment=True), seed=11)
    for _ in range(3):
        sampler.episode(task)
    state = sampler.state_dict()
    # the state survives JSON and torch's weights_only loader (how checkpoints store it)
    state = json.loads(json.dumps(state))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    expected = [sampler.episode(task) for _ in range(3)]
    resumed = EpisodeSampler(3, 2, Preprocessor(SIZE, augment=True), seed=999)
    resumed.load_state_dict(state)
    got = [resumed.episode(task) for _ in range(3)]
    for e, g in zip(expected, got):
        assert ids(e.support) == ids(g.support) and ids(e.query) == ids(g.query)
        assert torch.equal(e.support.images, g.support.images)  # augmentations too
        assert all(torch.equal(x, y) for x, y in zip(e.query.boxes, g.query.boxes))
    assert resumed.episodes_drawn == sampler.episodes_drawn == 6


def test_episode_larger_than_the_task_is_a_data_error_with_the_fix():
    with pytest.raises(DataError, match=r"'mammo' has 6 images but an episode needs 8.*support_size"):
        EpisodeSampler(4, 4, Preprocessor(SIZE), seed=0).episode(make_task(n=6))


def test_meta_batch_draws_distinct_tasks_then_whole_rounds():
    tasks = [make_task(n=10, name=f"t{i}", seed=i) for i in range(3)]
    sampler = EpisodeSampler(2, 2, Preprocessor(SIZE), seed=0)
    two = sampler.meta_batch(tasks, 2)
    assert len({e.task_name for e in two}) == 2
    five = sampler.meta_batch(tasks, 5)
    names = [e.task_name for e in five]
    assert set(names[:3]) == {"t0", "t1", "t2"} and len(set(names[3:])) == 2
    with pytest.raises(DataError, match="no source tasks"):
        sampler.meta_batch([], 2)


@pytest.mark.parametrize("n_way", [None, 2])
def test_a_sharded_meta_batch_is_the_ranks_share_and_decodes_only_its_images(n_way):
    from megatron.runtime.distributed import DistEnv, shard

    def setup(loaded):
        tasks = [make_task(n=30, name=f"t{i}", seed=i, loaded=loaded) for i in range(3)]
        # no decoded-image cache shared between samplers, so every decode is seen by the loader
        return tasks, EpisodeSampler(3, 2, Preprocessor(SIZE, augment=True, cache_size=0), seed=5, n_way=n_way)

    full_loaded: list[int] = []
    tasks, full = setup(full_loaded)
    whole = [full.meta_batch(tasks, 6) for _ in range(2)]
    for world in (2, 3):
        decoded_by_ranks = 0
        for rank in range(world):
            loaded: list[int] = []
            tasks, sampler = setup(loaded)
            env = DistEnv(rank=rank, world_size=world)
            for step in range(2):
                mine = sampler.meta_batch(tasks, 6, shard=env)
                expected = shard(whole[step], env)
                # the whole meta-batch's images, as a run's draw log hashes them, without decoding them
                assert repr(sampler.last_drawn_ids) == repr([(m["task"], m["image_id"]) for e in whole[step]
                                                            for b in (e.support, e.query) for m in b.meta])
                assert [e.task_name for e in mine] == [e.task_name for e in expected]
                for got, want in zip(mine, expected):
                    assert ids(got.support) == ids(want.support) and ids(got.query) == ids(want.query)
                    assert torch.equal(got.support.images, want.support.images)  # the same augmentations
                    assert torch.equal(got.query.images, want.query.images)
                    assert got.label_map == want.label_map
            # only this rank's episodes were decoded: its share of the whole run's decodes, nothing else
            assert sorted(loaded) == sorted(i for step in range(2) for e in shard(whole[step], env)
                                            for i in ids(e.support) + ids(e.query))
            decoded_by_ranks += len(loaded)
            # every rank drew the whole meta-batch: the next draws and the resume state agree with one process
            assert sampler.state_dict() == full.state_dict() and sampler.episodes_drawn == 12
        assert decoded_by_ranks == len(full_loaded)  # together the ranks decode what one process decodes, once
    with pytest.raises(ConfigError, match=r"training.meta_batch to a multiple of 4"):
        setup([])[1].meta_batch(setup([])[0], 6, shard=DistEnv(rank=0, world_size=4))


# -- N-way K-shot -----------------------------------------------------------------------------------------

def test_n_way_k_shot_remaps_labels_and_meets_k_shot():
    task = make_task(n=40)
    sampler = EpisodeSampler(4, 3, Preprocessor(SIZE), seed=5, n_way=2, k_shot=2)
    by_id = {r.image_id: r for r in task.records}
    seen_maps = set()
    for _ in range(8):
        ep = sampler.episode(task)
        assert sorted(ep.label_map.values()) == [0, 1]
        chosen = sorted(ep.label_map, key=ep.label_map.get)
        assert ep.categories == [task.categories[c] for c in chosen]
        seen_maps.add(tuple(chosen))
        assert not set(ids(ep.support)) & set(ids(ep.query)) and len(ep.query) >= 1
        for c, j in ep.label_map.items():  # every chosen class in >= k_shot support images
            assert sum(int((lab == j).any()) for lab in ep.support.labels) >= 2
        for batch in (ep.support, ep.query):
            for image_id, boxes, labels in zip(ids(batch), batch.boxes, batch.labels):
                rec = by_id[image_id]
                keep = np.isin(rec.labels, list(ep.label_map))
                # other classes' boxes dropped, the rest remapped one to one
                assert labels.tolist() == [ep.label_map[int(c)] for c in rec.labels[keep]]
                assert len(boxes) == int(keep.sum())
    assert len(seen_maps) > 1  # classes and their order vary between episodes


def test_n_way_errors_name_the_task_and_the_fix():
    task = make_task(n=40)
    with pytest.raises(DataError, match=r"'mammo' has 3 classes.*n_way is 4"):
        EpisodeSampler(4, 4, Preprocessor(SIZE), seed=0, n_way=4).episode(task)
    with pytest.raises(DataError, match=r"need 2 classes with at least 31 annotated images.*episodes.k_shot"):
        EpisodeSampler(4, 4, Preprocessor(SIZE), seed=0, n_way=2, k_shot=30).episode(task)
    with pytest.raises(ValueError, match="k_shot needs n_way"):
        EpisodeSampler(4, 4, Preprocessor(SIZE), seed=0, k_shot=2)


# -- the target split ---------------------------------------------------------------------------------------

def test_split_is_disjoint_nested_and_evaluates_on_the_same_images_for_every_k():
    task = make_task(n=100)
    pool20, held20 = split_target(task, 20, None, seed=7)
    pool40, held40 = split_target(task, 40, None, seed=7)
    p20, p40 = {r.image_id for r in pool20.records}, {r.image_id for r in pool40.records}
    h20, h40 = {r.image_id for r in held20.records}, {r.image_id for r in held40.records}
    assert len(p20) == 20 and len(p40) == 40 and p20 < p40
    assert h20 == h40 and len(h20) == 60
    assert not (p40 & h40)
    # deterministic, and seeds differ
    assert [r.image_id for r in split_target(task, 20, None, seed=7)[0].records] == [r.image_id for r in pool20.records]
    assert p20 != {r.image_id for r in split_target(task, 20, None, seed=8)[0].records}
    # explicit eval_images: held-out identical for both K as well
    a_pool, a_held = split_target(task, 20, 30, seed=1)
    b_pool, b_held = split_target(task, 40, 30, seed=1)
    assert [r.image_id for r in a_held.records] == [r.image_id for r in b_held.records] and len(a_held) == 30
    assert {r.image_id for r in a_pool.records} < {r.image_id for r in b_pool.records}
    assert not {r.image_id for r in b_pool.records} & {r.image_id for r in b_held.records}
    assert pool20.name == held20.name == task.name and pool20.categories == task.categories


def test_pool_prefers_findings_but_keeps_no_finding_images_proportionally():
    task = make_task(n=100, empty_every=4)  # 25% without findings
    pool, held = split_target(task, 20, None, seed=0)
    assert sum(len(r.boxes) == 0 for r in pool.records) == 5  # floor(20 * 0.25)
    pool, _ = split_target(task, 10, None, seed=0)
    assert sum(len(r.boxes) == 0 for r in pool.records) == 2  # floor(10 * 0.25): rounded in favour of findings
    assert sum(len(r.boxes) == 0 for r in held.records) == 15  # held-out stratified: 25% of 60


def test_k_too_large_is_a_data_error_with_the_numbers_and_the_fix():
    task = make_task(n=30)
    with pytest.raises(DataError, match=r"'mammo' has 30 images: K=40 .*at most 25"):
        split_target(task, 40, None, seed=0)
    with pytest.raises(DataError, match=r"K=20 plus 15 held-out.*data.shots to at most 15.*eval_images to at most 10"):
        split_target(task, 20, 15, seed=0)


def test_nothing_drawn_from_the_pool_can_reach_held_out_images():
    loaded: list[int] = []
    task = make_task(n=60, loaded=loaded)
    pool, held = split_target(task, 20, None, seed=2)
    held_ids = {r.image_id for r in held.records}
    pool_ids = {r.image_id for r in pool.records}
    assert not held_ids & pool_ids and len(held_ids) == 60 - 40  # 60 - max(K=20, reserve=40)
    pre = Preprocessor(SIZE, augment=True)
    rng = np.random.default_rng(0)
    drawn: set[int] = set()
    for _ in range(3):  # fine-tuning epochs
        for batch in iterate_batches(pool, 8, pre, rng, shuffle=True):
            drawn |= set(ids(batch))
    image_level = EpisodeSampler(4, 4, pre, seed=1)
    n_way = EpisodeSampler(4, 2, pre, seed=1, n_way=2, k_shot=1)
    for _ in range(30):
        for ep in (image_level.episode(pool), n_way.episode(pool)):
            drawn |= set(ids(ep.support)) | set(ids(ep.query))
    drawn |= {i for e in image_level.meta_batch([pool, pool], 4) for i in ids(e.support) + ids(e.query)}
    assert drawn == pool_ids  # every pool image used, and nothing else
    assert not set(loaded) & held_ids  # no held-out pixels were ever decoded
    # load_batch indexes the pool's own records: a held-out position does not exist there
    with pytest.raises(IndexError):
        load_batch(pool, [len(pool)], pre)


def test_batches_from_16_bit_png_files_through_the_default_loader(tmp_path):
    import cv2

    records = []
    for i in range(3):
        img = np.full((40, 80), 1000 + 100 * i, np.uint16)
        img[10:20, 20:40] = 3000  # a 12-bit "lesion"
        cv2.imwrite(str(tmp_path / f"{i}.png"), img)
        records.append(ImageRecord(i, tmp_path / f"{i}.png", 80, 40, [[20, 10, 40, 20]], [0], f"{i}.png"))
    task = Task("xray", ["nodule"], records)  # default image_loader: megatron.data.io.read_image
    pre = Preprocessor(SIZE)
    batch = load_batch(task, [0, 2], pre)
    # 80x40 -> scale 0.8, pad top 16; the windowed lesion is the brightest region and sits under its box
    np.testing.assert_allclose(batch.boxes[0].numpy(), [[16, 24, 32, 32]], atol=1e-4)
    img = batch.images[0, 0].numpy()
    assert img[28, 24] == 255 and img[45, 60] < 10 and img[5, 5] == 0
    # same task name and ids, other files: the cache keys on the path too, so no stale pixels
    other = tmp_path / "other"
    other.mkdir()
    cv2.imwrite(str(other / "0.png"), np.zeros((40, 80), np.uint8))
    twin = Task("xray", ["nodule"], [ImageRecord(0, other / "0.png", 80, 40, [[20, 10, 40, 20]], [0])])
    assert float(load_batch(twin, [0], pre).images.max()) == 0
