"""benchmarks/compare_finetune_epochs.py: the F = 10 / F = 20 comparison of whole default runs, on hand-made records
(verdicts, the interaction, the pairing checks) and on the committed folder (its README is what its records give)."""
from __future__ import annotations

import importlib.util
import re
import statistics
from pathlib import Path

import pytest

from megatron.benchmark.rows import ReportError

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_finetune_epochs",
                                               ROOT / "benchmarks" / "compare_finetune_epochs.py")
cfe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cfe)


def _record(seed, epochs, reptile, finetune, sha="abc", lr=1e-3):
    learner = lambda v: {"final": {"mAP50": v}, "best": {"mAP50": v},  # noqa: E731
                         "compute": {"spent": 200 * epochs}, "epochs": [{"wall_s": 2.0 * epochs}] * 4}
    return {"status": "complete", "seed": seed, "megatron_version": "0.1.0", "pretrain": {"sha256": sha},
            "eval_images": 140,
            "config": {"seed": seed, "training": {"finetune_epochs": epochs, "finetune_lr": lr},
                       "output": {"dir": f"/runs/f{epochs}", "name": f"seed{seed}"}},
            "learners": {"reptile": learner(reptile), "finetune": learner(finetune)}}


# per seed: the baseline gains ~30 points with F = 20, the meta-learner's lead of ~10 points vanishes
BASE_10 = [0.40, 0.42, 0.38, 0.41, 0.39]
NOISE = [0.001, -0.002, 0.0015, -0.001, 0.0005]


def _sets():
    short = {s: _record(s, 10, BASE_10[s] + 0.10 + NOISE[s], BASE_10[s]) for s in range(5)}
    long = {s: _record(s, 20, BASE_10[s] + 0.30 - NOISE[s], BASE_10[s] + 0.30 + NOISE[s]) for s in range(5)}
    return short, long


def test_each_row_gets_the_verdict_its_paired_seeds_give():
    short, long = _sets()
    rows = {r["what"]: r for r in cfe.compare(short, long)}
    base = rows["`finetune`, final model"]
    assert base["change"].mean == pytest.approx(30.0, abs=0.2)  # +0.30 mAP50 = +30 points on every seed
    assert base["verdicts"] == {"change": "better"}
    gap = rows["`reptile` − `finetune` (paired), final model"]
    assert gap["short"].mean == pytest.approx(10.0, abs=0.1) and gap["verdicts"]["short"] == "better"
    assert gap["long"].mean == pytest.approx(0.0, abs=0.1)
    assert gap["verdicts"]["long"] == "equivalent"  # |gap| < 0.1 point on every seed, margin ±5
    assert gap["change"].mean == pytest.approx(-10.0, abs=0.1) and gap["verdicts"]["change"] == "worse"
    block = cfe.readme_block(short, long)
    assert "| F = 10" in block and "| F = 20" in block
    assert cfe.ordered(long, short) == (short, long)
    assert "over the 10 paired comparisons" in block and "held-out mAP50 (140 images)" in block
    long_base = [100 * (BASE_10[s] + 0.30 + NOISE[s]) for s in range(5)]
    row = f"| finetune, F = 20 | {', '.join(f'{v:.1f}' for v in long_base)} | {statistics.stdev(long_base):.1f} |"
    assert row in block
    assert "| 4,000 | 160–160 s |" in block  # passes and the sum of the meta-epochs' wall times


def test_runs_that_differ_in_more_than_the_fine_tuning_length_are_refused():
    short, long = _sets()
    long[2] = _record(2, 20, 0.7, 0.7, lr=3e-4)
    long[3]["pretrain"]["sha256"] = "other"
    del long[4]
    with pytest.raises(ReportError) as err:
        cfe.compare(short, long)
    text = str(err.value)
    assert "seed 2: the configs differ in training.finetune_lr" in text
    assert "seed 3: different stage-1 checkpoints" in text
    assert "the seeds differ" in text
    assert "only --set training.finetune_epochs differing" in text  # the fix


def test_an_unfinished_run_is_named(tmp_path):
    path = tmp_path / "runs" / "seed0" / "run.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"status": "running", "seed": 0}')
    with pytest.raises(ReportError, match="seed0/run.json: the run is not complete"):
        cfe.load_records(tmp_path)


def test_the_committed_readme_is_what_its_records_give():
    block = cfe.readme_block(*cfe.ordered(cfe.load_records(cfe.REFERENCE), cfe.load_records(cfe.FOLDER)))
    text = (cfe.FOLDER / "README.md").read_text()
    assert block in text
    # the prose around the table states only intervals the table gives
    prose = " ".join(text.replace(block, "").replace("−", "-").split())
    stated = re.findall(r"[+-]?\d+\.\d \[[+-]?\d+\.\d, [+-]?\d+\.\d\]", prose)
    assert stated and [s for s in stated if s not in block] == []
