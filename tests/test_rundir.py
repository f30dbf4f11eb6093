"""The run directory (megatron.training.rundir), without the runner: the lock, what a folder's state means for a
new run, leftover temporary files, checkpoints that fall back to the previous good one, failures recorded."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron.atomic_io import atomic_write_json, atomic_write_text, file_mode
from megatron.errors import ConfigError
from megatron.training import rundir
from megatron.training.rundir import (
    CheckpointUnusable, RunDirBusy, RunDirTaken, carry_history, claim_run_dir, describe_error, load_resume_state,
    lock_run_dir, mark_failed, save_checkpoint,
)

FMT = 2


def write_record(run_dir: Path, **fields) -> dict:
    record = {"status": "running", "learners": {}, **fields}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps(record))
    return record


def ckpt_state(learner: str = "reptile", meta_epoch: int = 1, fmt=FMT) -> dict:
    return {"format": fmt, "learner_name": learner, "meta_epoch": meta_epoch,
            "detector": {"w": torch.full((2,), float(meta_epoch))}, "record": {"epochs": [meta_epoch]}}


def add_checkpoint(run_dir: Path, learner: str = "reptile") -> Path:
    return save_checkpoint(ckpt_state(learner), run_dir / "checkpoints" / learner)


# --- the lock ----------------------------------------------------------------------------------------------

def test_a_second_lock_is_refused_at_once_naming_pid_and_host(tmp_path):
    run_dir = tmp_path / "run"
    with lock_run_dir(run_dir) as lock:
        assert lock.held
        started = time.perf_counter()
        with pytest.raises(RunDirBusy) as info:
            lock_run_dir(run_dir)
        assert time.perf_counter() - started < 2  # "stops at once": no waiting for the holder
        err = info.value
        assert isinstance(err, ConfigError)  # exit 2 through the CLI
        assert err.pid == os.getpid() and err.host == socket.gethostname()
        assert f"PID {os.getpid()}" in str(err) and socket.gethostname() in str(err) and str(run_dir) in str(err)
    # released: the folder can be locked again
    lock_run_dir(run_dir).release()
    # picklable as is (a distributed run sends rank 0's error to every rank)
    import pickle

    again = pickle.loads(pickle.dumps(err))
    assert type(again) is RunDirBusy and str(again) == str(err) and again.pid == err.pid


_HOLDER = """
import sys, time
from megatron.training.rundir import lock_run_dir
lock = lock_run_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_the_lock_of_a_killed_process_is_released_by_the_os(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusy) as info:
            lock_run_dir(run_dir)
        assert info.value.pid == proc.pid  # the holder named is the other process
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        lock_run_dir(run_dir).release()  # no stale lock: a killed run never blocks its --resume
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_garbage_collected_lock_is_released(tmp_path):
    lock_run_dir(tmp_path / "run")  # not kept
    import gc

    gc.collect()
    lock_run_dir(tmp_path / "run").release()


# --- what a folder holds, and what a new run does with it --------------------------------------------------

def test_fresh_folder(tmp_path):
    with claim_run_dir(tmp_path / "new", tmp_path / "unused", resume=False) as claim:
        assert claim.mode == "fresh" and not claim.resume and claim.path == tmp_path / "new" and claim.note is None


def test_a_complete_run_is_refused_without_resume_and_resumed_with_it(tmp_path):
    run_dir = tmp_path / "run"
    write_record(run_dir, status="complete")
    with pytest.raises(RunDirTaken, match="already holds a complete run"):
        claim_run_dir(run_dir, tmp_path, resume=False)
    with claim_run_dir(run_dir, tmp_path, resume=True) as claim:
        assert claim.mode == "resume" and claim.record["status"] == "complete"


@pytest.mark.parametrize("status", ["failed", "running", "interrupted"])
def test_a_run_that_stopped_before_its_first_checkpoint_starts_afresh_saying_so(tmp_path, caplog, status):
    run_dir = tmp_path / "run"
    write_record(run_dir, status=status, error="CheckpointError: checkpoint bad.pt not found")
    for resume in (False, True):  # --resume too: there is nothing to continue, and the config may be fixed
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="megatron.training.rundir"):
            with claim_run_dir(run_dir, tmp_path, resume=resume) as claim:
                assert claim.mode == "restart" and not claim.resume
        assert "before its first checkpoint" in caplog.text and "starting it afresh" in caplog.text
        assert claim.note and "afresh" in claim.note
    if status == "failed":
        assert "bad.pt not found" in claim.note  # the recorded error is repeated


def test_an_unfinished_run_with_checkpoints_needs_resume(tmp_path):
    run_dir = tmp_path / "run"
    write_record(run_dir, status="failed", error="TrainingError: loss became nan")
    add_checkpoint(run_dir)
    with pytest.raises(RunDirTaken, match="--resume") as info:
        claim_run_dir(run_dir, tmp_path, resume=False)
    assert "loss became nan" in str(info.value)
    with claim_run_dir(run_dir, tmp_path, resume=True) as claim:
        assert claim.mode == "resume"


def test_resume_of_a_folder_that_never_held_a_run(tmp_path):
    with pytest.raises(ConfigError, match="holds no run to resume"):
        claim_run_dir(tmp_path / "typo", tmp_path, resume=True)
    assert not (tmp_path / "typo").exists()  # refused: nothing left behind
    # a run was started there (its lock file) but killed before it wrote run.json: start it afresh
    lock_run_dir(tmp_path / "early").release()
    with claim_run_dir(tmp_path / "early", tmp_path, resume=True) as claim:
        assert claim.mode == "restart"


def test_an_unreadable_record(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rundir.write_marker(run_dir)  # megatron's folder (an unreadable run.json alone would not say so)
    (run_dir / "run.json").write_text('{"status": "runn')
    with claim_run_dir(run_dir, tmp_path, resume=False) as claim:
        assert claim.mode == "restart" and "cannot be read" in claim.note
    add_checkpoint(run_dir)
    with pytest.raises(RunDirTaken, match="run.json"):
        claim_run_dir(run_dir, tmp_path, resume=True)


def test_a_busy_folder_is_refused_before_anything_is_decided(tmp_path):
    run_dir = tmp_path / "run"
    with lock_run_dir(run_dir):
        with pytest.raises(RunDirBusy):
            claim_run_dir(run_dir, tmp_path, resume=True)


def test_default_name_skips_taken_folders(tmp_path, caplog):
    base = tmp_path / "runs" / "reptile-tiny-seed0"
    write_record(base, status="complete")
    with claim_run_dir(None, base, resume=False) as claim:
        assert claim.path == base.parent / "reptile-tiny-seed0-2" and claim.mode == "fresh"
        # while that run holds -2, another run with the same default name takes -3
        with caplog.at_level(logging.WARNING, logger="megatron.training.rundir"):
            with claim_run_dir(None, base, resume=False) as other:
                assert other.path == base.parent / "reptile-tiny-seed0-3"
        assert "in use by PID" in caplog.text
    # an unfinished run with checkpoints is not overwritten: the next free folder, with a note
    write_record(base.parent / "reptile-tiny-seed0-2", status="failed")
    add_checkpoint(base.parent / "reptile-tiny-seed0-2")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megatron.training.rundir"):
        with claim_run_dir(None, base, resume=False) as claim:
            assert claim.path == base.parent / "reptile-tiny-seed0-3"
    assert "--resume" in caplog.text


def test_default_name_reuses_a_folder_whose_run_failed_before_its_first_checkpoint(tmp_path):
    base = tmp_path / "runs" / "x"
    write_record(base, status="failed", error="DataError: image unreadable")
    with claim_run_dir(None, base, resume=False) as claim:
        assert claim.path == base and claim.mode == "restart"


def test_default_name_resume_takes_the_newest(tmp_path):
    base = tmp_path / "runs" / "x"
    with pytest.raises(ConfigError, match="no run to resume"):
        claim_run_dir(None, base, resume=True)
    write_record(base, status="complete")
    write_record(base.parent / "x-3", status="running")
    add_checkpoint(base.parent / "x-3")
    (base.parent / "x-abc").mkdir()
    with claim_run_dir(None, base, resume=True) as claim:
        assert claim.path == base.parent / "x-3" and claim.mode == "resume"


def test_leftover_tmp_files_of_killed_writes_are_removed_when_a_run_claims_the_folder(tmp_path):
    run_dir = tmp_path / "run"
    write_record(run_dir, status="running")
    add_checkpoint(run_dir)
    dead = _dead_pid()
    stale = [run_dir / f".run.json.megatron-{dead}-0a1b2c3d.tmp",
             run_dir / "checkpoints" / "reptile" / f".last.pt.megatron-{dead}-a8b7c6d5.tmp"]
    for p in stale:
        p.write_bytes(b"half a write")
    kept = [run_dir / "notes.tmp", run_dir / "summary.md", run_dir / ".run.json.k2j3h4.tmp",
            run_dir / f".live.pt.megatron-{os.getpid()}-0a1b2c3d.tmp"]  # not megatron's pattern / writer alive
    for p in kept:
        p.write_text("mine")
    with claim_run_dir(run_dir, tmp_path, resume=True) as claim:
        assert sorted(claim.removed_tmp) == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- checkpoints -----------------------------------------------------------------------------------------

def test_save_keeps_the_previous_checkpoint(tmp_path):
    d = tmp_path / "checkpoints" / "reptile"
    save_checkpoint(ckpt_state(meta_epoch=1), d)
    assert not (d / "previous.pt").exists()
    save_checkpoint(ckpt_state(meta_epoch=2), d)
    assert torch.load(d / "last.pt")["meta_epoch"] == 2 and torch.load(d / "previous.pt")["meta_epoch"] == 1
    loaded = load_resume_state(d, "reptile", FMT)
    assert loaded.path == d / "last.pt" and not loaded.fell_back and loaded.state["meta_epoch"] == 2


def test_no_checkpoint_at_all_is_none(tmp_path):
    assert load_resume_state(tmp_path / "checkpoints" / "reptile", "reptile", FMT) is None


@pytest.mark.parametrize("spoil", ["random bytes", "truncated", "other learner", "other format", "not a dict",
                                   "missing key", "check fails"])
def test_an_unusable_last_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, spoil):
    run_dir = tmp_path / "run"
    record = write_record(run_dir, learners={"reptile": {"epochs": [1, 2]}})
    before = (run_dir / "run.json").read_bytes()
    d = run_dir / "checkpoints" / "reptile"
    save_checkpoint(ckpt_state(meta_epoch=1), d)
    save_checkpoint(ckpt_state(meta_epoch=2), d)
    last = d / "last.pt"
    check = None
    if spoil == "random bytes":
        last.write_bytes(os.urandom(3000))
    elif spoil == "truncated":
        last.write_bytes(last.read_bytes()[:200])
    elif spoil == "other learner":
        torch.save(ckpt_state("maml", 2), last)
    elif spoil == "other format":
        torch.save(ckpt_state(meta_epoch=2, fmt=1), last)
    elif spoil == "not a dict":
        torch.save([1, 2], last)
    elif spoil == "missing key":
        state = ckpt_state(meta_epoch=2)
        del state["record"]
        torch.save(state, last)

    def check(state):  # noqa: F811 - the caller's own test (e.g. the weights fit the detector)
        if spoil == "check fails" and state["meta_epoch"] == 2:
            raise RuntimeError("size mismatch for head.weight")

    with caplog.at_level(logging.WARNING, logger="megatron.training.rundir"):
        loaded = load_resume_state(d, "reptile", FMT, required=("record",), check=check)
    assert loaded.fell_back and loaded.path == d / "previous.pt" and loaded.state["meta_epoch"] == 1
    assert "previous good checkpoint" in caplog.text and "last.pt" in caplog.text
    # the bad file is kept aside (so the next save cannot rotate it over the good one), run.json untouched
    assert not last.exists() and (d / "last.pt.corrupt").exists()
    assert (run_dir / "run.json").read_bytes() == before and json.loads(before) == record


def test_last_missing_after_a_kill_between_rotation_and_write(tmp_path):
    d = tmp_path / "checkpoints" / "reptile"
    save_checkpoint(ckpt_state(meta_epoch=1), d)
    save_checkpoint(ckpt_state(meta_epoch=2), d)
    (d / "last.pt").unlink()
    loaded = load_resume_state(d, "reptile", FMT)
    assert loaded.fell_back and loaded.state["meta_epoch"] == 1


def test_no_usable_checkpoint_stops_with_a_clear_message_and_keeps_the_record(tmp_path):
    run_dir = tmp_path / "run"
    write_record(run_dir, learners={"reptile": {"epochs": [1]}, "finetune": {"epochs": [1]}})
    before = (run_dir / "run.json").read_bytes()
    d = run_dir / "checkpoints" / "reptile"
    d.mkdir(parents=True)
    (d / "last.pt").write_bytes(os.urandom(500))
    with pytest.raises(CheckpointUnusable) as info:
        load_resume_state(d, "reptile", FMT)
    msg = str(info.value)
    assert isinstance(info.value, ConfigError)
    assert str(d / "last.pt") in msg and "previous.pt: missing" in msg and "unchanged" in msg
    assert f"move {d} aside" in msg
    assert (run_dir / "run.json").read_bytes() == before
    assert (d / "last.pt").exists()  # nothing renamed when there is nothing to fall back to


# --- the record -------------------------------------------------------------------------------------------

def test_mark_failed_keeps_the_recorded_history(tmp_path):
    run_dir = tmp_path / "run"
    write_record(run_dir, learners={"reptile": {"epochs": [1, 2]}}, target="eit")
    written = mark_failed(run_dir, ValueError("boom"))
    on_disk = json.loads((run_dir / "run.json").read_text())
    assert on_disk == written
    assert on_disk["status"] == "failed" and on_disk["error"] == "ValueError: boom" and on_disk["failed_at"]
    assert on_disk["learners"] == {"reptile": {"epochs": [1, 2]}} and on_disk["target"] == "eit"


def test_mark_failed_with_the_in_memory_record_and_without_a_file(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    from megatron.training.weights import CheckpointError

    mark_failed(run_dir, CheckpointError("checkpoint w.pt not found"), {"status": "running", "learners": {}})
    assert json.loads((run_dir / "run.json").read_text())["error"] == "checkpoint w.pt not found"
    (run_dir / "run.json").unlink()
    mark_failed(run_dir, "set-up failed")
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"


def test_mark_failed_never_raises(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert mark_failed(blocker / "run", RuntimeError("original")) is None  # cannot write: logged, not raised


def test_describe_error():
    assert describe_error(ConfigError("data.target: no task")) == "data.target: no task"
    assert describe_error(KeyError("x")) == "KeyError: 'x'"
    assert describe_error(KeyboardInterrupt()).startswith("interrupted")
    assert describe_error(RuntimeError()) == "RuntimeError"


def test_carry_history_keeps_recorded_learners():
    old = {"status": "failed", "error": "boom", "learners": {"reptile": {"epochs": [1]}}, "split": {"pool": [1]},
           "config": {"seed": 0}}
    new = {"status": "running", "config": {"seed": 0}, "versions": {"torch": "x"}, "learners": {}}
    merged = carry_history(new, old)
    assert merged["status"] == "running" and merged["learners"] == {"reptile": {"epochs": [1]}}
    assert merged["split"] == {"pool": [1]} and merged["versions"] == {"torch": "x"}
    assert "error" not in merged and merged["earlier_errors"] == ["boom"]
    assert carry_history(new, None) is new


# --- file modes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o002, 0o022, 0o077])
def test_atomic_writes_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "summary.md", "x")
        atomic_write_json(tmp_path / "run.json", {"a": 1})
        with open(tmp_path / "plain.txt", "w") as f:  # what any other writer (e.g. a PNG) gets
            f.write("x")
        assert file_mode() == 0o666 & ~umask
    finally:
        os.umask(old)
    plain = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert plain == 0o666 & ~umask
    for name in ("summary.md", "run.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == plain, name


def test_lock_file_holds_pid_and_host(tmp_path):
    with lock_run_dir(tmp_path / "run"):
        holder = rundir.read_lock_holder(tmp_path / "run")
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
