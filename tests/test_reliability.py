"""Reliability without a run: clear errors for bad input — options and --set, null overrides, `config validate`,
checkpoint diagnosis, split messages, and the noise items (OpenCV, fixes, JSON position, duplicate ids,
error labels)."""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

import tiny_detector  # noqa: E402

import megatron  # noqa: E402
from megatron.cli import main  # noqa: E402
from megatron.config import load_config  # noqa: E402
from megatron.errors import ConfigError, DataError  # noqa: E402

# --- 1. dedicated options and --set: both always apply, never silently, in either order -------------------

# (flag, value on the command line, config key, --set text, expected config value)
COMMON = [
    ("--learner", "maml", "learner.name", "maml", "maml"),
    ("--detector", "faster-rcnn", "detector.name", "faster-rcnn", "faster-rcnn"),
    ("--checkpoint", "w.pt", "detector.checkpoint", "w.pt", Path("w.pt")),
    ("--seed", "5", "seed", "5", 5),
    ("--amp", "bf16", "training.amp", "bf16", "bf16"),
    ("--device", "cpu", "training.device", "cpu", "cpu"),
]
OUT = [("--out", "elsewhere", "output.dir", "elsewhere", Path("elsewhere"))]
RUN_ONLY = [
    ("--meta-epochs", "3", "training.meta_epochs", "3", 3),
    ("--budget", "500", "training.compute_budget", "500", 500),
    ("--select-sources", "2", "similarity.select_sources", "2", 2),
    ("--similarity", "embedding", "similarity.metric", "embedding", "embedding"),
    ("--no-baseline", None, "output.compare_baseline", "false", False),
    ("--name", "mine", "output.name", "mine", "mine"),
]
PRETRAIN_ONLY = [("--batch-size", "4", "training.batch_size", "4", 4)]
SIMILARITY_ONLY = [
    ("--target", "beta", "data.target", "beta", "beta"),
    ("--metrics", "embedding,wasserstein", "similarity.metrics", "[embedding, wasserstein]",
     ["embedding", "wasserstein"]),
]


class _Stop(Exception):
    pass


@pytest.fixture
def commands(monkeypatch, tmp_path):
    """``capture[command](argv) -> config`` for the commands that take dedicated options and --set; the work
    itself (run, pretrain, similarity) is replaced by a stub that records the config it was given."""
    seen = {}

    def fake_run(cfg, run_dir=None, pm=None, resume=False, progress=True, **kw):
        seen["cfg"] = cfg
        return {"learners": {}, "run_dir": str(tmp_path / "run"), "config": {}}

    def fake_pretrain(cfg, pm, out, settings, progress=True, **kw):
        seen["cfg"], seen["settings"] = cfg, settings
        return SimpleNamespace(tasks=[], categories=[], losses=[], steps=0, seconds=0.0, path=out)

    def fake_compute(cfg, pm, target, metric_names, progress=None):
        seen["cfg"], seen["target"], seen["metrics"] = cfg, target, metric_names
        return {"target": target, "metrics": {}}, {}

    import megatron.commands.similarity as similarity_cmd
    import megatron.training.pretrain as pretrain_mod
    import megatron.training.runner as runner

    monkeypatch.setattr(runner, "run_experiment", fake_run)
    monkeypatch.setattr(pretrain_mod, "pretrain", fake_pretrain)
    monkeypatch.setattr(similarity_cmd, "compute", fake_compute)
    monkeypatch.chdir(tmp_path)
    extra = {
        "run": ["run", "--no-progress"],
        "pretrain": ["pretrain", "--out", str(tmp_path / "p.pt"), "--no-progress"],
        "similarity": ["similarity", "--out", str(tmp_path / "sim"), "--no-plots"],
        "config show": ["config", "show"],
    }

    def run(command, argv):
        seen.clear()
        rc = main([*extra[command], *argv])
        return rc, seen

    return run


def _cases():
    table = {"run": COMMON + OUT + RUN_ONLY, "pretrain": COMMON + PRETRAIN_ONLY,
             "similarity": COMMON + SIMILARITY_ONLY, "config show": COMMON + OUT}
    return [pytest.param(cmd, *case, id=f"{cmd}:{case[0]}") for cmd, cases in table.items() for case in cases]


def _config(rc, seen, capsys, command):
    if command == "config show":
        return yaml.safe_load(capsys.readouterr().out)
    return seen["cfg"].model_dump(mode="json")


def _value(dumped, key):
    for part in key.split("."):
        dumped = dumped[part]
    return dumped


def _json(value):
    return json.loads(json.dumps(value, default=str))


@pytest.mark.parametrize("command,flag,value,key,set_text,expected", _cases())
def test_dedicated_option_and_set_each_apply_and_together_are_refused(commands, capsys, command, flag, value, key,
                                                                      set_text, expected):
    needs = ["--set", "similarity.select_sources=2"] if flag == "--similarity" else []
    option = [flag] if value is None else [flag, value]
    # --set alone applies (it was dropped for the run-only keys: their options' None defaults came after it)
    rc, seen = commands(command, ["--set", f"{key}={set_text}"])
    assert rc == 0
    assert _value(_config(rc, seen, capsys, command), key) == _json(expected)
    # the dedicated option alone applies
    rc, seen = commands(command, [*option, *needs])
    assert rc == 0
    assert _value(_config(rc, seen, capsys, command), key) == _json(expected)
    # both, in either order: an error naming both, and nothing runs
    for argv in ([*option, "--set", f"{key}={set_text}"], ["--set", f"{key}={set_text}", *option]):
        capsys.readouterr()
        rc, seen = commands(command, argv)
        err = " ".join(capsys.readouterr().err.split())
        assert rc == 2 and "cfg" not in seen
        assert flag in err and f"--set {key}=" in err and "only one" in err


@pytest.mark.parametrize("key,bad", [("training.meta_epochs", "0"), ("training.compute_budget", "-5"),
                                     ("similarity.select_sources", "0"), ("similarity.metric", "{a: 1}"),
                                     ("output.name", "[1, 2]")])
def test_bad_set_values_for_run_keys_exit_2(commands, capsys, key, bad):
    rc, seen = commands("run", ["--set", f"{key}={bad}"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "cfg" not in seen
    assert key in err and f"--set {key}={bad}" in err


def test_bad_dedicated_values_exit_2_naming_the_option(commands, capsys):
    rc, seen = commands("run", ["--meta-epochs", "0"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "cfg" not in seen and "training.meta_epochs" in err and "--meta-epochs 0" in err


def test_similarity_without_select_sources_is_still_an_error_but_set_counts(commands, capsys):
    rc, _ = commands("run", ["--similarity", "embedding"])
    assert rc == 2 and "--select-sources" in capsys.readouterr().err
    rc, seen = commands("run", ["--similarity", "embedding", "--set", "similarity.select_sources=3"])
    assert rc == 0 and seen["cfg"].similarity.select_sources == 3 and seen["cfg"].similarity.metric == "embedding"


def test_later_set_of_one_key_wins_and_pretrain_uses_the_batch_size(commands):
    rc, seen = commands("pretrain", ["--set", "training.batch_size=2", "--set", "training.batch_size=6"])
    assert rc == 0 and seen["settings"].batch_size == 6


def test_similarity_options_reach_the_computation(commands):
    rc, seen = commands("similarity", ["--target", "beta", "--metrics", "embedding"])
    assert rc == 0 and seen["target"] == "beta" and seen["metrics"] == ["embedding"]


def test_help_documents_how_options_combine(capsys):
    for argv in (["run", "--help"], ["config", "show", "--help"], ["pretrain", "--help"], ["similarity", "--help"],
                 ["benchmark", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())
        assert "--set" in text and ("cannot be given together" in text or "error (exit 2)" in text), argv


@pytest.mark.parametrize("flag,value,key", [("--detector", "yolox", "detector.name"),
                                            ("--budget", "100", "training.compute_budget")])
def test_benchmark_dedicated_option_and_set(monkeypatch, capsys, flag, value, key):
    import megatron.benchmark.grid as grid

    calls = []

    def fake_load(path, grid_overrides, base_overrides):
        calls.append((grid_overrides, base_overrides))
        raise _Stop

    monkeypatch.setattr(grid, "load_benchmark_config", fake_load)
    with pytest.raises(_Stop):
        main(["benchmark", "--set", f"{key}={value}", "--set", "training.grad_clip=null"])
    assert calls[-1][1] == {key: yaml.safe_load(value), "training.grad_clip": None}
    with pytest.raises(_Stop):
        main(["benchmark", flag, value])
    for argv in ([flag, value, "--set", f"{key}={value}"], ["--set", f"{key}={value}", flag, value]):
        calls.clear()
        assert main(["benchmark", *argv]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert not calls and flag in err and f"--set {key}=" in err


# --- 3. --set KEY=null unsets what the YAML set ----------------------------------------------------------

def test_set_null_unsets_a_key_the_yaml_sets(tmp_path, capsys):
    f = tmp_path / "exp.yaml"
    f.write_text("data:\n  eval_images: 10\ndetector:\n  checkpoint: w.pt\ntraining:\n  grad_clip: 5.0\n")
    assert main(["config", "show", "-c", str(f), "--set", "data.eval_images=null", "--set",
                 "detector.checkpoint=null", "--set", "training.grad_clip=null"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["data"]["eval_images"] is None and shown["detector"]["checkpoint"] is None
    assert shown["training"]["grad_clip"] is None
    cfg = load_config(f, {"training.grad_clip": None})
    assert cfg.training.grad_clip is None and cfg.data.eval_images == 10


def test_set_into_a_list_by_index(tmp_path):
    cfg = load_config(None, {"data.datasets": [{"plugin": "blobs"}], "data.datasets.0.options.images_per_task": 4})
    assert cfg.data.datasets[0].options == {"images_per_task": 4}
    with pytest.raises(ConfigError, match=r"data.datasets is a list of 1 item\(s\)"):
        load_config(None, {"data.datasets": [{"plugin": "blobs"}], "data.datasets.3.plugin": "coco"})


@pytest.mark.parametrize("item", ["novalue", "=3", "a..b=1", "training. x=1"])
def test_malformed_set_items(capsys, item):
    assert main(["config", "show", "--set", item]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


# --- 8. config validate: every error in one pass; --data checks the data ---------------------------------


def test_validate_reports_every_error_at_once(tmp_path, capsys):
    f = tmp_path / "exp.yaml"
    f.write_text(yaml.safe_dump({
        "seed": "abc",
        "learner": {"name": "reptil"},
        "detector": {"name": "yolo-x"},
        "data": {"datasets": [{"plugin": "cocoo"}, {"plugin": "medsynth", "options": {"bogus_opt": 1}}]},
        "similarity": {"metrics": ["wasserstein", "nope"]},
        "loggers": ["tensorbored"],
    }))
    assert main(["config", "validate", str(f)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    for expected in ("seed", "learner.name", "'reptil'", "detector.name", "'yolo-x'", "data.datasets.0.plugin",
                     "'cocoo'", "data.datasets.1.options.bogus_opt", "similarity.metrics.1", "'nope'",
                     "loggers.0.name", "'tensorbored'"):
        assert expected in err, expected
    assert "7 problems found" in err


def test_one_plugins_option_error_does_not_hide_another(tmp_path, capsys):
    f = tmp_path / "exp.yaml"
    f.write_text("learner:\n  name: maml\n  options: {first_ordre: true}\ndetector:\n  options: {sise: tiny}\n")
    assert main(["config", "validate", str(f)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "learner.options.first_ordre" in err and "detector.options.sise" in err


BLOBS = {"data": {"datasets": [{"plugin": "blobs", "options": {"images_per_task": 16}}], "target": "target",
                  "shots": 6, "eval_images": 6},
         "detector": {"name": "tiny"}}


def _write(tmp_path, data, **changes):
    data = json.loads(json.dumps(data))
    for dotted, value in changes.items():
        cur = data
        *parents, last = dotted.split(".")
        for p in parents:
            cur = cur.setdefault(p, {})
        cur[last] = value
    f = tmp_path / "exp.yaml"
    f.write_text(yaml.safe_dump(data))
    return str(f)


def test_validate_without_data_says_what_it_did_not_check(tmp_path, capsys, tiny_plugins):
    f = _write(tmp_path, BLOBS, **{"data.target": "nosuch"})
    assert main(["config", "validate", f]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "valid" in out and "data.target" in out and "--data" in out


def test_validate_data_checks_target_k_and_held_out(tmp_path, capsys, tiny_plugins):
    assert main(["config", "validate", _write(tmp_path, BLOBS), "--data"]) == 0
    assert "data checked" in capsys.readouterr().out
    assert main(["config", "validate", _write(tmp_path, BLOBS, **{"data.target": "nosuch"}), "--data"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "data.target" in err and "'nosuch'" in err and "alpha" in err
    assert main(["config", "validate", _write(tmp_path, BLOBS, **{"data.shots": 12}), "--data"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "16 images" in err and "data.shots to at most 10" in err and "data.eval_images to at most 4" in err
    assert main(["config", "validate", _write(tmp_path, BLOBS, **{"data.sources": ["alpha", "omega"]}), "--data"]) == 2
    assert "unknown task(s) omega" in capsys.readouterr().err


def test_validate_takes_set(tmp_path, capsys, tiny_plugins):
    f = _write(tmp_path, BLOBS)
    assert main(["config", "validate", f, "--set", "training.meta_epochs=0"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "training.meta_epochs" in err and "(from --set training.meta_epochs=0)" in err


# --- 6. checkpoint diagnosis -----------------------------------------------------------------------------

class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def no_unsafe(monkeypatch):
    monkeypatch.delenv("MEGATRON_ALLOW_UNSAFE_CHECKPOINTS", raising=False)


def test_random_bytes_are_not_a_checkpoint(tmp_path, no_unsafe):
    from megatron.training.weights import CheckpointError, read_checkpoint_file

    path = tmp_path / "random.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    msg = str(pytest.raises(CheckpointError, read_checkpoint_file, path).value)
    assert str(path) in msg and "not a PyTorch checkpoint" in msg
    assert "mmdet" not in msg.split("Fix:")[0] and "MEGATRON_ALLOW_UNSAFE_CHECKPOINTS" not in msg


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_a_pickle_that_runs_code_is_refused_without_advice_to_allow_it(tmp_path, no_unsafe, container):
    from megatron.training.weights import CheckpointError, read_checkpoint_file

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if container == "torch.save":
        torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _RunsCode(str(marker))}, path)
    else:
        path.write_bytes(pickle.dumps(_RunsCode(str(marker)), protocol=2))
    msg = str(pytest.raises(CheckpointError, read_checkpoint_file, path).value)
    assert "would run code" in msg and "system" in msg
    assert "MEGATRON_ALLOW_UNSAFE_CHECKPOINTS" not in msg and "mmdet" not in msg
    assert not marker.exists()  # diagnosing never runs the file


def test_an_object_off_the_allow_list_is_refused_with_torchs_whole_reason_and_no_opt_in_advice(tmp_path, no_unsafe):
    from megatron.training.weights import CheckpointError, read_checkpoint_file, torch_reason

    path = tmp_path / "mm.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": {"hub": argparse.Namespace(x=1)}}, path)
    with pytest.raises(Exception) as raw:
        torch.load(path, weights_only=True)
    msg = str(pytest.raises(CheckpointError, read_checkpoint_file, path).value)
    reason = torch_reason(str(raw.value)).rstrip(".")
    assert reason and reason in msg  # torch's reason in full, not cut mid-sentence
    assert "argparse.Namespace" in msg and "MEGATRON_ALLOW_UNSAFE_CHECKPOINTS" not in msg
    assert "In PyTorch 2.6" not in msg and "add_safe_globals" not in msg  # torch's general advice is left out


def test_torch_reason_keeps_whole_sentences():
    from megatron.training.weights import torch_reason

    long = "Weights only load failed. In PyTorch 2.6, we changed things.\n" + \
        "WeightsUnpickler error: First sentence is here. " + "Second sentence is very long " * 30 + "end."
    reason = torch_reason(long, limit=100)
    assert reason == "First sentence is here."


# --- 7. a target too small: only possible fixes --------------------------------------------------------

def _task(n):
    from megatron.types import ImageRecord, Task

    records = [ImageRecord(i, None, 32, 32, np.array([[1, 1, 9, 9]]), np.array([0]), f"{i}.png") for i in range(n)]
    return Task(name="eit", categories=["lesion"], records=records, image_loader=lambda r: np.zeros((32, 32), np.uint8))


@pytest.mark.parametrize("n,shots,eval_images,fixes,not_fixes", [
    (6, 1, 6, ["data.eval_images to at most 5", "add at least 1 image"], ["data.shots to at most"]),
    (6, 6, 3, ["data.shots to at most 3", "add at least 3 image"], ["data.eval_images to at most"]),
    (5, 2, None, ["set data.eval_images to at most 3", "add at least 2 image"], ["data.shots to at most"]),
    (8, 4, None, ["data.shots to at most 3", "data.eval_images to at most 4"], []),
    (1, 1, None, ["add at least 5 image"], ["data.shots to at most", "data.eval_images to at most"]),
])
def test_a_target_too_small_suggests_only_possible_fixes(n, shots, eval_images, fixes, not_fixes):
    from megatron.data.episodes import split_target

    msg = str(pytest.raises(DataError, split_target, _task(n), shots, eval_images, 0).value)
    assert "at most 0" not in msg and f"has {n} images" in msg
    for fix in fixes:
        assert fix in msg, (fix, msg)
    for fix in not_fixes:
        assert fix not in msg, (fix, msg)
    if eval_images is None:
        assert "data.eval_images" in msg


# --- 10. noise ------------------------------------------------------------------------------------------------

def _truncated_png(path: Path) -> None:
    from megatron.data.io import write_image

    write_image(path, (np.arange(64 * 48) % 251).astype(np.uint8).reshape(48, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_png_gives_one_error_and_no_opencv_warning(tmp_path, capfd):
    from megatron.data.io import read_image

    path = tmp_path / "t.png"
    _truncated_png(path)
    capfd.readouterr()
    with pytest.raises(DataError, match="t.png"):
        read_image(path)
    captured = capfd.readouterr()
    assert "WARN" not in captured.err and "grfmt" not in captured.err and captured.out == ""


def test_data_check_prints_a_fix_once(tmp_path, capsys):
    from test_coco_yolo import make_coco

    make_coco(tmp_path)
    _truncated_png(tmp_path / "images" / "b.png")
    assert main(["data", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.count("re-export it as") == 1 and "fix: re-export" not in out.split("\n    fix:")[0]


def test_truncated_json_keeps_the_position(tmp_path):
    from megatron.data.coco import load_json

    path = tmp_path / "annotations.json"
    path.write_text('{"images": [{"file_name": "abc')
    msg = str(pytest.raises(DataError, load_json, path).value)
    assert "truncated" in msg and "line 1, column 31" in msg and "line 1 column 27" in msg
    assert "starting at;" not in msg and "starting at: line 1 column 27" in msg


def test_duplicate_image_ids_are_one_error_not_a_cascade(tmp_path):
    from test_coco_yolo import coco_problems

    images = [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
              {"id": 2, "file_name": "b.png", "width": 640, "height": 480},
              {"id": 2, "file_name": "c.png", "width": 640, "height": 480}]
    annotations = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5]}] + [
        {"id": 10 + k, "image_id": 2, "category_id": 7, "bbox": [300, 300, 20, 20]} for k in range(12)]
    task, problems = coco_problems(tmp_path, images=images, annotations=annotations,
                                   categories=[{"id": 7, "name": "mass"}])
    assert [p.code for p in problems] == ["image_duplicate_id"], [str(p) for p in problems]
    p = problems[0]
    assert "b.png" in p.message and "c.png" in p.message and "12 annotation(s)" in p.message
    assert [r.image_id for r in task.records] == [1]


def test_errors_are_labelled_with_where_they_came_from(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("seed: abc\n")
    msg = str(pytest.raises(ConfigError, load_config, f, {"training.meta_epochs": 0},
                            origins={"training.meta_epochs": "--set training.meta_epochs=0"}).value)
    lines = msg.splitlines()
    assert lines[0].startswith(f"{f} and the command line: 2 error(s)")
    assert any(line.strip().startswith("seed:") and "(from" not in line for line in lines)
    assert any("training.meta_epochs" in line and line.endswith("(from --set training.meta_epochs=0)")
               for line in lines)
    only_cli = str(pytest.raises(ConfigError, load_config, f.with_name("ok.yaml").write_text("{}") and
                                 f.with_name("ok.yaml"), {"training.meta_epochs": 0}).value)
    assert only_cli.startswith("command line:") and str(f.with_name("ok.yaml")) not in only_cli.splitlines()[0]


def test_error_messages_are_printed_as_written_not_as_markup(capsys):
    assert main(["config", "show", "--set", "training.meta_epochs=[1]"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "(from --set training.meta_epochs=[1])" in err
