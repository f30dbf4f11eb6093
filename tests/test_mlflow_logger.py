"""The mlflow logger against real local MLflow stores (a file store and SQLite), read back with MLflow's own
client: params, metrics per step and per evaluation, artifacts, tags; a resumed run adds no step twice; benchmark
cells nest under one parent run; a store that cannot be opened is an error naming the URI and the reason."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("mlflow")  # the optional extra megatron[mlflow]; the test extras install it
from mlflow.tracking import MlflowClient  # noqa: E402

from megatron import get_plugin_manager  # noqa: E402
from megatron.config import ExperimentConfig  # noqa: E402
from megatron.errors import ConfigError, PluginError  # noqa: E402
from megatron.training.run_loggers import active_loggers, validate_loggers  # noqa: E402
from megatron_plugins.loggers.mlflow import MLflowLogger, MLflowOptions, default_tracking_uri, flatten  # noqa: E402

CONFIG = ExperimentConfig.model_validate({"learner": {"name": "reptile"}, "seed": 3,
                                          "data": {"target": "eit", "sources": ["chest_xray", "brain_mri"]}})
METRICS = {"mAP50": 0.41, "mAP50_95": 0.2, "FROC": 0.55, "per_class_AP50": {"lesion/small": 0.3}}


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one runs MLflow's schema migrations: seconds); each test writes
    to an experiment of its own."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def drive(logger: MLflowLogger, run_dir: Path, steps: range, epochs: range, end: bool = True) -> None:
    """The lifecycle hooks of a run, as the runner calls them: steps (4 per meta-epoch) and evaluations."""
    run_dir.mkdir(parents=True, exist_ok=True)
    logger.megatron_run_start(CONFIG, run_dir)
    for g in steps:
        logger.megatron_meta_step_end("reptile", (g - 1) // 4 + 1, (g - 1) % 4 + 1,
                                      {"loss": 1.0 / g, "global_step": g, "compute_spent": 10.0 * g})
    for e in epochs:
        logger.megatron_stage_end("meta_epoch", {"learner": "reptile", "meta_epoch": e, "train_loss": 0.5 / e})
        logger.megatron_evaluation_end("reptile", e, "heldout", {**METRICS, "mAP50": 0.1 * e})
    if end:
        (run_dir / "run.json").write_text(json.dumps({"status": "complete"}))
        (run_dir / "summary.md").write_text("# summary\n")
        (run_dir / "map50_curve.png").write_bytes(b"\x89PNG")
        (run_dir / "models").mkdir(exist_ok=True)
        (run_dir / "models" / "reptile-best.pth").write_bytes(b"weights")
        (run_dir / "models" / "reptile-final.pth").write_bytes(b"weights")
        logger.megatron_run_end(run_dir, {"status": "complete"})
    logger.close()


def the_run(uri: str, experiment: str = "megatron"):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return client, runs


@pytest.mark.parametrize("store", ["file", "sqlite"])
def test_params_metrics_artifacts_and_tags_are_in_the_store(tmp_path, store, monkeypatch, sqlite_uri):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses its file store without it
    uri = (tmp_path / "mlruns").as_uri() if store == "file" else sqlite_uri
    run_dir = tmp_path / "runs" / "reptile-yolox-seed3"
    options = MLflowOptions(tracking_uri=uri, experiment=f"values-{store}")
    drive(MLflowLogger(options, run_dir), run_dir, range(1, 9), range(1, 3))
    client, runs = the_run(uri, f"values-{store}")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "reptile-yolox-seed3"
    assert run.data.params["training.outer_lr"] == str(CONFIG.training.outer_lr)
    assert run.data.params["data.sources"] == '["chest_xray", "brain_mri"]' and run.data.params["seed"] == "3"
    tags = run.data.tags
    assert tags["learner"] == "reptile" and tags["seed"] == "3" and tags["target"] == "eit"
    assert tags["sources"] == "chest_xray,brain_mri" and tags["datasets"] == "medsynth" and tags["megatron.version"]
    loss = client.get_metric_history(run.info.run_id, "reptile/train/loss")
    assert [(m.step, round(m.value, 6)) for m in loss] == [(g, round(1.0 / g, 6)) for g in range(1, 9)]
    maps = client.get_metric_history(run.info.run_id, "reptile/heldout/mAP50")
    assert sorted((m.step, m.value) for m in maps) == [(1, 0.1), (2, 0.2)]  # the meta-epoch is the step
    assert run.data.metrics["reptile/heldout/FROC"] == 0.55
    assert run.data.metrics["reptile/heldout/AP50/lesion/small"] == 0.3
    assert run.data.metrics["reptile/train/epoch_loss"] == 0.25
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"run.json", "summary.md", "plots", "models"} <= paths
    assert [a.path for a in client.list_artifacts(run.info.run_id, "models")] == ["models/reptile-best.pth"]


def test_a_resumed_run_continues_its_mlflow_run_without_logging_a_step_twice(tmp_path, sqlite_uri):
    options = MLflowOptions(tracking_uri=sqlite_uri, experiment="resume")
    run_dir = tmp_path / "runs" / "r"
    # killed after 6 steps and one evaluation, with its checkpoint at the end of meta-epoch 1 (step 4)
    drive(MLflowLogger(options, run_dir), run_dir, range(1, 7), range(1, 2), end=False)
    client, runs = the_run(sqlite_uri, "resume")
    assert runs[0].info.status == "FAILED"
    # the resumed run replays from step 5 (its checkpoint) and goes on to the end
    drive(MLflowLogger(options, run_dir), run_dir, range(5, 13), range(2, 4))
    client, runs = the_run(sqlite_uri, "resume")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "reptile/train/loss")]
    assert sorted(steps) == list(range(1, 13))
    epochs = [m.step for m in client.get_metric_history(runs[0].info.run_id, "reptile/heldout/mAP50")]
    assert sorted(epochs) == [1, 2, 3]


def test_benchmark_cells_are_nested_runs_of_one_parent_per_grid(tmp_path, sqlite_uri):
    uri = sqlite_uri
    bench = tmp_path / "bench"
    (bench / "cells").mkdir(parents=True)
    (bench / "benchmark.json").write_text(json.dumps({"description": "a test grid", "grid": {"seeds": [0, 1]},
                                                      "budget": 600, "n_cells": 2}))
    for cell in ("reptile__nall__k20__all__s0", "finetune__nall__k20__all__s0"):
        drive(MLflowLogger(MLflowOptions(tracking_uri=uri, experiment="bench"), bench / "cells" / cell),
              bench / "cells" / cell, range(1, 5), range(1, 2))
    client, runs = the_run(uri, "bench")
    parents = [r for r in runs if r.data.tags.get("megatron.kind") == "benchmark"]
    cells = [r for r in runs if r not in parents]
    assert len(parents) == 1 and len(cells) == 2
    assert parents[0].data.params["grid.seeds"] == "[0, 1]" and parents[0].data.params["budget"] == "600"
    assert {r.data.tags["mlflow.parentRunId"] for r in cells} == {parents[0].info.run_id}
    assert not list(bench.glob(".mlflow-parent-*.lock"))
    # a benchmark's default store is beside its cells/ folder
    assert default_tracking_uri(bench / "cells" / "x") == f"sqlite:///{(bench / 'mlruns' / 'mlflow.db').resolve()}"


def test_the_default_store_is_an_mlruns_folder_beside_the_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's own artifact default would be ./mlruns here
    run_dir = tmp_path / "runs" / "r"
    drive(MLflowLogger(None, run_dir), run_dir, range(1, 3), range(1, 2))
    client, runs = the_run(f"sqlite:///{tmp_path / 'runs' / 'mlruns' / 'mlflow.db'}")
    assert len(runs) == 1
    assert list((tmp_path / "runs" / "mlruns" / "artifacts").rglob("summary.md"))
    assert not (tmp_path / "mlruns").exists()


def test_a_tracking_uri_that_cannot_be_opened_names_the_uri_and_the_reason(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    uri = f"sqlite:///{blocker / 'sub' / 'mlflow.db'}"
    with pytest.raises(PluginError) as err:
        MLflowLogger(MLflowOptions(tracking_uri=uri), tmp_path / "r")
    assert uri in str(err.value) and "cannot open" in str(err.value)
    with pytest.raises(PluginError, match="cannot open the tracking URI 'nosuchscheme://x'"):
        MLflowLogger(MLflowOptions(tracking_uri="nosuchscheme://x"), tmp_path / "r")
    # MLflow 3's refusal of its file store reaches the user whole, with its opt-out
    with pytest.raises(PluginError, match="MLFLOW_ALLOW_FILE_STORE"):
        MLflowLogger(MLflowOptions(tracking_uri=(tmp_path / "mlruns").as_uri()), tmp_path / "r")


def test_the_logger_is_switched_on_by_name_and_checks_its_options(tmp_path, sqlite_uri):
    pm = get_plugin_manager(autoload=False)
    cfg = ExperimentConfig.model_validate({**CONFIG.model_dump(), "loggers": [
        {"name": "mlflow", "options": {"experiment": "x", "tracking_uri": sqlite_uri}}]})
    with active_loggers(cfg, pm, tmp_path / "run") as loggers:
        assert isinstance(loggers[0], MLflowLogger) and loggers[0].options.experiment == "x"
    bad = ExperimentConfig.model_validate({**CONFIG.model_dump(), "loggers": [{"name": "mlflow", "options": {"uri": "x"}}]})
    with pytest.raises(ConfigError, match="loggers.0.options"):
        validate_loggers(bad, pm)


def test_params_are_the_config_flattened_to_dotted_keys():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}


TINY_RUN = [
    "run", "--learner", "reptile", "--detector", "tiny", "--meta-epochs", "2", "--no-baseline", "--no-pretrain",
    "--no-progress", "--logger", "mlflow",
    "--set", "data.datasets=[{plugin: blobs, options: {images_per_task: 16}}]", "--set", "data.target=target",
    "--set", "data.shots=6", "--set", "data.eval_images=8", "--set", "data.validation_images=2",
    "--set", "data.input_size=64",
    "--set", "training.finetune_epochs=1", "--set", "training.steps_per_epoch=2", "--set", "output.plots=false",
]


@pytest.mark.slow  # a whole tiny `megatron run` (about 30 s on a shared 2-core machine)
def test_a_megatron_run_with_logger_mlflow_lands_in_the_default_store(tiny_plugins, tmp_path, monkeypatch):
    from megatron.cli import main

    monkeypatch.chdir(tmp_path)
    assert main([*TINY_RUN, "--out", str(tmp_path / "runs")]) == 0
    record = json.loads((tmp_path / "runs" / "reptile-tiny-seed0" / "run.json").read_text())
    client, runs = the_run(f"sqlite:///{tmp_path / 'runs' / 'mlruns' / 'mlflow.db'}")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.tags["detector"] == "tiny" and run.data.tags["datasets"] == "blobs"
    maps = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "reptile/heldout/mAP50"))
    assert maps == [(e["meta_epoch"], e["metrics"]["mAP50"]) for e in record["learners"]["reptile"]["epochs"]]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "reptile/train/loss")]
    assert sorted(steps) == list(range(1, record["learners"]["reptile"]["steps_done"] + 1))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"run.json", "summary.md", "config.yaml", "models"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "models")] == ["models/reptile-best.pth"]


def test_one_process_at_a_time_creates_a_new_store_or_a_grid_s_parent_run(tmp_path):
    import threading
    import time

    from megatron_plugins.loggers.mlflow import exclusive

    inside, overlaps = [], []

    def work():
        with exclusive(tmp_path / "x.lock"):
            if inside:
                overlaps.append(1)
            inside.append(1)
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlaps and not (tmp_path / "x.lock").exists()
    (tmp_path / "stale.lock").write_text("")  # its holder died
    with exclusive(tmp_path / "stale.lock", wait_s=0.3):
        pass
