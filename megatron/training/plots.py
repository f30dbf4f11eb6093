"""Plots of a run record (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from megatron.evaluation.froc import FROC_FP_RATES, sensitivity_at


def plot_map50_curve(record: dict[str, Any], path: str | Path) -> Path:
    """mAP50 on the target's held-out split after every meta-epoch, one line per learner.

    Left: against the meta-epoch (top axis: baseline-equivalent epochs, M + F per meta-epoch).
    Right: against the compute spent (image passes), the axis on which learners are compared fairly.
    """
    path = Path(path)
    cfg = record.get("config", {}).get("training", {})
    per_meta_epoch = int(cfg.get("source_epochs", 1)) + int(cfg.get("finetune_epochs", 0))
    fig, (ax_epoch, ax_compute) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for name, lrec in record.get("learners", {}).items():
        epochs = lrec.get("epochs", [])
        if not epochs:
            continue
        x = [e["meta_epoch"] for e in epochs]
        y = [100.0 * e["metrics"]["mAP50"] for e in epochs]
        spent = [e["compute"]["spent"] for e in epochs]
        ax_epoch.plot(x, y, marker="o", label=name)
        ax_compute.plot(spent, y, marker="o", label=name)
    target = record.get("target", "target")
    ax_epoch.set_title(f"mAP50 on held-out {target} vs meta-epoch")
    ax_epoch.set_xlabel("meta-epoch (M source epochs + F fine-tuning epochs each)")
    ax_epoch.set_ylabel("mAP50 (%)")
    ax_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_epoch.grid(alpha=0.3)
    ax_epoch.legend(title="learner")
    top = ax_epoch.secondary_xaxis("top", functions=(lambda m: m * per_meta_epoch, lambda b: b / per_meta_epoch))
    top.set_xlabel(f"baseline-equivalent epochs ({per_meta_epoch} per meta-epoch)")
    ax_compute.set_title(f"mAP50 on held-out {target} vs compute")
    ax_compute.set_xlabel("compute spent (image passes: forward + backward)")
    ax_compute.set_ylabel("mAP50 (%)")
    ax_compute.grid(alpha=0.3)
    ax_compute.legend(title="learner")
    for ax in (ax_epoch, ax_compute):
        ax.set_ylim(bottom=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_train_loss(record: dict[str, Any], path: str | Path) -> Path:
    """Mean outer-step training loss per meta-epoch, one line per learner."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for name, lrec in record.get("learners", {}).items():
        epochs = [e for e in lrec.get("epochs", []) if e.get("train_loss") is not None]
        if epochs:
            ax.plot([e["meta_epoch"] for e in epochs], [e["train_loss"] for e in epochs], marker="o", label=name)
    ax.set_title("source training loss per meta-epoch")
    ax.set_xlabel("meta-epoch")
    ax.set_ylabel("mean outer-step loss (detector total loss, unitless)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title="learner")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_froc(record: dict[str, Any], path: str | Path) -> Path | None:
    """The FROC curve of each learner's final evaluation: lesion sensitivity against false positives per image
    (log2 axis, 1/16 to 16), with the seven LUNA16 operating points (1/8 .. 8) marked and their mean in the
    legend. Returns None, writing nothing, when no learner's final metrics hold a ``froc`` (older records)."""

    curves = {name: (lrec.get("final") or {}).get("froc") for name, lrec in record.get("learners", {}).items()}
    curves = {name: c for name, c in curves.items() if c and c.get("curve")}
    if not curves:
        return None
    path = Path(path)
    lo, hi = FROC_FP_RATES[0] / 2, FROC_FP_RATES[-1] * 2
    fig, ax = plt.subplots(figsize=(7, 4.6), constrained_layout=True)
    for name, froc in curves.items():
        x = [max(float(v), lo) for v in froc["curve"]["fp_per_image"]]
        y = [100.0 * float(v) for v in froc["curve"]["sensitivity"]]
        x, y = x + [hi], y + [y[-1]]  # the staircase continues at its last sensitivity
        line, = ax.step(x, y, where="post", label=f"{name} (FROC {100.0 * froc['mean_sensitivity']:.1f})")
        marks = sensitivity_at(froc["curve"], FROC_FP_RATES)
        ax.plot(FROC_FP_RATES, [100.0 * v for v in marks], "o", color=line.get_color(), ms=4)
    ax.set_xscale("log", base=2)
    ax.set_xlim(lo, hi)
    ax.set_xticks(FROC_FP_RATES, ["1/8", "1/4", "1/2", "1", "2", "4", "8"])
    ax.set_ylim(0, 100)
    first = next(iter(curves.values()))
    target = record.get("target", "target")
    ax.set_title(f"FROC on held-out {target} ({first.get('n_lesions', '?')} lesions, {first.get('n_images', '?')} "
                 f"images, hit: IoU >= {first.get('iou_threshold', 0.5):g})", fontsize=10)
    ax.set_xlabel("false positives per image (log scale)")
    ax.set_ylabel("sensitivity (% of lesions detected)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="learner (mean sensitivity at 1/8..8 FP/image, %)", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
