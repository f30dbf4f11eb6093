"""Configurable lifecycle plugins: the `loggers:` config section, `--logger`, the built-in tensorboard and csv
loggers, third-party loggers with their own options."""
from __future__ import annotations

import csv
import sys
import types
from pathlib import Path

import pytest
from pydantic import Field

import learners_for_tests  # noqa: E402
import tiny_detector  # noqa: E402

import megatron  # noqa: E402
from megatron import hookimpl  # noqa: E402
from megatron.cli import main  # noqa: E402
from megatron.config import load_config  # noqa: E402
from megatron.errors import ConfigError, PluginError  # noqa: E402
from megatron.api.logger import Logger, LoggerOptions  # noqa: E402
from megatron.training.run_loggers import active_loggers, validate_loggers, with_cli_loggers  # noqa: E402

TESTS = Path(__file__).resolve().parent


class JsonLinesOptions(LoggerOptions):
    file: str = Field("events.jsonl", description="file under the run directory")
    every: int = Field(1, ge=1, description="log every n-th outer step")


class JsonLinesLogger(Logger):
    """A third-party logger, written as the logger contract says."""

    PLUGIN_NAME = "jsonl"
    Options = JsonLinesOptions
    closed: list[str] = []

    def __init__(self, options, run_dir):
        super().__init__(options, run_dir)
        self.lines: list[tuple] = []

    @hookimpl
    def megatron_meta_step_end(self, learner, meta_epoch, step, stats):
        if step % self.options.every == 0:
            self.lines.append((learner, meta_epoch, step, stats["loss"]))

    def close(self):
        JsonLinesLogger.closed.append(self.options.file)


def jsonl_plugin() -> types.ModuleType:
    mod = types.ModuleType("megatron_jsonl")
    mod.megatron_register_loggers = hookimpl(lambda: [JsonLinesLogger])
    return mod


def step(pm, learner="reptile", meta_epoch=1, n=1, **stats):
    pm.hook.megatron_meta_step_end(learner=learner, meta_epoch=meta_epoch, step=n,
                                   stats={"loss": 1.0 / n, "global_step": n, "compute_spent": 16 * n, **stats})


# --- config ------------------------------------------------------------------------------------------------
def test_loggers_section_takes_names_or_name_and_options():
    cfg = load_config(None, {"loggers": ["csv", {"name": "tensorboard", "options": {"flush_secs": 5}}]})
    assert [(s.name, s.options) for s in cfg.loggers] == [("csv", {}), ("tensorboard", {"flush_secs": 5})]
    assert load_config(None, {}).loggers == []  # nothing is on by default
    with pytest.raises(ConfigError, match="loggers.0.nme"):
        load_config(None, {"loggers": [{"nme": "csv"}]})


def test_logger_options_are_validated_with_key_paths_and_unknown_names_list_the_known():
    pm = megatron.get_plugin_manager(autoload=False)
    cfg = load_config(None, {"loggers": ["csv", {"name": "tensorboard", "options": {"flush_secs": 0, "flush": 3}}]})
    msg = str(pytest.raises(ConfigError, validate_loggers, cfg, pm).value)
    assert "loggers.1.options.flush_secs" in msg and "loggers.1.options.flush" in msg
    assert "valid: subdir, flush_secs, per_class, log_config" in msg
    cfg = load_config(None, {"loggers": ["tensorbored"]})
    msg = str(pytest.raises(ConfigError, validate_loggers, cfg, pm).value)
    assert "loggers.0.name" in msg and "tensorbored" in msg and "csv, mlflow, tensorboard" in msg


def test_cli_logger_names_are_appended_once_and_keep_configured_options():
    cfg = load_config(None, {"loggers": [{"name": "csv", "options": {"per_class": True}}]})
    out = with_cli_loggers(cfg, ["tensorboard", "csv", "tensorboard"])
    assert [(s.name, s.options) for s in out.loggers] == [("csv", {"per_class": True}), ("tensorboard", {})]
    assert with_cli_loggers(cfg, None) is cfg


def test_run_benchmark_and_pretrain_accept_logger():
    parser = megatron.cli.build_parser()
    for argv in (["run", "--logger", "csv", "--logger", "tensorboard"],
                 ["benchmark", "--logger", "csv", "--logger", "tensorboard"],
                 ["pretrain", "--out", "x.pt", "--logger", "csv", "--logger", "tensorboard"]):
        assert parser.parse_args(argv).logger == ["csv", "tensorboard"]


def test_benchmark_with_an_unknown_logger_stops_before_any_cell(tmp_path, capsys):
    code = main(["benchmark", "--out", str(tmp_path / "b"), "--learners", "reptile", "--seeds", "0", "--dry-run",
                 "--logger", "tensorbored"])
    assert code == 2
    err = capsys.readouterr().err
    assert "tensorbored" in err and "csv, mlflow, tensorboard" in " ".join(err.split())
    assert not (tmp_path / "b").exists()


# --- the run's loggers: switched on, registered, unregistered, closed --------------------------------------------
def test_active_loggers_register_for_the_run_only_and_close_even_on_error(tmp_path):
    pm = megatron.get_plugin_manager(autoload=False, extra=[("megatron_jsonl", jsonl_plugin())])
    cfg = load_config(None, {"loggers": [{"name": "jsonl", "options": {"every": 2, "file": "a.jsonl"}}]})
    JsonLinesLogger.closed = []
    with active_loggers(cfg, pm, tmp_path) as (logger,):
        assert isinstance(logger, JsonLinesLogger) and logger.run_dir == tmp_path and logger.options.every == 2
        for n in range(1, 5):
            step(pm, n=n)
        assert [line[2] for line in logger.lines] == [2, 4]  # its own option at work
    assert JsonLinesLogger.closed == ["a.jsonl"]
    assert not [n for n, _ in pm.list_name_plugin() if n.startswith("loggers.")]
    step(pm, n=6)  # no longer registered: nothing arrives
    assert [line[2] for line in logger.lines] == [2, 4]
    with pytest.raises(RuntimeError, match="boom"):
        with active_loggers(cfg, pm, tmp_path):
            raise RuntimeError("boom")
    assert JsonLinesLogger.closed == ["a.jsonl", "a.jsonl"]
    assert not [n for n, _ in pm.list_name_plugin() if n.startswith("loggers.")]


def test_other_ranks_validate_but_start_nothing(tmp_path):
    pm = megatron.get_plugin_manager(autoload=False)
    with active_loggers(load_config(None, {"loggers": ["csv"]}), pm, tmp_path, enabled=False) as loggers:
        assert loggers == []
        step(pm)
    assert not (tmp_path / "csv").exists()
    with pytest.raises(ConfigError, match="loggers.0.options.subdri"):
        with active_loggers(load_config(None, {"loggers": [{"name": "csv", "options": {"subdri": "x"}}]}), pm,
                            tmp_path, enabled=False):
            pass


def test_a_logger_with_a_misspelt_hook_argument_fails_loudly(tmp_path):
    class Misspelt(Logger):
        PLUGIN_NAME = "misspelt"

        @hookimpl
        def megatron_evaluation_end(self, learner, meta_epoch, split, metric):
            pass

    mod = types.ModuleType("misspelt_mod")
    mod.megatron_register_loggers = hookimpl(lambda: [Misspelt])
    pm = megatron.get_plugin_manager(autoload=False, extra=[("misspelt_mod", mod)])
    with pytest.raises(PluginError, match="'misspelt'.*misspelt_mod.*metric"):
        with active_loggers(load_config(None, {"loggers": ["misspelt"]}), pm, tmp_path):
            pass
    assert not [n for n, _ in pm.list_name_plugin() if n.startswith("loggers.")]


# --- the built-in loggers ------------------------------------------------------------------------------------
METRICS = {"mAP50": 0.5, "mAP50_95": 0.25, "precision": 0.6, "recall": 0.4, "F1": 0.48, "tp": 2, "fp": 1, "fn": 3,
           "per_class_AP50": {"nodule": 0.7, "mass": 0.3}, "classes_without_gt": [], "score_threshold": 0.3}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_csv_logger_writes_a_row_per_step_and_per_evaluation(tmp_path):
    pm = megatron.get_plugin_manager(autoload=False)
    cfg = load_config(None, {"loggers": [{"name": "csv", "options": {"per_class": True}}]})
    with active_loggers(cfg, pm, tmp_path):
        for n in (1, 2):
            step(pm, n=n)
        step(pm, learner="maml", n=1, support_loss=0.5)  # a new column widens the file
        pm.hook.megatron_evaluation_end(learner="reptile", meta_epoch=1, split="heldout", metrics=METRICS)
    steps = read_csv(tmp_path / "csv" / "steps.csv")
    assert [(r["learner"], r["global_step"], r["compute_spent"]) for r in steps] == [
        ("reptile", "1", "16"), ("reptile", "2", "32"), ("maml", "1", "16")]
    assert float(steps[1]["loss"]) == 0.5 and steps[0]["support_loss"] == "" and steps[2]["support_loss"] == "0.5"
    (ev,) = read_csv(tmp_path / "csv" / "evaluations.csv")
    assert (ev["learner"], ev["meta_epoch"], ev["split"], ev["mAP50"], ev["tp"]) == ("reptile", "1", "heldout", "0.5", "2")
    assert ev["AP50/nodule"] == "0.7" and "classes_without_gt" not in ev


def test_csv_logger_after_a_resume_logs_each_step_once(tmp_path):
    pm = megatron.get_plugin_manager(autoload=False)
    cfg = load_config(None, {"loggers": ["csv"]})
    with active_loggers(cfg, pm, tmp_path):  # killed in meta-epoch 2 after step 3; checkpoint after step 2
        for n in (1, 2):
            step(pm, meta_epoch=1, n=n)
        pm.hook.megatron_evaluation_end(learner="reptile", meta_epoch=1, split="heldout", metrics=METRICS)
        step(pm, meta_epoch=2, n=3)
    with active_loggers(cfg, pm, tmp_path):  # resumed: meta-epoch 2 again
        for n in (3, 4):
            step(pm, meta_epoch=2, n=n)
        pm.hook.megatron_evaluation_end(learner="reptile", meta_epoch=2, split="heldout", metrics=METRICS)
    assert [r["global_step"] for r in read_csv(tmp_path / "csv" / "steps.csv")] == ["1", "2", "3", "4"]
    assert [r["meta_epoch"] for r in read_csv(tmp_path / "csv" / "evaluations.csv")] == ["1", "2"]


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_logger_writes_steps_evaluations_curve_and_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pm = megatron.get_plugin_manager(autoload=False)
    cfg = load_config(None, {"loggers": ["tensorboard"], "seed": 7})
    with active_loggers(cfg, pm, tmp_path):
        pm.hook.megatron_run_start(config=cfg, run_dir=tmp_path)
        for e, learner in ((1, "reptile"), (2, "reptile"), (1, "finetune")):
            step(pm, learner=learner, meta_epoch=e, n=e)
            pm.hook.megatron_evaluation_end(learner=learner, meta_epoch=e, split="heldout",
                                            metrics={**METRICS, "mAP50": 0.1 * e})
    root = tmp_path / "tensorboard"
    train = scalars(root / "reptile" / "train")
    assert train["train/loss"] == [(1, 1.0), (2, 0.5)] and train["train/compute_spent"] == [(1, 16.0), (2, 32.0)]
    ev = scalars(root / "reptile" / "eval")
    assert [(s, round(v, 6)) for s, v in ev["heldout/mAP50"]] == [(1, 0.1), (2, 0.2)]  # the curve, x = meta-epoch
    assert ev["heldout/AP50/nodule"][0][1] == pytest.approx(0.7) and "heldout/tp" in ev
    assert "heldout/classes_without_gt" not in ev
    assert scalars(root / "finetune" / "eval")["heldout/mAP50"][0][0] == 1  # the baseline's curve beside it
    acc = EventAccumulator(str(root / "reptile" / "train"))
    acc.Reload()
    (config_tag,) = [t for t in acc.Tags()["tensors"] if t.startswith("config")]
    assert "seed: 7" in acc.Tensors(config_tag)[0].tensor_proto.string_val[0].decode()


def test_tensorboard_logger_after_a_resume_shows_each_step_once(tmp_path):
    pm = megatron.get_plugin_manager(autoload=False)
    cfg = load_config(None, {"loggers": ["tensorboard"]})
    with active_loggers(cfg, pm, tmp_path):
        for n in (1, 2, 3):
            step(pm, n=n)
    with active_loggers(cfg, pm, tmp_path):
        for n in (3, 4):
            step(pm, n=n, loss_extra=float(n))
    train = scalars(tmp_path / "tensorboard" / "reptile" / "train")
    assert [s for s, _ in train["train/loss"]] == [1, 2, 3, 4]


# --- through the commands --------------------------------------------------------------------------------------
def test_pretrain_logs_its_loss_per_step_to_the_loggers(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("MEGATRON_PLUGINS", "tiny_detector")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("data:\n  datasets: [{plugin: blobs, options: {images_per_task: 4}}]\n  target: target\n"
                   "  input_size: 64\ndetector: {name: tiny}\n")
    out = tmp_path / "ckpt" / "tiny.pt"
    assert main(["pretrain", "-c", str(cfg), "--out", str(out), "--epochs", "1", "--max-steps", "3",
                 "--no-progress", "--logger", "csv"]) == 0, capsys.readouterr().err
    rows = read_csv(tmp_path / "ckpt" / "tiny-logs" / "csv" / "pretrain.csv")
    assert [r["step"] for r in rows] == ["1", "2", "3"] and all(float(r["loss"]) > 0 for r in rows)


def tiny_run_config(tmp_path: Path, **overrides):
    base = {
        "data.datasets": [{"plugin": "blobs", "options": {"images_per_task": 12}}], "data.target": "target",
        "data.shots": 4, "data.eval_images": 4, "data.input_size": 64, "detector.name": "tiny",
        "learner.name": "joint_test", "training.meta_epochs": 2, "training.steps_per_epoch": 2,
        "training.finetune_epochs": 1, "training.pretrain_epochs": 0, "output.dir": str(tmp_path / "runs"),
        "output.compare_baseline": False, "output.plots": False, "output.save_models": False,
    }
    base.update(overrides)
    return load_config(None, base)


def test_a_run_with_loggers_writes_tensorboard_and_csv_under_its_run_directory(tmp_path):
    """Needs the runner to switch the loggers on (``megatron.api.logger.active_loggers`` around the run)."""
    from megatron.training.runner import run_experiment

    pm = megatron.get_plugin_manager(autoload=False, extra=[("tiny_detector", tiny_detector),
                                                            ("learners_for_tests", learners_for_tests),
                                                            ("megatron_jsonl", jsonl_plugin())])
    cfg = tiny_run_config(tmp_path, loggers=["csv", "tensorboard", {"name": "jsonl", "options": {"file": "x"}}])
    JsonLinesLogger.closed = []
    record = run_experiment(cfg, run_dir=tmp_path / "r", pm=pm, progress=False)
    steps = read_csv(tmp_path / "r" / "csv" / "steps.csv")
    assert len(steps) == record["learners"]["joint_test"]["steps_done"] == 4
    assert [r["meta_epoch"] for r in read_csv(tmp_path / "r" / "csv" / "evaluations.csv")] == ["1", "2"]
    assert len(scalars(tmp_path / "r" / "tensorboard" / "joint_test" / "train")["train/loss"]) == 4
    assert JsonLinesLogger.closed == ["x"]  # the third-party logger got its options and was closed
    assert not [n for n, _ in pm.list_name_plugin() if n.startswith("loggers.")]
    used = {(p["kind"], p["name"]): p for p in record["versions"]["plugins"]}
    assert used[("logger", "jsonl")]["plugin"] == "megatron_jsonl"
    assert used[("logger", "tensorboard")]["package"] == "megatron"
    assert used[("learner", "joint_test")]["plugin"] == "learners_for_tests"
    assert used[("detector", "tiny")]["plugin"] == "tiny_detector" and ("dataset", "blobs") in used
