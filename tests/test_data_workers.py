"""Background data workers (megatron/data/loader.py): a run gives bit-identical records and weights with any
number of workers, resume stays exact, a sampler stopped early forgets what its workers drew ahead, worker
errors arrive unchanged, and the decoded-image cache keeps to its byte limit."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_run import KillAt, make_pm, tiny_config  # noqa: E402

from megatron.atomic_io import safe_torch_load  # noqa: E402
from megatron.data import loader as loader_module  # noqa: E402
from megatron.data.episodes import EpisodeSampler, iterate_batches  # noqa: E402
from megatron.data.loader import Loader, auto_workers  # noqa: E402
from megatron.data.preprocess import DecodedImageCache, Preprocessor  # noqa: E402
from megatron.errors import ConfigError, DataError  # noqa: E402
from megatron.training.runner import run_experiment  # noqa: E402
from megatron.types import ImageRecord, Task  # noqa: E402

SIZE = 48


def blob_task(n: int = 12, name: str = "blobs", fail_at: int | None = None) -> Task:
    """Images generated from their id (a bright square on noise); ``fail_at``: that id's loader raises."""

    def load(record: ImageRecord) -> np.ndarray:
        if record.image_id == fail_at:
            raise DataError(f"image {record.image_id} of task {name!r} is unreadable; replace the file")
        rng = np.random.default_rng(record.image_id)
        img = rng.integers(0, 60, (SIZE, SIZE), dtype=np.uint8)
        img[10:30, 12:32] = 200
        return img

    records = [ImageRecord(i, None, SIZE, SIZE, np.array([[12.0, 10.0, 32.0, 30.0]]), np.array([i % 2]), f"{i}.png")
               for i in range(n)]
    return Task(name, ["a", "b"], records, image_loader=load)


def run_config(tmp_path: Path, workers: int, **overrides):
    # stage 1 included (pre-training batches), its cache per run so each run trains it with its own workers
    base = {"training.pretrain_epochs": 1, "training.meta_epochs": 2, "training.steps_per_epoch": 3,
            "data.workers": workers, "data.prefetch": 2, "data.cache_dir": str(tmp_path / f"cache-{workers}")}
    base.update(overrides)
    return tiny_config(tmp_path, **base)


def numbers(record: dict) -> dict:
    """Everything in a run record that training produced (not timings or paths)."""
    out = {"pretrain_losses": record["pretrain"].get("losses")}
    for name, lrec in record["learners"].items():
        out[name] = {"final": lrec["final"], "best": lrec["best"], "compute": lrec["compute"],
                     "epochs": [{k: e[k] for k in ("train_loss", "steps", "compute", "episodes", "metrics", "validation")}
                                for e in lrec["epochs"]]}
    return out


def weights(run_dir: Path, learner: str) -> dict[str, torch.Tensor]:
    return safe_torch_load(run_dir / "checkpoints" / learner / "last.pt")["detector"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_run_gives_identical_records_and_weights_with_0_and_2_workers(tmp_path):
    records = {}
    for workers in (0, 2):
        cfg = run_config(tmp_path, workers)
        run_experiment(cfg, run_dir=tmp_path / f"w{workers}", pm=make_pm(), progress=False)
        records[workers] = json.loads((tmp_path / f"w{workers}" / "run.json").read_text())
    assert records[0]["pretrain"]["reused"] is False and records[2]["pretrain"]["reused"] is False
    assert numbers(records[0]) == numbers(records[2])
    assert records[0]["learners"]["joint_test"]["final"]["mAP50"] is not None
    assert_same_weights(weights(tmp_path / "w0", "joint_test"), weights(tmp_path / "w2", "joint_test"))
    # the stage-1 checkpoints (pre-trained with and without workers) hold the same weights too
    ckpts = [next((tmp_path / f"cache-{w}" / "pretrain").glob("*.pth")) for w in (0, 2)]
    assert_same_weights(*(safe_torch_load(p)["state_dict"] for p in ckpts))


def test_a_run_killed_with_workers_resumes_to_the_numbers_of_an_uninterrupted_run_without(tmp_path):
    full = run_experiment(run_config(tmp_path, 0), run_dir=tmp_path / "full", pm=make_pm(), progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(run_config(tmp_path, 2), run_dir=tmp_path / "killed", pm=make_pm(KillAt(2, 2)), progress=False)
    resumed = run_experiment(run_config(tmp_path, 2), run_dir=tmp_path / "killed", pm=make_pm(), resume=True,
                             progress=False)
    assert numbers(resumed)["joint_test"] == numbers(full)["joint_test"]
    assert_same_weights(weights(tmp_path / "full", "joint_test"), weights(tmp_path / "killed", "joint_test"))


@pytest.mark.parametrize("loader", [Loader(1, 1), Loader(3, 2)], ids=["1 worker", "3 workers"])
def test_episodes_and_batches_from_workers_equal_those_loaded_in_process(loader):
    tasks = [blob_task(name="a"), blob_task(name="b")]

    def draw(with_loader: Loader):
        sampler = EpisodeSampler(2, 2, Preprocessor(SIZE, augment=True), seed=5)
        stream = sampler.meta_batches(tasks, 2, 3, loader=with_loader)
        episodes = [e for meta in stream for e in meta.episodes]
        batches = list(iterate_batches(tasks[0], 5, Preprocessor(SIZE, augment=True), np.random.default_rng(2),
                                       shuffle=True, loader=with_loader))
        return episodes, batches, sampler.state_dict()

    (eps0, batches0, state0), (eps, batches, state) = draw(Loader()), draw(loader)
    assert state == state0 and len(eps) == len(eps0) == 6 and len(batches) == len(batches0) == 3
    for a, b in zip(eps0, eps):
        assert torch.equal(a.support.images, b.support.images) and torch.equal(a.query.images, b.query.images)
        assert all(torch.equal(x, y) for x, y in zip(a.query.boxes, b.query.boxes))
    assert all(torch.equal(a.images, b.images) for a, b in zip(batches0, batches))


def test_a_stream_stopped_early_puts_the_sampler_back_after_the_last_meta_batch_used():
    tasks = [blob_task(name="a"), blob_task(name="b")]
    streamed = EpisodeSampler(2, 2, Preprocessor(SIZE, augment=True), seed=9)
    stream = streamed.meta_batches(tasks, 2, None, loader=Loader(2, 3))
    used = [next(stream) for _ in range(2)]  # the workers have drawn several more by now
    stream.close()
    plain = EpisodeSampler(2, 2, Preprocessor(SIZE, augment=True), seed=9)
    ids = []
    for _ in range(2):
        plain.meta_batch(tasks, 2)
        ids.append(plain.last_drawn_ids)
    assert [m.drawn_ids for m in used] == ids
    assert streamed.state_dict() == plain.state_dict()
    # and the next meta-batch is the one an uninterrupted sampler draws next
    assert [e.support.images.sum() for e in streamed.meta_batch(tasks, 2)] == \
           [e.support.images.sum() for e in plain.meta_batch(tasks, 2)]


def test_a_data_error_in_a_worker_reaches_the_training_process_unchanged():
    task = blob_task(fail_at=7)
    with pytest.raises(DataError, match=r"image 7 of task 'blobs' is unreadable; replace the file$"):
        list(iterate_batches(task, 4, Preprocessor(SIZE), loader=Loader(2, 1)))


def test_the_decoded_image_cache_keeps_to_its_byte_limit():
    cache = DecodedImageCache(max_bytes=3000)
    for i in range(5):
        cache.put(i, np.zeros(1000, np.uint8))
    assert len(cache) == 3 and cache.nbytes == 3000 and cache.get(0) is None and cache.get(4) is not None
    cache.put("huge", np.zeros(4000, np.uint8))  # larger than the whole cache: not kept, nothing evicted
    assert cache.get("huge") is None and len(cache) == 3
    with pytest.raises(ConfigError, match="data.cache_bytes"):
        DecodedImageCache(max_bytes=-1)


def test_workers_are_off_on_the_cpu_and_a_share_of_the_cores_on_an_accelerator(monkeypatch):
    monkeypatch.setattr(loader_module, "usable_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert auto_workers("cpu") == 0
    assert auto_workers("cuda") == loader_module.MAX_AUTO_WORKERS
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four ranks on the machine: 4 cores each, one for the rank
    assert auto_workers("cuda:0") == 3
    with pytest.raises(ConfigError, match="data.workers"):
        Loader(workers=-1)
