"""megatron.benchmark.report: statistics in words, rebuilding from records, merging, plots."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

import _benchmark_fakes as fakes
from megatron.benchmark import grid as bm
from megatron.checkpoint import atomic_write_json
from megatron.cli import main
from megatron.benchmark.report import ReportError, build_report, load_rows

BASE = {"data": {"sources": fakes.SOURCES}, "training": {"meta_epochs": 3, "source_epochs": 10, "finetune_epochs": 5}}
FROZEN = {"name": "incremental", "label": "incremental-frozen",
          "options": {"label_for_fake": "incremental-frozen"}}


def run_grid(out: Path, report: bool = True, **grid) -> Path:
    bcfg, _ = bm.load_benchmark_config(None, {"budget": 6000, **grid})
    bm.run_benchmark(bcfg, BASE, out, runner=fakes.fake_runner, progress=False, report=report)
    return out


@pytest.fixture(scope="module")
def comparison_dir(tmp_path_factory) -> Path:
    return run_grid(tmp_path_factory.mktemp("cmp") / "bench", learners=["reptile", "maml", FROZEN], seeds=[0, 1, 2])


def verdict_line(text: str, learner: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"- **{learner}** vs finetune"))


def test_report_words_each_comparison_by_its_interval(comparison_dir):
    text = (comparison_dir / "report.md").read_text()
    assert verdict_line(text, "reptile").endswith("→ **better**.")
    assert "+5.0 [+5.0, +5.0] mAP50 points over 3 paired seed(s)" in verdict_line(text, "reptile")
    # maml: +0.33 points on average but seed noise of several points: the CI includes 0, so no claim
    assert verdict_line(text, "maml").endswith("→ **no significant difference (CI includes 0)**.")
    assert "better" not in verdict_line(text, "maml")
    assert verdict_line(text, "incremental-frozen").endswith("→ **worse**.")
    assert "points (x100" in text and "95% Student-t" in text


def test_report_tables_in_points_with_ci(comparison_dir):
    text = (comparison_dir / "report.md").read_text()
    # finetune mAP50 over seeds 0,1,2: 0.30 + {0, .08, -.04} + 0.06 + 0.02 -> 38, 46, 34 points: mean 39.3
    row = next(line for line in text.splitlines() if line.startswith("| finetune | 3 |"))
    assert row.split(" | ")[2].startswith("39.3 [")
    assert "| maml | mAP50 | 3 | +0.3 [" in text


def test_single_seed_gives_no_ci_and_no_claim(tmp_path):
    out = run_grid(tmp_path / "one", learners=["reptile"], seeds=[0])
    text = (out / "report.md").read_text()
    assert "CI not available (fewer than 2 paired seeds)" in verdict_line(text, "reptile")
    assert "better" not in verdict_line(text, "reptile")
    assert "(n=1, no CI)" in text


def test_results_files_one_row_per_cell(comparison_dir):
    rows = json.loads((comparison_dir / "results.json").read_text())
    assert len(rows) == 4 * 3
    r = next(r for r in rows if r["learner"] == "reptile" and r["seed"] == 1)
    assert r["mAP50"] == pytest.approx(fakes.final_map50("reptile", 1, 6, 20, 0.001))
    assert r["compute_spent"] == 6000 and r["sources"] == fakes.SOURCES and len(r["epochs"]) == 3
    with open(comparison_dir / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 12
    assert {"cell_id", "learner", "seed", "n_sources", "sources", "shots", "lr", "selection", "mAP50", "F1",
            "compute_spent", "wall_s", "epochs"} <= set(table[0])
    assert json.loads(table[0]["epochs"])[0]["meta_epoch"] == 1


def test_report_rebuilds_from_records_only(comparison_dir, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(comparison_dir, d)
    before = json.loads((d / "results.json").read_text())
    for name in ("results.json", "results.csv", "report.md", "benchmark.json"):
        (d / name).unlink()
    shutil.rmtree(d / "plots")
    assert main(["report", str(d)]) == 0
    after = json.loads((d / "results.json").read_text())
    strip = lambda rs: [{k: v for k, v in r.items()} for r in rs]  # noqa: E731
    assert strip(after) == strip(before)
    assert "→ **better**" in (d / "report.md").read_text()
    assert (d / "plots" / "paired_differences.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merging_dedupes_identical_cells_and_flags_conflicts(comparison_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(comparison_dir, other)
    res = build_report([comparison_dir, other], tmp_path / "merged")
    assert len(res.rows) == 12 and not res.warnings
    # one copy of one cell with different numbers: kept once, and the report warns
    rec_path = next((other / "cells").iterdir()) / "run.json"
    rec = json.loads(rec_path.read_text())
    for lrec in rec["learners"].values():
        lrec["final"]["mAP50"] += 0.1
    atomic_write_json(rec_path, rec)
    res = build_report([comparison_dir, other], tmp_path / "merged2")
    assert len(res.rows) == 12 and len(res.warnings) == 1 and "different results" in res.warnings[0]
    assert "different results" in (tmp_path / "merged2" / "report.md").read_text()
    assert main(["report", str(comparison_dir), str(other)]) == 2  # several DIRs need --out


def test_plain_run_directories_are_read(tmp_path):
    cfg = bm.ExperimentConfig.model_validate({"data": {"sources": fakes.SOURCES}, "learner": {"name": "reptile"},
                                              "training": {"compute_budget": 100}, "seed": 3})
    fakes.fake_runner(cfg, tmp_path / "runs" / "reptile-yolox-seed3")
    rows = load_rows([tmp_path / "runs"]).rows
    assert len(rows) == 1 and rows[0]["learner"] == "reptile" and rows[0]["seed"] == 3 and rows[0]["status"] == "complete"
    # a `megatron run` directory holding the learner and its baseline gives one row per learner
    rec_path = tmp_path / "runs" / "reptile-yolox-seed3" / "run.json"
    rec = json.loads(rec_path.read_text())
    rec["learners"]["finetune"] = rec["learners"]["reptile"]
    atomic_write_json(rec_path, rec)
    rows = load_rows([tmp_path / "runs"]).rows
    assert sorted(r["learner"] for r in rows) == ["finetune", "reptile"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no cell records"):
        load_rows([tmp_path / "empty"])
    with pytest.raises(ReportError, match="no such directory"):
        load_rows([tmp_path / "missing"])


def test_study_plots_follow_the_grid(tmp_path):
    out = run_grid(tmp_path / "n", learners=["reptile"], seeds=[0, 1], n_sources=[2, "all"], shots=[20, 40])
    names = {p.name for p in (out / "plots").iterdir()}
    assert {"ntasks_boxplots_k20.png", "ntasks_bar_k40.png", "paired_differences.png",
            "curves_n_2_random_k_20.png", "curves_n_all_6_k_40.png"} <= names
    assert not any(n.startswith(("lr_", "selection")) for n in names)


def test_selection_and_lr_plots(tmp_path):
    out = run_grid(tmp_path / "s", learners=["reptile"], seeds=[0, 1], n_sources=[3, "all"],
                   selection=["closest", "random"])
    assert (out / "plots" / "selection.png").exists()
    text = (out / "report.md").read_text()
    assert "## Source-task choice" in text and "closest − random" in text and "Closest tasks chosen" in text
    out = run_grid(tmp_path / "lr", learners=["reptile"], seeds=[0, 1], lrs=[1e-3, 1e-2])
    assert {"lr_curves.png", "lr_final.png"} <= {p.name for p in (out / "plots").iterdir()}
