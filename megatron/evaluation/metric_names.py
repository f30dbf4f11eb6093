"""The metrics every table shows (run summary, `megatron run`'s printout, benchmark reports and plots), in
order, with their display names: one list, so a table never labels a metric differently from another."""
from __future__ import annotations

REPORTED_METRICS: tuple[tuple[str, str], ...] = (
    ("mAP50", "mAP50"),
    ("mAP50_95", "mAP50:95"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("F1", "F1"),
    # mean sensitivity at 1/8..8 false positives per image (megatron.evaluation.froc)
    ("FROC", "FROC (mean sens.)"),
)
METRIC_KEYS: tuple[str, ...] = tuple(key for key, _ in REPORTED_METRICS)
METRIC_LABELS: dict[str, str] = dict(REPORTED_METRICS)
