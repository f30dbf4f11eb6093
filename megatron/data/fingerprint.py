"""The target's fingerprint before a run: how big its lesions are at the detector's input, and how many
patients and images K can be drawn from.

A lesion the letterbox shrinks below the detector's finest stride (YOLOX: 8 input pixels) falls inside one
cell of the finest feature map and is easily missed; ``megatron data check`` and ``config validate --data``
print the box sizes at ``data.input_size`` (and in mm where the records carry their pixel spacing), the share
of boxes below the stride, and the input size that keeps nearly every box above it.

A box's size is ``sqrt(w * h)`` (the COCO convention for small / medium / large) at the letterbox scale
``input_size / max(image width, height)`` (:meth:`megatron.data.preprocess.Preprocessor.letterbox`).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from megatron.data.problems import Problem
from megatron.types import Task

#: the stride assumed when no detector is known (YOLOX, RetinaNet and FCOS's finest level)
DEFAULT_STRIDE = 8
#: the share of boxes a recommended input size may leave below the stride (the smallest 5%: outliers)
TOLERATED_SMALL_SHARE = 0.05
#: input sizes are multiples of this (the coarsest stride of the detectors: 32)
SIZE_MULTIPLE = 32
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    return {f"q{int(q * 100)}": round(float(np.quantile(values, q)), 2) for q in QUANTILES}


def box_sizes(task: Task, input_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(sqrt(area) at input_size px, sqrt(area) / max(image side), sqrt(area) mm or NaN)`` for every box."""
    at_input, relative, mm = [], [], []
    for record in task.records:
        if not len(record.boxes):
            continue
        wh = (record.boxes[:, 2:] - record.boxes[:, :2]).astype(np.float64)
        side = max(record.width, record.height)
        root_area = np.sqrt(wh[:, 0] * wh[:, 1])
        relative.append(root_area / side)
        at_input.append(root_area * input_size / side)
        spacing = record.meta.get("spacing") if isinstance(record.meta, dict) else None
        if spacing is not None and len(spacing) == 2:
            row_mm, col_mm = float(spacing[0]), float(spacing[1])
            mm.append(np.sqrt(wh[:, 0] * col_mm * wh[:, 1] * row_mm))
        else:
            mm.append(np.full(len(wh), np.nan))
    if not at_input:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    return np.concatenate(at_input), np.concatenate(relative), np.concatenate(mm)


def recommended_input_size(relative: np.ndarray, stride: int, task: Task) -> int | None:
    """The smallest multiple of 32 at which all but the smallest 5% of boxes measure at least ``stride``; capped
    at the largest image side (rounded up to 32: upsampling beyond the pixels adds nothing). None without boxes."""
    if relative.size == 0:
        return None
    small = float(np.quantile(relative, TOLERATED_SMALL_SHARE))
    native = max(max(r.width, r.height) for r in task.records)
    cap = SIZE_MULTIPLE * math.ceil(native / SIZE_MULTIPLE)
    need = SIZE_MULTIPLE * math.ceil(stride / max(small, 1e-9) / SIZE_MULTIPLE)
    return int(max(SIZE_MULTIPLE, min(need, cap)))


def fingerprint(task: Task, input_size: int, stride: int = DEFAULT_STRIDE) -> dict[str, Any]:
    """Box sizes at ``input_size`` (px; mm where known), the share of boxes below ``stride`` and the recommended
    input size (see the module docstring)."""
    at_input, relative, mm = box_sizes(task, input_size)
    known_mm = mm[~np.isnan(mm)]
    below = int((at_input < stride).sum())
    return {"input_size": int(input_size), "smallest_stride": int(stride), "boxes": int(at_input.size),
            "box_px_at_input": _quantiles(at_input), "box_mm": _quantiles(known_mm),
            "boxes_with_spacing": int(known_mm.size), "boxes_below_stride": below,
            "share_below_stride": round(below / at_input.size, 4) if at_input.size else 0.0,
            "recommended_input_size": recommended_input_size(relative, stride, task)}


def fingerprint_problems(print_: dict[str, Any], where: str) -> list[Problem]:
    """A warning, with the fix, when boxes shrink below the smallest stride at the configured input size."""
    below = print_["boxes_below_stride"]
    if not below:
        return []
    recommended = print_["recommended_input_size"]
    size, stride = print_["input_size"], print_["smallest_stride"]
    fix = (f"set data.input_size: {recommended} (all but the smallest {TOLERATED_SMALL_SHARE:.0%} of boxes then measure "
           f"at least {stride} px)" if recommended and recommended > size else
           "crop the images around the region of interest, or use a detector with a finer stride (e.g. faster-rcnn: 4)")
    return [Problem("warning", "boxes_below_stride", where, "",
                    f"{below} of {print_['boxes']} boxes ({print_['share_below_stride']:.0%}) measure less than the "
                    f"detector's smallest stride ({stride} px) at data.input_size {size}, so those lesions shrink "
                    "into one cell of the finest feature map and are easily missed", fix)]
