"""Hostile inputs a new user meets (issue 22's cases and issue 23's published checkpoints): run folders holding
the user's own files, the user's temp files, a corrupted or swapped stage-1 cache, a stage 1 killed mid-way,
checkpoints that smuggle code calls (``os.system``, ``cProfile.run``, ``runpy``, ``pickle.loads`` in a reduce,
``getattr`` misuse) beside a real mmengine checkpoint that must load, a full disk, misleading command-line
errors, plugins that misspell a required method, degenerate predicted boxes. Each case: nothing of the user's is
lost, no code from a file runs, and the message names what, where and the fix."""
from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_detector
from tiny_run import make_pm, tiny_config

import megatron
from megatron import hookimpl
from megatron.atomic_io import StorageFullError, TMP_PATTERN, atomic_torch_save, sha256_of, tmp_name
from megatron.cli import main
from megatron.errors import ConfigError, DataError, MegatronError, PluginError
from megatron.experiment import build_taskset, load_tasks
from megatron.training import pretrain as stage1
from megatron.training.rundir import MARKER_FILE, RunDirNotOwned, claim_run_dir, save_checkpoint
from megatron.training.runner import run_experiment
from megatron.training.weights import CheckpointError, read_checkpoint_file, save_detector_checkpoint

ALLOW = "MEGATRON_ALLOW_UNSAFE_CHECKPOINTS"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- 1. run folders that are not megatron's -------------------------------------------------------------------

def user_folder(path: Path) -> dict[Path, bytes]:
    """A folder of the user's own files, some with the names a run writes."""
    files = {path / "config.yaml": b"my: config\n", path / "summary.md": b"# my thesis notes\n",
             path / "models" / "reptile-final.pth": b"my model", path / ".thesis.draft.tmp": b"draft",
             path / "sub" / ".notes.v2.tmp": b"notes"}
    for p, data in files.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def test_a_folder_of_the_users_files_is_refused_listing_them_and_nothing_is_written_there(tmp_path):
    folder = tmp_path / "mine"
    files = user_folder(folder)
    with pytest.raises(RunDirNotOwned) as info:
        claim_run_dir(folder, tmp_path, resume=False)
    msg = str(info.value)
    assert isinstance(info.value, ConfigError)  # exit 2 through the CLI
    assert "config.yaml" in msg and "models/" in msg and "--force" in msg and "new folder" in msg
    assert sorted(p.name for p in folder.iterdir()) == sorted([".thesis.draft.tmp", "config.yaml", "models", "sub",
                                                               "summary.md"])  # no lock, no marker
    assert all(p.read_bytes() == data for p, data in files.items())


def test_a_run_json_without_megatrons_status_field_is_not_a_run(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"my": "experiment log"}))
    for resume in (False, True):
        with pytest.raises(RunDirNotOwned, match="run.json"):
            claim_run_dir(folder, tmp_path, resume=resume)
    assert json.loads((folder / "run.json").read_text()) == {"my": "experiment log"}


def test_force_adopts_a_folder_and_deletes_none_of_the_users_files(tmp_path):
    folder = tmp_path / "mine"
    files = user_folder(folder)
    with claim_run_dir(folder, tmp_path, resume=False, force=True) as claim:
        assert claim.mode == "fresh" and (folder / MARKER_FILE).is_file()
    assert all(p.read_bytes() == data for p, data in files.items())  # the user's temp files included


def test_a_run_made_before_the_marker_existed_still_resumes(tmp_path):
    folder = tmp_path / "old-run"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"status": "failed", "learners": {}}))
    save_checkpoint({"format": 1, "learner_name": "reptile"}, folder / "checkpoints" / "reptile")
    with claim_run_dir(folder, tmp_path, resume=True) as claim:
        assert claim.mode == "resume"
    assert (folder / MARKER_FILE).is_file()  # adopted: from now on it says so itself


def test_the_default_run_name_skips_a_folder_that_is_not_megatrons(tmp_path):
    base = tmp_path / "runs" / "reptile"
    user_folder(base)
    with claim_run_dir(None, base, resume=False) as claim:
        assert claim.path == base.parent / "reptile-2"


def test_cleanup_removes_only_megatrons_temp_files_whose_writer_is_gone(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / MARKER_FILE).write_text("{}")
    dead = dead_pid()
    ours = [folder / f".run.json.megatron-{dead}-0123abcd.tmp",
            folder / "checkpoints" / "reptile" / f".last.pt.megatron-{dead}-89abcdef.tmp"]
    theirs = [folder / ".thesis.draft.tmp", folder / "sub" / ".notes.v2.tmp", folder / ".run.json.k2j3h4.tmp",
              folder / f".x.pt.megatron-{os.getpid()}-0123abcd.tmp"]  # the user's, and a live writer's
    for p in ours + theirs:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    with claim_run_dir(folder, tmp_path, resume=False) as claim:
        assert sorted(claim.removed_tmp) == sorted(ours)
    assert all(p.exists() for p in theirs) and not any(p.exists() for p in ours)


def test_megatrons_temp_names_carry_its_mark_host_and_pid():
    from megatron.atomic_io import host_token

    name = tmp_name("run.json")
    match = TMP_PATTERN.match(name)
    assert match and match["name"] == "run.json" and int(match["pid"]) == os.getpid()
    assert match["host"] == host_token()


def test_a_temp_file_another_machine_is_writing_into_a_shared_folder_is_left_alone(tmp_path):
    # SLURM array jobs on several nodes share a run or cache folder: a PID from another node says nothing here
    from megatron.atomic_io import OTHER_HOST_STALE_S, remove_stale_tmp_files

    other, dead = "0badc0de", dead_pid()
    writing = tmp_path / f".run.json.megatron-{other}-{dead}-0123abcd.tmp"
    abandoned = tmp_path / f".cell.json.megatron-{other}-{dead}-89abcdef.tmp"
    for p in (writing, abandoned):
        p.write_bytes(b"x")
    old = time.time() - OTHER_HOST_STALE_S - 60
    os.utime(abandoned, (old, old))
    assert remove_stale_tmp_files(tmp_path) == [abandoned]
    assert writing.exists()


def test_a_run_into_a_folder_of_user_files_stops_before_any_work(tmp_path):
    folder = tmp_path / "mine"
    user_folder(folder)
    with pytest.raises(RunDirNotOwned):
        run_experiment(tiny_config(tmp_path), run_dir=folder, pm=make_pm(), progress=False)
    assert not (folder / "run.json").exists() and (folder / "config.yaml").read_bytes() == b"my: config\n"


# --- 2. the stage-1 cache verifies what it serves --------------------------------------------------------------

def write_coco(folder: Path, n: int = 3, size: int = 32, name: str | None = None) -> Path:
    """A tiny COCO task on disk: ``n`` grey images with one box each."""
    from megatron.data.io import write_image

    images, annotations = [], []
    for i in range(n):
        img = np.full((size, size), 40 + 20 * i, np.uint8)
        img[4:12, 4:12] = 220
        write_image(folder / "images" / f"im{i}.png", img, png_compression=0)  # same dims, same byte length
        images.append({"id": i + 1, "file_name": f"im{i}.png", "width": size, "height": size})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [4, 4, 8, 8], "area": 64,
                            "iscrowd": 0})
    ann = folder / "annotations.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": [{"id": 1, "name": "lesion"}]}))
    return ann


def two_source_config(tmp_path: Path, target_images: int = 16, **overrides):
    datasets = [{"plugin": "coco", "options": {"annotation_file": str(write_coco(tmp_path / n)), "name": n}}
                for n in ("src_a", "src_b")]
    datasets.append({"plugin": "blobs", "options": {"tasks": ["target"], "images_per_task": target_images}})
    return tiny_config(tmp_path, **{"data.datasets": datasets, "data.sources": ["src_a", "src_b"], **overrides})


def key_of(cfg, pm) -> str:
    return stage1.stage1_cache_key(cfg, build_taskset(cfg, load_tasks(cfg, pm)).sources, pm)[0]


def test_the_stage1_key_ignores_the_target_and_follows_the_source_pixels(tmp_path, monkeypatch):
    pm = make_pm()
    cfg = two_source_config(tmp_path)
    key = key_of(cfg, pm)
    assert key_of(two_source_config(tmp_path, target_images=20), pm) == key  # a target-only change reuses
    # a source image replaced by another of the same size, under the same name (and its old mtime)
    image = tmp_path / "src_a" / "images" / "im1.png"
    before = image.stat()
    other = (tmp_path / "src_a" / "images" / "im2.png").read_bytes()
    assert len(other) == before.st_size
    image.write_bytes(other)
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert key_of(cfg, pm) != key
    # large sources are keyed by size + modification time instead of content: a touched file counts too
    monkeypatch.setattr(stage1, "CONTENT_HASH_LIMIT", 0)
    stat_key = key_of(cfg, pm)
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert key_of(cfg, pm) != stat_key


def test_the_stage1_key_follows_what_the_sources_hold_not_where_they_sit(tmp_path, monkeypatch):
    # a cluster's nodes mount the data at different paths; a moved dataset is the same data
    import shutil

    pm = make_pm()
    key = key_of(two_source_config(tmp_path), pm)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name in ("src_a", "src_b"):
        shutil.copytree(tmp_path / name, moved / name)
    datasets = [{"plugin": "coco", "options": {"annotation_file": str(moved / n / "annotations.json"), "name": n}}
                for n in ("src_a", "src_b")]
    datasets.append({"plugin": "blobs", "options": {"tasks": ["target"], "images_per_task": 16}})
    at_other_path = tiny_config(tmp_path, **{"data.datasets": datasets, "data.sources": ["src_a", "src_b"]})
    assert key_of(at_other_path, pm) == key
    monkeypatch.setattr(stage1, "CONTENT_HASH_LIMIT", 0)  # keyed by size + mtime: the location counts again
    assert key_of(at_other_path, pm) != key_of(two_source_config(tmp_path), pm)


def stage1_setup(tmp_path: Path):
    cfg = tiny_config(tmp_path, **{"training.pretrain_epochs": 1})
    pm = make_pm()
    sources = build_taskset(cfg, load_tasks(cfg, pm)).sources
    return cfg, pm, sources


def test_a_corrupted_or_swapped_cache_entry_is_reported_moved_aside_and_rebuilt(tmp_path, caplog):
    cfg, pm, sources = stage1_setup(tmp_path)
    first = stage1.stage1_checkpoint(cfg, pm, sources, progress=False)
    path = Path(first["checkpoint"])
    assert first["reused"] is False and first["sha256"] == sha256_of(path)
    assert stage1.stage1_checkpoint(cfg, pm, sources, progress=False)["reused"] is True
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # bytes flipped inside the cached file
    path.write_bytes(bytes(data))
    again = stage1.stage1_checkpoint(cfg, pm, sources, progress=False)
    assert again["reused"] is False and "checksum" in again["replaced"] and "corrupt" in caplog.text
    assert again["sha256"] == sha256_of(path)
    assert list(path.parent.glob(f"{path.name}.corrupt-*"))  # kept for inspection
    # another valid checkpoint copied over it: same story
    atomic_torch_save({"state_dict": {"w": torch.zeros(1)}}, path)
    assert stage1.stage1_checkpoint(cfg, pm, sources, progress=False)["reused"] is False
    # an unreadable record beside it
    path.with_suffix(".json").write_text("{garbage")
    assert "cannot be read" in stage1.stage1_checkpoint(cfg, pm, sources, progress=False)["replaced"]


def test_a_loaded_checkpoint_whose_bytes_changed_since_it_was_written_is_refused(tmp_path):
    det = tiny_detector.TinyDetector(2, 64)
    path = tmp_path / "ckpt.pth"
    save_detector_checkpoint(det, path)
    read_checkpoint_file(path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="changed since megatron wrote it"):
        read_checkpoint_file(path)


def test_stale_partial_checkpoints_of_killed_stage1_runs_are_removed(tmp_path):
    folder = tmp_path / "pretrain"
    folder.mkdir()
    stale = folder / f"tiny-0123456789abcdef.partial-{dead_pid()}.pth"
    live = folder / f"tiny-0123456789abcdef.partial-{os.getpid()}.pth"
    for p in (stale, live):
        p.write_bytes(b"half")
    assert stage1.remove_stale_partials(folder) == [stale]
    assert live.exists() and not stale.exists()
    other_host = folder / f"tiny-0123456789abcdef.partial-0badc0de-{dead_pid()}.pth"  # a node sharing the cache
    other_host.write_bytes(b"half")
    assert stage1.remove_stale_partials(folder) == [] and other_host.exists()


def test_a_stage1_that_finishes_second_keeps_the_first_processes_checkpoint(tmp_path, monkeypatch):
    # two array jobs train the same entry at once: the second must not swap the file under the first's checksum
    from megatron.atomic_io import write_checksum
    from megatron.config import ExperimentConfig

    cfg = ExperimentConfig.model_validate({"data": {"cache_dir": str(tmp_path)}})
    key = "fedcba9876543210" * 4
    path = stage1.stage1_cache_dir(cfg) / f"{cfg.detector.name}-{key[:16]}.pth"

    def pretrain_while_another_finishes(sub_cfg, pm, out, settings, progress=False, checksum=False):
        path.write_bytes(b"the first process's checkpoint")
        digest = write_checksum(path)
        path.with_suffix(".json").write_text(json.dumps({"cache_key": key, "complete": True, "sha256": digest,
                                                         "epochs": 3}))
        Path(out).write_bytes(b"this process's checkpoint")
        return types.SimpleNamespace(epochs=3, steps=9, losses=[1.0])

    monkeypatch.setattr(stage1, "pretrain", pretrain_while_another_finishes)
    entry = stage1.stage1_checkpoint(cfg, None, [], progress=False, cache_key=(key, {}))
    assert entry["reused"] is True and path.read_bytes() == b"the first process's checkpoint"
    assert entry["sha256"] == sha256_of(path) and not list(path.parent.glob("*.partial-*"))


def test_a_cache_entry_another_process_is_finishing_is_not_moved_aside_as_corrupt(tmp_path, monkeypatch):
    # between its rename and its description, another process's fresh entry looks incomplete: reading it as
    # corrupt would move a good checkpoint away under the process that is still writing it
    from megatron.config import ExperimentConfig

    cfg = ExperimentConfig.model_validate({"data": {"cache_dir": str(tmp_path)}})
    folder = stage1.stage1_cache_dir(cfg)
    folder.mkdir(parents=True)
    key = "0123456789abcdef" * 4
    path = folder / f"{cfg.detector.name}-{key[:16]}.pth"
    path.write_bytes(b"just renamed")  # its .json not written yet
    trained = []
    monkeypatch.setattr(stage1, "_train_into_cache", lambda *a, **k: trained.append(1) or {"checkpoint": str(path)})
    entry = stage1.stage1_checkpoint(cfg, None, [], progress=False, cache_key=(key, {}))
    assert trained and "replaced" not in entry  # a copy trained; nothing moved aside
    assert path.read_bytes() == b"just renamed" and not list(folder.glob("*.corrupt-*"))
    old = time.time() - stage1.IN_PROGRESS_S - 60
    os.utime(path, (old, old))  # the same state an hour on: an interrupted write, moved aside as before
    entry = stage1.stage1_checkpoint(cfg, None, [], progress=False, cache_key=(key, {}))
    assert "is missing" in entry["replaced"] and list(folder.glob("*.corrupt-*"))


# --- 3. checkpoints: an allow-list of what weights files hold ----------------------------------------------

@pytest.fixture
def no_unsafe(monkeypatch):
    monkeypatch.delenv(ALLOW, raising=False)


def test_a_checkpoint_written_by_mmengine_with_its_message_hub_loads_with_no_opt_in(tmp_path, no_unsafe):
    from mmengine.config import ConfigDict
    from mmengine.logging import MessageHub
    from mmengine.runner.checkpoint import get_state_dict, save_checkpoint, weights_to_cpu

    model = torch.nn.Linear(3, 2)
    hub = MessageHub.get_instance("hostile-inputs-test")
    hub.update_scalar("train/loss", 0.5)
    hub.update_scalar("train/loss", np.float32(0.25))
    hub.update_info("iter", np.int64(3))
    meta = {"epoch": np.int64(2), "iter": 10, "seed": np.int32(7), "hub": hub, "mmengine_version": "0.10.7",
            "dataset_meta": {"classes": ("lesion",)}, "mean": np.zeros((2, 2), np.float32),
            "cfg": ConfigDict(model=dict(type="YOLOX", widen_factor=0.375))}
    path = tmp_path / "epoch_2.pth"
    save_checkpoint({"meta": meta, "state_dict": weights_to_cpu(get_state_dict(model)),
                     "message_hub": hub.state_dict()}, str(path))
    with pytest.raises(pickle.UnpicklingError):  # torch's own safe loader refuses it ...
        torch.load(path, weights_only=True)
    obj = read_checkpoint_file(path)  # ... megatron's allows exactly these types
    assert torch.equal(obj["state_dict"]["weight"], model.weight.detach())
    assert obj["meta"]["epoch"] == 2 and obj["meta"]["hub"].get_scalar("train/loss").current() == 0.25
    assert obj["meta"]["cfg"].model.widen_factor == 0.375
    with pytest.raises(pickle.UnpicklingError):  # and only while megatron loads
        torch.load(path, weights_only=True)


class _Smuggler:
    """A ``meta`` value whose unpickling calls ``call(*args)``."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return (self.call, self.args)


def _payloads(marker: Path) -> dict[str, object]:
    import cProfile
    import runpy

    from mmengine.logging import HistoryBuffer

    code = f"open({str(marker)!r}, 'w').write('ran')"
    script = marker.with_suffix(".py")
    script.write_text(code)
    return {
        "os.system": _Smuggler(os.system, f"touch {marker}"),
        "cProfile.run": _Smuggler(cProfile.run, code),
        "runpy.run_path": _Smuggler(runpy.run_path, str(script)),
        "pickle.loads": _Smuggler(pickle.loads, pickle.dumps(_Smuggler(exec, code), protocol=2)),
        "builtins.exec": _Smuggler(exec, code),
        "getattr misuse": _Smuggler(getattr, HistoryBuffer, "__init__"),
    }


@pytest.mark.parametrize("name", ["os.system", "cProfile.run", "runpy.run_path", "pickle.loads", "builtins.exec",
                                  "getattr misuse"])
def test_a_checkpoint_smuggling_a_code_call_in_meta_is_refused_and_never_runs(tmp_path, no_unsafe, name):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    meta = {"epoch": np.int64(1), "hub": _payloads(marker)[name]}
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": meta}, path)
    msg = str(pytest.raises(CheckpointError, read_checkpoint_file, path).value)
    assert "would run code" in msg and str(path) in msg
    assert ALLOW not in msg  # never suggested for such a file
    assert not marker.exists()


def test_the_allow_list_is_by_construction_not_a_list_of_dangerous_modules():
    from megatron.safe_globals import is_data_global

    for name in ("torch._utils._rebuild_tensor_v2", "collections.OrderedDict", "numpy.dtype", "numpy.ndarray",
                 "numpy.core.multiarray._reconstruct", "numpy._core.multiarray.scalar",
                 "mmengine.logging.message_hub.MessageHub", "mmengine.logging.history_buffer.HistoryBuffer"):
        assert is_data_global(name), name
    for name in ("cProfile.run", "profile.run", "runpy._run_code", "pickle.loads", "timeit.timeit", "pdb.run",
                 "trace.Trace", "builtins.eval", "argparse.Namespace", "some_package.anything"):
        assert not is_data_global(name), name


# --- 4. a full disk -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     OSError(errno.EFBIG, "File too large"),
                                     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")])
def test_a_full_disk_while_writing_a_checkpoint_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch, failure):
    def full(obj, f):
        f.write(b"some bytes")
        raise failure

    monkeypatch.setattr(torch, "save", full)
    target = tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(StorageFullError) as info:
        atomic_torch_save({"w": torch.zeros(3)}, target)
    msg = str(info.value)
    assert str(target) in msg and "MB free" in msg and "ulimit -f" in msg and "inline_container" not in msg
    assert not list(target.parent.iterdir())


def test_the_file_size_limit_of_the_shell_gives_the_same_clear_error(tmp_path):
    script = ("import torch\nfrom megatron.atomic_io import atomic_torch_save\n"
              f"atomic_torch_save({{'w': torch.zeros(200000)}}, {str(tmp_path / 'big.pt')!r})\n")
    proc = subprocess.run(["bash", "-c", f"ulimit -f 64; exec {sys.executable} -c \"$0\"", script],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "StorageFullError" in proc.stderr and "no room" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_meta_training_is_recorded_as_such(tmp_path, monkeypatch):
    real = torch.save

    def full_for_checkpoints(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "learner_name" in obj:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_for_checkpoints)
    cfg = tiny_config(tmp_path, **{"training.meta_epochs": 1})
    with pytest.raises(StorageFullError):
        run_experiment(cfg, run_dir=tmp_path / "run", pm=make_pm(), progress=False)
    error = json.loads((tmp_path / "run" / "run.json").read_text())["error"]
    assert "no room" in error and "inline_container" not in error and str(tmp_path / "run") in error


# --- 5. command-line errors that name the right culprit ------------------------------------------------------

def test_predict_out_naming_an_existing_file_is_a_clear_error(tmp_path, capsys):
    existing = tmp_path / "results.json"
    existing.write_text("mine")
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    assert main(["predict", "--checkpoint", str(tmp_path / "m.pth"), str(image), "--out", str(existing)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "is a file, not a folder" in err and "Traceback" not in err and existing.read_text() == "mine"


def test_a_set_under_a_number_key_is_blamed_on_the_set(tmp_path, capsys):
    f = tmp_path / "exp.yaml"
    f.write_text("seed: 0\n")
    assert main(["config", "validate", str(f), "--set", "training.meta_epochs.x=1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "(from --set training.meta_epochs.x=1)" in err and "command line" in err


def test_a_second_benchmark_into_the_same_out_refuses_at_once(tmp_path):
    from megatron.benchmark.grid import load_benchmark_config, run_benchmark
    from megatron.training.rundir import lock_run_dir

    bcfg, base = load_benchmark_config(None, {}, {})
    with lock_run_dir(tmp_path, ".benchmark-0-of-1.lock"):  # the first benchmark, still running
        with pytest.raises(ConfigError, match="in use by another `megatron benchmark`") as info:
            run_benchmark(bcfg, base, tmp_path)
    assert f"PID {os.getpid()}" in str(info.value) and not (tmp_path / "cells").exists()


def test_an_unreadable_cell_record_gets_one_fix_from_the_benchmark_and_the_report(tmp_path):
    from megatron.benchmark import grid, rows

    bad = tmp_path / "cells" / "reptile-seed0" / "run.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{torn")
    from_benchmark = str(pytest.raises(MegatronError, grid.read_json, bad).value)
    from_report = str(pytest.raises(rows.ReportError, rows._read, bad).value)
    assert from_benchmark == from_report and "delete that cell's folder" in from_report


# --- 6. plugins that misspell a required method -----------------------------------------------------------------

def _misspelt(kind: str):
    from megatron.api import DatasetPlugin, Detector, MetaLearner, SimilarityMetric

    base, hook, method, typo = {
        "learner": (MetaLearner, "megatron_register_learners", "meta_step", "meta_stpe"),
        "dataset": (DatasetPlugin, "megatron_register_datasets", "load", "laod"),
        "similarity": (SimilarityMetric, "megatron_register_similarity_metrics", "summarize", "summarise"),
        "detector": (Detector, "megatron_register_detectors", "predict", "predcit"),
    }[kind]
    body = {"PLUGIN_NAME": f"typo-{kind}", typo: lambda self, *a: None, "__module__": "typo_pkg.plugin"}
    if kind == "similarity":
        body["distance"] = lambda self, a, b: 0.0
    if kind == "detector":
        body["loss"] = lambda self, batch, params=None: {}
    cls = type(f"Typo{kind.title()}", (base,), body)
    module = types.ModuleType("typo_pkg")
    setattr(module, hook, hookimpl(lambda: [cls]))
    return module, method, typo


@pytest.mark.parametrize("kind", ["learner", "dataset", "similarity", "detector"])
def test_a_misspelt_required_method_fails_at_registration_naming_plugin_package_and_method(kind):
    module, method, typo = _misspelt(kind)
    with pytest.raises(PluginError) as info:
        megatron.get_plugin_manager(autoload=False, extra=[("typo_pkg", module)])
    msg = " ".join(str(info.value).split())
    assert "'typo_pkg'" in msg and f"{method}()" in msg and f"{typo}: misspelt?" in msg
    assert f"typo-{kind}" in msg and "define the missing method" in msg


# --- 7. predictions never carry a degenerate box -----------------------------------------------------------------

def test_predict_drops_degenerate_boxes_and_clips_to_the_image():
    from megatron.data.preprocess import Preprocessor
    from megatron.evaluation.predictions import predict_task
    from megatron.types import Detections, ImageRecord, Task

    class Degenerate(torch.nn.Module):
        def predict(self, batch):
            boxes = np.array([[0, 128, 128, 0], [10, 10, 10, 20], [5, 5, 40, 90], [np.nan, 1, 2, 3]], np.float32)
            return [Detections(boxes, np.array([0.9996, 0.9, 0.8, 0.7], np.float32), np.zeros(4, np.int64))
                    for _ in batch.meta]

    task = Task("t", ["lesion"], [ImageRecord(1, None, 64, 48, np.zeros((0, 4)), np.zeros(0))],
                image_loader=lambda r: np.zeros((48, 64), np.uint8))
    [det] = predict_task(Degenerate(), task, Preprocessor(64), 1, torch.device("cpu"))
    assert det.boxes.tolist() == [[5, 5, 40, 48]] and det.scores.tolist() == [pytest.approx(0.8)]


# --- 8. what the config and its pages say -------------------------------------------------------------------------

def test_config_validate_data_refuses_what_run_refuses(tmp_path, capsys, tiny_plugins):
    f = tmp_path / "exp.yaml"
    cfg = tiny_config(tmp_path, **{"data.eval_images": 4, "data.validation_images": 4, "learner.name": "reptile"})
    f.write_text(json.dumps(cfg.model_dump(mode="json")))
    assert main(["config", "validate", str(f), "--data"]) == 2
    validate_err = " ".join(capsys.readouterr().err.split())
    with pytest.raises(DataError) as run_err:
        run_experiment(cfg, run_dir=tmp_path / "run", pm=make_pm(), progress=False)
    assert "data.validation_images" in validate_err and " ".join(str(run_err.value).split()) in validate_err


def test_eval_images_null_is_documented_as_the_code_does_it(capsys):
    from megatron.config import DataConfig

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "max(K, 40)" in help_text and "holds out all the rest" not in help_text
    assert "max(K, 40)" in DataConfig.model_fields["eval_images"].description


def test_the_dataset_contract_documents_problem_and_raise_for_errors_and_a_working_hint():
    from megatron.data.problems import Problem, raise_for_errors

    page = (Path(__file__).resolve().parent.parent / "registry_docs" / "contracts" / "dataset.md").read_text()
    assert "code=" in page and "raise_for_errors(problems, source" in page
    problem = Problem("error", "bad_row", "boxes.csv", "line 4", "no box", "add one")
    with pytest.raises(DataError) as info:
        raise_for_errors([problem], "boxes.csv")
    assert "megatron data check -c CONFIG" in str(info.value) and "data check boxes.csv" not in str(info.value)
