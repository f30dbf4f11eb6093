"""The ``ks-intensity`` similarity metric: Kolmogorov–Smirnov distance between grey-level distributions."""
from __future__ import annotations

import numpy as np
from pydantic import Field

from megatron import hookimpl
from megatron.api.similarity import SimilarityMetric, SimilarityOptions
from megatron.types import Task


class KSOptions(SimilarityOptions):
    sample_size: int = Field(50, ge=1, description="images sampled per dataset (seeded)")
    exclude_extremes: bool = Field(True, description="leave out pure black (0) and pure white (255) pixels")


class KSIntensity(SimilarityMetric):
    """sup_v |F_a(v) - F_b(v)| over grey levels v, F the pooled cumulative histogram of a dataset's sample."""

    PLUGIN_NAME = "ks-intensity"
    UNIT = "KS statistic (0..1)"
    Options = KSOptions

    def summarize(self, task: Task) -> np.ndarray:
        if len(task) == 0:
            raise ValueError(f"dataset {task.name!r} has no images to compare")
        rng = np.random.default_rng(self.ctx.seed)
        n = min(self.options.sample_size, len(task))
        hist = np.zeros(256, dtype=np.float64)
        for i in rng.choice(len(task), size=n, replace=False):
            image = task.load_image(task.records[int(i)])
            gray = image if image.ndim == 2 else image[..., :3].mean(axis=2)
            if gray.dtype != np.uint8:  # 16-bit: scale the used range to 8 bits
                lo, hi = float(gray.min()), float(gray.max())
                gray = ((gray - lo) / max(hi - lo, 1.0) * 255.0)
            hist += np.bincount(np.asarray(gray, dtype=np.uint8).ravel(), minlength=256)
        if self.options.exclude_extremes:
            hist[0] = hist[255] = 0.0
        total = hist.sum()
        if total == 0:
            raise ValueError(f"dataset {task.name!r}: every sampled pixel is pure black or white")
        return np.cumsum(hist / total)

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(np.max(np.abs(a - b)))


@hookimpl
def megatron_register_similarity_metrics():
    return [KSIntensity]
