"""benchmarks/device_check.sh and its helper, tested without a GPU (``--cpu-only`` runs the same code paths on the
CPU and names what it skipped)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load_benchmark_module(name: str):
    """A script of benchmarks/ (not a package) loaded by its path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


device_check = _load_benchmark_module("device_check")


def _amp_row(learner, amp, ok=True, **kw):
    row = {"learner": learner, "amp": amp, "ok": ok, "problems": [] if ok else ["first loss 50% from fp32's"],
           "losses": [10.0, 9.0], "scales": [None, None], "eval_loss": 9.5, "seconds_per_meta_step": 0.1}
    row.update(kw)
    return row


def test_summary_names_every_part_and_fails_when_one_failed(tmp_path):
    env = {"device": "NVIDIA Test GPU", "torch": "2.x", "cuda": "13.0", "when": "now"}
    (tmp_path / "amp.json").write_text(json.dumps({
        "environment": env, "ok": False, "skipped": [], "failures": ["maml amp=fp16: first loss 50% from fp32's"],
        "rows": [_amp_row("maml", "off"), _amp_row("maml", "fp16", ok=False, first_loss_rel_diff=0.5, scales=[1024.0, 2048.0])]}))
    (tmp_path / "distributed.json").write_text(json.dumps({
        "environment": env, "ok": True, "skipped": [], "failures": [], "backend": "gloo",
        "attempts": [{"backend": "nccl", "ok": False}, {"backend": "gloo", "ok": True}],
        "cases": {"maml": {"ranks_identical": True, "max_rel_diff_to_one_process": 1e-7, "seconds_two": 1.0, "seconds_one": 1.5}}}))
    assert device_check.part_summary(tmp_path) == 1  # the amp part failed, and no benchmark ran
    text = (tmp_path / "summary.md").read_text()
    assert "NVIDIA Test GPU" in text and "amp: **FAILED**" in text and "first loss 50%" in text
    assert "backend **gloo** (attempts: nccl failed, gloo ok)" in text and "| maml | True | 1.0e-07 |" in text
    assert "| maml | fp16 |" in text and "2048" in text  # the fp16 scaler's scale is shown
    assert "bench_learners: **not run**" in text


def test_device_slug_is_a_folder_name():
    assert device_check.slug("NVIDIA H200 (141 GB)") == "nvidia-h200-141-gb"


@pytest.fixture(scope="module")
def amp_runs(tmp_path_factory):
    """The amp part on the CPU for one learner: as it is, and with a precision path that changes the loss."""
    from megatron.api.learner import MetaLearner

    good = device_check.part_amp(torch.device("cpu"), 64, 1, ["finetune"], tmp_path_factory.mktemp("good"), True)
    original = MetaLearner.loss

    def drifting_loss(self, detector, batch, params=None):  # a broken bf16 path: the loss comes out 1.5x
        loss = original(self, detector, batch, params)
        return loss * 1.5 if self.ctx.amp == "bf16" else loss

    MetaLearner.loss = drifting_loss
    try:
        bad = device_check.part_amp(torch.device("cpu"), 64, 1, ["finetune"], tmp_path_factory.mktemp("bad"), True)
    finally:
        MetaLearner.loss = original
    return good, bad


def test_amp_check_passes_on_the_cpu_and_says_what_it_skipped(amp_runs):
    good, _ = amp_runs
    assert good["ok"], good["failures"]
    assert [r["amp"] for r in good["rows"]] == ["off", "control1", "control2", "bf16"]
    assert any("fp16" in s for s in good["skipped"])
    bf16 = good["rows"][-1]
    assert bf16["first_loss_rel_diff"] <= bf16["first_loss_allowed"] and bf16["update_norm"] > 0


def test_amp_check_fails_a_precision_path_that_changes_the_result(amp_runs):
    _, bad = amp_runs
    assert not bad["ok"]
    assert any(f.startswith("finetune amp=bf16: first loss") for f in bad["failures"])
    assert all(r["ok"] for r in bad["rows"] if r["amp"] != "bf16")


@pytest.mark.slow  # ~3-4 minutes on one core: every learner, two processes, the benchmark
def test_the_whole_device_check_runs_on_the_cpu(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--cpu-only", "--out", str(out),
                           "--python", sys.executable], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (out / "summary.md").read_text()
    assert "amp: **ok**" in text and "distributed: **ok**" in text and "skipped: fp16" in text
    amp = json.loads((out / "amp.json").read_text())
    assert {r["learner"] for r in amp["rows"]} == set(device_check.LEARNERS)
    dist = json.loads((out / "distributed.json").read_text())
    assert dist["backend"] == "gloo" and all(c["ranks_identical"] for c in dist["cases"].values())
    assert json.loads((out / "bench_learners.json").read_text())["inner_steps"] == 3
