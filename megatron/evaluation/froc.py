"""FROC: lesion sensitivity against false positives per image, the metric medical detection reports.

LUNA16 (Setio et al., 2017) and the challenges and frameworks after it (nnDetection, MONAI) summarise a
lesion detector by its FROC curve: every detection of every image, pooled and taken in descending score
order; after each one, the **sensitivity** (lesions hit / all lesions) against the **false positives per
image** (false positives / all images, lesion-free images included). The summary is the mean sensitivity at
1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives per image (:data:`FROC_FP_RATES`).

Conventions (fixed here; the evaluator's docstring points at them):

- **Hits.** Per image and class, detections in descending score order are matched greedily to the
  not-yet-hit lesion (ground-truth box) of the same class with the highest IoU, if that IoU is
  ``>= iou_threshold``: one hit per lesion. A detection that matches no lesion — including a second
  detection of a lesion already hit — is a false positive (the COCO / nnDetection rule, and the same matching
  as the evaluator's precision and recall; LUNA16 instead ignores duplicate hits on a lesion).
- **Which detections.** All of them (the top ``max_detections`` per image, as for mAP), whatever their
  score: the curve sweeps the score threshold.
- **Ties.** Detections with equal scores enter together: the curve has one point per distinct score.
- **Sensitivity at a rate** ``f``: the highest sensitivity the detector reaches with at most ``f`` false
  positives per image (the curve read as a staircase). Where a false and a true positive share a score this
  is the lower end of LUNA16's linear interpolation; otherwise the two agree. Beyond the detector's last
  point it is its final sensitivity.
- **No lesions** in the evaluated images: sensitivity is undefined; every value is 0.0 (as mAP is 0.0 when
  no class has ground truth) and ``n_lesions`` is 0.

``curve`` keeps the staircase's corners only: the origin (score ``None``: no detection kept), each point where the sensitivity
rises, and the last point (every detection counted), so it stays small (at most ``n_lesions + 2`` points)
and :func:`sensitivity_at` on it gives the same values as on the full curve.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from megatron.evaluation.boxes import box_iou

FROC_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def match_detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, gt_boxes: np.ndarray,
                     gt_labels: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Per detection of one image, True when it is a hit (module docstring: greedy, one hit per lesion)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels = np.asarray(labels, np.int64).reshape(-1)
    gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    gt_labels = np.asarray(gt_labels, np.int64).reshape(-1)
    hit = np.zeros(len(boxes), dtype=bool)
    for c in np.unique(labels):
        det_idx = np.where(labels == c)[0]
        det_idx = det_idx[np.argsort(-scores[det_idx], kind="stable")]
        g = gt_boxes[gt_labels == c]
        if not len(g):
            continue
        iou = box_iou(boxes[det_idx], g)
        taken = np.zeros(len(g), dtype=bool)
        for row, i in enumerate(det_idx):
            cand = np.where(taken, -1.0, iou[row])
            j = int(np.argmax(cand))
            if cand[j] >= iou_threshold:
                taken[j] = True
                hit[i] = True
    return hit


def froc_curve(scores: np.ndarray, hits: np.ndarray, n_lesions: int, n_images: int) -> dict[str, list]:
    """The staircase corners (module docstring) from pooled detection ``scores`` and their ``hits``."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    hits = np.asarray(hits, bool).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    scores, hits = scores[order], hits[order]
    tp = np.cumsum(hits)
    fp = np.cumsum(~hits)
    # one point per distinct score: the last detection of each run of equal scores
    last = np.r_[scores[1:] != scores[:-1], True] if len(scores) else np.zeros(0, bool)
    tp, fp, thr = tp[last], fp[last], scores[last]
    sens = tp / n_lesions if n_lesions else np.zeros(len(tp))
    fpi = fp / max(n_images, 1)
    # keep the first point of each sensitivity level: the staircase's value at any rate is unchanged
    xs, ys, ts = [0.0], [0.0], [None]
    for f, s, t in zip(fpi, sens, thr):
        if s > ys[-1]:
            xs.append(float(f))
            ys.append(float(s))
            ts.append(float(t))
    if len(fpi) and (xs[-1] != float(fpi[-1]) or ys[-1] != float(sens[-1])):
        xs.append(float(fpi[-1]))
        ys.append(float(sens[-1]))
        ts.append(float(thr[-1]))
    return {"fp_per_image": xs, "sensitivity": ys, "score": ts}


def sensitivity_at(curve: dict[str, Sequence[float]], rates: Sequence[float] = FROC_FP_RATES) -> list[float]:
    """The highest sensitivity on ``curve`` with at most ``rate`` false positives per image, per rate."""
    x = np.asarray(curve["fp_per_image"], np.float64)
    y = np.asarray(curve["sensitivity"], np.float64)
    out = []
    for rate in rates:
        ok = x <= rate + 1e-12
        out.append(float(y[ok].max()) if ok.any() else 0.0)
    return out


def froc(per_image: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
         iou_threshold: float = 0.5, rates: Sequence[float] = FROC_FP_RATES) -> dict[str, Any]:
    """FROC of a detector over images given as ``(boxes, scores, labels, gt_boxes, gt_labels)`` per image.

    Returns ``fp_per_image`` (the rates), ``sensitivity`` (one per rate), ``mean_sensitivity`` (their mean,
    the FROC score), ``curve`` (the staircase corners: ``fp_per_image``, ``sensitivity``, ``score``),
    ``n_images``, ``n_lesions``, ``n_detections``, ``iou_threshold`` and ``matching`` (one line).
    """
    all_scores, all_hits = [], []
    n_lesions = 0
    for boxes, scores, labels, gt_boxes, gt_labels in per_image:
        gt_labels = np.asarray(gt_labels).reshape(-1)
        n_lesions += len(gt_labels)
        all_scores.append(np.asarray(scores, np.float64).reshape(-1))
        all_hits.append(match_detections(boxes, scores, labels, gt_boxes, gt_labels, iou_threshold))
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    hits = np.concatenate(all_hits) if all_hits else np.zeros(0, bool)
    curve = froc_curve(scores, hits, n_lesions, len(per_image))
    sens = sensitivity_at(curve, rates) if n_lesions else [0.0] * len(rates)
    return {
        "fp_per_image": [float(r) for r in rates],
        "sensitivity": sens,
        "mean_sensitivity": float(np.mean(sens)) if sens else 0.0,
        "curve": curve,
        "n_images": len(per_image),
        "n_lesions": int(n_lesions),
        "n_detections": int(len(scores)),
        "iou_threshold": float(iou_threshold),
        "matching": f"hit: IoU >= {iou_threshold:g} with a lesion of the same class, one hit per lesion (greedy by "
                    "score); every other detection is a false positive",
    }
