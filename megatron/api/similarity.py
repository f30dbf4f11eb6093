"""The interface of similarity-metric plugins (what a third-party metric subclasses and may use).

A metric turns a task into a summary once (:meth:`SimilarityMetric.summarize`: decoding images, computing
histograms or embeddings) and compares two summaries (:meth:`SimilarityMetric.distance`). Splitting the two
lets the core cache summaries and time decoding and distance separately.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from megatron.errors import ConfigError, DataError
from megatron.types import Task

log = logging.getLogger(__name__)


class SimilarityOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sample_size: int = Field(50, ge=1, description="images sampled per dataset (seeded; the method uses 50)")


@dataclass
class SimilarityContext:
    """What the core lends a metric: the seed, the device and (for embedding metrics) a way to build a
    feature extractor from the configured detector."""

    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    input_size: int = 256
    # returns a module whose forward maps a (B, 3, S, S) [0, 255] float batch to (B, D) embeddings
    make_feature_extractor: Callable[[], Callable[[torch.Tensor], torch.Tensor]] | None = None
    # what make_feature_extractor builds, for the output (e.g. "yolox backbone, weights from ckpt.pth")
    feature_extractor_desc: str = ""


class SimilarityMetric:
    """Abstract similarity metric: smaller distance = more similar; ``distance(a, a) == 0``; symmetric."""

    PLUGIN_NAME: ClassVar[str]
    UNIT: ClassVar[str] = ""  # what a distance of 1 means, for tables and plots
    # True when the metric compares annotations (boxes): `megatron similarity` skips it, with a note, for
    # datasets that have none (unlabelled folders); image-only metrics leave it False
    USES_LABELS: ClassVar[bool] = False
    Options: ClassVar[type[SimilarityOptions]] = SimilarityOptions

    def __init__(self, options: SimilarityOptions | None = None, ctx: SimilarityContext | None = None):
        self.options = options if options is not None else self.Options()
        self.ctx = ctx if ctx is not None else SimilarityContext()

    def summarize(self, task: Task) -> Any:
        raise NotImplementedError

    def distance(self, a: Any, b: Any) -> float:
        raise NotImplementedError

    @property
    def unit(self) -> str:
        """The unit of this instance's distances (options may change it; default :attr:`UNIT`)."""
        return self.UNIT

    def describe(self) -> str:
        """One line on how this metric instance measures (e.g. which weights); shown with its results."""
        return ""


# ------------------------------------------------------------------------------------------------------
# Shared helpers for metric plugins: seeded sampling and image loading with errors that name the file.
# ------------------------------------------------------------------------------------------------------

def sample_indices(task: Task, sample_size: int, seed: int) -> list[int]:
    """``sample_size`` distinct record indices of ``task`` (all of them when it is smaller), sorted.

    The generator is seeded with ``(seed, crc32(task.name))`` so that each task gets its own reproducible
    sample, independent of the order tasks are summarised in.
    """
    if len(task) == 0:
        raise DataError(f"task {task.name!r} ({task.source or 'unknown source'}) holds no images, so it has no "
                        "similarity to anything; check its annotation file and image folder, or leave it out")
    if sample_size < 1:
        raise ConfigError(f"similarity: sample_size must be >= 1, got {sample_size}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(task.name.encode())])
    n = min(int(sample_size), len(task))
    return sorted(rng.choice(len(task), size=n, replace=False).tolist())


def load_image_checked(task: Task, index: int) -> np.ndarray:
    """``task.load_image(task.records[index])``, any failure re-raised as a :class:`DataError` naming the file."""
    record = task.records[index]
    try:
        image = task.load_image(record)
        image = np.asarray(image)
    except Exception as exc:  # decoder errors come in many types; the user needs the file name
        where = record.path or record.file_name or f"image_id {record.image_id}"
        raise DataError(f"task {task.name!r}: cannot read image {where} (image_id {record.image_id}): "
                        f"{type(exc).__name__}: {exc}. Fix or remove the file (and its annotations)") from exc
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)) or image.size == 0:
        where = record.path or record.file_name or f"image_id {record.image_id}"
        raise DataError(f"task {task.name!r}: image {where} has shape {image.shape}; expected (H, W) grayscale "
                        "or (H, W, 3) RGB")
    return image


def to_gray_uint8(image: np.ndarray, window: str = "percentile", percentiles: tuple[float, float] = (0.5, 99.5),
                  fixed_range: tuple[float, float] | None = None) -> np.ndarray:
    """Grayscale 8-bit view of any image the loaders return.

    RGB(A) -> luminance (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B, as OpenCV). 8-bit data is kept as is.
    Other depths (16-bit, float) are mapped linearly to 0..255 from an intensity window: ``percentile``
    (per image, ``percentiles`` of its values), ``fixed`` (``fixed_range``, the same for every image: use it
    when intensities are calibrated, e.g. CT Hounsfield units) or ``full`` (the dtype's full range).
    """
    if image.ndim == 3:
        if image.shape[2] == 1:
            image = image[:, :, 0]
        else:
            rgb = image[:, :, :3]
            if rgb.dtype == np.uint8:
                import cv2

                image = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
            else:
                image = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if image.dtype == np.uint8:
        return image
    data = image.astype(np.float64)
    if window == "fixed":
        if fixed_range is None:
            raise ConfigError("similarity: intensity_window 'fixed' needs fixed_range: [low, high]")
        lo, hi = float(fixed_range[0]), float(fixed_range[1])
    elif window == "full":
        if np.issubdtype(image.dtype, np.integer):
            info = np.iinfo(image.dtype)
            lo, hi = float(info.min), float(info.max)
        else:
            lo, hi = 0.0, 1.0
    else:
        lo, hi = (float(v) for v in np.percentile(data, percentiles))
    if hi <= lo:
        return np.zeros(data.shape, dtype=np.uint8) if data.max() <= lo else np.full(data.shape, 255, np.uint8)
    return np.clip(np.rint((data - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------
