"""The benchmark report, rebuilt from the cell records alone: results.csv/json, report.md and plots.

Input: one or more benchmark directories (``<dir>/cells/<cell-id>/run.json`` + ``cell.json``), or plain run
directories (``<dir>/run.json``) or folders of them. Identical cells found in several directories (the same
cell id with the same final metrics) are counted once, so separate runs of one grid (shards, machines) merge.

Statistics (:mod:`megatron.benchmark.stats`): per learner and setting, the mean over seeds with a 95% Student-t interval;
per learner, the paired difference against the ``finetune`` baseline of the same setting, with its interval and
a verdict in words. Metrics are stored as fractions (0..1) and shown in mAP points (x100).
"""
from __future__ import annotations

import csv
import io
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from megatron.benchmark import stats
from megatron.checkpoint import atomic_write_json, atomic_write_text
from megatron.benchmark.rows import (  # noqa: F401 - re-exported for readers of the report
    BASELINE, CSV_COLUMNS, METRIC_LABELS, METRICS, POINTS, UNIT, Loaded, ReportError, complete, fixed_epoch, load_rows,
    n_all, setting_label, setting_of, slug, _skey,
)

log = logging.getLogger(__name__)






# ----------------------------------------------------------------------------------------------------- statistics
@dataclass
class Comparison:
    setting: tuple
    learner: str
    metric: str
    diff: stats.PairedDifference | None  # None: the baseline has no seed in common


def summarise(rows: list[dict]) -> tuple[dict, list[Comparison]]:
    """``{setting: {learner: {metric: Interval}}}`` and the paired comparisons against the baseline."""
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
        base = groups[setting].get(BASELINE)
        for learner, rs in sorted(groups[setting].items()):
            if learner == BASELINE or not base:
                continue
            for m in METRICS:
                cand = {r["seed"]: r[m] for r in rs if r[m] is not None}
                ref = {r["seed"]: r[m] for r in base if r[m] is not None}
                diff = stats.paired_difference(cand, ref) if set(cand) & set(ref) else None
                comparisons.append(Comparison(setting, learner, m, diff))
    return summary, comparisons


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


def build_report(dirs: Iterable[str | Path], out: str | Path, epoch: int | None = None) -> ReportResult:
    """Rebuild results.csv, results.json, report.md and plots/*.png in ``out`` from the cell records in ``dirs``."""
    dirs = [Path(d) for d in dirs]
    out = Path(out)
    loaded = load_rows(dirs)
    rows = loaded.rows
    out.mkdir(parents=True, exist_ok=True)
    write_results(rows, out)
    summary, comparisons = summarise(rows)
    from megatron.benchmark import plots as _plots  # matplotlib only when a report is written

    plot_paths = _plots.make_all(rows, summary, comparisons, out / "plots", loaded, epoch=epoch)
    text = render_markdown(rows, summary, comparisons, loaded, dirs, [p.relative_to(out) for p in plot_paths])
    atomic_write_text(out / "report.md", text)
    return ReportResult(out, rows, summary, comparisons, plot_paths, loaded.warnings)


def render_markdown(rows: list[dict], summary: dict, comparisons: list[Comparison], loaded: Loaded,
                    dirs: list[Path], plots: list[Path]) -> str:
    n_sources_all = n_all(loaded)
    done = complete(rows)
    L: list[str] = ["# megatron benchmark report", ""]
    desc = next((b.get("description") for b in loaded.benchmark if b.get("description")), "")
    if desc:
        L += [desc.strip(), ""]
    det = sorted({str(r["detector"]) for r in rows})
    tgt = sorted({str(r["target"]) for r in rows})
    seeds = sorted({r["seed"] for r in done}, key=str)
    L += [f"- results from: {', '.join(f'`{d}`' for d in dirs)}",
          f"- cells: {len(done)} complete of {len(rows)}; detector: {', '.join(det)}; target: {', '.join(tgt)}; "
          f"seeds: {', '.join(map(str, seeds)) or '–'}",
          f"- metrics on the target's held-out split, in **{UNIT}**; intervals are 95% Student-t confidence "
          "intervals over seeds, shown as `mean [low, high]`"]
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

    L += ["## Verdicts against the `finetune` baseline (mAP50)", "",
          "A learner is called *better* or *worse* only when the 95% interval of its paired difference (over "
          "seeds, same setting) excludes zero.", ""]
    mc = [c for c in comparisons if c.metric == "mAP50"]
    if not mc:
        L += ["No comparison available: no setting has both a learner and `finetune` with complete cells.", ""]
    for c in mc:
        if c.diff is None:
            L.append(f"- {c.learner}, {setting_label(c.setting, n_sources_all)}: no seed in common with the baseline.")
            continue
        iv = c.diff.interval
        L.append(f"- **{c.learner}** vs finetune, {setting_label(c.setting, n_sources_all)}: {_fmt(iv, signed=True)} "
                 f"mAP50 points over {iv.n} paired seed(s) → **{c.diff.verdict}**.")
    L.append("")

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
            L.append(f"| {learner} | {n} | " + " | ".join(_fmt(ivs.get(m)) for m in METRICS)
                     + f" | {(sum(sp) / len(sp)) if sp else float('nan'):,.0f} | {', '.join(stop)} |")
        L.append("")
        cs = [c for c in comparisons if c.setting == setting]
        if cs:
            L += ["Paired difference against `finetune` (learner − finetune, points):", "",
                  "| learner | metric | pairs | difference [95% CI] | verdict |", "|---|---|---|---|---|"]
            for c in cs:
                if c.diff is None:
                    L.append(f"| {c.learner} | {METRIC_LABELS[c.metric]} | 0 | – | no common seed |")
                else:
                    L.append(f"| {c.learner} | {METRIC_LABELS[c.metric]} | {c.diff.interval.n} | "
                             f"{_fmt(c.diff.interval, signed=True)} | {c.diff.verdict} |")
            L.append("")
        L += _fairness(setting, done)

    sel = selection_comparisons(rows)
    if sel:
        L += ["## Source-task choice", "", "Paired over seeds, same learner, K and learning rate (points of mAP50):", "",
              "| learner | N | comparison | pairs | difference [95% CI] | verdict |", "|---|---|---|---|---|---|"]
        for learner, n, a, b, diff in sel:
            L.append(f"| {learner} | {n} | {a} − {b} | {diff.interval.n} | {_fmt(diff.interval, signed=True)} | "
                     f"{diff.verdict.replace('better', f'{a} better').replace('worse', f'{a} worse')} |")
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
    """Closest vs random (same N) and closest vs all, per learner, paired over seeds."""
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
    return out


