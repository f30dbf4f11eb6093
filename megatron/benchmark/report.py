"""The benchmark report, rebuilt from the cell records alone: results.csv/json, report.md and plots.

Input: one or more benchmark directories (``<dir>/cells/<cell-id>/run.json`` + ``cell.json``), or plain run
directories (``<dir>/run.json``) or folders of them. Identical cells found in several directories (the same
cell id with the same final metrics) are counted once, so separate runs of one grid (shards, machines) merge.

Statistics (:mod:`megatron.benchmark.stats`): per learner and setting, the mean over seeds with a 95% Student-t interval;
per learner, the paired difference against the ``finetune`` baseline of the same setting, with its interval and
a verdict in words, Holm-corrected over all the report's comparisons of a metric. Metrics are stored as fractions
(0..1) and shown in mAP points (x100).

The report reads answer first, then the power check, then the tables:

- **Answer**: the verdicts (mAP50) — withheld when the positive control failed (the grid is under-powered; the
  report says what to change) or is not complete.
- **Power check** (:func:`control_checks`, :func:`power_rows`): the positive control (``finetune`` −
  ``finetune_scratch`` must be *better*), the negative control (``finetune_aa`` − ``finetune`` must show no
  significant difference, and must not be identical), and per comparison the minimum detectable paired
  difference at 80% power and the seeds a 5-point difference needs.
- **Setup**, **Results per setting**, **Source-task choice**, plots.

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

log = logging.getLogger(__name__)






# ----------------------------------------------------------------------------------------------------- statistics
@dataclass
class Comparison:
    setting: tuple
    learner: str
    metric: str
    diff: stats.PairedDifference | None  # None: the baseline has no seed in common
    p_holm: float | None = None  # Holm-adjusted p-value over the comparisons of this metric

    @property
    def verdict(self) -> str:
        """The verdict after the multiple-comparison correction (:func:`stats.verdict`)."""
        if self.diff is None:
            return "no common seed"
        return stats.verdict(self.diff.interval, self.p_holm)


def _paired(cand: list[dict], ref: list[dict], metric: str = "mAP50") -> stats.PairedDifference | None:
    a = {r["seed"]: r[metric] for r in cand if r[metric] is not None}
    b = {r["seed"]: r[metric] for r in ref if r[metric] is not None}
    return stats.paired_difference(a, b) if set(a) & set(b) else None


def summarise(rows: list[dict]) -> tuple[dict, list[Comparison]]:
    """``{setting: {learner: {metric: Interval}}}`` and the paired comparisons against the baseline (the power
    check's control cells are summarised but not compared here: :func:`control_checks`), Holm-corrected per metric."""
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
        base = [r for r in groups[setting].get(BASELINE, []) if not r.get("control")]
        for learner, rs in sorted(groups[setting].items()):
            if learner == BASELINE or not base or any(r.get("control") for r in rs):
                continue
            for m in METRICS:
                comparisons.append(Comparison(setting, learner, m, _paired(rs, base, m)))
    for metric in {c.metric for c in comparisons}:  # one family per metric: every learner x setting
        family = [c for c in comparisons if c.metric == metric and c.diff is not None]
        for c, p in zip(family, stats.holm([c.diff.p_value for c in family])):
            c.p_holm = p
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


#: the difference whose seed count the report quotes, in points
TARGET_DIFFERENCE = 5.0


def power_rows(comparisons: list[Comparison], check: PowerCheck) -> list[PowerRow]:
    """The minimum detectable paired difference and the seeds a 5-point difference needs, for every mAP50
    comparison and control with at least 2 pairs, from its observed spread."""
    out: list[PowerRow] = []
    items = [(c.setting, f"{c.learner} − {BASELINE}", c.diff) for c in comparisons if c.metric == "mAP50"]
    items += [(c.setting, f"{c.candidate} − {c.reference} ({c.kind} control)", c.diff) for c in check.controls]
    for setting, name, diff in sorted(items, key=lambda t: _skey(t[0])):
        if diff is None or not diff.interval.available:
            continue
        iv = diff.interval.scaled(POINTS)
        out.append(PowerRow(setting, name, iv.n, iv.sd, stats.min_detectable_difference(iv.sd, iv.n),
                            stats.seeds_needed(TARGET_DIFFERENCE, iv.sd)))
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


RECORD_FILES = ("cell.json", "run.json", "error.txt")


def copy_records(rows: list[dict], loaded: Loaded, out: Path) -> int:
    """Copy every grid cell's record (``cell.json``, ``run.json``, ``error.txt``; never checkpoints or models) into
    ``out/cells/<cell-id>/`` and the grids' ``benchmark.json`` into ``out``, so that ``megatron report OUT``
    rebuilds the same report from ``out`` alone. Returns the number of cells copied."""
    n = 0
    for r in rows:
        src = Path(r["_dir"])
        dst = out / "cells" / r["cell_id"]
        if not (src / "cell.json").exists() or src.resolve() == dst.resolve():
            continue  # plain run directories have no cell definition; a cell already in place stays
        dst.mkdir(parents=True, exist_ok=True)
        for name in RECORD_FILES:
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


def build_report(dirs: Iterable[str | Path], out: str | Path, epoch: int | None = None,
                 copy: bool | None = None, model: str = DEFAULT_MODEL) -> ReportResult:
    """Rebuild results.csv, results.json, report.md and plots/*.png in ``out`` from the cell records in ``dirs``.

    ``copy`` (default: when ``out`` is not one of ``dirs``): also copy the cell records into ``out``
    (:func:`copy_records`), which makes ``out`` a self-contained, rebuildable result folder. ``model``: whose
    metrics, each cell's validation-``selected`` model or its ``final`` one (:data:`~megatron.benchmark.rows.MODELS`)."""
    dirs = [Path(d) for d in dirs]
    out = Path(out)
    loaded = load_rows(dirs, model)
    rows = loaded.rows
    out.mkdir(parents=True, exist_ok=True)
    if copy is None:
        copy = out.resolve() not in {d.resolve() for d in dirs}
    copied = copy_records(rows, loaded, out) if copy else 0
    write_results(rows, out)
    summary, comparisons = summarise(rows)
    check = control_checks(rows)
    from megatron.benchmark import plots as _plots  # matplotlib only when a report is written

    plot_paths = _plots.make_all(rows, summary, comparisons, out / "plots", loaded, epoch=epoch,
                                 withheld=check.withheld)
    sources = [out] if copy else dirs
    text = render_markdown(rows, summary, comparisons, loaded, sources, [p.relative_to(out) for p in plot_paths],
                           check)
    atomic_write_text(out / "report.md", text)
    return ReportResult(out, rows, summary, comparisons, plot_paths, loaded.warnings, check, copied)


WITHHELD = "verdict withheld (under-powered grid)"
WITHHELD_INCOMPLETE = "verdict withheld (positive control not complete)"


def _words(verdict: str, check: PowerCheck | None) -> str:
    """A verdict as the report shows it: withheld when the power check failed (no interval: nothing to withhold)."""
    if check is None or not check.withheld or verdict in (stats.NOT_AVAILABLE, "no common seed"):
        return verdict
    return WITHHELD if check.status == "under-powered" else WITHHELD_INCOMPLETE


def _p(p: float | None, relation: bool = False) -> str:
    if p is None:
        return "n/a" if relation else "–"
    if p < 0.001:
        return "< 0.001"
    return f"= {p:.3f}" if relation else f"{p:.3f}"


def _short(words: str) -> str:
    """A verdict in a word or three, for the per-learner tally."""
    for short in (stats.BETTER, stats.WORSE, "withheld"):
        if words.startswith(short) or short in words.split(" (")[0]:
            return short
    if words == stats.NOT_AVAILABLE:
        return "no CI (1 seed)"
    if words == "no common seed":
        return words
    return "no significant difference"


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


def render_markdown(rows: list[dict], summary: dict, comparisons: list[Comparison], loaded: Loaded,
                    dirs: list[Path], plots: list[Path], check: PowerCheck | None = None) -> str:
    check = check if check is not None else control_checks(rows)
    n_sources_all = n_all(loaded)
    done = complete(rows)
    L: list[str] = ["# megatron benchmark report", ""]
    descs = []
    for b in loaded.benchmark:
        if b.get("description") and b["description"].strip() not in descs:
            descs.append(b["description"].strip())
    for desc in descs:
        L += [desc, ""]

    # ---- the answer first
    mc = [c for c in comparisons if c.metric == "mAP50"]
    L += ["## Answer: each learner against the `finetune` baseline (mAP50)", "", f"Model measured: {_model_words(done)}.",
          ""]
    if check.status == "under-powered":
        failed = [c for c in check.controls if c.kind == "positive" and c.passed is False]
        L += ["**Verdicts withheld: this grid is under-powered.** Its positive control failed — the pre-trained "
              "`finetune` baseline could not be told apart from the same baseline trained from random weights, a "
              "difference that must exist. A grid that cannot see that cannot see a smaller difference between "
              "learners; the numbers below are shown, the verdicts are not. What to change:", ""]
        L += [f"- {a}" for a in underpowered_advice(failed[0])]
        L.append("")
    elif check.status == "incomplete":
        L += ["**Verdicts withheld until the positive control is complete** (see the power check): without it "
              "nothing shows this grid can detect a known effect.", ""]
    elif check.status == "no positive control":
        L += ["No positive control in these results (run without `--no-controls` to get one): nothing shows this "
              "grid can detect a known effect, so read each verdict with the minimum detectable difference of the "
              "power check.", ""]
    else:
        L += ["The power check passed: this grid detects the effect of pre-training (positive control).", ""]
    for c in check.negative_failed:
        L += [f"> **Warning: the negative control (A/A) failed** in {setting_label(c.setting, n_sources_all)}: "
              f"{c.problem}. Treat the verdicts with caution.", ""]
    if not mc:
        L += ["No comparison available: no setting has both a learner and `finetune` with complete cells.", ""]
    else:
        L += ["A learner is *better* or *worse* only when the 95% interval of its paired difference (over seeds, same "
              f"setting) excludes zero **and** the difference stays significant after Holm's correction for the "
              f"{sum(c.diff is not None and c.diff.interval.available for c in mc)} comparison(s) of this report.", ""]
        tally: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for c in mc:
            tally[c.learner][_short(_words(c.verdict, check))] += 1
        for learner, counts in tally.items():
            parts = ", ".join(f"{w} in {n}" for w, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
            L.append(f"- {learner}: {parts} of {sum(counts.values())} setting(s)")
        L.append("")
    for c in mc:
        if c.diff is None:
            L.append(f"- {c.learner}, {setting_label(c.setting, n_sources_all)}: no seed in common with the baseline.")
            continue
        iv = c.diff.interval
        L.append(f"- **{c.learner}** vs finetune, {setting_label(c.setting, n_sources_all)}: {_fmt(iv, signed=True)} "
                 f"mAP50 points over {iv.n} paired seed(s); Holm-adjusted p {_p(c.p_holm, relation=True)} "
                 f"→ **{_words(c.verdict, check)}**.")
    L.append("")

    # ---- the power check
    L += ["## Power check", ""]
    if check.controls:
        L += [_control_line(c, n_sources_all) for c in check.controls]
    else:
        L.append("- No control cells in these results (`--no-controls`, or a shard that holds none of them).")
    n_family = sum(c.diff is not None and c.diff.interval.available for c in mc)
    L += [f"- Multiple comparisons: verdicts are corrected with Holm's step-down method over the {n_family} "
          "comparison(s) of mAP50 against `finetune` (family-wise error rate 5%; each other metric, and the "
          "source-task comparisons, form families of their own). The tables show raw 95% intervals and "
          "Holm-adjusted p-values.", ""]
    prow = power_rows(comparisons, check)
    if prow:
        L += ["The smallest true paired difference each comparison detects with 80% power (two-sided 5%; exact "
              "paired t-test power from the noncentral t distribution) at the spread observed over its seeds, and "
              f"the seeds a {TARGET_DIFFERENCE:g}-point difference would need at that spread. The observed spread is "
              "itself uncertain with few seeds.", "",
              "| setting | comparison | pairs | sd of paired differences | minimum detectable difference | "
              f"seeds for {TARGET_DIFFERENCE:g} points |", "|---|---|---|---|---|---|"]
        for r in prow:
            need = "–" if r.seeds_for_5 is None else f"{r.seeds_for_5:,}"
            L.append(f"| {setting_label(r.setting, n_sources_all)} | {r.comparison} | {r.n} | {r.sd:.1f} | "
                     f"{r.mdd:.1f} | {need} |")
        L.append("")
    else:
        L += ["No comparison with 2 or more paired seeds: no minimum detectable difference.", ""]

    # ---- what ran
    L += ["## Setup", ""]
    det = sorted({str(r["detector"]) for r in rows})
    tgt = sorted({str(r["target"]) for r in rows})
    seeds = sorted({r["seed"] for r in done}, key=str)
    L += [f"- results from: {', '.join(f'`{d}`' for d in dirs)}",
          f"- cells: {len(done)} complete of {len(rows)}; detector: {', '.join(det)}; target: {', '.join(tgt)}; "
          f"seeds: {', '.join(map(str, seeds)) or '–'}",
          f"- metrics on the target's held-out split, in **{UNIT}**; intervals are 95% Student-t confidence "
          "intervals over seeds, shown as `mean [low, high]`",
          f"- model measured: {_model_words(done)}"]
    reused = [r for r in done if r.get("reused_from")]
    if reused:
        L.append(f"- {len(reused)} of the {len(done)} complete cells are identical experiments taken from other grids "
                 "(`--reuse`: same config but for paths, same versions), e.g. `" + str(reused[0]["reused_from"]) + "`")
    budgets = sorted({b.get("budget_note") for b in loaded.benchmark if b.get("budget_note")})
    for note in budgets:
        L.append(f"- compute budget per cell: {note}")
    spent = [r["compute_spent"] for r in done if r["compute_spent"] is not None]
    if spent:
        L.append(f"- compute spent per cell: {min(spent):,.0f} – {max(spent):,.0f} image passes (forward + backward)")
    walls = [float(r["wall_s"]) for r in done if r["wall_s"] is not None]
    if walls:
        L.append(f"- wall time per cell: {min(walls):,.0f} – {max(walls):,.0f} s (mean {sum(walls) / len(walls):,.0f} s; "
                 f"{sum(walls) / 3600:.2f} h of cell time in all)")
    for b in loaded.benchmark:
        for note in b.get("notes") or []:
            L.append(f"- note: {note}")
    if loaded.records:
        rec = loaded.records[0]
        v = rec.get("versions") or {}
        if v:
            L.append("- versions: " + ", ".join(f"{k} {v[k]}" for k in ("megatron", "python", "torch", "mmdet",
                                                                         "mmcv", "mmengine") if k in v)
                     + f"; megatron {rec.get('megatron_version', '?')}")
            L.append(f"- machine: {v.get('platform', '?')}; cpu: {v.get('cpu', '?')}; device: {v.get('device', '?')}; "
                     f"threads: {v.get('threads', '?')}")
    L += [f"- warning: {w}" for w in loaded.warnings]
    L.append("")

    # ---- the tables
    L += ["## Results per setting", ""]
    for setting, per_learner in summary.items():
        L += [f"### {setting_label(setting, n_sources_all)}", "",
              "| learner | seeds | " + " | ".join(METRIC_LABELS[m] for m in METRICS) + " | image passes | stopped by |",
              "|---|---|" + "---|" * len(METRICS) + "---|---|"]
        for learner, ivs in per_learner.items():
            rs = [r for r in done if setting_of(r) == setting and r["learner"] == learner]
            n = len(rs)
            sp = [r["compute_spent"] for r in rs if r["compute_spent"] is not None]
            stop = sorted({str(r["stopped_by"]) for r in rs})
            role = {"positive": " (positive control)", "negative": " (negative control)"}.get(
                next((r.get("control") for r in rs if r.get("control")), None), "")
            L.append(f"| {learner}{role} | {n} | " + " | ".join(_fmt(ivs.get(m)) for m in METRICS)
                     + f" | {(sum(sp) / len(sp)) if sp else float('nan'):,.0f} | {', '.join(stop)} |")
        L.append("")
        cs = [c for c in comparisons if c.setting == setting]
        if cs:
            L += ["Paired difference against `finetune` (learner − finetune, points):", "",
                  "| learner | metric | pairs | difference [95% CI] | Holm-adjusted p | verdict |",
                  "|---|---|---|---|---|---|"]
            for c in cs:
                if c.diff is None:
                    L.append(f"| {c.learner} | {METRIC_LABELS[c.metric]} | 0 | – | – | no common seed |")
                else:
                    L.append(f"| {c.learner} | {METRIC_LABELS[c.metric]} | {c.diff.interval.n} | "
                             f"{_fmt(c.diff.interval, signed=True)} | {_p(c.p_holm)} | {_words(c.verdict, check)} |")
            L.append("")
        L += _fairness(setting, done)

    sel = selection_comparisons(rows)
    if sel:
        L += ["## Source-task choice", "", "Paired over seeds, same learner, K and learning rate (points of mAP50; "
              "Holm-corrected over these comparisons):", "",
              "| learner | N | comparison | pairs | difference [95% CI] | Holm-adjusted p | verdict |",
              "|---|---|---|---|---|---|---|"]
        for learner, n, a, b, diff, p_holm in sel:
            words = _words(stats.verdict(diff.interval, p_holm), check)
            L.append(f"| {learner} | {n} | {a} − {b} | {diff.interval.n} | {_fmt(diff.interval, signed=True)} | "
                     f"{_p(p_holm)} | {words.replace('better', f'{a} better').replace('worse', f'{a} worse')} |")
        L.append("")
        chosen = sorted({(r['n_tasks'], ', '.join(r['sources'] or [])) for r in done
                         if r['selection'] == 'closest' and r['sources']})
        if chosen:
            L += ["Closest tasks chosen: " + "; ".join(f"N={n}: {s}" for n, s in chosen), ""]

    bad = [r for r in rows if r["status"] != "complete"]
    if bad:
        L += ["## Cells not complete", "", "| cell | status |", "|---|---|"]
        L += [f"| {r['cell_id']} | {r['status']} |" for r in bad]
        L += ["", "Re-run the same `megatron benchmark` command: finished cells are skipped, killed ones resume.", ""]

    if plots:
        L += ["## Plots", ""]
        L += [f"![{p.stem}]({p.as_posix()})" for p in plots]
        L.append("")
    L += ["Rebuild this report from the records alone: `megatron report "
          + " ".join(str(d) for d in dirs) + "`.", ""]
    return "\n".join(L)


def _fairness(setting: tuple, done: list[dict]) -> list[str]:
    """Flag settings where learners did not spend the same compute (the comparison would not be fair)."""
    spent: dict[str, list[float]] = defaultdict(list)
    for r in done:
        if setting_of(r) == setting and r["compute_spent"]:
            spent[r["learner"]].append(float(r["compute_spent"]))
    means = {k: sum(v) / len(v) for k, v in spent.items()}
    if len(means) < 2:
        return []
    lo, hi = min(means.values()), max(means.values())
    if hi > 1.1 * lo:
        worst = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(means.items()))
        return [f"> **Unequal compute** in this setting (mean image passes: {worst}): a learner stopped by its "
                "epoch count before the budget. Raise `training.meta_epochs` so every learner stops by the budget.", ""]
    return []


def selection_comparisons(rows: list[dict]) -> list[tuple]:
    """Closest vs random (same N) and closest vs all, per learner, paired over seeds:
    ``(learner, N, "closest", other, PairedDifference, Holm-adjusted p)``, Holm over these comparisons."""
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
    adjusted = stats.holm([d.p_value for *_, d in out])
    return [(*t, p) for t, p in zip(out, adjusted)]


