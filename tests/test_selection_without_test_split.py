"""Source choice without the test split (issue 25): the similarity that ranks the source tasks for
`similarity.select_sources` reads only the target's pool and validation images, never a held-out image, and the
run record lists which target images it read."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_run import make_pm, tiny_config

from megatron.errors import DataError
from megatron.similarity.ranking import build_metric, select_sources
from megatron.similarity.selection import selection_target
from megatron.training.prepare import split_target_three
from megatron.training.runner import run_experiment
from megatron.types import ImageRecord, Task


def grey_task(name: str, n: int, level: int, heldout_guard: set | None = None) -> Task:
    """``n`` flat images at grey ``level``, one box each; the loader raises on any id in ``heldout_guard``."""
    records = [ImageRecord(image_id=i, path=None, width=32, height=32, boxes=np.array([[4, 4, 12, 12]], np.float32),
                           labels=np.array([0]), file_name=f"{name}_{i}.png") for i in range(1, n + 1)]

    def load(r: ImageRecord) -> np.ndarray:
        if heldout_guard is not None and r.image_id in heldout_guard:
            raise AssertionError(f"held-out image {r.image_id} was read")
        return np.full((32, 32), level + r.image_id % 3, np.uint8)

    return Task(name=name, categories=["lesion"], records=records, image_loader=load)


def test_similarity_for_selection_never_reads_a_held_out_image(tmp_path):
    target = grey_task("target", 40, 100)
    pool, validation, heldout = split_target_three(target, 8, 30, 10, seed=0)
    guard = {r.image_id for r in heldout.records}
    guarded = grey_task("target", 40, 100, heldout_guard=guard)  # the same images (id i at index i-1), held-out refused
    view = selection_target(guarded.subset([r.image_id - 1 for r in pool.records]),
                            guarded.subset([r.image_id - 1 for r in validation.records]), heldout)
    sources = [grey_task("near", 10, 102), grey_task("far", 10, 200)]
    cfg = tiny_config(tmp_path, **{"similarity.sample_size": 1000})  # more than offered: every image is read
    metric = build_metric(make_pm(), cfg, "wasserstein")
    chosen = select_sources(metric, view.task, sources, 1)
    assert chosen.chosen == ["near"]
    read = {i for _, i in view.read}
    assert read == {r.image_id for r in pool.records} | {r.image_id for r in validation.records}  # all offered
    assert not read & guard
    assert view.record()["offered"] == {"pool": 8, "validation": 10, "extra": 0}


def test_a_split_whose_pool_overlaps_the_held_out_images_is_refused():
    target = grey_task("target", 20, 100)
    with pytest.raises(DataError, match="held-out"):
        selection_target(target.subset([0, 1, 2]), None, target.subset([2, 3, 4]))


@pytest.mark.slow  # a whole tiny run
def test_the_run_record_lists_the_target_images_selection_read_and_none_is_held_out(tmp_path):
    write_pngs(tmp_path / "unlabelled", [90, 120, 150])
    cfg = tiny_config(tmp_path, **{"training.meta_epochs": 1, "similarity.select_sources": 1,
                                   "similarity.metric": "wasserstein", "similarity.metrics": ["wasserstein"],
                                   "data.validation_images": 4,
                                   "similarity.unlabelled_target": [str(tmp_path / "unlabelled")]})
    record = run_experiment(cfg, run_dir=tmp_path / "r", pm=make_pm(), progress=False, learners=["joint_test"])
    used = record["selection"]["target_images"]
    split = record["split"]
    allowed = {x["id"] for x in split["pool"]} | {x["id"] for x in split["validation"]}
    read = set(used["read"]["pool"]) | set(used["read"]["validation"])
    assert read and read <= allowed
    assert not read & {x["id"] for x in split["heldout"]}
    assert used["offered"]["pool"] == len(split["pool"]) and used["offered"]["validation"] == len(split["validation"])
    assert used["offered"]["extra"] == 3 and set(used["read"]["extra"]) <= {
        str(tmp_path / "unlabelled" / f"img_{i:02d}.png") for i in range(3)} and used["read"]["extra"]


def test_the_committed_recheck_of_experiment_5_says_what_its_readme_says():
    """benchmarks/results/source_choice_without_test_split: every figure of its README, from selection.json."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "source_choice_without_test_split"
    rows = json.loads((folder / "selection.json").read_text())
    readme = (folder / "README.md").read_text()
    assert len(rows) == 10 and all(r["chosen"] == r["committed_chosen"] for r in rows)
    assert {r["target_images_read"] for r in rows} == {30} and {r["held_out_images_read"] for r in rows} == {0}
    shift = max(abs(r["distances"][k] - r["committed_distances"][k]) for r in rows for k in r["distances"])
    assert f"at most {shift:.2f} grey levels" in readme
    for n in (2, 3):
        gap = min(sorted(r["distances"].values())[n] - sorted(r["distances"].values())[n - 1]
                  for r in rows if r["n"] == n)
        assert f"{gap:.1f} grey levels at N = {n}" in readme or f"and {gap:.1f} at N = {n}" in readme


# --- similarity.unlabelled_target: images of the target without labels, never a held-out file ---------------
def write_pngs(folder: Path, levels: list[int]) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, level in enumerate(levels):
        path = folder / f"img_{i:02d}.png"
        Image.fromarray(np.full((32, 32), level, np.uint8)).save(path)
        paths.append(path)
    return paths


def file_task(name: str, paths: list[Path]) -> Task:
    records = [ImageRecord(image_id=i + 1, path=p, width=32, height=32, boxes=np.array([[4, 4, 12, 12]], np.float32),
                           labels=np.array([0]), file_name=p.name) for i, p in enumerate(paths)]
    return Task(name=name, categories=["lesion"], records=records)


def test_unlabelled_target_images_are_read_by_selection_and_listed_in_the_record(tmp_path):
    from megatron.similarity.selection import unlabelled_target_tasks

    target = file_task("target", write_pngs(tmp_path / "target", [100 + i % 3 for i in range(12)]))
    pool, held = target.subset(range(4)), target.subset(range(4, 12))
    # the labelled pool is grey 100-102; the unlabelled images of the same scanner say it is really around 200
    extra = unlabelled_target_tasks([tmp_path / "unlabelled"] if write_pngs(tmp_path / "unlabelled", [200] * 40)
                                    else [], "target")
    view = selection_target(pool, None, held, extra)
    sources = [grey_task("near_pool", 10, 100), grey_task("near_extra", 10, 199)]
    cfg = tiny_config(tmp_path, **{"similarity.sample_size": 1000})
    chosen = select_sources(build_metric(make_pm(), cfg, "wasserstein"), view.task, sources, 1)
    assert chosen.chosen == ["near_extra"]  # the 40 extra images outweigh the 4 pool images
    record = view.record()
    assert record["offered"] == {"pool": 4, "validation": 0, "extra": 40}
    assert len(record["read"]["extra"]) == 40 and all(p.endswith(".png") for p in record["read"]["extra"])
    assert record["read"]["pool"] == [1, 2, 3, 4]


def test_an_unlabelled_folder_holding_held_out_images_is_refused_by_path_and_by_copy(tmp_path):
    import shutil

    from megatron.similarity.selection import unlabelled_target_tasks

    target = file_task("target", write_pngs(tmp_path / "target", list(range(100, 112))))
    pool, held = target.subset(range(4)), target.subset(range(4, 12))
    # the target's own image folder: 8 of its files are held-out images
    same_folder = unlabelled_target_tasks([tmp_path / "target"], "target")
    with pytest.raises(DataError, match=r"(?s)8 file\(s\) are held-out test images.*img_04\.png.*fix:"):
        selection_target(pool, None, held, same_folder)
    # a copy of one held-out file under another name (same bytes) beside genuinely new images
    write_pngs(tmp_path / "copies", [50, 51])
    shutil.copy(tmp_path / "target" / "img_07.png", tmp_path / "copies" / "renamed.png")
    with pytest.raises(DataError, match=r"(?s)1 file\(s\).*renamed\.png \(held-out image 8, img_07\.png\)"):
        selection_target(pool, None, held, unlabelled_target_tasks([tmp_path / "copies"], "target"))
    # pool images are labelled training images, not test images: offered again is allowed
    shutil.rmtree(tmp_path / "copies")
    write_pngs(tmp_path / "copies", [50, 51])
    shutil.copy(tmp_path / "target" / "img_00.png", tmp_path / "copies" / "pool_copy.png")
    assert selection_target(pool, None, held, unlabelled_target_tasks([tmp_path / "copies"], "target")).record()[
        "offered"]["extra"] == 3


def test_an_unlabelled_target_folder_that_is_missing_or_empty_gets_an_error_naming_the_key(tmp_path):
    from megatron.similarity.selection import unlabelled_target_tasks

    with pytest.raises(DataError, match=r"similarity.unlabelled_target: image folder .*nowhere does not exist"):
        unlabelled_target_tasks([tmp_path / "nowhere"], "target")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"(?s)similarity.unlabelled_target: .*empty.*holds no images.*fix"):
        unlabelled_target_tasks([tmp_path / "empty"], "target")
