"""The runner: meta-epochs, equal compute, exact resume, NaN stop, hooks, run directory (tiny detector)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import learners_for_tests  # noqa: E402
import tiny_detector  # noqa: E402
from tiny_run import KillAt, make_pm, tiny_config  # noqa: E402

import megatron  # noqa: E402
from megatron import hookimpl  # noqa: E402
from megatron.atomic_io import safe_torch_load  # noqa: E402
from megatron.config import load_config  # noqa: E402
from megatron.errors import ConfigError, PluginError, TrainingError  # noqa: E402
from megatron.runtime.environment import derive_seed  # noqa: E402
from megatron.training.meta_train import steps_per_source_epoch  # noqa: E402
from megatron.training.runner import run_experiment  # noqa: E402



class Recorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    def megatron_run_start(self, config, run_dir):
        self.calls.append(("run_start", config.learner.name, Path(run_dir)))

    @hookimpl
    def megatron_meta_step_end(self, learner, meta_epoch, step, stats):
        self.calls.append(("step", learner, meta_epoch, step, stats["loss"]))

    @hookimpl
    def megatron_evaluation_end(self, learner, meta_epoch, metrics):
        self.calls.append(("eval", learner, meta_epoch, metrics["mAP50"]))

    @hookimpl
    def megatron_run_end(self, run_dir, record):
        self.calls.append(("run_end", record["status"]))


class Broken:
    @hookimpl
    def megatron_evaluation_end(self, learner, meta_epoch, metrics):
        raise ValueError("logger backend unreachable")


def epoch_numbers(record, name):
    return [(e["meta_epoch"], e["compute"], e["metrics"], e["train_loss"], e["episodes"])
            for e in record["learners"][name]["epochs"]]


def test_resume_after_kill_ends_with_exactly_the_uninterrupted_metrics(tmp_path):
    cfg = tiny_config(tmp_path, **{"training.finetune_epochs": 3})  # enough for a non-zero mAP50
    full = run_experiment(cfg, run_dir=tmp_path / "full", pm=make_pm(), progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, run_dir=tmp_path / "killed", pm=make_pm(KillAt(2, 2)), progress=False)
    partial = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert partial["status"] == "interrupted"  # a Ctrl-C is recorded (a SIGKILL leaves "running")
    assert len(partial["learners"]["joint_test"]["epochs"]) == 1  # epoch 1 checkpointed, epoch 2 lost
    resumed = run_experiment(cfg, run_dir=tmp_path / "killed", pm=make_pm(), resume=True, progress=False)
    assert resumed["status"] == "complete"
    assert epoch_numbers(resumed, "joint_test") == epoch_numbers(full, "joint_test")
    assert resumed["learners"]["joint_test"]["final"] == full["learners"]["joint_test"]["final"]
    assert full["learners"]["joint_test"]["final"]["mAP50"] > 0  # the numbers compared are real


@pytest.mark.parametrize("learner", ["reptile", "incremental"])
def test_resume_is_exact_for_builtin_learners_with_state(learner, tmp_path):
    """Reptile (annealed step size) and incremental (task phases, optimiser resets) keep state across epochs."""
    cfg = tiny_config(tmp_path, **{"learner.name": learner, "training.steps_per_epoch": 2})
    full = run_experiment(cfg, run_dir=tmp_path / "full", pm=make_pm(), progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, run_dir=tmp_path / "killed", pm=make_pm(KillAt(2, 2)), progress=False)
    resumed = run_experiment(cfg, run_dir=tmp_path / "killed", pm=make_pm(), resume=True, progress=False)
    assert epoch_numbers(resumed, learner) == epoch_numbers(full, learner)


def test_resume_refuses_a_changed_config(tmp_path):
    cfg = tiny_config(tmp_path, **{"training.meta_epochs": 1})
    run_experiment(cfg, run_dir=tmp_path / "r", pm=make_pm(), progress=False)
    changed = tiny_config(tmp_path, **{"training.meta_epochs": 1, "training.outer_lr": 0.5})
    with pytest.raises(ConfigError, match="training.outer_lr"):
        run_experiment(changed, run_dir=tmp_path / "r", pm=make_pm(), resume=True, progress=False)


def test_nan_loss_stops_with_training_error_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path)
    steps = steps_per_source_epoch(cfg, [t for t in _blob_tasks() if t.name != "target"])
    # loss calls in epoch 1: 2 per episode x 2 episodes per step, plus the fine-tuning batches (8 / 8 = 1)
    good_calls = steps * 4 + 1
    cfg = tiny_config(tmp_path, **{"detector.options": {"nan_after_steps": good_calls + 3}})
    with pytest.raises(TrainingError, match="not finite|became nan"):
        run_experiment(cfg, run_dir=tmp_path / "nan", pm=make_pm(), progress=False)
    record = json.loads((tmp_path / "nan" / "run.json").read_text())
    assert record["status"] == "failed" and "joint_test" in record["error"]
    ckpt = safe_torch_load(tmp_path / "nan" / "checkpoints" / "joint_test" / "last.pt")
    assert ckpt["meta_epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["detector"].values())


def _blob_tasks():
    return tiny_detector.BlobsDataset(tiny_detector.BlobsOptions(images_per_task=16)).load()


def test_lifecycle_hooks_fire_in_order(tmp_path):
    learners_for_tests.JointTestLearner.progress_seen = []
    rec = Recorder()
    cfg = tiny_config(tmp_path, **{"training.meta_epochs": 2})
    record = run_experiment(cfg, run_dir=tmp_path / "h", pm=make_pm(rec), progress=False)
    kinds = [c[0] for c in rec.calls]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    assert rec.calls[0][2] == tmp_path / "h" and rec.calls[-1][1] == "complete"
    steps = record["learners"]["joint_test"]["steps_done"]
    assert kinds.count("step") == steps and kinds.count("eval") == 2
    evals = [c for c in rec.calls if c[0] == "eval"]
    assert [e[3] for e in evals] == [e["metrics"]["mAP50"] for e in record["learners"]["joint_test"]["epochs"]]
    progress = learners_for_tests.JointTestLearner.progress_seen
    assert len(progress) == steps and progress[0] == 0.0 and progress == sorted(progress) and progress[-1] < 1.0
    first_eval = kinds.index("eval")
    assert kinds[1:first_eval] == ["step"] * (steps // 2)  # epoch 1's steps come before its evaluation


def test_a_raising_hook_is_reported_with_the_plugin_name(tmp_path):
    with pytest.raises(PluginError, match="'Broken'.*megatron_evaluation_end.*logger backend unreachable"):
        run_experiment(tiny_config(tmp_path, **{"training.meta_epochs": 1}), run_dir=tmp_path / "b",
                       pm=make_pm(Broken()), progress=False)


def test_baseline_gets_exactly_the_compute_the_learner_spent(tmp_path):
    cfg = tiny_config(tmp_path, **{"training.meta_epochs": 2})
    record = run_experiment(cfg, run_dir=tmp_path / "m", pm=make_pm(), progress=False,
                            learners=["joint_test", "joint_test_half"])
    first, second = record["learners"]["joint_test"], record["learners"]["joint_test_half"]
    budget = first["compute"]["spent"]
    assert first["stopped_by"] == "epochs" and second["stopped_by"] == "budget"
    assert second["compute"]["budget"] == budget
    assert second["compute"]["spent"] <= budget
    # it spends half as much per step, so it keeps going: more meta-epochs, and within one step of the budget
    assert len(second["epochs"]) > len(first["epochs"])
    assert budget - second["compute"]["spent"] <= 2 * 2 * 4 + 2 * 8
    assert "matched" in second["budget"] and "joint_test" in record["comparison"]["how"]


def test_explicit_budget_stops_every_learner(tmp_path):
    cfg = tiny_config(tmp_path, **{"training.compute_budget": 150, "training.meta_epochs": 2})
    record = run_experiment(cfg, run_dir=tmp_path / "b", pm=make_pm(), progress=False,
                            learners=["joint_test", "joint_test_half"])
    for lrec in record["learners"].values():
        assert lrec["stopped_by"] == "budget"
        assert lrec["compute"]["spent"] <= 150
        assert lrec["epochs"]  # always at least one evaluation
    assert "150" in record["comparison"]["how"]


def test_record_run_directory_and_plots(tmp_path):
    cfg = tiny_config(tmp_path, **{"training.meta_epochs": 1, "output.plots": True})
    record = run_experiment(cfg, pm=make_pm(), progress=False, learners=["joint_test", "joint_test_half"])
    run_dir = tmp_path / "runs" / "joint_test-tiny-seed0"
    assert Path(record["run_dir"]) == run_dir
    on_disk = json.loads((run_dir / "run.json").read_text())
    assert on_disk["status"] == "complete" and on_disk["learners"].keys() == {"joint_test", "joint_test_half"}
    assert on_disk["versions"]["torch"] == torch.__version__.split("+")[0] or on_disk["versions"]["torch"]
    assert on_disk["target"] == "target" and on_disk["sources"] == ["alpha", "beta", "gamma"]
    assert on_disk["shots"] == 8 and on_disk["eval_images"] == 8
    lrec = on_disk["learners"]["joint_test"]
    assert lrec["baseline_equivalent_epochs"] == pytest.approx(1 * (1 + 1))
    assert set(lrec["final"]) >= {"mAP50", "mAP50_95", "precision", "recall", "F1", "per_class_AP50"}
    assert (run_dir / "config.yaml").read_text().startswith("data:")
    assert (run_dir / "map50_curve.png").stat().st_size > 10_000
    assert "joint_test_half" in (run_dir / "summary.md").read_text()
    # a second fresh run never overwrites the first
    again = run_experiment(cfg, pm=make_pm(), progress=False, learners=["joint_test"])
    assert Path(again["run_dir"]) == run_dir.parent / "joint_test-tiny-seed0-2"


def test_learners_start_from_the_same_weights_and_see_the_same_split(tmp_path):
    # a budget that is never reached, so both learners run exactly max_meta_epochs
    cfg = tiny_config(tmp_path, **{"training.compute_budget": 10**9, "training.max_meta_epochs": 1})
    a = run_experiment(cfg, run_dir=tmp_path / "a", pm=make_pm(), progress=False, learners=["joint_test"])
    b = run_experiment(cfg, run_dir=tmp_path / "b", pm=make_pm(), progress=False,
                       learners=["joint_test_half", "joint_test"])
    # the same learner gives the same numbers whether it runs first or second in a run
    assert epoch_numbers(a, "joint_test") == epoch_numbers(b, "joint_test")
    assert b["learners"]["joint_test"]["stopped_by"] == "epoch_cap"


def test_head_is_resized_for_a_target_with_other_classes(tmp_path):
    cfg = tiny_config(tmp_path, **{
        "data.datasets": [{"plugin": "blobs", "options": {"tasks": ["alpha", "beta"], "images_per_task": 16}},
                          {"plugin": "blobs", "options": {"tasks": ["target"], "classes": 1, "images_per_task": 16}}],
        "training.meta_epochs": 1,
    })
    record = run_experiment(cfg, run_dir=tmp_path / "h", pm=make_pm(), progress=False)
    assert record["head_classes"] == 2
    assert list(record["learners"]["joint_test"]["final"]["per_class_AP50"]) == ["square"]


def test_select_sources_meta_trains_on_the_closest(tmp_path):
    pm = make_pm()
    if "wasserstein" not in pm.registers["similarity"]:
        pytest.skip("the wasserstein similarity plugin is not installed")
    cfg = tiny_config(tmp_path, **{"training.meta_epochs": 1, "similarity.select_sources": 1,
                                   "similarity.metric": "wasserstein", "similarity.sample_size": 8})
    record = run_experiment(cfg, run_dir=tmp_path / "s", pm=pm, progress=False)
    sel = record["selection"]
    assert sel["metric"] == "wasserstein" and sel["k"] == 1
    # blob tasks differ by background level; gamma's is the closest to the target's
    assert sel["chosen"] == ["gamma"] == record["sources"]
    assert sel["distances"]["gamma"] < sel["distances"]["beta"] < sel["distances"]["alpha"]
    assert "closest" in sel["reason"]


def test_bf16_autocast_on_cpu_and_fp16_fallback(tmp_path):
    cfg = tiny_config(tmp_path, **{"training.meta_epochs": 1, "training.amp": "bf16"})
    record = run_experiment(cfg, run_dir=tmp_path / "bf16", pm=make_pm(), progress=False)
    assert record["learners"]["joint_test"]["epochs"][0]["train_loss"] > 0
    cfg16 = tiny_config(tmp_path, **{"training.meta_epochs": 1, "training.amp": "fp16", "training.device": "cpu"})
    with pytest.warns(UserWarning, match="fp16 needs a CUDA device"):
        run_experiment(cfg16, run_dir=tmp_path / "fp16", pm=make_pm(), progress=False)


def test_unknown_device_and_learner_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown learner 'nope'"):
        run_experiment(tiny_config(tmp_path), pm=make_pm(), progress=False, learners=["nope"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            run_experiment(tiny_config(tmp_path, **{"training.device": "cuda"}), pm=make_pm(), progress=False)


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(0, "episodes") == derive_seed(0, "episodes")
    assert len({derive_seed(0, "episodes"), derive_seed(0, "init"), derive_seed(1, "episodes")}) == 3


def test_runs_start_from_detector_checkpoint(tmp_path):
    from megatron.training.weights import save_detector_checkpoint

    torch.manual_seed(123)
    pretrained = tiny_detector.TinyDetector(3, 64)  # another class count: only the classifier is re-initialised
    save_detector_checkpoint(pretrained, tmp_path / "pre.pt")
    cfg = tiny_config(tmp_path, **{"training.meta_epochs": 1, "detector.checkpoint": str(tmp_path / "pre.pt")})
    from_ckpt = run_experiment(cfg, run_dir=tmp_path / "c", pm=make_pm(), progress=False)
    ckpt = safe_torch_load(tmp_path / "c" / "checkpoints" / "joint_test" / "last.pt")
    plain = run_experiment(tiny_config(tmp_path, **{"training.meta_epochs": 1}), run_dir=tmp_path / "p",
                           pm=make_pm(), progress=False)
    assert from_ckpt["learners"]["joint_test"]["epochs"][0]["train_loss"] != \
        plain["learners"]["joint_test"]["epochs"][0]["train_loss"]
    assert ckpt["detector"]["head.cls.weight"].shape[0] == 2
    with pytest.raises(megatron.errors.MegatronError, match="missing.pt"):
        run_experiment(tiny_config(tmp_path, **{"detector.checkpoint": str(tmp_path / "missing.pt")}),
                       run_dir=tmp_path / "w", pm=make_pm(), progress=False)


def test_every_learner_fine_tunes_from_the_same_new_target_head_at_each_meta_epoch(tmp_path, monkeypatch):
    # the target's classifier is re-initialised for its classes before fine-tuning; drawn from the global RNG,
    # it differed between learners (each had advanced the stream by its own source training), adding noise
    # that pairing by seed cannot remove
    import tiny_detector

    heads = []
    original = tiny_detector.TinyDetector.set_num_classes

    def recording(self, num_classes):
        original(self, num_classes)
        heads.append(self.head["cls"].weight.detach().clone())

    class RandomOps:  # a learner whose steps draw from torch's global RNG (dropout, samplers) as the real ones do
        @hookimpl
        def megatron_meta_step_end(self, learner, meta_epoch, step, stats):
            if "half" in str(learner):
                torch.rand(3)

    monkeypatch.setattr(tiny_detector.TinyDetector, "set_num_classes", recording)
    one_class_sources = {"plugin": "blobs", "options": {"images_per_task": 16, "classes": 1,
                                                        "tasks": ["alpha", "beta", "gamma"]}}
    two_class_target = {"plugin": "blobs", "options": {"images_per_task": 16, "classes": 2, "tasks": ["target"]}}
    cfg = tiny_config(tmp_path, **{"training.meta_epochs": 2,
                                   "data.datasets": [one_class_sources, two_class_target]})
    run_experiment(cfg, run_dir=tmp_path / "h", pm=make_pm(RandomOps()), progress=False,
                   learners=["joint_test", "joint_test_half"])
    # the first learner's two meta-epochs, then the second's (at half the cost per step it runs more of them)
    assert len(heads) > 4
    first_learner, second_learner = heads[:2], heads[2:]
    for e in range(2):
        assert torch.equal(first_learner[e], second_learner[e])  # the same head at the same meta-epoch
    assert not torch.equal(first_learner[0], first_learner[1])  # a fresh draw each meta-epoch
