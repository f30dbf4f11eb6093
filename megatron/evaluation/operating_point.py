"""The operating point: the score threshold a deployed detector keeps boxes at, chosen on the validation split.

A fixed threshold (``evaluation.score_threshold``, 0.3) suits a detector whose scores are calibrated; a
few-shot detector often scores its true boxes far lower (on a real nuclei target: 61.6 mAP50, but precision 100
and recall 4.4 at 0.3). So the run chooses the threshold on the validation split — images never trained on,
and never the held-out test split — by ``evaluation.operating_point``:

- ``max_f1``: the threshold with the highest F1 on validation (on ties the highest threshold: fewer boxes);
- ``sensitivity``: the highest threshold whose validation recall reaches ``evaluation.target_sensitivity``
  (not reached: the lowest score, i.e. every box, flagged ``reached: false``);
- ``fixed``: ``evaluation.score_threshold`` itself.

The chosen threshold is then applied to the held-out split, where precision, recall, F1 and the matching
point of the FROC curve (false positives per image, sensitivity) are reported beside the fixed-threshold
figures, and it is stored in the model file as ``megatron predict``'s default.

Counting: the same greedy matching as precision / recall and FROC (:func:`megatron.evaluation.froc.match_detections`).
Greedy matching in descending score order decides each detection from the higher-scored ones only, so the
detections kept at a threshold are matched exactly as when all are matched: one matching of all detections
gives the counts at every threshold. A threshold ``t`` keeps the detections scoring ``>= t``; candidate
thresholds are the distinct detection scores.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np

from megatron.evaluation.froc import match_detections

OPERATING_POINT_RULES = ("max_f1", "sensitivity", "fixed")


@dataclass(frozen=True)
class ScoredHits:
    """Every detection of a split, pooled: its score and whether it hits a lesion; with the lesion and image counts."""

    scores: np.ndarray
    hits: np.ndarray
    n_gt: int
    n_images: int


def scored_hits(per_image: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                iou_threshold: float) -> ScoredHits:
    """From ``(boxes, scores, labels, gt_boxes, gt_labels)`` per image (the evaluator's top detections)."""
    scores, hits, n_gt, n_images = [], [], 0, 0
    for boxes, s, labels, gt_boxes, gt_labels in per_image:
        n_images += 1
        n_gt += len(np.asarray(gt_labels).reshape(-1))
        scores.append(np.asarray(s, np.float64).reshape(-1))
        hits.append(match_detections(boxes, s, labels, gt_boxes, gt_labels, iou_threshold))
    return ScoredHits(np.concatenate(scores) if scores else np.zeros(0),
                      np.concatenate(hits) if hits else np.zeros(0, bool), n_gt, n_images)


def counts_at(sh: ScoredHits, threshold: float) -> dict[str, Any]:
    """Precision, recall, F1, true and false positives, false negatives and false positives per image of the
    detections scoring ``>= threshold`` (the FROC curve's point at that threshold: ``fp_per_image``,
    ``sensitivity`` = recall). Fractions in 0..1; 0.0 where a denominator is 0."""
    keep = sh.scores >= threshold
    tp = int(sh.hits[keep].sum())
    fp = int(keep.sum()) - tp
    return _counts(tp, fp, sh.n_gt, sh.n_images) | {"threshold": float(threshold)}


def _counts(tp: int, fp: int, n_gt: int, n_images: int) -> dict[str, Any]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / n_gt if n_gt else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": float(precision), "recall": float(recall), "F1": float(f1), "tp": tp, "fp": fp,
            "fn": int(n_gt - tp), "fp_per_image": float(fp / max(n_images, 1)), "sensitivity": float(recall)}


def _curve(sh: ScoredHits) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate thresholds (distinct scores, descending) with the true and false positives kept at each."""
    order = np.argsort(-sh.scores, kind="stable")
    scores, hits = sh.scores[order], sh.hits[order]
    tp, fp = np.cumsum(hits), np.cumsum(~hits)
    last = np.r_[scores[1:] != scores[:-1], True] if len(scores) else np.zeros(0, bool)
    return scores[last], tp[last], fp[last]


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold and where it came from, with the counts on the split it was chosen on."""

    threshold: float
    rule: str  # one of OPERATING_POINT_RULES
    chosen_on: str  # "validation" | "fixed default"
    target_sensitivity: float | None = None
    reached: bool = True  # the sensitivity rule reached its target
    counts: dict[str, Any] | None = None  # counts_at on the split it was chosen on

    def to_dict(self) -> dict[str, Any]:
        """Flat: where the threshold came from, and the counts at it on the split it was chosen on."""
        head = {k: v for k, v in asdict(self).items() if k != "counts"}
        return {**head, **(self.counts or {}), "threshold": self.threshold}


#: the keys of an operating point that say where its threshold came from (the rest are one split's counts)
PROVENANCE_KEYS = ("threshold", "rule", "chosen_on", "target_sensitivity", "reached")


def apply_operating_point(sh: ScoredHits, point: dict[str, Any]) -> dict[str, Any]:
    """``point`` (chosen elsewhere, e.g. on validation) applied to the detections ``sh`` of another split: its
    provenance with this split's counts at its threshold."""
    return {**{k: point.get(k) for k in PROVENANCE_KEYS}, **counts_at(sh, float(point["threshold"]))}


def fixed_point(threshold: float, rule: str, why: str = "fixed default") -> dict[str, Any]:
    """An operating point nobody chose: the fixed threshold (no validation split, or ``rule: fixed``)."""
    return {"threshold": float(threshold), "rule": rule, "chosen_on": why, "target_sensitivity": None,
            "reached": True}


def choose_operating_point(sh: ScoredHits, rule: str, fixed_threshold: float,
                           target_sensitivity: float | None = None) -> OperatingPoint:
    """The threshold ``rule`` picks on the validation detections ``sh`` (module docstring). Without any
    detection or lesion on validation there is nothing to choose on: the fixed threshold, said so."""
    if rule not in OPERATING_POINT_RULES:
        raise ValueError(f"operating point rule {rule!r}: expected one of {', '.join(OPERATING_POINT_RULES)}")
    thresholds, tp, fp = _curve(sh)
    if rule == "fixed" or not len(thresholds) or not sh.n_gt:
        return OperatingPoint(float(fixed_threshold), rule, "fixed default", target_sensitivity,
                              counts=counts_at(sh, fixed_threshold))
    if rule == "max_f1":
        precision = tp / (tp + fp)
        recall = tp / sh.n_gt
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
        i = int(np.argmax(f1))  # the first maximum in descending thresholds: the highest threshold on ties
        return OperatingPoint(float(thresholds[i]), rule, "validation", None, True, counts_at(sh, float(thresholds[i])))
    if target_sensitivity is None:
        raise ValueError("the sensitivity rule needs a target sensitivity")
    reaching = np.nonzero(tp / sh.n_gt >= target_sensitivity - 1e-12)[0]
    i = int(reaching[0]) if len(reaching) else len(thresholds) - 1
    return OperatingPoint(float(thresholds[i]), rule, "validation", float(target_sensitivity), bool(len(reaching)),
                          counts_at(sh, float(thresholds[i])))


def model_operating_point(validation: dict[str, Any] | None, heldout: dict[str, Any]) -> dict[str, Any] | None:
    """What a model file keeps: the threshold and where it came from, with P/R/F1 and the FROC point at it on
    the validation split (where it was chosen) and on the held-out split; from the evaluations' metrics."""
    point = heldout.get("operating_point")
    if point is None:
        return None
    counts = ("precision", "recall", "F1", "fp_per_image", "sensitivity")
    entry = {k: point.get(k) for k in PROVENANCE_KEYS}
    entry["heldout"] = {k: point.get(k) for k in counts}
    chosen = (validation or {}).get("operating_point")
    entry["validation"] = {k: chosen.get(k) for k in counts} if chosen else None
    return entry


def describe(point: dict[str, Any] | None, fixed_threshold: float) -> str:
    """One line: which threshold and where it came from (what ``megatron predict`` and the summary print)."""
    if not point:
        return f"score >= {fixed_threshold:g}: the fixed default (`evaluation.score_threshold`; no validation split chose one)"
    if point.get("chosen_on") != "validation":
        return (f"score >= {point['threshold']:g}: the fixed default (`evaluation.score_threshold`; "
                + ("`evaluation.operating_point: fixed`)" if point.get("rule") == "fixed" else
                   "the validation split had no detection or no lesion to choose on)"))
    if point.get("rule") == "sensitivity":
        how = (f"the highest threshold reaching sensitivity {point['target_sensitivity']:g} on the validation split"
               if point.get("reached") else f"sensitivity {point['target_sensitivity']:g} was not reached on the "
               "validation split: every detection kept")
    else:
        how = "the threshold with the highest F1 on the validation split"
    return f"score >= {point['threshold']:.4g}: {how} (`evaluation.operating_point: {point.get('rule')}`)"

