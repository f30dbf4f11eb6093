"""`megatron run --nproc 2` end to end on CPU (gloo, loopback): the tiny detector on the synthetic blobs tasks.

The subprocesses find the test plugins through ``MEGATRON_PLUGINS`` (and ``PYTHONPATH=tests``). A run
with 2 processes must produce one run directory written by rank 0, end with the weights a 1-process run of the
same config ends with (float tolerance), and survive a process dying mid-run: the launcher exits with a message
naming the rank, the checkpoint of the last finished meta-epoch is intact, and ``--resume`` finishes the run
with the weights of an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

TESTS = Path(__file__).resolve().parent

CONFIG = {
    "seed": 3,
    "data": {"datasets": [{"plugin": "blobs", "options": {"images_per_task": 12}}], "target": "target",
             "shots": 6, "eval_images": 6, "input_size": 64},
    "detector": {"name": "tiny", "options": {"width": 8}},
    "learner": {"name": "faulty_reptile", "options": {"eps_start": 0.5, "eps_end": 0.5}},
    "episodes": {"support_size": 2, "query_size": 2},
    "training": {"meta_epochs": 2, "source_epochs": 1, "steps_per_epoch": 2, "finetune_epochs": 1, "meta_batch": 2,
                 "inner_steps": 1, "inner_lr": 0.01, "batch_size": 4, "device": "cpu", "num_threads": 1},
    "output": {"compare_baseline": False, "plots": False},
}


def megatron_run(tmp_path: Path, run_dir: Path, *extra: str, nproc: int = 2, env_extra: dict | None = None,
                 timeout: float = 240) -> subprocess.CompletedProcess:
    cfg = tmp_path / "cfg.yaml"
    if not cfg.exists():
        cfg.write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "MEGATRON_PLUGINS": "tiny_detector,dist_test_plugins", "MEGATRON_DISABLE_PLUGIN_AUTOLOAD": "1",
           "OMP_NUM_THREADS": "1", "MEGATRON_DIST_TIMEOUT_S": "60",
           # the mmdet detectors are not needed here and take most of a process's start-up
           "MEGATRON_BLOCK_PLUGINS": "yolox,faster_rcnn,retinanet", **(env_extra or {})}
    cmd = [sys.executable, "-m", "megatron", "run", "-c", str(cfg), "--run-dir", str(run_dir), "--no-progress", *extra]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "faulty_reptile" / "last.pt", weights_only=False)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run2")
    proc = megatron_run(tmp, tmp / "run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp / "run", proc


def test_two_process_run_writes_one_complete_record(two_process_run):
    run_dir, proc = two_process_run
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "complete"
    assert record["distributed"]["world_size"] == 2 and record["distributed"]["backend"] == "gloo"
    lrec = record["learners"]["faulty_reptile"]
    assert [e["meta_epoch"] for e in lrec["epochs"]] == [1, 2]
    assert 0.0 <= lrec["final"]["mAP50"] <= 1.0
    # compute is counted over both processes: 2 steps x 2 episodes x (2 + 2) images per meta-epoch, fwd + bwd
    source_passes = 2 * CONFIG["training"]["meta_epochs"] * 2 * 2 * 4
    assert lrec["compute"]["spent"] >= source_passes
    # one run directory, the results table printed once (by rank 0)
    assert sorted(p.name for p in run_dir.parent.iterdir() if p.is_dir()) == ["run"]
    assert proc.stdout.count("held-out split") == 1, proc.stdout
    assert checkpoint(run_dir)["finished"]


def test_two_processes_end_with_the_weights_of_one_process(two_process_run, tmp_path):
    """The same config in this process (run_experiment, no process group): the same weights and compute."""
    import dist_test_plugins
    import tiny_detector

    import megatron
    from megatron.config import load_config
    from megatron.training.runner import run_experiment

    run_dir, _ = two_process_run
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(CONFIG))
    pm = megatron.get_plugin_manager(autoload=False, extra=[("tiny_detector", tiny_detector),
                                                            ("dist_test_plugins", dist_test_plugins)])
    threads = torch.get_num_threads()
    try:
        run_experiment(load_config(cfg_path, {}), run_dir=tmp_path / "run1", pm=pm, progress=False)
    finally:
        torch.set_num_threads(threads)
    two, one = checkpoint(run_dir)["detector"], checkpoint(tmp_path / "run1")["detector"]
    for name in one:
        assert torch.allclose(two[name].float(), one[name].float(), atol=1e-6, rtol=1e-5), name
    rec1 = json.loads((tmp_path / "run1" / "run.json").read_text())
    rec2 = json.loads((run_dir / "run.json").read_text())
    assert rec1["learners"]["faulty_reptile"]["compute"]["spent"] == rec2["learners"]["faulty_reptile"]["compute"]["spent"]
    assert rec1.get("distributed", {"world_size": 1})["world_size"] == 1


@pytest.mark.slow
def test_a_dead_rank_stops_the_run_and_resume_finishes_it(two_process_run, tmp_path):
    run_dir = tmp_path / "run"
    steps = CONFIG["training"]["steps_per_epoch"]
    # rank 1 dies before the first outer step of meta-epoch 2
    died = megatron_run(tmp_path, run_dir, env_extra={"MEGATRON_TEST_DIE_RANK": "1", "MEGATRON_TEST_DIE_AT_STEP": str(steps)})
    assert died.returncode != 0
    assert "rank 1" in died.stdout + died.stderr and "--resume" in died.stdout + died.stderr
    state = checkpoint(run_dir)
    assert state["meta_epoch"] == 1 and not state["finished"]
    assert json.loads((run_dir / "run.json").read_text())["status"] != "complete"

    resumed = megatron_run(tmp_path, run_dir, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    final, reference = checkpoint(run_dir), checkpoint(two_process_run[0])
    assert final["finished"]
    for name, value in reference["detector"].items():
        assert torch.equal(final["detector"][name], value), name
    rec = json.loads((run_dir / "run.json").read_text())
    ref = json.loads((two_process_run[0] / "run.json").read_text())
    assert rec["learners"]["faulty_reptile"]["final"] == ref["learners"]["faulty_reptile"]["final"]


# --- the pieces the launch relies on (in this process) -----------------------------------------------------
def test_megatron_plugins_env_registers_modules_and_rejects_unknown_ones(monkeypatch):
    import megatron
    from megatron.errors import PluginError

    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("MEGATRON_PLUGINS", "tiny_detector, dist_test_plugins")
    pm = megatron.get_plugin_manager(autoload=False)
    assert "faulty_reptile" in pm.registers["learner"] and "tiny" in pm.registers["detector"]
    assert pm.info["dist_test_plugins"].package == "dist_test_plugins"
    monkeypatch.setenv("MEGATRON_PLUGINS", "no_such_module_anywhere")
    with pytest.raises(PluginError, match="no_such_module_anywhere.*PYTHONPATH"):
        megatron.get_plugin_manager(autoload=False)


def test_nproc_relaunches_the_same_command_line_without_nproc():
    from megatron.cli import build_parser
    from megatron.commands.run import relaunch_argv

    argv = ["run", "-c", "cfg.yaml", "--learner", "maml", "--seed", "4", "--set", "training.meta_batch=4",
            "--set", "data.shots=40", "--resume", "--no-progress", "--nproc", "4", "--run-dir", "runs/x"]
    args = build_parser().parse_args(argv)
    again = relaunch_argv(args)
    assert "--nproc" not in again
    reparsed = build_parser().parse_args(again)
    for key in ("config", "learner", "seed", "set", "resume", "no_progress", "run_dir"):
        assert getattr(reparsed, key) == getattr(args, key), key
    assert reparsed.nproc is None


def test_nproc_checks_the_meta_batch_before_starting_processes(tmp_path):
    from megatron.cli import build_parser
    from megatron.errors import ConfigError

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    args = build_parser().parse_args(["run", "-c", str(cfg), "--nproc", "3", "--no-progress", "--run-dir", str(tmp_path / "r")])
    with pytest.raises(ConfigError, match=r"training.meta_batch = 2 must be a multiple of the number of processes"):
        args.func(args)
    args = build_parser().parse_args(["run", "-c", str(cfg), "--nproc", "0"])
    with pytest.raises(ConfigError, match="at least 1"):
        args.func(args)
    assert not (tmp_path / "r").exists()
