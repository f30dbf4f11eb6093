"""Evaluation of detections against ground truth: COCO metrics (:mod:`.coco`) and FROC (:mod:`.froc`)."""
from megatron.evaluation.coco import COCO_IOU_THRESHOLDS, box_iou, evaluate
from megatron.evaluation.froc import FROC_FP_RATES, froc, froc_curve, sensitivity_at

__all__ = ["COCO_IOU_THRESHOLDS", "FROC_FP_RATES", "box_iou", "evaluate", "froc", "froc_curve", "sensitivity_at"]
