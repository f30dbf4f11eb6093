"""``megatron run`` through the CLI main function: every built-in learner end to end, and the main job."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import tiny_detector  # noqa: E402

import megatron  # noqa: E402
from megatron.cli import main  # noqa: E402

BUILTIN_LEARNERS = ["maml", "reptile", "anil", "proto", "finetune", "incremental"]


TINY_ARGS = [
    "--detector", "tiny", "--no-progress", "--meta-epochs", "1",
    "--set", "data.datasets=[{plugin: blobs, options: {images_per_task: 16}}]", "--set", "data.target=target",
    "--set", "data.shots=6", "--set", "data.eval_images=6", "--set", "data.input_size=64",
    "--set", "training.finetune_epochs=1", "--set", "training.steps_per_epoch=2",
    "--set", "output.plots=false",
]


@pytest.mark.parametrize("learner", BUILTIN_LEARNERS)
def test_every_learner_runs_through_megatron_run(learner, tiny_plugins, tmp_path, capsys):
    rc = main(["run", "--learner", learner, "--out", str(tmp_path), *TINY_ARGS])
    out = capsys.readouterr().out
    assert rc == 0, out
    record = json.loads((tmp_path / f"{learner}-tiny-seed0" / "run.json").read_text())
    assert record["status"] == "complete"
    expected = [learner] if learner == "finetune" else [learner, "finetune"]
    assert list(record["learners"]) == expected
    for name in expected:
        lrec = record["learners"][name]
        assert lrec["epochs"] and 0.0 <= lrec["final"]["mAP50"] <= 1.0
        assert lrec["compute"]["spent"] > 0 and lrec["compute"]["images_backward"] > 0
    if learner != "finetune":
        assert record["learners"]["finetune"]["compute"]["spent"] <= record["learners"][learner]["compute"]["spent"]
        assert "difference" in out and f"{learner} − finetune, in points" in " ".join(out.split())
    assert "mAP50:95" in out and "compute in image passes" in " ".join(out.split())


def test_budget_option_and_select_sources(tiny_plugins, tmp_path, capsys):
    args = ["run", "--learner", "reptile", "--out", str(tmp_path), *TINY_ARGS, "--budget", "120",
            "--select-sources", "2", "--similarity", "wasserstein", "--set", "similarity.sample_size=6"]
    assert main(args) == 0
    record = json.loads((tmp_path / "reptile-tiny-seed0" / "run.json").read_text())
    assert record["config"]["training"]["compute_budget"] == 120
    for lrec in record["learners"].values():
        assert lrec["compute"]["spent"] <= 120 and lrec["stopped_by"] in ("budget", "epoch_cap")
    assert record["selection"]["chosen"] == ["gamma", "beta"]  # closest first
    assert record["sources"] == ["beta", "gamma"]  # meta-trained on in the configured task order
    assert "closest" in capsys.readouterr().out


def test_resume_through_the_cli(tiny_plugins, tmp_path):
    args = ["run", "--learner", "finetune", "--out", str(tmp_path), *TINY_ARGS]
    assert main(args) == 0
    first = json.loads((tmp_path / "finetune-tiny-seed0" / "run.json").read_text())
    # resuming a finished run changes nothing
    assert main([*args, "--resume"]) == 0
    again = json.loads((tmp_path / "finetune-tiny-seed0" / "run.json").read_text())
    assert again["learners"] == first["learners"]


def test_cli_errors_are_clear(tiny_plugins, tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path), *TINY_ARGS, "--similarity", "wasserstein"]) == 2
    assert "--select-sources" in capsys.readouterr().err
    assert main(["run", "--out", str(tmp_path), *TINY_ARGS, "--learner", "mamll"]) == 2
    err = capsys.readouterr().err
    assert "learner.name" in err and "'mamll'" in err and "maml" in err


def test_help_documents_the_meta_epoch_mapping(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "20 meta-epochs about 300 baseline epochs" in text and "--select-sources" in text


@pytest.mark.slow
def test_main_job_yolox_medsynth_short(tmp_path, capsys):
    """The real thing, shortened: YOLOX-tiny on the medsynth suite, reptile vs finetune, one short meta-epoch."""
    rc = main(["run", "--learner", "reptile", "--detector", "yolox", "--out", str(tmp_path), "--no-progress",
               "--meta-epochs", "1", "--set", "training.steps_per_epoch=2", "--set", "training.finetune_epochs=1"])
    assert rc == 0
    run_dir = tmp_path / "reptile-yolox-seed0"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["target"] == "eit" and len(record["sources"]) == 6 and record["shots"] == 20
    assert list(record["learners"]) == ["reptile", "finetune"]
    assert (run_dir / "map50_curve.png").exists() and (run_dir / "config.yaml").exists()
