"""The method's stages in `megatron run`: stage 1 cached by content, the split on record and reusable, the
validation split and the kept models, the episode record that resume checks, the stage events."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tiny_run import make_pm, tiny_config  # noqa: E402

from megatron import hookimpl  # noqa: E402
from megatron.errors import ConfigError, DataError  # noqa: E402
from megatron.experiment import build_taskset, load_tasks  # noqa: E402
from megatron.training.pretrain import stage1_cache_key  # noqa: E402
from megatron.training.runner import run_experiment  # noqa: E402


def staged_config(tmp_path: Path, **overrides):
    base = {"training.pretrain_epochs": 2, "training.meta_epochs": 2, "data.validation_images": 4, "data.eval_images": 12,
            "data.datasets": [{"plugin": "blobs", "options": {"images_per_task": 20}}]}
    base.update(overrides)
    return tiny_config(tmp_path, **base)


def sources_of(cfg):
    return build_taskset(cfg, load_tasks(cfg, make_pm())).sources


class Stages:
    def __init__(self):
        self.events = []

    @hookimpl
    def megatron_stage_start(self, stage, info):
        self.events.append(("start", stage, dict(info)))

    @hookimpl
    def megatron_stage_end(self, stage, info):
        self.events.append(("end", stage, dict(info)))


def test_stage1_cache_key_changes_with_every_input_and_only_then(tmp_path):
    cfg = staged_config(tmp_path)
    sources = sources_of(cfg)
    key, inputs = stage1_cache_key(cfg, sources)
    assert stage1_cache_key(staged_config(tmp_path), sources)[0] == key  # same config, same key
    assert stage1_cache_key(staged_config(tmp_path, **{"training.meta_epochs": 5}), sources)[0] == key  # not an input
    # the run's seed is not an input (stage 1 has its own, fixed by default): every seed of a study shares it
    assert stage1_cache_key(staged_config(tmp_path, seed=5), sources)[0] == key
    for changed in ({"training.pretrain_seed": 1}, {"training.pretrain_epochs": 3}, {"training.pretrain_lr": 1e-4},
                    {"data.input_size": 32}, {"detector.options": {"width": 8}},
                    {"data.datasets": [{"plugin": "blobs", "options": {"images_per_task": 21}}]}):
        other = staged_config(tmp_path, **changed)
        assert stage1_cache_key(other, sources_of(other))[0] != key, changed
    assert stage1_cache_key(cfg, sources[:1])[0] != key  # fewer source tasks
    from importlib import metadata

    assert inputs["versions"]["torch"] == metadata.version("torch") and inputs["settings"]["epochs"] == 2


def test_run_pretrains_once_then_reuses_the_cached_checkpoint(tmp_path):
    cfg = staged_config(tmp_path, **{"learner.name": "joint_test"})
    first = run_experiment(cfg, run_dir=tmp_path / "a", pm=make_pm(), progress=False)
    second = run_experiment(cfg, run_dir=tmp_path / "b", pm=make_pm(), progress=False)
    a, b = first["pretrain"], second["pretrain"]
    assert a["reused"] is False and b["reused"] is True
    assert a["checkpoint"] == b["checkpoint"] and Path(a["checkpoint"]).exists()
    assert a["cache_key"] == b["cache_key"] and a["epochs"] == 2
    assert Path(a["checkpoint"]).parent == tmp_path / "cache" / "pretrain"
    # same start weights, so the same numbers
    assert first["learners"]["joint_test"]["final"] == second["learners"]["joint_test"]["final"]


def test_no_pretrain_starts_from_random_weights_and_says_so(tmp_path, caplog):
    cfg = staged_config(tmp_path, **{"training.pretrain_epochs": 0})
    record = run_experiment(cfg, run_dir=tmp_path / "r", pm=make_pm(), progress=False)
    assert record["pretrain"]["checkpoint"] is None and "random" in record["pretrain"]["source"]
    assert "random weights" in caplog.text


def test_split_is_on_record_disjoint_and_reusable(tmp_path):
    cfg = staged_config(tmp_path)
    record = run_experiment(cfg, run_dir=tmp_path / "a", pm=make_pm(), progress=False)
    split = record["split"]
    ids = {k: [e["id"] for e in split[k]] for k in ("pool", "validation", "heldout")}
    assert len(ids["pool"]) == 8 and len(ids["validation"]) == 4 and len(ids["heldout"]) == 8
    assert not (set(ids["pool"]) & set(ids["validation"])) and not (set(ids["pool"]) & set(ids["heldout"]))
    assert not (set(ids["validation"]) & set(ids["heldout"]))
    assert all("file_name" in e and "group" in e for k in ("pool", "validation", "heldout") for e in split[k])
    assert split["grouping"] == "none: every image its own group" and split["patients"]["pool"] == 8
    on_disk = json.loads((tmp_path / "a" / "run.json").read_text())["split"]
    assert on_disk == split
    # another seed would draw another split; --split-from keeps this one exactly
    other = staged_config(tmp_path, seed=7, **{"data.split_from": str(tmp_path / "a" / "run.json")})
    again = run_experiment(other, run_dir=tmp_path / "b", pm=make_pm(), progress=False)
    assert again["split"] == split
    drawn = run_experiment(staged_config(tmp_path, seed=7), run_dir=tmp_path / "c", pm=make_pm(), progress=False)
    assert drawn["split"] != split


def test_validation_is_carved_from_the_evaluation_images_the_same_for_every_k(tmp_path):
    from megatron.training.prepare import auto_validation_images, split_target_three

    cfg = staged_config(tmp_path, **{"data.datasets": [{"plugin": "blobs", "options": {"images_per_task": 60}}]})
    target = build_taskset(cfg, load_tasks(cfg, make_pm())).target
    splits = {k: split_target_three(target, k, None, 5, seed=3) for k in (10, 20)}
    ids = {k: [[r.image_id for r in t.records] for t in parts] for k, parts in splits.items()}
    assert ids[10][1] == ids[20][1] and ids[10][2] == ids[20][2]  # validation and held-out do not depend on K
    assert set(ids[10][0]) < set(ids[20][0])  # nested pools
    assert auto_validation_images(160) == 20 and auto_validation_images(40) == 10 and auto_validation_images(19) == 0
    with pytest.raises(DataError, match="data.validation_images"):
        split_target_three(target, 10, 6, 6, seed=3)


def test_split_from_refuses_naming_the_missing_ids(tmp_path):
    cfg = staged_config(tmp_path)
    run_experiment(cfg, run_dir=tmp_path / "a", pm=make_pm(), progress=False)
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    record["split"]["heldout"].append({"id": 987654, "file_name": "gone.png"})
    (tmp_path / "a" / "run.json").write_text(json.dumps(record))
    other = staged_config(tmp_path, **{"data.split_from": str(tmp_path / "a" / "run.json")})
    with pytest.raises(DataError, match="987654"):
        run_experiment(other, run_dir=tmp_path / "b", pm=make_pm(), progress=False)


def test_models_are_kept_and_best_follows_validation(tmp_path):
    from megatron.training.model_file import load_model

    cfg = staged_config(tmp_path, **{"training.meta_epochs": 3})
    record = run_experiment(cfg, run_dir=tmp_path / "r", pm=make_pm(), progress=False)
    lrec = record["learners"]["joint_test"]
    val = [e["validation"]["mAP50"] for e in lrec["epochs"]]
    best_epoch = 1 + max(range(len(val)), key=lambda i: (val[i], -i))
    assert lrec["best"]["meta_epoch"] == best_epoch
    assert lrec["best"]["mAP50"] == lrec["epochs"][best_epoch - 1]["metrics"]["mAP50"]
    assert lrec["models"]["best_meta_epoch"] == best_epoch
    for kind in ("final", "best"):
        path = tmp_path / "r" / "models" / f"joint_test-{kind}.pth"
        assert Path(lrec["models"][kind]) == path and path.exists()
        model, info = load_model(path, pm=make_pm())
        assert info.class_names == record["target_categories"]
        assert info.provenance["learner"] == "joint_test"
    _, info = load_model(tmp_path / "r" / "models" / "joint_test-best.pth", pm=make_pm())
    assert info.provenance["meta_epoch"] == best_epoch


def test_episode_draws_are_recorded_and_resume_checks_them(tmp_path):
    cfg = staged_config(tmp_path)
    record = run_experiment(cfg, run_dir=tmp_path / "r", pm=make_pm(), progress=False)
    epochs = record["learners"]["joint_test"]["epochs"]
    hashes = [e["episodes"]["sha256"] for e in epochs]
    assert len(set(hashes)) == len(hashes) and all(len(h) == 64 for h in hashes)
    assert epochs[1]["episodes"]["draws"] > epochs[0]["episodes"]["draws"] > 0
    # the same config draws the same images
    again = run_experiment(cfg, run_dir=tmp_path / "r2", pm=make_pm(), progress=False)
    assert [e["episodes"]["sha256"] for e in again["learners"]["joint_test"]["epochs"]] == hashes
    # a checkpoint that does not belong to the record is refused on resume
    from megatron.atomic_io import atomic_torch_save, safe_torch_load

    ckpt = tmp_path / "r" / "checkpoints" / "joint_test" / "last.pt"
    state = safe_torch_load(ckpt)
    state["finished"] = False
    state["record"]["epochs"] = state["record"]["epochs"][:1]
    atomic_torch_save(state, ckpt)
    with pytest.raises(ConfigError, match="episodes drawn"):
        run_experiment(cfg, run_dir=tmp_path / "r", pm=make_pm(), resume=True, progress=False)


def test_stage_events_follow_the_method(tmp_path):
    stages = Stages()
    cfg = staged_config(tmp_path, **{"output.compare_baseline": True, "learner.name": "joint_test"})
    run_experiment(cfg, run_dir=tmp_path / "r", pm=make_pm(stages), progress=False)
    starts = [s for kind, s, _ in stages.events if kind == "start"]
    assert starts[:3] == ["prepare", "pretrain", "meta_train"]
    assert starts.count("meta_train") == 2 and starts.count("meta_epoch") >= starts.count("adapt") >= 4
    assert [s for kind, s, _ in stages.events if kind == "end"].count("meta_epoch") == starts.count("meta_epoch")
    ends = {(s): info for kind, s, info in stages.events if kind == "end"}
    assert ends["prepare"]["pool"] == 8 and ends["prepare"]["validation"] == 4
    assert ends["pretrain"]["reused"] is False and ends["pretrain"]["checkpoint"]
