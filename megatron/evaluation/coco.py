"""Detection metrics: COCO mAP (pycocotools), precision / recall / F1 at one operating point, and FROC.

Every number is a fraction in ``[0, 1]`` (the report layer may show points). Conventions, fixed here so
that every learner and the baseline are scored the same way:

- **Matching detections to images** is by ``Detections.image_id == ImageRecord.image_id``. A record with no
  detections simply has none; detections for an image id that is not among the records are an error.
- **mAP50 / mAP50_95** come from pycocotools' ``COCOeval`` (bbox, area range "all", at most
  ``max_detections`` detections per image, 101-point interpolated precision). ``mAP50_95`` averages the ten
  IoU thresholds 0.50, 0.55, ..., 0.95. Labels are task-local indices ``0..C-1``; COCO category ids are
  ``label + 1``.
- **Classes without ground truth** in the evaluated split have no defined AP: they are *excluded* from the
  means (COCO's own convention; their false positives still lower the precision below). They are listed
  under ``classes_without_gt`` and are absent from ``per_class_AP50``. If no class has ground truth, the
  mAPs are 0.0.
- **No detections at all** gives mAP 0.0 (not NaN), precision 0.0, recall 0.0, F1 0.0.
- **Precision / recall / F1** use the detections scored ``>= score_threshold`` (after keeping the top
  ``max_detections`` per image). Per image and class, detections are taken in descending score order and
  each is matched to the not-yet-matched ground-truth box of the same class with the highest IoU, if that IoU
  is ``>= iou_threshold`` (greedy, one detection per ground-truth box); unmatched detections are false
  positives, unmatched ground-truth boxes false negatives. Counts are summed over all images and classes
  (micro average). ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``, ``F1`` their harmonic mean;
  each is 0.0 when its denominator is 0.
- **FROC** (:mod:`megatron.evaluation.froc`): sensitivity against false positives per image over all the
  (top ``max_detections``) detections, whatever their score; a hit is IoU ``>= iou_threshold`` with a
  ground-truth box of the same class, one hit per box (the same greedy matching as precision / recall).
  ``FROC`` is the mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives per image.
"""
from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import numpy as np

from megatron.errors import DataError
from megatron.evaluation.boxes import box_iou
from megatron.evaluation.froc import froc
from megatron.evaluation.operating_point import apply_operating_point, choose_operating_point, scored_hits
from megatron.types import Detections, ImageRecord

log = logging.getLogger(__name__)

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def _top_k(det: Detections, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes = np.asarray(det.boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(det.scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(det.labels, dtype=np.int64).reshape(-1)
    if not (len(boxes) == len(scores) == len(labels)):
        raise DataError(f"detections for image {det.image_id}: {len(boxes)} boxes, {len(scores)} scores, "
                        f"{len(labels)} labels (must be equal)")
    order = np.argsort(-scores, kind="stable")[:k]
    return boxes[order], scores[order], labels[order]


def _group_detections(detections: list[Detections], records: list[ImageRecord],
                      max_detections: int) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    known = {r.image_id for r in records}
    if len(known) != len(records):
        raise DataError("evaluate: records hold repeated image_id values; each image must have a unique id")
    grouped: dict[int, list[Detections]] = {}
    for det in detections:
        if det.image_id not in known:
            raise DataError(f"evaluate: detections for image_id {det.image_id}, which is not among the evaluated "
                            "records; set Detections.image_id to the record's image_id")
        grouped.setdefault(det.image_id, []).append(det)
    out = {}
    for image_id, dets in grouped.items():
        merged = Detections(
            boxes=np.concatenate([np.asarray(d.boxes, np.float32).reshape(-1, 4) for d in dets]),
            scores=np.concatenate([np.asarray(d.scores, np.float32).reshape(-1) for d in dets]),
            labels=np.concatenate([np.asarray(d.labels, np.int64).reshape(-1) for d in dets]),
            image_id=image_id,
        )
        out[image_id] = _top_k(merged, max_detections)
    return out


def _coco_ap(grouped: dict, records: list[ImageRecord], categories: list[str],
             max_detections: int) -> tuple[np.ndarray, list[int]]:
    """Per-class AP at each of the 10 COCO IoU thresholds, shape ``(10, C)``; NaN where a class has no GT."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    n_cls = len(categories)
    ap = np.full((len(COCO_IOU_THRESHOLDS), n_cls), np.nan)
    gt_counts = np.zeros(n_cls, dtype=np.int64)
    for r in records:
        gt_counts += np.bincount(r.labels, minlength=n_cls)[:n_cls]
    n_det = sum(len(v[0]) for v in grouped.values())
    with_gt = [c for c in range(n_cls) if gt_counts[c] > 0]
    if not with_gt:
        return ap, with_gt
    if n_det == 0:
        ap[:, with_gt] = 0.0
        return ap, with_gt

    images, annotations = [], []
    for r in records:
        images.append({"id": int(r.image_id), "width": int(r.width), "height": int(r.height)})
        for box, lab in zip(r.boxes.astype(np.float64), r.labels):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append({"id": len(annotations) + 1, "image_id": int(r.image_id), "category_id": int(lab) + 1,
                                "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h, "iscrowd": 0})
    results = []
    for image_id, (boxes, scores, labels) in grouped.items():
        for box, score, lab in zip(boxes, scores, labels):
            results.append({"image_id": int(image_id), "category_id": int(lab) + 1, "score": float(score),
                            "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]})
    # pycocotools prints progress to stdout; keep the terminal for the CLI
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": i + 1, "name": n} for i, n in enumerate(categories)]}
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.imgIds = [int(r.image_id) for r in records]
        ev.params.catIds = list(range(1, n_cls + 1))
        ev.params.maxDets = [1, 10, int(max_detections)]
        ev.evaluate()
        ev.accumulate()
    # precision: (T iou thresholds, R=101 recall points, K classes, A area ranges, M maxDets); -1 = undefined
    prec = ev.eval["precision"][:, :, :, 0, -1]
    for c in with_gt:
        p = prec[:, :, c]
        p = np.where(p < 0, 0.0, p)  # recall points never reached count as precision 0 (COCO convention)
        ap[:, c] = p.mean(axis=1)
    return ap, with_gt


def _precision_recall(grouped: dict, records: list[ImageRecord], score_threshold: float,
                      iou_threshold: float) -> tuple[int, int, int]:
    tp = fp = fn = 0
    for r in records:
        boxes, scores, labels = grouped.get(r.image_id, (np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)))
        keep = scores >= score_threshold
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        for c in np.union1d(np.unique(labels), np.unique(r.labels)):
            d = boxes[labels == c]  # already in descending score order
            g = r.boxes[r.labels == c]
            iou = box_iou(d, g)
            matched = np.zeros(len(g), dtype=bool)
            for i in range(len(d)):
                cand = np.where(matched, -1.0, iou[i]) if len(g) else np.zeros(0)
                j = int(np.argmax(cand)) if len(cand) else -1
                if j >= 0 and cand[j] >= iou_threshold:
                    matched[j] = True
                    tp += 1
                else:
                    fp += 1
            fn += int((~matched).sum())
    return tp, fp, fn


def _operating_point(per_image: list, iou_threshold: float, operating_point: str | dict[str, Any],
                     score_threshold: float, target_sensitivity: float | None) -> dict[str, Any]:
    """A threshold chosen on these images by the rule ``operating_point``, or a point chosen elsewhere (its dict)
    applied to them (:mod:`megatron.evaluation.operating_point`)."""
    hits = scored_hits(per_image, iou_threshold)
    if isinstance(operating_point, str):
        return choose_operating_point(hits, operating_point, score_threshold, target_sensitivity).to_dict()
    return apply_operating_point(hits, operating_point)


def _check_labels(grouped: dict, records: list[ImageRecord], categories: list[str]) -> None:
    """A DataError naming the image when a ground-truth or detected label is not a class of ``categories``."""
    n_cls = len(categories)
    for r in records:
        if len(r.labels) and (r.labels.min() < 0 or r.labels.max() >= n_cls):
            raise DataError(f"evaluate: image {r.image_id} ({r.file_name or r.path}) has label(s) outside "
                            f"0..{n_cls - 1} for categories {categories}")
    for image_id, (_, _, labels) in grouped.items():
        if len(labels) and (labels.min() < 0 or labels.max() >= n_cls):
            raise DataError(f"evaluate: detections for image {image_id} have label(s) outside 0..{n_cls - 1}")


def evaluate(detections: list[Detections], records: list[ImageRecord], categories: list[str],
             score_threshold: float = 0.3, iou_threshold: float = 0.5, max_detections: int = 100,
             operating_point: str | dict[str, Any] | None = None,
             target_sensitivity: float | None = None) -> dict[str, Any]:
    """Score ``detections`` against the ground truth in ``records`` (conventions: see the module docstring).

    Returns a dict with ``mAP50``, ``mAP50_95``, ``per_class_AP50`` and ``per_class_AP50_95`` (class name ->
    AP, classes with ground truth only), ``classes_without_gt``, ``precision``, ``recall``, ``F1``, ``tp``, ``fp``, ``fn``,
    ``FROC`` (mean sensitivity at 1/8..8 false positives per image) and ``froc`` (its rates, sensitivities,
    curve points and counts: :func:`megatron.evaluation.froc.froc`), ``n_images``, ``n_gt``, ``n_det``
    (detections after the per-image ``max_detections`` cap) and the thresholds used. All metric values are
    fractions in ``[0, 1]``.

    ``operating_point`` (:mod:`megatron.evaluation.operating_point`): a rule (``max_f1`` | ``sensitivity`` |
    ``fixed``, with ``target_sensitivity``) chooses a threshold on these records; a point chosen elsewhere (the
    dict of that choice) is applied to them. Either adds ``operating_point``: the threshold, where it came from,
    and precision, recall, F1 and the FROC point (``fp_per_image``, ``sensitivity``) at it on these records.
    """
    if not records:
        raise DataError("evaluate: no records to evaluate on; the evaluation split is empty")
    n_cls = len(categories)
    grouped = _group_detections(detections, records, max_detections)
    _check_labels(grouped, records, categories)
    ap, with_gt = _coco_ap(grouped, records, categories, max_detections)
    if with_gt:
        map50 = float(ap[0, with_gt].mean())
        map50_95 = float(ap[:, with_gt].mean())
    else:
        map50 = map50_95 = 0.0
    tp, fp, fn = _precision_recall(grouped, records, score_threshold, iou_threshold)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    empty = (np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))
    per_image = [(*grouped.get(r.image_id, empty), r.boxes, r.labels) for r in records]
    froc_result = froc(per_image, iou_threshold)
    extra = {} if operating_point is None else {"operating_point": _operating_point(
        per_image, iou_threshold, operating_point, score_threshold, target_sensitivity)}
    return {
        "mAP50": map50,
        "mAP50_95": map50_95,
        "per_class_AP50": {categories[c]: float(ap[0, c]) for c in with_gt},
        "per_class_AP50_95": {categories[c]: float(ap[:, c].mean()) for c in with_gt},
        "classes_without_gt": [categories[c] for c in range(n_cls) if c not in with_gt],
        "precision": float(precision),
        "recall": float(recall),
        "F1": float(f1),
        "FROC": froc_result["mean_sensitivity"],
        "froc": froc_result,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "n_images": len(records),
        "n_gt": int(sum(len(r.labels) for r in records)),
        "n_det": int(sum(len(v[0]) for v in grouped.values())),
        "score_threshold": float(score_threshold),
        "iou_threshold": float(iou_threshold),
        "max_detections": int(max_detections),
        **extra,
    }
