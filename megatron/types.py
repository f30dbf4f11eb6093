"""The data types every part of megatron passes around.

Plain dataclasses, no behaviour beyond small conveniences: plugins produce and consume them, so they
must stay stable and easy to construct by hand in tests.

Coordinates: boxes are ``(x1, y1, x2, y2)`` in pixels, float32, ``x2 > x1`` and ``y2 > y1``.
Labels are contiguous task-local class indices ``0 .. len(task.categories) - 1``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from megatron.data.io import read_image


@dataclass
class ImageRecord:
    """One annotated image of a task, in its original (file) coordinates."""

    image_id: int
    path: Path | None  # where the pixels come from; None when ``Task.image_loader`` produces them
    width: int
    height: int
    boxes: np.ndarray  # (n, 4) float32, xyxy pixels in the original image
    labels: np.ndarray  # (n,) int64 task-local class indices
    file_name: str = ""
    frame: int | None = None  # 0-based frame of a multi-frame DICOM file; None for single-frame images
    # the unit of independence (the patient; every slice of a volume shares its volume's group): splits and any
    # draw that must not leak are made over groups. None: the image is its own group (group_of gives its id)
    group: str | None = None
    # what the reader knows beyond the pixels: pixel spacing in mm (row, column), the slice's position in its
    # volume, the volume's affine (voxel -> RAS world, mm), the source series... (JSON-serialisable values)
    meta: dict = field(default_factory=dict)

    @property
    def group_id(self) -> str:
        """The record's group: ``group`` when the reader set one, else the image itself (``image:<id>``)."""
        return self.group if self.group is not None else f"image:{self.image_id}"

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.boxes) != len(self.labels):
            raise ValueError(
                f"image {self.image_id} ({self.file_name or self.path}): "
                f"{len(self.boxes)} boxes but {len(self.labels)} labels"
            )


def _read_image_file(record: ImageRecord) -> np.ndarray:
    assert record.path is not None
    return read_image(record.path, frame=record.frame)


@dataclass
class Task:
    """One dataset (one modality): its categories and its annotated images.

    ``image_loader(record)`` returns the raw pixels as an ``np.ndarray``: ``(H, W)`` uint8/uint16 grayscale
    or ``(H, W, 3)`` uint8 RGB. The default reads ``record.path`` from disk.
    """

    name: str
    categories: list[str]
    records: list[ImageRecord]
    modality: str = ""
    source: str = ""  # where it came from (plugin name and path), for error messages and the run record
    image_loader: Callable[[ImageRecord], np.ndarray] = field(default=_read_image_file, repr=False)
    # where the records' groups (patients) come from, for the run record ("" = derived from the records:
    # megatron.data.groups.describe_grouping)
    grouping: str = ""

    def load_image(self, record: ImageRecord) -> np.ndarray:
        return self.image_loader(record)

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, indices: list[int], name: str | None = None) -> "Task":
        """A task holding only ``records[i]`` for ``i`` in ``indices`` (same categories, same loader)."""
        return Task(
            name=name or self.name,
            categories=list(self.categories),
            records=[self.records[i] for i in indices],
            modality=self.modality,
            source=self.source,
            image_loader=self.image_loader,
            grouping=self.grouping,
        )


@dataclass
class TaskSet:
    """The source tasks a learner meta-trains on, and the few-shot target task."""

    sources: list[Task]
    target: Task


@dataclass
class Batch:
    """A collated batch, ready for a detector.

    ``images`` is ``(B, 3, S, S)`` float32 with values in ``[0, 255]`` (intensity-normalised, not yet
    mean/std-normalised: that is the detector's business). ``boxes[i]`` is ``(n_i, 4)`` xyxy in the
    *input* (letterboxed) coordinates; ``labels[i]`` is ``(n_i,)`` int64. ``meta[i]`` holds at least
    ``image_id``, ``orig_size`` ``(h, w)``, ``scale`` (input px per original px) and ``pad`` ``(left, top)``
    so predictions can be mapped back with :func:`to_original_coords`.
    """

    images: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    meta: list[dict]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            images=self.images.to(device, non_blocking=True),
            boxes=[b.to(device) for b in self.boxes],
            labels=[lab.to(device) for lab in self.labels],
            meta=self.meta,
        )


@dataclass
class Episode:
    """A support and a query batch drawn from one task (no image in both).

    ``categories`` are the class names in the episode's label space: for N-way episodes the labels
    are remapped to ``0 .. N-1`` and ``label_map`` maps task label -> episode label.
    """

    task_name: str
    support: Batch
    query: Batch
    categories: list[str]
    label_map: dict[int, int] | None = None


@dataclass
class Detections:
    """A detector's predictions for one image, in the original image coordinates."""

    boxes: np.ndarray  # (n, 4) float32 xyxy
    scores: np.ndarray  # (n,) float32
    labels: np.ndarray  # (n,) int64
    image_id: int = -1


def to_original_coords(boxes: np.ndarray | torch.Tensor, meta: dict) -> np.ndarray:
    """Map xyxy boxes from letterboxed input coordinates back to the original image, clipped to it."""
    b = boxes.detach().cpu().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes)
    b = b.astype(np.float32).reshape(-1, 4).copy()
    left, top = meta["pad"]
    scale = float(meta["scale"])
    b[:, [0, 2]] = (b[:, [0, 2]] - left) / scale
    b[:, [1, 3]] = (b[:, [1, 3]] - top) / scale
    h, w = meta["orig_size"]
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
    return b
