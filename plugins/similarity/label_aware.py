"""``label_aware``: optimal transport between the *annotations* of two datasets (what a detector must find).

The two measures of the method look only at pixels: ``wasserstein`` at global intensity, ``embedding`` at
image appearance. Neither sees the boxes, yet how well a detector transfers depends first on the objects:
how many there are per image, how large they are relative to the image, their shape, and how much they
stand out from their surroundings. Two X-ray sets with equal histograms can hold whole-lung opacities in
one and 5-pixel calcifications in the other; this metric tells them apart. (It is OTDD-flavoured — a
dataset distance that uses the labels — but compares box geometry rather than class names, which differ
between modalities and cannot be matched across datasets.)

Each sampled image becomes a vector (all in *octaves*, i.e. log2, so that a unit means "a factor of 2"):

- ``count``: ``log2(1 + number of boxes)``;
- ``size``: mean and standard deviation over the image's boxes of ``log2(sqrt(box area / image area))``;
- ``aspect``: mean ``log2(width / height)`` of its boxes;
- ``contrast`` (option, needs decoding): mean over its boxes of ``(mean inside - mean of a surrounding ring)
  / (image std + 1)``, clipped to ±4 (image-std units; signed, since lesions are bright in some modalities
  and dark in others), scaled by ``contrast_weight``.

The ground cost between two images is ``|count_a - count_b|`` plus, when both hold boxes, the Euclidean
distance between their size/aspect/contrast parts, or ``empty_image_cost`` when exactly one of them holds
none (box statistics of an empty image are undefined, not zero). The distance between datasets is the exact
OT cost (POT ``ot.emd2``, uniform weights) between their image sets. **Unit: octaves** (label-feature units:
1.0 is e.g. all boxes twice as large, or twice as many per image).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import ot
from pydantic import Field

from megatron import hookimpl
from megatron.api.similarity import SimilarityMetric, SimilarityOptions, load_image_checked, sample_indices, to_gray_uint8


class LabelAwareOptions(SimilarityOptions):
    contrast: bool = Field(True, description="include lesion contrast (box vs surrounding ring); needs decoding the "
                           "sampled images, turn off for a labels-only distance")
    contrast_weight: float = Field(0.5, ge=0, description="weight of the contrast feature relative to the octave features")
    empty_image_cost: float = Field(1.0, ge=0, description="cost between an image with boxes and one without "
                                    "(beyond the count difference)")


@dataclass
class LabelSummary:
    task: str
    counts: np.ndarray  # (n,) log2(1 + boxes)
    shape: np.ndarray  # (n, 3 or 4) size mean, size std, aspect[, contrast]; NaN rows for empty images
    has_boxes: np.ndarray  # (n,) bool
    image_ids: list[int]


def box_contrast(gray: np.ndarray, box: np.ndarray) -> float:
    """(mean inside the box - mean of the ring around it) / (image std + 1), clipped to [-4, 4]."""
    h, w = gray.shape
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    ix1, iy1 = int(np.clip(np.floor(x1), 0, w - 1)), int(np.clip(np.floor(y1), 0, h - 1))
    ix2, iy2 = int(np.clip(np.ceil(x2), ix1 + 1, w)), int(np.clip(np.ceil(y2), iy1 + 1, h))
    ox1, oy1 = int(np.clip(np.floor(x1 - bw / 2), 0, w - 1)), int(np.clip(np.floor(y1 - bh / 2), 0, h - 1))
    ox2, oy2 = int(np.clip(np.ceil(x2 + bw / 2), ox1 + 1, w)), int(np.clip(np.ceil(y2 + bh / 2), oy1 + 1, h))
    inner = gray[iy1:iy2, ix1:ix2].astype(np.float64)
    outer = gray[oy1:oy2, ox1:ox2].astype(np.float64)
    ring_n = outer.size - inner.size
    if ring_n <= 0 or inner.size == 0:
        return 0.0  # the box fills the image: no surround to compare with
    ring_mean = (outer.sum() - inner.sum()) / ring_n
    return float(np.clip((inner.mean() - ring_mean) / (float(gray.std()) + 1.0), -4.0, 4.0))


def image_features(record, gray: np.ndarray | None, contrast_weight: float) -> tuple[float, np.ndarray | None]:
    """``(count feature, shape features or None for an image without boxes)``."""
    n = len(record.boxes)
    count = float(np.log2(1 + n))
    if n == 0:
        return count, None
    b = record.boxes.astype(np.float64)
    bw = np.clip(b[:, 2] - b[:, 0], 1e-3, None)
    bh = np.clip(b[:, 3] - b[:, 1], 1e-3, None)
    rel = 0.5 * np.log2(bw * bh / (float(record.width) * float(record.height)))
    feats = [rel.mean(), rel.std(), np.log2(bw / bh).mean()]
    if gray is not None:
        feats.append(contrast_weight * float(np.mean([box_contrast(gray, box) for box in b])))
    return count, np.asarray(feats)


class LabelAwareSimilarity(SimilarityMetric):
    """OT distance between datasets' per-image annotation statistics (box count, size, aspect, contrast).

    Example::

        similarity:
          metrics: [wasserstein, embedding, label_aware]
          options:
            label_aware: {contrast: true, contrast_weight: 0.5}
    """

    PLUGIN_NAME: ClassVar[str] = "label_aware"
    USES_LABELS: ClassVar[bool] = True  # compares boxes: skipped for datasets without annotations
    UNIT: ClassVar[str] = "octaves"
    Options: ClassVar[type[LabelAwareOptions]] = LabelAwareOptions
    options: LabelAwareOptions

    def summarize(self, task) -> LabelSummary:
        o = self.options
        indices = sample_indices(task, o.sample_size, self.ctx.seed)
        dim = 4 if o.contrast else 3
        counts = np.zeros(len(indices))
        shape = np.full((len(indices), dim), np.nan)
        has = np.zeros(len(indices), dtype=bool)
        for row, i in enumerate(indices):
            record = task.records[i]
            gray = to_gray_uint8(load_image_checked(task, i)) if o.contrast and len(record.boxes) else None
            if gray is not None and gray.shape != (record.height, record.width):
                # boxes are in the record's coordinates; rescale the pixels to match them
                import cv2

                gray = cv2.resize(gray, (record.width, record.height), interpolation=cv2.INTER_AREA)
            c, f = image_features(record, gray, o.contrast_weight)
            counts[row] = c
            if f is not None:
                shape[row], has[row] = f, True
        return LabelSummary(task=task.name, counts=counts, shape=shape, has_boxes=has,
                            image_ids=[task.records[i].image_id for i in indices])

    def cost_matrix(self, a: LabelSummary, b: LabelSummary) -> np.ndarray:
        cost = np.abs(a.counts[:, None] - b.counts[None, :])
        both = a.has_boxes[:, None] & b.has_boxes[None, :]
        one = a.has_boxes[:, None] ^ b.has_boxes[None, :]
        diff = np.nan_to_num(a.shape[:, None, :] - b.shape[None, :, :])
        cost += np.where(both, np.sqrt((diff ** 2).sum(-1)), 0.0)
        cost += np.where(one, self.options.empty_image_cost, 0.0)
        return cost

    def distance(self, a: LabelSummary, b: LabelSummary) -> float:
        if a.shape.shape[1] != b.shape.shape[1]:
            raise ValueError("label summaries made with different `contrast` settings cannot be compared")
        wa = np.full(len(a.counts), 1.0 / len(a.counts))
        wb = np.full(len(b.counts), 1.0 / len(b.counts))
        return float(ot.emd2(wa, wb, self.cost_matrix(a, b)))

    def describe(self) -> str:
        parts = "box count, size, aspect" + (", lesion contrast" if self.options.contrast else "")
        return f"OT between per-image annotation statistics ({parts}) of up to {self.options.sample_size} sampled images/dataset"


@hookimpl
def megatron_register_similarity_metrics() -> list[type]:
    return [LabelAwareSimilarity]
