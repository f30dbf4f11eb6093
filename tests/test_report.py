"""megatron.benchmark.report: statistics in words, rebuilding from records, merging, plots."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from scipy.stats import chi2

import _benchmark_fakes as fakes
from megatron.benchmark import grid as bm
from megatron.atomic_io import atomic_write_json
from megatron.cli import main
from megatron.benchmark.report import ReportError, build_report, load_rows

BASE = {"data": {"sources": fakes.SOURCES},
        "training": {"meta_epochs": 3, "source_epochs": 10, "finetune_epochs": 5, "outer_lr": 0.001}}
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
    # maml: +0.33 points on average but seed noise of several points: the CI includes 0, and with 3 seeds the
    # TOST cannot exclude a 5-point difference either: no claim either way
    assert verdict_line(text, "maml").endswith("→ **inconclusive**.")
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
    assert verdict_line(text, "reptile").endswith("→ **inconclusive (fewer than 2 paired seeds)**.")
    assert "better" not in verdict_line(text, "reptile")
    assert "(n=1, no CI)" in text


def test_results_files_one_row_per_cell(comparison_dir):
    rows = json.loads((comparison_dir / "results.json").read_text())
    assert len(rows) == (4 + 2) * 3  # reptile, maml, incremental-frozen, finetune + the two controls, 3 seeds
    assert {r["control"] for r in rows if r["learner"].startswith("finetune_")} == {"positive", "negative"}
    r = next(r for r in rows if r["learner"] == "reptile" and r["seed"] == 1)
    assert r["mAP50"] == pytest.approx(fakes.final_map50("reptile", 1, 6, 20, 0.001))
    assert r["compute_spent"] == 6000 and r["sources"] == fakes.SOURCES and len(r["epochs"]) == 3
    with open(comparison_dir / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 18
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
    assert len(res.rows) == 18 and not res.warnings
    # one copy of one cell with different numbers: kept once, and the report warns
    rec_path = next((other / "cells").iterdir()) / "run.json"
    rec = json.loads(rec_path.read_text())
    for lrec in rec["learners"].values():
        lrec["final"]["mAP50"] += 0.1
    atomic_write_json(rec_path, rec)
    res = build_report([comparison_dir, other], tmp_path / "merged2")
    assert len(res.rows) == 18 and len(res.warnings) == 1 and "different results" in res.warnings[0]
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


# --- the power check, Holm, self-contained folders -------------------------------------------------------
def section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    nxt = text.find("\n## ", start + 1)
    return text[start:nxt if nxt > 0 else None]


def test_report_reads_answer_then_power_check_then_tables(comparison_dir):
    text = (comparison_dir / "report.md").read_text()
    order = [text.index(h) for h in ("## Answer", "## Power check", "## Setup", "## Results per setting")]
    assert order == sorted(order)
    power = section(text, "Power check")
    pos = next(line for line in power.splitlines() if line.startswith("- **Positive control**"))
    # finetune − finetune_scratch = 0.25 − the scratch noise {0.01, −0.02, 0.015}: 24, 27, 23.5 points
    assert "finetune − finetune_scratch = +24.8 [" in pos and pos.endswith("**passed**.")
    neg = next(line for line in power.splitlines() if line.startswith("- **Negative control, A/A**"))
    assert "finetune_aa − finetune = +0.1 [" in neg and neg.endswith("**passed**.")
    assert "Holm" in power and "over the 3 comparison(s)" in power
    assert "The power check passed" in section(text, "Answer")


def test_power_table_gives_mdd_and_seeds_for_five_points(comparison_dir):
    from megatron.benchmark import stats

    text = (comparison_dir / "report.md").read_text()
    row = next(line for line in section(text, "Power check").splitlines() if line.startswith("| N=all (6), K=20 | maml"))
    # maml − finetune per seed = its noise: 3, −4, 2 points; sd by hand:
    diffs = [3.0, -4.0, 2.0]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    mdd = stats.min_detectable_difference(sd, 3)
    need = stats.seeds_needed(5.0, sd)
    # the MDD at the ends of the sd's 95% chi-square interval, by hand
    low, high = (stats.min_detectable_difference(sd * math.sqrt(2 / chi2.ppf(q, 2)), 3) for q in (0.975, 0.025))
    assert row == f"| N=all (6), K=20 | maml − finetune | 3 | {sd:.1f} | {mdd:.1f} [{low:.1f}, {high:.1f}] | {need} |"
    assert 11 < mdd < 13 and need == 7  # 3 seeds detect only a 12-point difference; 5 points would need 7 seeds


def test_failed_positive_control_withholds_the_verdicts(tmp_path):
    bcfg, _ = bm.load_benchmark_config(None, {"budget": 6000, "learners": ["reptile"], "seeds": [0, 1, 2]})
    res = bm.run_benchmark(bcfg, BASE, tmp_path / "b", runner=fakes.underpowered_runner, progress=False)
    assert res.report.power.status == "under-powered"
    text = (tmp_path / "b" / "report.md").read_text()
    answer = section(text, "Answer")
    assert "**Verdicts withheld: this grid is under-powered.**" in answer
    # reptile is +5 in every seed: it would be "better", but the grid failed its control
    assert verdict_line(text, "reptile").endswith("→ **verdict withheld (under-powered grid)**.")
    assert "→ **better**" not in text and "| better |" not in text
    # what to change, from the control's own numbers: seeds, and the spread's causes
    assert "seeds (`--seeds 0,...," in answer and "`data.eval_images`" in answer and "`--budget`" in answer
    assert "**failed** — pre-training made no detectable difference" in section(text, "Power check")
    # finetune − scratch per seed = 5 − the noise {12, −15, 3}: −7, 20, 2 points; the seeds that would detect it
    from megatron.benchmark import stats

    diffs = [-7.0, 20.0, 2.0]
    sd = math.sqrt(sum((d - 5.0) ** 2 for d in diffs) / 2)
    need = stats.seeds_needed(5.0, sd)
    assert f"needs {need} seeds (`--seeds 0,...,{need - 1}`), this grid has 3" in answer
    # a control that came out the wrong way round points at stage 1 instead
    from megatron.benchmark.report import ControlCheck, underpowered_advice

    wrong = ControlCheck("positive", ("all", 20, None, "all"), "finetune", "finetune_scratch",
                         stats.paired_difference({0: 0.3, 1: 0.2}, {0: 0.35, 1: 0.3}), False)
    assert "check stage 1" in underpowered_advice(wrong)[0]


def test_positive_control_not_complete_withholds_too(tmp_path):
    out = run_grid(tmp_path / "inc", learners=["reptile"], seeds=[0, 1])
    for seed in (0, 1):  # the scratch cells never finished
        (out / "cells" / f"finetune_scratch__nall__k20__all__s{seed}" / "run.json").unlink()
    res = build_report([out], out)
    assert res.power.status == "incomplete"
    text = (out / "report.md").read_text()
    assert "Verdicts withheld until the positive control is complete" in text
    assert verdict_line(text, "reptile").endswith("→ **verdict withheld (positive control not complete)**.")


def test_a_a_control_catches_a_replicate_that_changes_nothing(tmp_path):
    bcfg, _ = bm.load_benchmark_config(None, {"budget": 6000, "learners": ["reptile"], "seeds": [0, 1, 2]})
    res = bm.run_benchmark(bcfg, BASE, tmp_path / "b", runner=fakes.replicate_ignored_runner, progress=False)
    neg = next(c for c in res.report.power.controls if c.kind == "negative")
    assert neg.passed is False and "identical" in neg.problem
    text = (tmp_path / "b" / "report.md").read_text()
    assert "**Warning: the negative control (A/A) failed**" in section(text, "Answer")
    assert verdict_line(text, "reptile").endswith("→ **better**.")  # a warning, not a reason to withhold


def test_without_controls_the_report_says_so(tmp_path):
    out = run_grid(tmp_path / "none", learners=["reptile"], seeds=[0, 1, 2], controls=False)
    text = (out / "report.md").read_text()
    assert "No positive control in these results" in section(text, "Answer")
    assert "No control cells in these results" in section(text, "Power check")
    assert verdict_line(text, "reptile").endswith("→ **better**.")
    assert not any(p.name.startswith(("finetune_scratch", "finetune_aa")) for p in (out / "cells").iterdir())


def _row(learner: str, seed: int, n: int, value: float, control: str | None = None) -> dict:
    from megatron.benchmark.rows import METRICS

    metrics = {m: value for m in METRICS}
    return {"cell_id": f"{learner}-{n}-{seed}", "learner": learner, "control": control, "seed": seed, "n_sources": n,
            "shots": 20, "lr": None, "selection": "random", "status": "complete", **metrics}


def test_holm_turns_a_lone_raw_win_among_several_settings_into_no_verdict():
    from megatron.benchmark import stats
    from megatron.benchmark.report import summarise

    rows = []
    # N=2: x − finetune = 0.04, 0.05, 0.06, 0.045, 0.055 -> raw p 1.5e-4; N=3: 0.02, 0.05, 0, 0.04, 0.03 -> raw
    # p 0.031 (CI excludes 0), second smallest of three, so x2 = 0.062 after Holm; N=4: no effect (p = 1)
    deltas = {2: [0.04, 0.05, 0.06, 0.045, 0.055], 3: [0.02, 0.05, 0.0, 0.04, 0.03], 4: [0.01, -0.02, 0.0, 0.02, -0.01]}
    for n, ds in deltas.items():
        for seed, d in enumerate(ds):
            rows += [_row("finetune", seed, n, 0.3 + 0.01 * seed), _row("x", seed, n, 0.3 + 0.01 * seed + d)]
    _, comparisons = summarise(rows)
    by_n = {c.setting[0]: c for c in comparisons if c.metric == "mAP50"}
    raw = {n: c.diff.p_value for n, c in by_n.items()}
    assert raw[3] < 0.05 and by_n[3].diff.verdict == stats.BETTER  # uncorrected, a win
    # Holm over the three settings: sorted p's times 3, 2, 1, kept monotone
    ordered = sorted(raw, key=raw.get)
    assert by_n[ordered[0]].p_holm == pytest.approx(3 * raw[ordered[0]])
    assert by_n[ordered[1]].p_holm == pytest.approx(max(3 * raw[ordered[0]], 2 * raw[ordered[1]]))
    assert by_n[3].p_holm >= 0.05 and stats.verdict(by_n[3].diff.interval, by_n[3].p_holm) == stats.NOT_AFTER_HOLM
    # +2.8 points, within the 5-point margin, but the TOST's p 0.031 is second of three too: 0.062 after Holm
    assert by_n[3].p_equivalence_holm == pytest.approx(2 * stats.tost(by_n[3].diff.interval, 0.05).p_value)
    assert by_n[3].verdict == stats.INCONCLUSIVE
    assert by_n[2].verdict == stats.BETTER and by_n[4].verdict == stats.EQUIVALENT  # ±2 points: inside ±5


def test_report_elsewhere_copies_the_records_and_rebuilds_alone(comparison_dir, tmp_path):
    out = tmp_path / "results" / "committed"
    res = build_report([comparison_dir], out)
    assert res.copied == 18
    cell = out / "cells" / "reptile__nall__k20__all__s0"
    assert sorted(p.name for p in cell.iterdir()) == ["cell.json", "run.json"]  # no checkpoints
    assert (comparison_dir / "cells" / cell.name / "checkpoints").exists()
    assert json.loads((out / "benchmark.json").read_text())["n_cells"] == 18
    before = json.loads((out / "results.json").read_text())
    text = (out / "report.md").read_text()
    assert f"`megatron report {out}`" in text
    moved = tmp_path / "elsewhere"
    shutil.copytree(out, moved)
    for name in ("results.json", "results.csv", "report.md"):
        (moved / name).unlink()
    assert main(["report", str(moved)]) == 0  # from the copied records alone
    after = json.loads((moved / "results.json").read_text())
    assert [(r["cell_id"], r["mAP50"], r["control"]) for r in after] == [
        (r["cell_id"], r["mAP50"], r["control"]) for r in before]
    assert (moved / "report.md").read_text().replace(str(moved), str(out)) == text


def _with_selection(out: Path, best_of: dict[str, float]) -> None:
    """Give the cells named in ``best_of`` a validation-selected model with that test mAP50 (as the runner does)."""
    for cid, value in best_of.items():
        path = out / "cells" / cid / "run.json"
        rec = json.loads(path.read_text())
        lrec = next(iter(rec["learners"].values()))
        lrec["best"] = {**lrec["final"], "mAP50": value, "meta_epoch": 2, "validation_mAP50": 0.5}
        atomic_write_json(path, rec)


def test_report_measures_the_validation_selected_model_and_final_on_request(tmp_path):
    out = run_grid(tmp_path / "g", report=False, learners=["reptile"], seeds=[0, 1], controls=False)
    _with_selection(out, {"reptile__nall__k20__all__s0": 0.61})
    selected = {r["cell_id"]: r for r in load_rows([out]).rows}
    chosen, plain = selected["reptile__nall__k20__all__s0"], selected["reptile__nall__k20__all__s1"]
    assert (chosen["mAP50"], chosen["model"], chosen["selected_epoch"]) == (0.61, "selected", 2)
    assert chosen["final_mAP50"] != 0.61
    assert (plain["model"], plain["mAP50"]) == ("final", plain["final_mAP50"])  # no validation split: the final one
    final = {r["cell_id"]: r for r in load_rows([out], model="final").rows}
    assert final["reptile__nall__k20__all__s0"]["mAP50"] == chosen["final_mAP50"]
    assert main(["report", str(out), "--model", "final"]) == 0
    assert "the model after the last meta-epoch" in (out / "report.md").read_text()
    assert main(["report", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "chosen on the target's validation split" in text and "fall back to the final model" in text
    with pytest.raises(ReportError, match="unknown model"):
        load_rows([out], model="best")


# --- equivalence verdicts, the A/A pair's MDD, unequal compute (issue 25) ------------------------------------
def _verdict_rows(deltas_by_learner: dict[str, list[float]], n: int = 2) -> list[dict]:
    """Hand-made complete cells: `finetune` at 0.30 + 0.01·seed, each learner that plus its per-seed delta."""
    rows = []
    for seed in range(5):
        rows.append(_row("finetune", seed, n, 0.3 + 0.01 * seed))
        for learner, ds in deltas_by_learner.items():
            rows.append(_row(learner, seed, n, 0.3 + 0.01 * seed + ds[seed]))
    return rows


HAND_MADE = {
    "up": [0.08, 0.09, 0.10, 0.085, 0.095],  # +9 points, tight: better
    "down": [-0.08, -0.09, -0.10, -0.085, -0.095],  # worse
    "same": [0.005, -0.005, 0.0, 0.01, -0.01],  # ±1 point around 0: equivalent within ±5
    "noisy": [0.10, -0.08, 0.06, -0.09, 0.02],  # mean +0.2, sd 8 points: neither
}


def test_hand_made_cells_get_each_of_the_four_verdicts():
    from megatron.benchmark import stats
    from megatron.benchmark.report import summarise

    _, comparisons = summarise(_verdict_rows(HAND_MADE))
    got = {c.learner: c.verdict for c in comparisons if c.metric == "mAP50"}
    assert got == {"up": stats.BETTER, "down": stats.WORSE, "same": stats.EQUIVALENT, "noisy": stats.INCONCLUSIVE}
    # a tighter margin than the "same" cells' own spread allows turns equivalence into inconclusive
    _, tight = summarise(_verdict_rows({"same": HAND_MADE["same"]}), margin=0.5)
    assert next(c for c in tight if c.metric == "mAP50").verdict == stats.INCONCLUSIVE


def test_answer_uses_only_the_four_verdict_words_with_the_margin(tmp_path):
    from megatron.benchmark.report import Page, control_checks, render_markdown, summarise
    from megatron.benchmark.rows import Loaded

    rows = _verdict_rows(HAND_MADE)
    for r in rows:
        r.update(detector="d", target="t", compute_spent=None, wall_s=None, model="final", stopped_by="budget")
    summary, comparisons = summarise(rows, margin=4.0)
    text = render_markdown(Page(rows, summary, comparisons, Loaded(rows), [tmp_path], [], control_checks(rows), 4.0))
    answer = section(text, "Answer")
    words = {line.rsplit("→ **", 1)[1].rstrip("*.") for line in answer.splitlines() if "→ **" in line}
    assert words == {"better", "worse", "equivalent within ±4", "inconclusive"}
    tally = [line for line in answer.splitlines() if line.startswith("- ") and " of 1 setting(s)" in line]
    assert sorted(line.split(": ")[1] for line in tally) == sorted(
        ["better in 1 of 1 setting(s)", "worse in 1 of 1 setting(s)", "equivalent within ±4 in 1 of 1 setting(s)",
         "inconclusive in 1 of 1 setting(s)"])
    assert "no significant difference" not in answer.split("- **up**")[1]  # the lines name no other verdict


def test_the_margin_comes_from_the_grid_and_the_command_line(tmp_path):
    out = run_grid(tmp_path / "m", learners=["reptile"], seeds=[0, 1, 2], controls=False)
    bj = json.loads((out / "benchmark.json").read_text())
    assert bj["report"] == {"equivalence_margin": 5.0}
    bj["report"]["equivalence_margin"] = 2.5
    (out / "benchmark.json").write_text(json.dumps(bj))
    assert main(["report", str(out)]) == 0
    assert "equivalence within ±2.5" in verdict_line((out / "report.md").read_text(), "reptile")
    assert main(["report", str(out), "--equivalence-margin", "7"]) == 0
    assert "equivalence within ±7" in verdict_line((out / "report.md").read_text(), "reptile")


def test_mdd_is_shown_next_to_the_a_a_pair_s(comparison_dir):
    from megatron.benchmark import stats

    power = section((comparison_dir / "report.md").read_text(), "Power check")
    aa = next(line for line in power.splitlines() if "finetune_aa − finetune (negative control)" in line)
    # A/A per seed = the replicate noise of the fakes: +1.0, −1.2, +0.4 points
    diffs = [1.0, -1.2, 0.4]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    low, high = stats.mdd_interval(sd, 3)
    figure = f"{stats.min_detectable_difference(sd, 3):.1f} [{low:.1f}, {high:.1f}]"
    assert f"| {figure} |" in aa
    assert f"Next to it, the A/A pair (N=all (6), K=20: two independent replicates of one learner, no true " \
           f"difference) has a minimum detectable difference of {figure} points" in power


def test_a_cell_off_the_baseline_s_compute_is_flagged_with_its_recorded_cause():
    from megatron.benchmark.report import compute_shortfalls

    rows = _verdict_rows({"anil": [0.0] * 5, "short": [0.0] * 5, "x": [0.0] * 5})
    spend = {"finetune": (4528, "budget", 4), "anil": (4140, "budget", 3), "short": (4400, "epochs", 2),
             "x": (4500, "budget", 4)}  # x: 0.6% short, inside the 2% tolerance
    for r in rows:
        r["compute_spent"], r["stopped_by"], r["n_epochs"] = spend[r["learner"]]
        r["compute_budget"] = 4544
    flagged = compute_shortfalls(rows)
    assert {s.learner for s in flagged} == {"anil", "short"} and len(flagged) == 10
    anil = next(s for s in flagged if s.learner == "anil")
    assert anil.relative == pytest.approx(4140 / 4528 - 1)
    assert anil.cause.startswith("stopped by the budget after 3 meta-epoch(s) with 404 image passes of its 4,544 "
                                 "budget unspent")
    short = next(s for s in flagged if s.learner == "short")
    assert short.cause.startswith("stopped by its epoch count (`training.meta_epochs`) after 2 meta-epoch(s)")
    assert "epoch count" not in anil.cause and "budget after" not in short.cause


def test_the_report_shows_unequal_compute_at_k_40_too(tmp_path):
    from megatron.benchmark.report import Page, control_checks, render_markdown, summarise
    from megatron.benchmark.rows import Loaded

    rows = []
    for k in (20, 40):
        for r in _verdict_rows({"anil": [0.0] * 5}):
            r.update(shots=k, cell_id=f"{r['cell_id']}-k{k}", detector="d", target="t", wall_s=None, model="final",
                     compute_budget=4544, n_epochs=4 if r["learner"] == "finetune" else 3, stopped_by="budget",
                     compute_spent=4544 if r["learner"] == "finetune" else 4320)
            rows.append(r)
    summary, comparisons = summarise(rows)
    text = render_markdown(Page(rows, summary, comparisons, Loaded(rows), [tmp_path], [], control_checks(rows)))
    assert "> **Unequal compute**: 10 cell(s)" in section(text, "Answer")
    results = section(text, "Results per setting")
    for k in (20, 40):
        block = results[results.index(f"K={k}"):]
        assert "> - anil, 5 cell(s): 4,320 (-4.9%) — stopped by the budget after 3 meta-epoch(s)" in block


def test_a_cell_the_run_marked_unequal_is_left_out_of_the_verdicts_with_its_reason():
    from megatron.benchmark.report import compute_shortfalls, summarise

    rows = _verdict_rows({"up": HAND_MADE["up"]})
    reason = "stopped by its epoch cap (training.max_meta_epochs) after 4000 of 4544 image passes"
    for r in rows:
        r.update(compute_spent=4544, n_epochs=4, stopped_by="budget", compute_budget=4544)
        if r["learner"] == "up" and r["seed"] == 0:
            r.update(unequal_compute=reason, compute_spent=4000, stopped_by="epoch_cap")
    _, comparisons = summarise(rows)
    main_cmp = next(c for c in comparisons if c.metric == "mAP50")
    assert main_cmp.diff.seeds == (1, 2, 3, 4)  # seed 0's cell is not paired
    flagged = compute_shortfalls(rows)
    assert len(flagged) == 1 and flagged[0].cause.startswith(reason)
    assert "left out of the verdicts" in flagged[0].cause


def test_validation_selection_among_unequal_numbers_of_meta_epochs_is_flagged_and_not_for_the_final_model(tmp_path):
    from megatron.benchmark.report import Page, control_checks, render_markdown, summarise
    from megatron.benchmark.rows import Loaded

    def text_for(model: str) -> str:
        rows = _verdict_rows({"reptile": [0.0] * 5, "maml": [0.0] * 5})
        for r in rows:
            r.update(detector="d", target="t", wall_s=None, model=model, compute_budget=3500, compute_spent=3500,
                     stopped_by="budget", n_epochs={"finetune": 5, "reptile": 2, "maml": 5}[r["learner"]])
        summary, comparisons = summarise(rows)
        return section(render_markdown(Page(rows, summary, comparisons, Loaded(rows), [tmp_path], [],
                                            control_checks(rows))), "Results per setting")

    selected = text_for("selected")
    assert ("the arms had different numbers of candidates (mean per cell): `finetune` 5, reptile 2. More "
            "candidates favour their arm") in selected and "maml" not in selected.split("Unequal selection")[1]
    assert "Unequal selection" not in text_for("final")  # the last model has no candidates to choose among
