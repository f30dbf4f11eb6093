"""The benchmark report, rebuilt from the cell records alone: results.csv/json, report.md and plots.

Input: one or more benchmark directories (``<dir>/cells/<cell-id>/run.json`` + ``cell.json``), or plain run
directories (``<dir>/run.json``) or folders of them. Identical cells found in several directories (the same
cell id with the same final metrics) are counted once, so separate runs of one grid (shards, machines) merge.

Statistics (:mod:`megatron.stats`): per learner and setting, the mean over seeds with a 95% Student-t interval;
per learner, the paired difference against the ``finetune`` baseline of the same setting, with its interval and
a verdict in words. Metrics are stored as fractions (0..1) and shown in mAP points (x100).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from megatron import stats
from megatron.checkpoint import atomic_write_json, atomic_write_text
from megatron.errors import MegatronError

log = logging.getLogger(__name__)

BASELINE = "finetune"
METRICS = ("mAP50", "mAP50_95", "precision", "recall", "F1")
METRIC_LABELS = {"mAP50": "mAP50", "mAP50_95": "mAP50:95", "precision": "precision", "recall": "recall", "F1": "F1"}
POINTS = 100.0  # fractions -> points
UNIT = "points (x100 of a fraction in 0..1; 1 point = 0.01 mAP)"
CSV_COLUMNS = ("cell_id", "learner", "learner_plugin", "seed", "n_sources", "n_tasks", "sources", "shots", "lr",
               "selection", "detector", "target", "status", *METRICS, "compute_spent", "compute_budget",
               "stopped_by", "baseline_equivalent_epochs", "n_epochs", "wall_s", "epochs")


class ReportError(MegatronError):
    """Records that cannot be turned into a report (none found, unreadable)."""


# ------------------------------------------------------------------------------------------------------- loading
def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc}); re-run that cell or delete its folder") from None


def _cell_dirs(root: Path) -> list[Path]:
    root = Path(root)
    if not root.exists():
        raise ReportError(f"{root}: no such directory (expected a `megatron benchmark` --out folder)")
    if (root / "run.json").exists() or (root / "cell.json").exists():
        return [root]
    base = root / "cells" if (root / "cells").is_dir() else root
    return sorted(p for p in base.iterdir() if p.is_dir() and ((p / "run.json").exists() or (p / "cell.json").exists()))


def _learner_record(rec: dict, plugin: str) -> dict | None:
    learners = rec.get("learners") or {}
    if plugin in learners:
        return learners[plugin]
    if len(learners) == 1:
        return next(iter(learners.values()))
    return None


def _epochs(lrec: dict) -> list[dict]:
    """Per-epoch metrics with cumulative compute (the record may hold per-epoch or cumulative counts)."""
    eps = lrec.get("epochs") or []
    spent = [float((e.get("compute") or {}).get("spent") or 0) for e in eps]
    total = float((lrec.get("compute") or {}).get("spent") or 0)
    cumulative = bool(spent) and abs(spent[-1] - total) <= max(1.0, 1e-6 * total) and all(
        b >= a for a, b in zip(spent, spent[1:]))
    out, acc = [], 0.0
    for i, e in enumerate(eps):
        acc = spent[i] if cumulative else acc + spent[i]
        m = e.get("metrics") or {}
        out.append({"meta_epoch": e.get("meta_epoch", i + 1), "compute_spent": acc, "train_loss": e.get("train_loss"),
                    **{k: m.get(k) for k in METRICS}})
    return out


def row_from_record(cell_dir: Path, rec: dict | None, cell: dict | None) -> dict:
    """One results row from a cell's record and (optional) cell definition."""
    cfg = (rec or {}).get("config") or {}
    plugin = (cell or {}).get("learner_name") or (cfg.get("learner") or {}).get("name") or "?"
    label = (cell or {}).get("learner") or plugin
    lrec = _learner_record(rec, plugin) if rec else None
    final = (lrec or {}).get("final") or {}
    sources = (rec or {}).get("sources")
    if sources is None and cell:
        sources = cell.get("sources")
    selection = (cell or {}).get("selection") or ("closest" if (rec or {}).get("selection") else "given")
    compute = (lrec or {}).get("compute") or {}
    epochs = _epochs(lrec) if lrec else []
    wall = (rec or {}).get("wall_s")
    if wall is None and lrec:
        wall = sum(float(e.get("wall_s") or 0) for e in lrec.get("epochs") or [])
    status = (rec or {}).get("status") or ("failed" if (cell_dir / "error.txt").exists() else "not started")
    if status == "complete" and not lrec:
        status = "incomplete record"
    return {
        "cell_id": (cell or {}).get("id") or cell_dir.name,
        "learner": label, "learner_plugin": plugin,
        "seed": (cell or {}).get("seed", (rec or {}).get("seed", cfg.get("seed"))),
        "n_sources": (cell or {}).get("n_sources") if cell else None,
        "n_tasks": len(sources) if sources is not None else None,
        "sources": list(sources) if sources is not None else None,
        "shots": (cell or {}).get("shots", (rec or {}).get("shots", (cfg.get("data") or {}).get("shots"))),
        "lr": (cell or {}).get("lr"),
        "selection": selection,
        "detector": (cell or {}).get("detector") or (cfg.get("detector") or {}).get("name"),
        "target": (rec or {}).get("target") or (cfg.get("data") or {}).get("target"),
        "status": status,
        **{k: final.get(k) for k in METRICS},
        "compute_spent": compute.get("spent"),
        "compute_budget": compute.get("budget", (cell or {}).get("budget")),
        "stopped_by": (lrec or {}).get("stopped_by"),
        "baseline_equivalent_epochs": (lrec or {}).get("baseline_equivalent_epochs"),
        "n_epochs": len(epochs),
        "wall_s": wall,
        "epochs": epochs,
        "_dir": str(cell_dir),
    }


@dataclass
class Loaded:
    rows: list[dict]
    warnings: list[str] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)  # one complete record, for versions/config
    benchmark: list[dict] = field(default_factory=list)  # benchmark.json of each directory


def load_rows(dirs: Iterable[str | Path]) -> Loaded:
    """Every cell of every directory, identical cells counted once."""
    loaded = Loaded([])
    by_id: dict[str, dict] = {}
    for d in dirs:
        d = Path(d)
        bj = _read(d / "benchmark.json") if d.is_dir() else None
        if bj:
            loaded.benchmark.append(bj)
        for cdir in _cell_dirs(d):
            rec = _read(cdir / "run.json")
            cell = _read(cdir / "cell.json")
            if cell is None and rec and len(rec.get("learners") or {}) > 1:
                # a `megatron run` directory with its baseline: one row per learner
                cells = [{"id": f"{cdir.name}:{name}", "learner": name, "learner_name": name}
                         for name in rec["learners"]]
            else:
                cells = [cell]
            for c in cells:
                row = row_from_record(cdir, rec, c)
                if rec and row["status"] == "complete" and not loaded.records:
                    loaded.records.append(rec)
                _merge(by_id, row, loaded.warnings)
    loaded.rows = sorted(by_id.values(), key=lambda r: (r["learner"], _skey(setting_of(r)), str(r["seed"])))
    if not loaded.rows:
        raise ReportError(f"no cell records under {', '.join(map(str, dirs))} "
                          "(expected <dir>/cells/<cell-id>/run.json from `megatron benchmark`)")
    return loaded


def _merge(by_id: dict[str, dict], row: dict, warnings: list[str]) -> None:
    """Keep one row per cell id: a complete copy over an unfinished one; disagreeing copies are reported."""
    prev = by_id.get(row["cell_id"])
    if prev is None:
        by_id[row["cell_id"]] = row
    elif prev["status"] != "complete" and row["status"] == "complete":
        by_id[row["cell_id"]] = row
    elif prev["status"] == "complete" and row["status"] == "complete" and any(prev[k] != row[k] for k in METRICS):
        warnings.append(f"cell {row['cell_id']} appears in {prev['_dir']} and {row['_dir']} with different results; "
                        "kept the first (check that both ran the same grid)")


# ----------------------------------------------------------------------------------------------------- statistics
def setting_of(row: dict) -> tuple:
    n = row["n_sources"] if row["n_sources"] is not None else "all"
    return (n, row["shots"], row["lr"], row["selection"])


def _skey(setting: tuple) -> tuple:
    return tuple((0, v) if isinstance(v, (int, float)) else (1, str(v)) for v in setting)


def setting_label(setting: tuple, n_all: int | None = None) -> str:
    n, k, lr, sel = setting
    ns = f"N=all ({n_all})" if n == "all" and n_all else f"N={n}"
    parts = [ns if n == "all" else f"{ns} ({sel})", f"K={k}"]
    if lr is not None:
        parts.append(f"lr={lr:g}")
    return ", ".join(parts)


def complete(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "complete" and r["mAP50"] is not None]


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
    from megatron import benchmark_plots as _plots  # matplotlib only when a report is written

    plot_paths = _plots.make_all(rows, summary, comparisons, out / "plots", loaded, epoch=epoch)
    text = render_markdown(rows, summary, comparisons, loaded, dirs, [p.relative_to(out) for p in plot_paths])
    atomic_write_text(out / "report.md", text)
    return ReportResult(out, rows, summary, comparisons, plot_paths, loaded.warnings)


def _n_all(loaded: Loaded) -> int | None:
    for b in loaded.benchmark:
        if b.get("all_sources"):
            return len(b["all_sources"])
    return None


def render_markdown(rows: list[dict], summary: dict, comparisons: list[Comparison], loaded: Loaded,
                    dirs: list[Path], plots: list[Path]) -> str:
    n_all = _n_all(loaded)
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
            L.append(f"- {c.learner}, {setting_label(c.setting, n_all)}: no seed in common with the baseline.")
            continue
        iv = c.diff.interval
        L.append(f"- **{c.learner}** vs finetune, {setting_label(c.setting, n_all)}: {_fmt(iv, signed=True)} "
                 f"mAP50 points over {iv.n} paired seed(s) → **{c.diff.verdict}**.")
    L.append("")

    L += ["## Results per setting", ""]
    for setting, per_learner in summary.items():
        L += [f"### {setting_label(setting, n_all)}", "",
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


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def fixed_epoch(rows: list[dict], epoch: int | None) -> int | None:
    """The epoch for "at a fixed epoch" plots: given, else the last epoch every complete cell reached."""
    lens = [r["n_epochs"] for r in complete(rows) if r["n_epochs"]]
    if not lens:
        return None
    return min(epoch, min(lens)) if epoch else min(lens)

