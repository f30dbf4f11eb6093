"""Evaluation of detections against ground truth: COCO metrics (:mod:`.coco`)."""
from megatron.evaluation.coco import COCO_IOU_THRESHOLDS, box_iou, evaluate

__all__ = ["COCO_IOU_THRESHOLDS", "box_iou", "evaluate"]
