"""The benchmark's plots (matplotlib, Agg): made from results rows only, each readable on its own.

Which plots appear depends on what the grid varied:

- always: ``paired_differences.png`` (learner − finetune in mAP50 points with 95% CI, per setting);
- per setting with a baseline: ``curves_<setting>.png`` (mAP50 against meta-epoch and against compute, mean over
  seeds with a 95% CI band, and the compute equivalence stated on the plot) — the method's experiment 4;
- several learning rates: ``lr_curves.png`` and ``lr_final.png`` (experiment 1);
- several numbers of source tasks: ``ntasks_boxplots.png`` and ``ntasks_bar.png`` (experiment 2);
- several source selections: ``selection.png`` (experiment 5).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullFormatter  # noqa: E402

from megatron.benchmark import stats  # noqa: E402
from megatron.benchmark.rows import (BASELINE, METRIC_LABELS, POINTS, complete, fixed_epoch, n_all,  # noqa: E402
                                    setting_label, setting_of, slug, _skey)

Y_POINTS = "mAP50 (points, ×100)"


def _colors(learners: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    order = [BASELINE] + [x for x in learners if x != BASELINE]
    return {name: ("0.4" if name == BASELINE else cmap(i % 10)) for i, name in enumerate(order)}


def _ci(values: list[float]) -> tuple[float, float, float]:
    iv = stats.mean_ci(values)
    if not iv.available:
        return iv.mean, iv.mean, iv.mean
    return iv.mean, iv.low, iv.high


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _epoch_series(rows: list[dict], key: str = "mAP50") -> tuple[np.ndarray, list, list, list, np.ndarray]:
    """Per epoch index: mean, CI low/high over the seeds that reached it, and the mean cumulative compute."""
    n = max(r["n_epochs"] for r in rows)
    xs, mean, low, high, comp = [], [], [], [], []
    for i in range(n):
        vals = [r["epochs"][i][key] for r in rows if r["n_epochs"] > i and r["epochs"][i][key] is not None]
        if not vals:
            continue
        m, lo, hi = _ci([v * POINTS for v in vals])
        xs.append(rows[0]["epochs"][i]["meta_epoch"] if rows[0]["n_epochs"] > i else i + 1)
        mean.append(m), low.append(lo), high.append(hi)
        comp.append(np.mean([r["epochs"][i]["compute_spent"] for r in rows if r["n_epochs"] > i]))
    return np.array(xs), mean, low, high, np.array(comp)


def _equivalence_text(rows_by_learner: dict[str, list[dict]]) -> str:
    parts = []
    for learner, rs in rows_by_learner.items():
        eps = np.mean([r["n_epochs"] for r in rs])
        spent = np.mean([r["compute_spent"] or 0 for r in rs])
        bee = [r["baseline_equivalent_epochs"] for r in rs if r["baseline_equivalent_epochs"] is not None]
        if bee and eps:
            per = np.mean(bee) / eps
            parts.append(f"{learner}: {eps:.0f} epochs ≈ {np.mean(bee):.0f} baseline epochs "
                         f"({per:.1f} per epoch), {spent:,.0f} image passes")
        else:
            parts.append(f"{learner}: {eps:.0f} epochs, {spent:,.0f} image passes")
    return "Equal compute: " + "\n".join(parts)


def plot_curves(rows: list[dict], setting: tuple, path: Path, n_all: int | None, src: dict | None) -> Path:
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by[r["learner"]].append(r)
    colors = _colors(list(by))
    fig, (ax_e, ax_c) = plt.subplots(1, 2, figsize=(12, 5.2))
    for learner in sorted(by, key=lambda x: (x != BASELINE, x)):
        x, m, lo, hi, comp = _epoch_series(by[learner])
        if not len(x):
            continue
        c = colors[learner]
        n = len(by[learner])
        label = f"{learner} ({n} seed{'s' if n != 1 else ''})"
        ax_e.plot(x, m, marker="o", color=c, label=label)
        ax_e.fill_between(x, lo, hi, color=c, alpha=0.15)
        ax_c.plot(comp / 1e3, m, marker="o", color=c, label=label)
        ax_c.fill_between(comp / 1e3, lo, hi, color=c, alpha=0.15)
    per = ""
    if src:
        t = src.get("training") or {}
        per = (f"1 meta-epoch = {t.get('source_epochs', '?')} source epochs + {t.get('finetune_epochs', '?')} "
               "fine-tuning epochs")
    ax_e.set(xlabel="epoch (evaluation round; meta-epoch for meta-learners)", ylabel=Y_POINTS,
             title="mAP50 on the held-out target vs epoch")
    ax_c.set(xlabel="compute spent (thousand image passes, forward + backward)", ylabel=Y_POINTS,
             title="mAP50 vs compute (the fair axis)")
    for ax in (ax_e, ax_c):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"Few-shot target: {setting_label(setting, n_all)} — mean over seeds, band = 95% CI", fontsize=12)
    text = _equivalence_text(by) + (f"\n{per}" if per else "")
    ax_e.xaxis.set_major_locator(MaxNLocator(integer=True))
    n_lines = text.count("\n") + 1
    fig.text(0.5, 0.01, text, ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, min(0.35, 0.03 + 0.035 * n_lines), 1, 0.95))
    return _save(fig, path)


#: the colour of each verdict of :func:`megatron.benchmark.stats.equivalence_verdict` in the paired plot
VERDICT_COLOURS = {stats.BETTER: "tab:green", stats.WORSE: "tab:red", stats.EQUIVALENT: "tab:blue"}


def plot_paired(comparisons: list, path: Path, n_all: int | None, withheld: bool = False) -> Path | None:
    cs = [c for c in comparisons if c.metric == "mAP50" and c.diff is not None]
    if not cs:
        return None
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.45 * len(cs)))
    ys = np.arange(len(cs))[::-1]
    for y, c in zip(ys, cs):
        iv = c.diff.interval.scaled(POINTS)
        color = "tab:gray" if withheld else VERDICT_COLOURS.get(c.verdict, "tab:gray")
        if iv.available:
            ax.errorbar(iv.mean, y, xerr=[[iv.mean - iv.low], [iv.high - iv.mean]], fmt="o", color=color, capsize=4)
        else:
            ax.plot(iv.mean, y, "o", mfc="white", color=color)
    ax.axvline(0, color="black", lw=1)
    margin = cs[0].margin * POINTS
    for x in (-margin, margin):  # the equivalence margin
        ax.axvline(x, color="tab:blue", lw=0.8, ls="--")
    ax.set_yticks(ys, [f"{c.learner} | {setting_label(c.setting, n_all)}" for c in cs], fontsize=8)
    ax.set(xlabel="learner − finetune, mAP50 points (paired over seeds; bar = 95% CI)",
           title="Paired difference against the fine-tuning baseline\n" + (
               "(verdicts withheld: the positive control failed; see the power check)" if withheld else
               f"green: better, red: worse, blue: equivalent within ±{margin:g} (dashed lines),\n"
               "grey: inconclusive (Holm-corrected verdicts)"))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_lr(rows: list[dict], out: Path, fixed: str = "") -> list[Path]:
    lrs = sorted({r["lr"] for r in rows if r["lr"] is not None})
    if len(lrs) < 2:
        return []
    learners = sorted({r["learner"] for r in rows}, key=lambda x: (x != BASELINE, x))
    scaled = any(r.get("lr_scale") for r in rows)
    name = "lr ×" if scaled else "lr ="
    fig, axes = plt.subplots(1, len(learners), figsize=(5.5 * len(learners), 4.5), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, learner in zip(axes[0], learners):
        for j, lr in enumerate(lrs):
            rs = [r for r in rows if r["learner"] == learner and r["lr"] == lr]
            if not rs:
                continue
            x, m, lo, hi, _ = _epoch_series(rs)
            c = cmap(j / max(1, len(lrs) - 1))
            ax.plot(x, m, marker="o", color=c, label=f"{name} {lr:g}")
            ax.fill_between(x, lo, hi, color=c, alpha=0.12)
        ax.set(title=f"{learner}", xlabel="epoch (meta-epoch for meta-learners)", ylabel=Y_POINTS)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Learning-rate study: mAP50 vs epoch, one line per learning rate (mean over seeds, band = 95% CI)"
                 + _title_suffix(rows, ("n_sources", "shots")))
    fig.tight_layout()
    p1 = _save(fig, out / f"lr_curves{_suffix(fixed)}.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = _colors(learners)
    for learner in learners:
        pts = []
        for lr in lrs:
            vals = [r["mAP50"] * POINTS for r in rows if r["learner"] == learner and r["lr"] == lr]
            if vals:
                pts.append((lr, *_ci(vals)))
        if pts:
            a = np.array(pts)
            ax.errorbar(a[:, 0], a[:, 1], yerr=[a[:, 1] - a[:, 2], a[:, 3] - a[:, 1]], marker="o", capsize=4,
                        color=colors[learner], label=learner)
    ax.set_xscale("log")
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])  # the swept values themselves, not powers of ten
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel=("multiplier of the base config's learning rates" if scaled else "learning rate") + " (log scale)",
           ylabel=Y_POINTS + " (measured model)",
           title="mAP50 vs learning rate (mean, 95% CI over seeds)" + _title_suffix(rows, ("n_sources", "shots")))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return [p1, _save(fig, out / f"lr_final{_suffix(fixed)}.png")]


def plot_ntasks(rows: list[dict], out: Path, epoch: int | None, fixed: str = "") -> list[Path]:
    ns = sorted({r["n_tasks"] for r in rows if r["n_tasks"] is not None})
    if len(ns) < 2:
        return []
    learners = sorted({r["learner"] for r in rows}, key=lambda x: (x != BASELINE, x))
    colors = _colors(learners)
    width = 0.8 / len(learners)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, metric in zip(axes.flat, ("mAP50", "recall", "precision", "F1")):
        for j, learner in enumerate(learners):
            data, pos = [], []
            for i, n in enumerate(ns):
                vals = [r[metric] * POINTS for r in rows if r["learner"] == learner and r["n_tasks"] == n
                        and r[metric] is not None]
                if vals:
                    data.append(vals)
                    pos.append(i + (j - (len(learners) - 1) / 2) * width)
            if data:
                bp = ax.boxplot(data, positions=pos, widths=width * 0.85, patch_artist=True, manage_ticks=False,
                                medianprops={"color": "black", "linewidth": 1.5})
                for box in bp["boxes"]:
                    box.set(facecolor=colors[learner], alpha=0.45)
                ax.plot([], [], "s", color=colors[learner], alpha=0.6, label=learner)
        ax.set_xticks(range(len(ns)), [str(n) for n in ns])
        ax.set(xlabel="number of source tasks N", ylabel=f"{METRIC_LABELS[metric]} (points, ×100)",
               title=METRIC_LABELS[metric])
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Metrics of the measured model on the held-out target vs number of source tasks (box: spread over seeds)"
                 + _title_suffix(rows, ("shots", "lr")))
    fig.tight_layout()
    p1 = _save(fig, out / f"ntasks_boxplots{_suffix(fixed)}.png")

    e = fixed_epoch(rows, epoch)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    _grouped_bars(ax, learners, ns, colors, width, lambda learner, n: [
        r["epochs"][e - 1]["mAP50"] * POINTS for r in rows if r["learner"] == learner and
        r["n_tasks"] == n and r["n_epochs"] >= e and r["epochs"][e - 1]["mAP50"] is not None])
    ax.set_xticks(range(len(ns)), [str(n) for n in ns])
    ax.set(xlabel="number of source tasks N", ylabel=Y_POINTS,
           title=f"mAP50 at epoch {e} vs number of source tasks{_title_suffix(rows, ('shots', 'lr'))}\n"
                 "(mean, error bar = 95% CI over seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return [p1, _save(fig, out / f"ntasks_bar{_suffix(fixed)}.png")]


def _grouped_bars(ax, learners: list[str], groups: list, colors: dict, width: float, values) -> None:
    """One bar per (group, learner): mean of ``values(learner, group)`` with its 95% CI as the error bar."""
    for j, learner in enumerate(learners):
        xs, ms, errs = [], [], [[], []]
        for i, g in enumerate(groups):
            vals = values(learner, g)
            if vals:
                m, lo, hi = _ci(vals)
                xs.append(i + (j - (len(learners) - 1) / 2) * width)
                ms.append(m), errs[0].append(m - lo), errs[1].append(hi - m)
        if xs:
            ax.bar(xs, ms, width=width * 0.9, yerr=errs, capsize=4, color=colors[learner], alpha=0.8, label=learner)


def plot_selection(rows: list[dict], out: Path, fixed: str = "") -> list[Path]:
    sels = [s for s in ("closest", "random", "all") if any(r["selection"] == s for r in rows)]
    if "closest" not in sels or len(sels) < 2:  # random vs all alone is the N study's bar chart
        return []
    learners = sorted({r["learner"] for r in rows}, key=lambda x: (x != BASELINE, x))
    groups = sorted({(r["selection"], r["n_tasks"]) for r in rows}, key=lambda t: (sels.index(t[0]), t[1] or 0))
    colors = _colors(learners)
    width = 0.8 / len(learners)
    fig, ax = plt.subplots(figsize=(max(7, 1.4 * len(groups)), 4.8))
    _grouped_bars(ax, learners, groups, colors, width, lambda learner, g: [
        r["mAP50"] * POINTS for r in rows if r["learner"] == learner and (r["selection"], r["n_tasks"]) == g])
    ax.set_xticks(range(len(groups)), [f"{s}\nN={n}" for s, n in groups])
    ax.set(xlabel="source-task choice", ylabel=Y_POINTS + " (measured model)",
           title="Source-task choice: closest by similarity vs random vs all" + _title_suffix(rows, ("shots", "lr"))
                 + "\n(mean, error bar = 95% CI over seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return [_save(fig, out / f"selection{_suffix(fixed)}.png")]


def make_all(rows: list[dict], summary: dict, comparisons: list, out: Path, loaded, epoch: int | None = None,
             withheld: bool = False) -> list[Path]:
    """Every plot the grid's dimensions call for. The power check's control cells appear in the curves of their
    setting only (``finetune_scratch`` against ``finetune`` is worth seeing), not in the study plots."""
    out = Path(out)
    done = [r for r in complete(rows) if r["n_epochs"]]
    paths: list[Path] = []
    if not done:
        return paths
    n_sources_all = n_all(loaded)
    src = (loaded.records[0].get("config") if loaded.records else None)
    p = plot_paired(comparisons, out / "paired_differences.png", n_sources_all, withheld)
    if p:
        paths.append(p)
    by_setting: dict[tuple, list[dict]] = defaultdict(list)
    for r in done:
        by_setting[setting_of(r)].append(r)
    for setting in sorted(by_setting, key=_skey):
        rs = by_setting[setting]
        if len({r["learner"] for r in rs}) >= 1:
            name = "curves_" + slug(setting_label(setting, n_sources_all)) + ".png"
            paths.append(plot_curves(rs, setting, out / name, n_sources_all, src))
    # each study plot holds the other grid dimensions fixed: one figure per combination of them
    done = [r for r in done if not r.get("control")]
    if not done:
        return paths
    for fixed, rs in _partition(done, ("n_sources", "shots", "selection")):
        paths += plot_lr(rs, out, fixed)
    for fixed, rs in _partition(done, ("shots", "lr")):
        paths += plot_ntasks(rs, out, epoch, fixed)
    for fixed, rs in _partition(done, ("shots", "lr")):
        paths += plot_selection(rs, out, fixed)
    return paths


def _partition(rows: list[dict], keys: tuple[str, ...]) -> list[tuple[str, list[dict]]]:
    """Rows grouped by ``keys``; the suffix names the group only when there is more than one."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in keys)].append(r)
    if len(groups) == 1:
        return [("", rows)]
    out = []
    short = {"n_sources": "n", "shots": "k", "selection": "", "lr": "lr"}
    for key in sorted(groups, key=lambda t: tuple(str(x) for x in t)):
        label = "_".join(f"{short[k]}{'all' if v is None and k == 'n_sources' else v}" for k, v in zip(keys, key)
                         if not (k == "lr" and v is None))
        out.append((label, groups[key]))
    return out


def _suffix(fixed: str) -> str:
    return f"_{slug(fixed)}" if fixed else ""


def _title_suffix(rows: list[dict], keys: tuple[str, ...]) -> str:
    parts = []
    for k in keys:
        vals = {r[k] for r in rows}
        if len(vals) == 1:
            v = next(iter(vals))
            if k == "shots":
                parts.append(f"K={v}")
            elif k == "lr" and v is not None:
                parts.append(f"lr ×{v:g}" if any(r.get("lr_scale") for r in rows) else f"lr={v:g}")
            elif k == "n_sources":
                parts.append(f"N={'all' if v is None else v}")
    return f" [{', '.join(parts)}]" if parts else ""
