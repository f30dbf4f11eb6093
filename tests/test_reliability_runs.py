"""`megatron run` processes: one run per folder (two started at once), and runs killed with SIGKILL at random
points that resume to exactly the uninterrupted run's record and weights.

The runs are separate processes of the public CLI (``python -m megatron run``) with the tiny detector and the
blobs dataset (``MEGATRON_PLUGINS``, ``PYTHONPATH=tests``); ``reliability_plugins`` can hold a run at its start
(``MEGATRON_TEST_START_DELAY_S``) so that a second run surely meets the first one's lock.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent

TINY_RUN = [
    "--detector", "tiny", "--device", "cpu", "--no-progress",
    "--set", "data.datasets=[{plugin: blobs, options: {images_per_task: 16}}]", "--set", "data.target=target",
    "--set", "data.shots=6", "--set", "data.eval_images=6", "--set", "data.input_size=64",
    "--set", "training.finetune_epochs=1", "--set", "training.steps_per_epoch=2",
    "--set", "training.pretrain_epochs=0", "--set", "training.num_threads=1", "--set", "output.plots=false",
]


def _env(extra: dict | None = None) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "MEGATRON_PLUGINS": "tiny_detector,reliability_plugins", "MEGATRON_DISABLE_PLUGIN_AUTOLOAD": "1",
            "OMP_NUM_THREADS": "1", "MEGATRON_BLOCK_PLUGINS": "yolox,faster_rcnn,retinanet", "COLUMNS": "160",
            **(extra or {})}


def start(cwd: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "megatron", "run", *TINY_RUN, *args]
    return subprocess.Popen(cmd, cwd=cwd, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def record_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


# --- one run per folder ------------------------------------------------------------------------------------

def test_two_runs_started_at_once_into_one_folder(tmp_path):
    run_dir = tmp_path / "run"
    hold = {"MEGATRON_TEST_START_DELAY_S": "4"}  # the winner holds the folder at least this long
    procs = [start(tmp_path, "--learner", "reptile", "--no-baseline", "--meta-epochs", "1", "--run-dir", str(run_dir),
                   env=hold) for _ in range(2)]
    results = {p.pid: finish(p) for p in procs}
    codes = sorted(rc for rc, _, _ in results.values())
    assert codes == [0, 2], {pid: (rc, err[-2000:]) for pid, (rc, _, err) in results.items()}
    (winner,) = [pid for pid, (rc, _, _) in results.items() if rc == 0]
    (loser,) = [pid for pid, (rc, _, _) in results.items() if rc == 2]
    err = " ".join(results[loser][2].split())
    assert "in use by another run" in err and f"PID {winner}" in err and socket.gethostname() in err
    assert "Traceback" not in err
    record = record_of(run_dir)
    assert record["status"] == "complete" and list(record["learners"]) == ["reptile"]
    assert len(record["learners"]["reptile"]["epochs"]) == 1  # one run's results, not two runs' interleaved


@pytest.mark.slow
def test_two_runs_with_the_same_default_name_get_two_folders(tmp_path):
    out = tmp_path / "runs"
    hold = {"MEGATRON_TEST_START_DELAY_S": "4"}
    procs = [start(tmp_path, "--learner", "reptile", "--no-baseline", "--meta-epochs", "1", "--out", str(out), env=hold)
             for _ in range(2)]
    results = [finish(p) for p in procs]
    assert [rc for rc, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    folders = sorted(p.name for p in out.iterdir())
    assert folders == ["reptile-tiny-seed0", "reptile-tiny-seed0-2"]
    for name in folders:
        assert record_of(out / name)["status"] == "complete"


# --- fault injection: SIGKILL at random points, then --resume ----------------------------------------------

_VOLATILE = {"wall_s", "cpu_s", "stage_wall_s", "seconds", "versions", "failed_at", "started", "earlier_errors",
             "timings", "comm_s"}


def _normalise(value, run_dir: str):
    """The record without what legitimately differs between two runs of one config: timings, versions and the
    run directory's own path."""
    if isinstance(value, dict):
        return {k: _normalise(v, run_dir) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_normalise(v, run_dir) for v in value]
    if isinstance(value, str):
        return value.replace(run_dir, "<run>")
    return value


def _weights(run_dir: Path, learner: str) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / learner / "last.pt", map_location="cpu", weights_only=True)["detector"]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path} appeared: {proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


@pytest.mark.slow
def test_runs_killed_at_random_points_resume_to_the_uninterrupted_result(tmp_path):
    args = ["--learner", "reptile", "--meta-epochs", "3"]  # reptile, then the finetune baseline: two learners
    full_dir = tmp_path / "full"
    proc = start(tmp_path, *args, "--run-dir", str(full_dir))
    _wait_for(full_dir / ".lock", proc)  # the run holds its folder from here on
    locked_at = time.monotonic()
    rc, _, err = finish(proc)
    assert rc == 0, err[-3000:]
    span = time.monotonic() - locked_at  # how long a run holds its folder: the kills fall inside it
    full = record_of(full_dir)
    assert full["status"] == "complete" and list(full["learners"]) == ["reptile", "finetune"]

    rng = random.Random(1207)
    kills = int(os.environ.get("MEGATRON_TEST_KILLS", "4"))  # fewer for a quick check on a busy machine
    delays = sorted(rng.uniform(0.02, 0.95) * span for _ in range(kills))
    for i, delay in enumerate(delays):
        run_dir = tmp_path / f"killed-{i}"
        proc = start(tmp_path, *args, "--run-dir", str(run_dir))
        _wait_for(run_dir / ".lock", proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        killed = proc.returncode == -signal.SIGKILL
        if (run_dir / "run.json").exists() and killed and record_of(run_dir)["status"] == "complete":
            # killed after the final record, while writing the summary and plots: resume must finish those
            assert delay > 0.5 * span, f"the record said complete {delay:.2f} s into a {span:.2f} s run"
        rc, _, err = finish(start(tmp_path, *args, "--run-dir", str(run_dir), "--resume"))
        assert rc == 0, f"resume after a kill at {delay:.2f} s: {err[-3000:]}"
        assert "Traceback" not in err
        resumed = record_of(run_dir)
        assert resumed["status"] == "complete"
        assert _normalise(resumed, str(run_dir)) == _normalise(full, str(full_dir)), f"kill at {delay:.2f} s"
        for learner in ("reptile", "finetune"):
            mine, theirs = _weights(run_dir, learner), _weights(full_dir, learner)
            assert mine.keys() == theirs.keys()
            assert all(torch.equal(mine[k], theirs[k]) for k in mine), \
                f"{learner} weights differ (kill at {delay:.2f} s)"
        assert not list(run_dir.rglob("*.tmp")), "temporary files of the killed writes were not cleaned"


# --- failures recorded and recovered (in this process, through the CLI's main) -------------------------------


@pytest.mark.parametrize("rerun", [[], ["--resume"]], ids=["rerun", "rerun --resume"])
def test_a_run_that_fails_in_set_up_is_recorded_and_a_rerun_starts_afresh(tmp_path, tiny_plugins, capsys, caplog,
                                                                          rerun):
    from megatron.cli import main

    run_dir = tmp_path / "run"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(3000))
    args = ["run", *TINY_RUN, "--learner", "reptile", "--no-baseline", "--meta-epochs", "1", "--run-dir", str(run_dir)]
    assert main([*args, "--checkpoint", str(bad)]) == 2
    record = record_of(run_dir)
    assert record["status"] == "failed" and "bad.pt" in record["error"]
    assert "not a PyTorch checkpoint" in capsys.readouterr().err
    # the fixed command (with --resume, its config now differs from the failed one's) starts afresh, saying so
    with caplog.at_level("WARNING"):
        assert main([*args, *rerun]) == 0, capsys.readouterr().err
    assert "before its first checkpoint" in caplog.text and "starting it afresh" in caplog.text
    record = record_of(run_dir)
    assert record["status"] == "complete" and record["config"]["detector"]["checkpoint"] is None
    assert len(record["learners"]["reptile"]["epochs"]) == 1 and "error" not in record
    # a complete run is not started again without --resume
    capsys.readouterr()
    assert main(args) == 2 and "complete run" in capsys.readouterr().err


def test_resume_from_a_corrupt_checkpoint_falls_back_or_stops_and_keeps_the_history(tmp_path, tiny_plugins, capsys,
                                                                                  caplog):
    from megatron.cli import main

    run_dir = tmp_path / "run"
    args = ["run", *TINY_RUN, "--learner", "reptile", "--no-baseline", "--meta-epochs", "2", "--run-dir", str(run_dir)]
    assert main(args) == 0
    before = record_of(run_dir)
    ckpts = run_dir / "checkpoints" / "reptile"
    weights = torch.load(ckpts / "last.pt", weights_only=True)["detector"]
    assert (ckpts / "previous.pt").exists()  # the previous good checkpoint is kept
    # a corrupt last.pt: resumed from previous.pt, with a warning, to the same result
    (ckpts / "last.pt").write_bytes(os.urandom(2000))
    with caplog.at_level("WARNING"):
        assert main([*args, "--resume"]) == 0, capsys.readouterr().err
    assert "previous good checkpoint" in caplog.text
    after = record_of(run_dir)
    assert _normalise(after, str(run_dir)) == _normalise(before, str(run_dir))
    again = torch.load(ckpts / "last.pt", weights_only=True)["detector"]
    assert all(torch.equal(again[k], weights[k]) for k in weights)
    # nothing usable at all: a clear message naming the files, exit 2, the recorded history kept
    (ckpts / "last.pt").write_bytes(os.urandom(2000))
    torch.save({"format": -1, "learner_name": "maml"}, ckpts / "previous.pt")
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "last.pt" in err and "previous.pt" in err and "Traceback" not in err
    kept = record_of(run_dir)
    assert kept["learners"] == after["learners"]  # not `learners: {}`
