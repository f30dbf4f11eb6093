"""A detector's predictions on a task, scored by the core evaluator — what the runner does after every
fine-tuning, and what ``megatron evaluate`` does with a saved model."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import numpy as np
import torch

from megatron.types import Detections, Task
from megatron.data.episodes import iterate_batches
from megatron.data.loader import Loader
from megatron.evaluation.coco import evaluate
from megatron.runtime import distributed as mdist


def predict_task(detector, task: Task, pre_eval, batch_size: int, device: torch.device,
                 autocast: contextlib.AbstractContextManager | None = None,
                 loader: Loader | None = None) -> list[Detections]:
    """Detections for every image of ``task`` (no gradient, in original image coordinates); ``loader``'s
    workers load the batches ahead (default: in this thread)."""

    was_training = detector.training
    detector.eval()
    detections: list[Detections] = []
    with torch.no_grad(), (autocast if autocast is not None else contextlib.nullcontext()):
        for batch in (iterate_batches(task, batch_size, pre_eval, loader=loader) if task.records else ()):
            preds = detector.predict(batch.to(device))
            for det, meta in zip(preds, batch.meta):
                if det.image_id == -1:
                    det.image_id = int(meta["image_id"])
                det.boxes = np.asarray(det.boxes, dtype=np.float32).reshape(-1, 4)
                det.scores = np.asarray(det.scores, dtype=np.float32).reshape(-1)
                det.labels = np.asarray(det.labels, dtype=np.int64).reshape(-1)
                drop_degenerate_boxes(det, meta.get("orig_size"))
            detections.extend(preds)
    detector.train(was_training)
    return detections


def drop_degenerate_boxes(det: Detections, orig_size: tuple[int, int] | None) -> Detections:
    """Clip ``det``'s boxes to the image (``orig_size``: height, width) and drop those left without area
    (``x2 <= x1`` or ``y2 <= y1``) or with a non-finite coordinate or score: whatever a detector returns, no
    degenerate box reaches a metric, a results file or a drawing. In place; returns ``det``."""
    boxes = det.boxes
    if orig_size is not None and len(boxes):
        h, w = (float(v) for v in orig_size)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    keep = (np.isfinite(boxes).all(axis=1) & np.isfinite(det.scores) & (boxes[:, 2] > boxes[:, 0])
            & (boxes[:, 3] > boxes[:, 1]))
    if not keep.all():
        det.boxes, det.scores, det.labels = boxes[keep], det.scores[keep], det.labels[keep]
    return det


def evaluate_detector(detector, task: Task, pre_eval, cfg, device: torch.device, ctx=None, env=None,
                      operating_point: str | dict[str, Any] | None = None,
                      loader: Loader | None = None) -> dict[str, Any]:
    """Predict on every image of ``task`` (not charged to any compute account) and score with
    :func:`megatron.evaluation.evaluate` at ``cfg.evaluation``'s thresholds; ``operating_point``: a rule to
    choose one on ``task`` (the validation split: ``cfg.evaluation.operating_point``) or a chosen point to apply
    (:mod:`megatron.evaluation.operating_point`).

    Distributed: each rank predicts its share of the images; rank 0 gathers the detections, scores them and
    sends the metrics to every rank."""

    env = env if env is not None else mdist.DistEnv()
    mine = task
    if env.enabled:
        mine = dataclasses.replace(task, records=mdist.shard_records(task.records, env))
    detections = predict_task(detector, mine, pre_eval, cfg.training.batch_size, device,
                              ctx.autocast() if ctx is not None else None, loader=loader)
    ev = cfg.evaluation

    def score() -> dict[str, Any]:
        return evaluate(detections, task.records, list(task.categories), score_threshold=ev.score_threshold,
                        iou_threshold=ev.iou_threshold, max_detections=ev.max_detections,
                        operating_point=operating_point, target_sensitivity=ev.target_sensitivity)

    if not env.enabled:
        return score()
    parts = mdist.gather_objects(detections, env)
    # back in the split's image order, as one process produces them (score ties are then broken alike)
    position = {r.image_id: i for i, r in enumerate(task.records)}
    detections = sorted((d for part in parts for d in part), key=lambda d: position.get(d.image_id, -1))
    return mdist.on_main(score, env)
