"""The benchmark report, rebuilt from the cell records alone: results.csv/json, report.md and plots.

Input: one or more benchmark directories (``<dir>/cells/<cell-id>/run.json`` + ``cell.json``), or plain run
directories (``<dir>/run.json``) or folders of them. Identical cells found in several directories (the same
cell id with the same final metrics) are counted once, so separate runs of one grid (shards, machines) merge.

Statistics (:mod:`megatron.benchmark.stats`): per learner and setting, the mean over seeds with a 95% Student-t interval;
per learner, the paired difference against the ``finetune`` baseline of the same setting, with its interval and
one of four verdicts — *better*, *worse*, *equivalent within ±m* (two one-sided tests at the margin
``report.equivalence_margin``, default 5 points) or *inconclusive* — both tests Holm-corrected over all the
report's comparisons of a metric. Metrics are stored as fractions (0..1) and shown in mAP points (x100).

The report reads answer first, then the power check, then the tables:

- **Answer**: the verdicts (mAP50) — withheld when the positive control failed (the grid is under-powered; the
  report says what to change) or is not complete.
- **Power check** (:func:`control_checks`, :func:`power_rows`): the positive control (``finetune`` −
  ``finetune_scratch`` must be *better*), the negative control (``finetune_aa`` − ``finetune`` must show no
  significant difference, and must not be identical), and per comparison the minimum detectable paired
  difference at 80% power — with its range over the sd's 95% chi-square interval, next to the A/A pair's — and
  the seeds a 5-point difference needs.
- **Setup**, **Results per setting** (with P/R/F1 at the operating point chosen on validation, and every cell
  more than 2% off its baseline's image passes flagged with the cause its record gives), **Source-task choice**,
  plots.

A report written into a folder other than its inputs copies the cell records there (:func:`copy_records`), so
that folder rebuilds on its own (``megatron report OUT``).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from megatron.benchmark import stats
from megatron.atomic_io import atomic_write_json, atomic_write_text
from megatron.benchmark.rows import (  # noqa: F401 - re-exported for readers of the report
    BASELINE, CSV_COLUMNS, DEFAULT_MODEL, METRIC_LABELS, METRICS, POINTS, UNIT, Loaded, ReportError, complete,
    fixed_epoch, load_rows, n_all, setting_label, setting_of, slug, _skey,
)
from megatron.training.run_files import CELL_FILE, CELL_RECORD_FILES

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------- statistics
NO_COMMON_SEED = "no common seed"
TOO_FEW_SEEDS = f"{stats.INCONCLUSIVE} (fewer than 2 paired seeds)"
#: the equivalence margin of every comparison, in mAP points, unless the grid's ``report.equivalence_margin`` or
#: ``megatron report --equivalence-margin`` says otherwise: half the +8.7 / +9.1 gains the method reports, and
#: about the A/A pair's minimum detectable difference at five seeds
DEFAULT_EQUIVALENCE_MARGIN = 5.0


@dataclass
class Comparison:
    setting: tuple
    learner: str
    metric: str
    diff: stats.PairedDifference | None  # None: the baseline has no seed in common
    p_holm: float | None = None  # Holm-adjusted p-value of the difference test, over this metric's comparisons
    margin: float = DEFAULT_EQUIVALENCE_MARGIN / POINTS  # the equivalence margin, in the metric's units (fractions)
    p_equivalence_holm: float | None = None  # Holm-adjusted TOST p-value, over this metric's comparisons

    @property
    def verdict(self) -> str:
        """*better*, *worse*, *equivalent* (within ±margin) or *inconclusive*, after the multiple-comparison
        correction (:func:`stats.equivalence_verdict`)."""
        if self.diff is None:
            return NO_COMMON_SEED
        if not self.diff.interval.available:
            return TOO_FEW_SEEDS
        return stats.equivalence_verdict(self.diff.interval, self.margin, self.p_holm, self.p_equivalence_holm)


def _paired(cand: list[dict], ref: list[dict], metric: str = "mAP50") -> stats.PairedDifference | None:
    a = {r["seed"]: r[metric] for r in cand if r[metric] is not None}
    b = {r["seed"]: r[metric] for r in ref if r[metric] is not None}
    return stats.paired_difference(a, b) if set(a) & set(b) else None


def _holm_both(family: list, diffs: list[stats.PairedDifference], margin: float) -> list[tuple]:
    """Holm-adjusted (difference p, TOST p) per member of ``family``, each test corrected over the family."""
    p_diff = stats.holm([d.p_value for d in diffs])
    tosts = [stats.tost(d.interval, margin) for d in diffs]
    p_equiv = stats.holm([t.p_value if t is not None else None for t in tosts])
    return list(zip(family, p_diff, p_equiv))


def summarise(rows: list[dict], margin: float = DEFAULT_EQUIVALENCE_MARGIN) -> tuple[dict, list[Comparison]]:
    """``{setting: {learner: {metric: Interval}}}`` and the paired comparisons against the baseline (the power
    check's control cells are summarised but not compared here: :func:`control_checks`), both tests (difference,
    equivalence within ±``margin`` points) Holm-corrected per metric."""
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in complete(rows):
        groups[setting_of(r)][r["learner"]].append(r)
    summary: dict = {}
    comparisons: list[Comparison] = []
    for setting in sorted(groups, key=_skey):
        summary[setting] = {}
        for learner, rs in sorted(groups[setting].items()):
            summary[setting][learner] = {m: stats.mean_ci([r[m] for r in rs]) for m in METRICS
                                         if all(r[m] is not None for r in rs)}
        # cells the run marked as short of their budget are left out of the verdicts (the report says which)
        base = [r for r in groups[setting].get(BASELINE, []) if not r.get("control") and not r.get("unequal_compute")]
        for learner, all_rs in sorted(groups[setting].items()):
            rs = [r for r in all_rs if not r.get("unequal_compute")]
            if learner == BASELINE or not base or any(r.get("control") for r in all_rs):
                continue
            for m in METRICS:
                comparisons.append(Comparison(setting, learner, m, _paired(rs, base, m), margin=margin / POINTS))
    for metric in {c.metric for c in comparisons}:  # one family per metric: every learner x setting
        family = [c for c in comparisons if c.metric == metric and c.diff is not None]
        for c, p, p_eq in _holm_both(family, [c.diff for c in family], margin / POINTS):
            c.p_holm, c.p_equivalence_holm = p, p_eq
    return summary, comparisons


# ---------------------------------------------------------------------------------------------- the power check
@dataclass
class ControlCheck:
    """One control of one setting: ``candidate − reference`` in mAP50, and whether it came out as it must."""

    kind: str  # "positive" | "negative"
    setting: tuple
    candidate: str
    reference: str
    diff: stats.PairedDifference | None
    passed: bool | None  # None: not decidable yet (cells missing, fewer than 2 paired seeds)
    problem: str = ""


@dataclass
class PowerCheck:
    controls: list[ControlCheck]
    status: str  # "passed" | "under-powered" | "incomplete" | "no positive control"

    @property
    def withheld(self) -> bool:
        return self.status in ("under-powered", "incomplete")

    @property
    def negative_failed(self) -> list[ControlCheck]:
        return [c for c in self.controls if c.kind == "negative" and c.passed is False]


def control_checks(rows: list[dict]) -> PowerCheck:
    """The positive control (``finetune`` − ``finetune_scratch``: must be *better*, raw 95% interval above 0)
    and the negative one (``finetune_aa`` − ``finetune``: must not differ, and must not be identical) per setting
    that has control cells; the grid is under-powered when a positive control fails."""
    done = complete(rows)
    checks: list[ControlCheck] = []
    settings = sorted({setting_of(r) for r in rows if r.get("control")}, key=_skey)
    for setting in settings:
        here = [r for r in done if setting_of(r) == setting]
        base = [r for r in here if r["learner"] == BASELINE and not r.get("control")]
        for kind in ("positive", "negative"):
            ctl_all = [r for r in rows if setting_of(r) == setting and r.get("control") == kind]
            if not ctl_all:
                continue
            ctl = [r for r in here if r.get("control") == kind]
            label = ctl_all[0]["learner"]
            cand, ref = (base, ctl) if kind == "positive" else (ctl, base)
            names = (BASELINE, label) if kind == "positive" else (label, BASELINE)
            diff = _paired(cand, ref) if cand and ref else None
            passed: bool | None = None
            problem = ""
            if diff is None or not diff.interval.available:
                problem = "fewer than 2 paired seeds complete"
            elif kind == "positive":
                passed = diff.verdict == stats.BETTER
                if not passed:
                    problem = ("pre-training made no detectable difference" if diff.interval.mean > 0 else
                               "the randomly initialised baseline did at least as well as the pre-trained one")
            elif all(d == 0 for d in diff.differences):
                passed = False
                problem = ("identical numbers in every seed: `training.replicate` did not change the training "
                           "randomness, so the A/A pair measured nothing")
            else:
                passed = diff.verdict not in (stats.BETTER, stats.WORSE)
                if not passed:
                    problem = ("a difference between two runs of the same learner: chance (1 in 20 at 95%) or "
                               "randomness that is not independent across replicates")
            checks.append(ControlCheck(kind, setting, *names, diff, passed, problem))
    positives = [c for c in checks if c.kind == "positive"]
    if not positives:
        status = "no positive control"
    elif any(c.passed is False for c in positives):
        status = "under-powered"
    elif any(c.passed is None for c in positives):
        status = "incomplete"
    else:
        status = "passed"
    return PowerCheck(checks, status)


@dataclass
class PowerRow:
    setting: tuple
    comparison: str
    n: int
    sd: float  # of the paired differences, points
    mdd: float | None  # minimum detectable difference at 80% power, points
    seeds_for_5: int | None  # seeds a 5-point difference needs at this spread
    mdd_range: tuple[float, float] | None = None  # the MDD at the ends of the sd's 95% interval
    control: str | None = None  # "positive" | "negative" for the power check's pairs


#: the difference whose seed count the report quotes, in points
TARGET_DIFFERENCE = 5.0


def power_rows(comparisons: list[Comparison], check: PowerCheck) -> list[PowerRow]:
    """The minimum detectable paired difference (with its range over the sd's 95% interval) and the seeds a
    5-point difference needs, for every mAP50 comparison and control with at least 2 pairs, from its observed
    spread."""
    out: list[PowerRow] = []
    items = [(c.setting, f"{c.learner} − {BASELINE}", c.diff, None) for c in comparisons if c.metric == "mAP50"]
    items += [(c.setting, f"{c.candidate} − {c.reference} ({c.kind} control)", c.diff, c.kind)
              for c in check.controls]
    for setting, name, diff, kind in sorted(items, key=lambda t: _skey(t[0])):
        if diff is None or not diff.interval.available:
            continue
        iv = diff.interval.scaled(POINTS)
        out.append(PowerRow(setting, name, iv.n, iv.sd, stats.min_detectable_difference(iv.sd, iv.n),
                            stats.seeds_needed(TARGET_DIFFERENCE, iv.sd), stats.mdd_interval(iv.sd, iv.n), kind))
    return out


# ------------------------------------------------------------------------------------------ equal compute
#: a cell whose image passes differ from its setting's baseline mean by more than this fraction is flagged
COMPUTE_TOLERANCE = 0.02


@dataclass
class ComputeShortfall:
    """A cell that spent more than :data:`COMPUTE_TOLERANCE` more or less compute than its setting's baseline."""

    cell_id: str
    setting: tuple
    learner: str
    spent: float  # image passes
    baseline: float  # the mean of the setting's `finetune` cells
    budget: float | None
    stopped_by: str | None
    n_epochs: int
    recorded: str | None = None  # the run's own reason when it marked the cell unequal (left out of verdicts)

    @property
    def relative(self) -> float:
        return self.spent / self.baseline - 1

    @property
    def cause(self) -> str:
        """Why, in the words of the cell's record (``stopped_by``, or the run's own reason)."""
        if self.recorded:
            return f"{self.recorded} — marked unequal by the run, so left out of the verdicts"
        if self.relative > 0:
            return "it spent more than the baseline"
        left = f"{self.budget - self.spent:,.0f} image passes of its {self.budget:,.0f} budget unspent" \
            if self.budget else "part of its budget unspent"
        if self.stopped_by == "budget":
            return (f"stopped by the budget after {self.n_epochs} meta-epoch(s) with {left}: one more outer step "
                    "plus the target fine-tuning it must leave room for did not fit in the rest")
        if self.stopped_by in ("epochs", "epoch_cap"):
            what = "its meta-epoch cap (`training.max_meta_epochs`)" if self.stopped_by == "epoch_cap" else \
                "its epoch count (`training.meta_epochs`)"
            return f"stopped by {what} after {self.n_epochs} meta-epoch(s) with {left}"
        return f"stopped by {self.stopped_by or 'an unrecorded cause'} with {left}"


def compute_shortfalls(rows: list[dict]) -> list[ComputeShortfall]:
    """Every complete cell more than :data:`COMPUTE_TOLERANCE` off the mean image passes of its setting's
    baseline cells (the A/A and scratch controls included: they must spend what the baseline spends)."""
    done = complete(rows)
    out: list[ComputeShortfall] = []
    for setting in sorted({setting_of(r) for r in done}, key=_skey):
        here = [r for r in done if setting_of(r) == setting and r["compute_spent"]]
        base = [float(r["compute_spent"]) for r in here if r["learner"] == BASELINE and not r.get("control")]
        if not base:
            continue
        ref = sum(base) / len(base)
        for r in here:
            spent = float(r["compute_spent"])
            if abs(spent / ref - 1) > COMPUTE_TOLERANCE or r.get("unequal_compute"):
                out.append(ComputeShortfall(r["cell_id"], setting, r["learner"], spent, ref, r.get("compute_budget"),
                                            r.get("stopped_by"), r.get("n_epochs") or 0, r.get("unequal_compute")))
    return out


def underpowered_advice(check: ControlCheck) -> list[str]:
    """What to change when a positive control failed, from its own numbers."""
    advice = []
    iv = check.diff.interval.scaled(POINTS) if check.diff is not None and check.diff.interval.available else None
    if iv is not None and iv.mean > 0:
        need = stats.seeds_needed(iv.mean, iv.sd)
        if need is not None and need > iv.n:
            advice.append(f"more seeds: at this spread (sd {iv.sd:.1f} points) detecting the control's own "
                          f"difference of {iv.mean:.1f} points with 80% power needs {need} seeds "
                          f"(`--seeds 0,...,{need - 1}`), this grid has {iv.n};")
    elif iv is not None:
        advice.append("check stage 1: the pre-trained start did not beat random weights at all, so the checkpoint "
                      "does not transfer to the target (`training.pretrain_epochs`, `training.pretrain_lr`) or the "
                      "budget lets random weights catch up;")
    advice.append("less spread per seed: more held-out target images (`data.eval_images`), a larger compute budget "
                  "per cell (`--budget`), a longer stage 1 (`training.pretrain_epochs`), and learning rates at which "
                  "fine-tuning is stable (experiment 1, `lr_study.yaml`);")
    advice.append("then re-run: with more seeds the same `--out` keeps the finished cells; a changed budget or recipe "
                  "needs a fresh `--out`.")
    return advice


def _fmt(iv: stats.Interval | None, scale: float = POINTS, signed: bool = False) -> str:
    if iv is None:
        return "–"
    s = iv.scaled(scale)
    mean = f"{s.mean:+.1f}" if signed else f"{s.mean:.1f}"
    if not s.available:
        return f"{mean} (n={s.n}, no CI)"
    lo, hi = (f"{s.low:+.1f}", f"{s.high:+.1f}") if signed else (f"{s.low:.1f}", f"{s.high:.1f}")
    return f"{mean} [{lo}, {hi}]"


# --------------------------------------------------------------------------------------------------------- output
def write_results(rows: list[dict], out: Path) -> None:
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    atomic_write_json(out / "results.json", clean)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in clean:
        w.writerow({**r, "sources": ";".join(r["sources"]) if r["sources"] is not None else "",
                    "epochs": json.dumps(r["epochs"], separators=(",", ":")),
                    **{k: ("" if r[k] is None else r[k]) for k in ("n_sources", "lr", "n_tasks")}})
    atomic_write_text(out / "results.csv", buf.getvalue())


@dataclass
class ReportResult:
    out: Path
    rows: list[dict]
    summary: dict
    comparisons: list[Comparison]
    plots: list[Path]
    warnings: list[str]
    power: PowerCheck | None = None
    copied: int = 0  # cell records copied into ``out``


def copy_records(rows: list[dict], loaded: Loaded, out: Path) -> int:
    """Copy every grid cell's record (``cell.json``, ``run.json``, ``error.txt``; never checkpoints or models) into
    ``out/cells/<cell-id>/`` and the grids' ``benchmark.json`` into ``out``, so that ``megatron report OUT``
    rebuilds the same report from ``out`` alone. Returns the number of cells copied."""
    n = 0
    for r in rows:
        src = Path(r["_dir"])
        dst = out / "cells" / r["cell_id"]
        if not (src / CELL_FILE).exists() or src.resolve() == dst.resolve():
            continue  # plain run directories have no cell definition; a cell already in place stays
        dst.mkdir(parents=True, exist_ok=True)
        for name in CELL_RECORD_FILES:
            if (src / name).exists():
                shutil.copyfile(src / name, dst / name)
            else:
                (dst / name).unlink(missing_ok=True)
        n += 1
    grids: list[dict] = []
    for b in loaded.benchmark:
        b = {k: v for k, v in b.items() if k != "shard"}
        if b not in grids:
            grids.append(b)
    if grids:
        atomic_write_json(out / "benchmark.json", grids[0] if len(grids) == 1 else grids)
    return n


def equivalence_margin(loaded: Loaded, given: float | None = None) -> float:
    """The equivalence margin in points: ``given`` (``megatron report --equivalence-margin``), else the grid's
    ``report.equivalence_margin`` (recorded in its benchmark.json), else :data:`DEFAULT_EQUIVALENCE_MARGIN`."""
    if given is not None:
        if given <= 0:
            raise ReportError(f"equivalence margin {given}: must be a positive number of mAP points")
        return float(given)
    margins = {float((b.get("report") or {}).get("equivalence_margin")) for b in loaded.benchmark
               if (b.get("report") or {}).get("equivalence_margin") is not None}
    if len(margins) > 1:
        loaded.warnings.append(f"the merged grids state different equivalence margins ({sorted(margins)}); "
                               f"used the smallest, {min(margins):g}")
    return min(margins) if margins else DEFAULT_EQUIVALENCE_MARGIN


def build_report(dirs: Iterable[str | Path], out: str | Path, epoch: int | None = None,
                 copy: bool | None = None, model: str = DEFAULT_MODEL,
                 margin: float | None = None) -> ReportResult:
    """Rebuild results.csv, results.json, report.md and plots/*.png in ``out`` from the cell records in ``dirs``.

    ``copy`` (default: when ``out`` is not one of ``dirs``): also copy the cell records into ``out``
    (:func:`copy_records`), which makes ``out`` a self-contained, rebuildable result folder. ``model``: whose
    metrics, each cell's validation-``selected`` model or its ``final`` one (:data:`~megatron.benchmark.rows.MODELS`).
    ``margin``: the equivalence margin in points (:func:`equivalence_margin`)."""
    dirs = [Path(d) for d in dirs]
    out = Path(out)
    loaded = load_rows(dirs, model)
    rows = loaded.rows
    out.mkdir(parents=True, exist_ok=True)
    if copy is None:
        copy = out.resolve() not in {d.resolve() for d in dirs}
    copied = copy_records(rows, loaded, out) if copy else 0
    write_results(rows, out)
    margin = equivalence_margin(loaded, margin)
    summary, comparisons = summarise(rows, margin)
    check = control_checks(rows)
    from megatron.benchmark import plots as _plots  # matplotlib only when a report is written

    plot_paths = _plots.make_all(rows, summary, comparisons, out / "plots", loaded, epoch=epoch,
                                 withheld=check.withheld)
    page = Page(rows, summary, comparisons, loaded, [out] if copy else dirs,
                [p.relative_to(out) for p in plot_paths], check, margin)
    atomic_write_text(out / "report.md", render_markdown(page))
    return ReportResult(out, rows, summary, comparisons, plot_paths, loaded.warnings, check, copied)


# ------------------------------------------------------------------------------------------------------ words
WITHHELD = "verdict withheld (under-powered grid)"
WITHHELD_INCOMPLETE = "verdict withheld (positive control not complete)"


def verdict_words(verdict: str, margin: float) -> str:
    """A verdict of :func:`stats.equivalence_verdict` as the report writes it (the margin in points)."""
    return f"equivalent within ±{margin:g}" if verdict == stats.EQUIVALENT else verdict


def _words(verdict: str, check: PowerCheck | None, margin: float) -> str:
    """A verdict as the report shows it: withheld when the power check failed."""
    if check is None or not check.withheld or verdict in (NO_COMMON_SEED, TOO_FEW_SEEDS):
        return verdict_words(verdict, margin)
    return WITHHELD if check.status == "under-powered" else WITHHELD_INCOMPLETE


def _p(p: float | None, relation: bool = False) -> str:
    if p is None:
        return "n/a" if relation else "–"
    if p < 0.001:
        return "< 0.001"
    return f"= {p:.3f}" if relation else f"{p:.3f}"


def _short(words: str) -> str:
    """A verdict in a word or three, for the per-learner tally."""
    return "withheld" if words.startswith("verdict withheld") else words.split(" (")[0]


def _control_line(c: ControlCheck, n_sources_all: int | None) -> str:
    what = {"positive": "**Positive control** (pre-trained `finetune` − the same from random weights: must be "
                        "*better*)",
            "negative": "**Negative control, A/A** (`finetune` run again with independent randomness − `finetune`: "
                        "must show *no significant difference*)"}[c.kind]
    head = f"- {what}, {setting_label(c.setting, n_sources_all)}: "
    if c.diff is None or not c.diff.interval.available:
        n = c.diff.interval.n if c.diff is not None else 0
        return head + f"not decidable yet ({n} paired seed(s) complete; needs 2 or more)."
    iv = c.diff.interval
    result = "**passed**" if c.passed else f"**failed** — {c.problem}"
    return (head + f"{c.candidate} − {c.reference} = {_fmt(iv, signed=True)} mAP50 points over {iv.n} paired "
            f"seed(s) → {c.diff.verdict}: {result}.")


def _model_words(done: list[dict]) -> str:
    used = defaultdict(int)
    for r in done:
        used[r.get("model") or "final"] += 1
    words = {"selected": "the model chosen on the target's validation split (the meta-epoch with the best "
                         "validation mAP50), measured on the held-out test split it never saw",
             "final": "the model after the last meta-epoch"}
    if len(used) <= 1:
        return words[next(iter(used), "final")]
    return "; ".join(f"{words[m]} in {n} cell(s)" for m, n in sorted(used.items())) + \
        " (cells without a validation split fall back to the final model)"


# --------------------------------------------------------------------------------------------------- the page
@dataclass
class Page:
    """Everything a report page is written from; each section of :func:`render_markdown` reads it."""

    rows: list[dict]
    summary: dict
    comparisons: list[Comparison]
    loaded: Loaded
    dirs: list[Path]
    plots: list[Path]
    check: PowerCheck
    margin: float = DEFAULT_EQUIVALENCE_MARGIN  # points

    def __post_init__(self) -> None:
        self.n_sources_all = n_all(self.loaded)
        self.done = complete(self.rows)
        self.shortfalls = compute_shortfalls(self.rows)
        self.main = [c for c in self.comparisons if c.metric == "mAP50"]  # the answer's comparisons

    def label(self, setting: tuple) -> str:
        return setting_label(setting, self.n_sources_all)

    def words(self, verdict: str) -> str:
        return _words(verdict, self.check, self.margin)


def render_markdown(page: Page) -> str:
    """report.md: title, answer, power check, setup, results per setting, source-task choice, cells not
    complete, plots — one function per section."""
    sections = (_title_section, _answer_section, _power_section, _setup_section, _results_section,
                _source_choice_section, _incomplete_section, _plots_section)
    return "\n".join(line for section in sections for line in section(page))


def _title_section(page: Page) -> list[str]:
    lines = ["# megatron benchmark report", ""]
    descs: list[str] = []
    for b in page.loaded.benchmark:
        if b.get("description") and b["description"].strip() not in descs:
            descs.append(b["description"].strip())
    for desc in descs:
        lines += [desc, ""]
    return lines


def _power_status_lines(check: PowerCheck) -> list[str]:
    """What the power check means for the verdicts, first thing in the answer."""
    if check.status == "under-powered":
        failed = [c for c in check.controls if c.kind == "positive" and c.passed is False]
        return ["**Verdicts withheld: this grid is under-powered.** Its positive control failed — the pre-trained "
                "`finetune` baseline could not be told apart from the same baseline trained from random weights, a "
                "difference that must exist. A grid that cannot see that cannot see a smaller difference between "
                "learners; the numbers below are shown, the verdicts are not. What to change:", "",
                *[f"- {a}" for a in underpowered_advice(failed[0])], ""]
    if check.status == "incomplete":
        return ["**Verdicts withheld until the positive control is complete** (see the power check): without it "
                "nothing shows this grid can detect a known effect.", ""]
    if check.status == "no positive control":
        return ["No positive control in these results (run without `--no-controls` to get one): nothing shows this "
                "grid can detect a known effect, so read each verdict with the minimum detectable difference of the "
                "power check.", ""]
    return ["The power check passed: this grid detects the effect of pre-training (positive control).", ""]


def _warning_lines(page: Page) -> list[str]:
    lines = []
    for c in page.check.negative_failed:
        lines += [f"> **Warning: the negative control (A/A) failed** in {page.label(c.setting)}: {c.problem}. Treat the "
                  "verdicts with caution.", ""]
    if page.shortfalls:
        learners = sorted({s.learner for s in page.shortfalls})
        lines += [f"> **Unequal compute**: {len(page.shortfalls)} cell(s) spent more than "
                  f"{COMPUTE_TOLERANCE:.0%} more or less than their setting's `finetune` baseline "
                  f"({', '.join(learners)}); their comparisons are not at equal compute. Causes, from each cell's "
                  "record, under *Results per setting*.", ""]
    return lines


def _rule_lines(page: Page) -> list[str]:
    n = sum(c.diff is not None and c.diff.interval.available for c in page.main)
    m = f"{page.margin:g}"
    return [f"Each comparison gets one of four verdicts. *better* / *worse*: the 95% interval of the paired "
            f"difference (over seeds, same setting) excludes zero **and** the difference stays significant after "
            f"Holm's correction for the {n} comparison(s) of this report. *equivalent within ±{m}*: two one-sided "
            f"t-tests (TOST, 5% each, Holm-corrected likewise) exclude a difference of {m} mAP50 points or more "
            f"either way (equivalence margin `report.equivalence_margin` = {m}). *inconclusive*: neither — the "
            f"data still allow a difference of {m} points or more; no significant difference is not equivalence.",
            ""]


def _tally_lines(page: Page) -> list[str]:
    tally: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for c in page.main:
        tally[c.learner][_short(page.words(c.verdict))] += 1
    lines = []
    for learner, counts in tally.items():
        parts = ", ".join(f"{w} in {n}" for w, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"- {learner}: {parts} of {sum(counts.values())} setting(s)")
    return lines + [""]


def _comparison_line(page: Page, c: Comparison) -> str:
    if c.diff is None:
        return f"- {c.learner}, {page.label(c.setting)}: no seed in common with the baseline."
    iv = c.diff.interval
    return (f"- **{c.learner}** vs finetune, {page.label(c.setting)}: {_fmt(iv, signed=True)} mAP50 points over "
            f"{iv.n} paired seed(s); Holm-adjusted p {_p(c.p_holm, relation=True)} (difference), "
            f"{_p(c.p_equivalence_holm, relation=True)} (equivalence within ±{page.margin:g}) "
            f"→ **{page.words(c.verdict)}**.")


def _answer_section(page: Page) -> list[str]:
    lines = ["## Answer: each learner against the `finetune` baseline (mAP50)", "",
             f"Model measured: {_model_words(page.done)}.", ""]
    lines += _power_status_lines(page.check) + _warning_lines(page)
    if not page.main:
        return lines + ["No comparison available: no setting has both a learner and `finetune` with complete cells.",
                        "", ""]
    lines += _rule_lines(page) + _tally_lines(page)
    return lines + [_comparison_line(page, c) for c in page.main] + [""]


def _power_section(page: Page) -> list[str]:
    lines = ["## Power check", ""]
    if page.check.controls:
        lines += [_control_line(c, page.n_sources_all) for c in page.check.controls]
    else:
        lines.append("- No control cells in these results (`--no-controls`, or a shard that holds none of them).")
    n_family = sum(c.diff is not None and c.diff.interval.available for c in page.main)
    lines += [f"- Multiple comparisons: verdicts are corrected with Holm's step-down method over the {n_family} "
              "comparison(s) of mAP50 against `finetune` (family-wise error rate 5%, the difference tests and the "
              "equivalence tests each; each other metric, and the source-task comparisons, form families of their "
              "own). The tables show raw 95% intervals and Holm-adjusted p-values.", ""]
    return lines + _mdd_lines(page)


def _mdd_lines(page: Page) -> list[str]:
    prow = power_rows(page.comparisons, page.check)
    if not prow:
        return ["No comparison with 2 or more paired seeds: no minimum detectable difference.", ""]
    lines = ["The smallest true paired difference each comparison detects with 80% power (two-sided 5%; exact paired "
             "t-test power from the noncentral t distribution) at the spread observed over its seeds, and the seeds "
             f"a {TARGET_DIFFERENCE:g}-point difference would need at that spread. The observed spread is itself "
             "uncertain with few seeds: the range in brackets is the minimum detectable difference at the two ends "
             "of the sd's 95% confidence interval (chi-square, n − 1 degrees of freedom).", "",
             "| setting | comparison | pairs | sd of paired differences | minimum detectable difference [range] | "
             f"seeds for {TARGET_DIFFERENCE:g} points |", "|---|---|---|---|---|---|"]
    for r in prow:
        need = "–" if r.seeds_for_5 is None else f"{r.seeds_for_5:,}"
        lines.append(f"| {page.label(r.setting)} | {r.comparison} | {r.n} | {r.sd:.1f} | {_mdd(r)} | {need} |")
    lines.append("")
    for r in (r for r in prow if r.control == "negative"):
        lines += [f"Next to it, the A/A pair ({page.label(r.setting)}: two independent replicates of one learner, "
                  f"no true difference) has a minimum detectable difference of {_mdd(r)} points: a comparison whose "
                  "figure is near that one is as sensitive as this grid gets.", ""]
    return lines


def _mdd(r: PowerRow) -> str:
    if r.mdd is None:
        return "–"
    return f"{r.mdd:.1f}" + (f" [{r.mdd_range[0]:.1f}, {r.mdd_range[1]:.1f}]" if r.mdd_range else "")


def _setup_section(page: Page) -> list[str]:
    rows, done = page.rows, page.done
    det = sorted({str(r["detector"]) for r in rows})
    tgt = sorted({str(r["target"]) for r in rows})
    seeds = sorted({r["seed"] for r in done}, key=str)
    lines = ["## Setup", "",
             f"- results from: {', '.join(f'`{d}`' for d in page.dirs)}",
             f"- cells: {len(done)} complete of {len(rows)}; detector: {', '.join(det)}; target: {', '.join(tgt)}; "
             f"seeds: {', '.join(map(str, seeds)) or '–'}",
             f"- metrics on the target's held-out split, in **{UNIT}**; intervals are 95% Student-t confidence "
             "intervals over seeds, shown as `mean [low, high]`",
             f"- model measured: {_model_words(done)}",
             f"- equivalence margin: ±{page.margin:g} mAP50 points"]
    reused = [r for r in done if r.get("reused_from")]
    if reused:
        lines.append(f"- {len(reused)} of the {len(done)} complete cells are identical experiments taken from other "
                     "grids (`--reuse`: same config but for paths, same versions), e.g. `"
                     + str(reused[0]["reused_from"]) + "`")
    lines += _compute_lines(page) + _version_lines(page)
    return lines + [f"- warning: {w}" for w in page.loaded.warnings] + [""]


def _compute_lines(page: Page) -> list[str]:
    lines = [f"- compute budget per cell: {note}"
             for note in sorted({b.get("budget_note") for b in page.loaded.benchmark if b.get("budget_note")})]
    spent = [r["compute_spent"] for r in page.done if r["compute_spent"] is not None]
    if spent:
        lines.append(f"- compute spent per cell: {min(spent):,.0f} – {max(spent):,.0f} image passes "
                     "(forward + backward)")
    walls = [float(r["wall_s"]) for r in page.done if r["wall_s"] is not None]
    if walls:
        lines.append(f"- wall time per cell: {min(walls):,.0f} – {max(walls):,.0f} s (mean "
                     f"{sum(walls) / len(walls):,.0f} s; {sum(walls) / 3600:.2f} h of cell time in all)")
    return lines + [f"- note: {note}" for b in page.loaded.benchmark for note in b.get("notes") or []]


def _version_lines(page: Page) -> list[str]:
    if not page.loaded.records:
        return []
    rec = page.loaded.records[0]
    v = rec.get("versions") or {}
    if not v:
        return []
    return ["- versions: " + ", ".join(f"{k} {v[k]}" for k in ("megatron", "python", "torch", "mmdet", "mmcv",
                                                               "mmengine") if k in v)
            + f"; megatron {rec.get('megatron_version', '?')}",
            f"- machine: {v.get('platform', '?')}; cpu: {v.get('cpu', '?')}; device: {v.get('device', '?')}; "
            f"threads: {v.get('threads', '?')}"]


def _results_section(page: Page) -> list[str]:
    lines = ["## Results per setting", ""]
    for setting, per_learner in page.summary.items():
        lines += _learner_table(page, setting, per_learner)
        lines += _difference_table(page, setting)
        lines += _operating_point_table(page, setting)
        lines += _unequal_compute_lines(page, setting)
        lines += _unequal_selection_lines(page, setting)
    return lines


def _learner_table(page: Page, setting: tuple, per_learner: dict) -> list[str]:
    lines = [f"### {page.label(setting)}", "",
             "| learner | seeds | " + " | ".join(METRIC_LABELS[m] for m in METRICS) + " | image passes | stopped by |",
             "|---|---|" + "---|" * len(METRICS) + "---|---|"]
    for learner, ivs in per_learner.items():
        rs = [r for r in page.done if setting_of(r) == setting and r["learner"] == learner]
        sp = [r["compute_spent"] for r in rs if r["compute_spent"] is not None]
        stop = sorted({str(r["stopped_by"]) for r in rs})
        role = {"positive": " (positive control)", "negative": " (negative control)"}.get(
            next((r.get("control") for r in rs if r.get("control")), None), "")
        lines.append(f"| {learner}{role} | {len(rs)} | " + " | ".join(_fmt(ivs.get(m)) for m in METRICS)
                     + f" | {(sum(sp) / len(sp)) if sp else float('nan'):,.0f} | {', '.join(stop)} |")
    return lines + [""]


def _difference_table(page: Page, setting: tuple) -> list[str]:
    cs = [c for c in page.comparisons if c.setting == setting]
    if not cs:
        return []
    lines = ["Paired difference against `finetune` (learner − finetune, points; Holm-adjusted p of the difference "
             f"test and of the equivalence test at ±{page.margin:g}):", "",
             "| learner | metric | pairs | difference [95% CI] | p (difference) | p (equivalence) | verdict |",
             "|---|---|---|---|---|---|---|"]
    for c in cs:
        if c.diff is None:
            lines.append(f"| {c.learner} | {METRIC_LABELS[c.metric]} | 0 | – | – | – | {NO_COMMON_SEED} |")
        else:
            lines.append(f"| {c.learner} | {METRIC_LABELS[c.metric]} | {c.diff.interval.n} | "
                         f"{_fmt(c.diff.interval, signed=True)} | {_p(c.p_holm)} | {_p(c.p_equivalence_holm)} | "
                         f"{page.words(c.verdict)} |")
    return lines + [""]


def _operating_point_table(page: Page, setting: tuple) -> list[str]:
    """P/R/F1 at each cell's operating point chosen on validation (records made before it existed have none)."""
    rs = [r for r in page.done if setting_of(r) == setting and r.get("op_chosen_on") == "validation"]
    if not rs:
        return []
    lines = ["At the operating point chosen on the validation split (`evaluation.operating_point`; mean over seeds "
             "[95% CI], points), beside the fixed-threshold figures above:", "",
             "| learner | seeds | threshold (mean) | precision | recall | F1 | FROC point (FP/image, sensitivity) |",
             "|---|---|---|---|---|---|---|"]
    for learner in sorted({r["learner"] for r in rs}):
        mine = [r for r in rs if r["learner"] == learner]
        cells = [_fmt(stats.mean_ci([r[k] for r in mine])) for k in ("op_precision", "op_recall", "op_F1")]
        fpi = [r["op_fp_per_image"] for r in mine if r.get("op_fp_per_image") is not None]
        froc_point = (f"{sum(fpi) / len(fpi):.2f}, {_fmt(stats.mean_ci([r['op_recall'] for r in mine]))}"
                      if fpi else "–")
        thr = sum(r["op_threshold"] for r in mine) / len(mine)
        lines.append(f"| {learner} | {len(mine)} | {thr:.3f} | " + " | ".join(cells) + f" | {froc_point} |")
    return lines + [""]


def _unequal_compute_lines(page: Page, setting: tuple) -> list[str]:
    """The cells of ``setting`` more than COMPUTE_TOLERANCE off the baseline's image passes, with their causes."""
    here = [s for s in page.shortfalls if s.setting == setting]
    if not here:
        return []
    groups: dict[tuple, list[ComputeShortfall]] = defaultdict(list)
    for s in here:
        groups[(s.learner, s.spent, s.cause)].append(s)
    lines = [f"> **Unequal compute** in this setting: the `finetune` baseline's cells spent {here[0].baseline:,.0f} "
             f"image passes on average; these cells are more than {COMPUTE_TOLERANCE:.0%} off it:", ">"]
    for (learner, spent, cause), cells in groups.items():
        lines.append(f"> - {learner}, {len(cells)} cell(s): {spent:,.0f} ({cells[0].relative:+.1%}) — {cause}.")
    return lines + [""]


def _unequal_selection_lines(page: Page, setting: tuple) -> list[str]:
    """When the reported model is chosen on validation among a cell's meta-epochs, an arm that ran more
    meta-epochs in the same compute picks among more candidates (a learner whose outer step costs more runs
    fewer): the counts, for each learner whose mean differs from the baseline's by half a meta-epoch or more."""
    per: dict[str, list[int]] = defaultdict(list)
    for r in page.done:
        if setting_of(r) == setting and r.get("model") == "selected" and r.get("n_epochs"):
            per[r["learner"]].append(r["n_epochs"])
    if BASELINE not in per:
        return []
    mean = {learner: sum(v) / len(v) for learner, v in per.items()}
    differ = {learner: n for learner, n in mean.items() if abs(n - mean[BASELINE]) >= 0.5}
    if not differ:
        return []
    listing = ", ".join(f"{learner} {n:.2g}" for learner, n in sorted(differ.items()))
    return [f"> **Unequal selection**: the reported model is the best of each cell's meta-epochs on the validation "
            f"split, and the arms had different numbers of candidates (mean per cell): `finetune` "
            f"{mean[BASELINE]:.2g}, {listing}. More candidates favour their arm; `megatron report DIR --model final` "
            "compares the models after the last meta-epoch instead.", ""]


def _source_choice_section(page: Page) -> list[str]:
    sel = selection_comparisons(page.rows, page.margin)
    if not sel:
        return []
    lines = ["## Source-task choice", "", "Paired over seeds, same learner, K and learning rate (points of mAP50; "
             f"Holm-corrected over these comparisons; equivalence margin ±{page.margin:g}):", "",
             "| learner | N | comparison | pairs | difference [95% CI] | p (difference) | p (equivalence) | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for learner, n, a, b, diff, p_holm, p_eq in sel:
        words = page.words(stats.equivalence_verdict(diff.interval, page.margin / POINTS, p_holm, p_eq))
        words = {stats.BETTER: f"{a} better", stats.WORSE: f"{a} worse"}.get(words, words)
        lines.append(f"| {learner} | {n} | {a} − {b} | {diff.interval.n} | {_fmt(diff.interval, signed=True)} | "
                     f"{_p(p_holm)} | {_p(p_eq)} | {words} |")
    lines.append("")
    chosen = sorted({(r['n_tasks'], ', '.join(r['sources'] or [])) for r in page.done
                     if r['selection'] == 'closest' and r['sources']})
    if chosen:
        lines += ["Closest tasks chosen: " + "; ".join(f"N={n}: {s}" for n, s in chosen), ""]
    return lines


def _incomplete_section(page: Page) -> list[str]:
    bad = [r for r in page.rows if r["status"] != "complete"]
    if not bad:
        return []
    return (["## Cells not complete", "", "| cell | status |", "|---|---|"]
            + [f"| {r['cell_id']} | {r['status']} |" for r in bad]
            + ["", "Re-run the same `megatron benchmark` command: finished cells are skipped, killed ones resume.", ""])


def _plots_section(page: Page) -> list[str]:
    lines = []
    if page.plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.as_posix()})" for p in page.plots] + [""]
    return lines + ["Rebuild this report from the records alone: `megatron report "
                    + " ".join(str(d) for d in page.dirs) + "`.", ""]


def selection_comparisons(rows: list[dict], margin: float = DEFAULT_EQUIVALENCE_MARGIN) -> list[tuple]:
    """Closest vs random (same N) and closest vs all, per learner, paired over seeds: ``(learner, N, "closest",
    other, PairedDifference, Holm-adjusted p, Holm-adjusted TOST p at ±margin points)``, Holm over these."""
    done = complete(rows)
    if len({r["selection"] for r in done}) < 2:
        return []
    by: dict[tuple, dict] = defaultdict(dict)
    for r in done:
        by[(r["learner"], r["shots"], r["lr"], r["selection"], r["n_sources"])][r["seed"]] = r["mAP50"]
    out = []
    for (learner, k, lr, sel, n), vals in sorted(by.items(), key=lambda kv: str(kv[0])):
        if sel != "closest":
            continue
        for other, key in (("random", (learner, k, lr, "random", n)), ("all", (learner, k, lr, "all", None))):
            ref = by.get(key)
            if ref and set(ref) & set(vals):
                out.append((learner, n, "closest", other, stats.paired_difference(vals, ref)))
    return [(*t, p, p_eq) for t, p, p_eq in _holm_both(out, [t[-1] for t in out], margin / POINTS)]
