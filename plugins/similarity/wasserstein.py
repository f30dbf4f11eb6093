"""``wasserstein``: Wasserstein-1 distance between the average grayscale histograms of two datasets.

The measure of the method: ``sample_size`` randomly chosen images per dataset (seeded), converted to 8-bit
grayscale, one histogram per image over the pixel values 1..254 (pure black 0 and pure white 255 are left
out: padding, collimator borders and burnt-in text would otherwise dominate), each image's histogram
normalised to sum 1, averaged over the sample and normalised again. Two datasets are compared with the 1-D
Wasserstein-1 (earth mover's) distance between their average histograms, computed with POT
(``ot.wasserstein_1d``), with ground cost ``|i - j|`` between grey levels.

**Unit: grey levels** (of the 8-bit image). A distance of 5 means that, on average, intensity mass must move
5 grey levels to turn one dataset's histogram into the other's; a dataset whose every pixel is 3 levels
brighter than another's is at distance exactly 3. With ``bins`` coarser than 254, bin positions are the bin
centres expressed in grey levels, so the unit stays grey levels (the resolution becomes ``254 / bins`` levels).

16-bit (or float) images are mapped to 0..255 first by an intensity window (``intensity_window``): per-image
percentiles (default 0.5..99.5), a fixed range for calibrated data, or the dtype's full range.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import ot
from pydantic import Field, model_validator

from megatron import hookimpl
from megatron.errors import DataError
from megatron.api.similarity import SimilarityMetric, SimilarityOptions, load_image_checked, sample_indices, to_gray_uint8

GREY_LEVELS = 254  # pixel values 1..254


class WassersteinOptions(SimilarityOptions):
    bins: int = Field(254, ge=1, le=254, description="histogram bins over grey levels 1..254 (254: one per level); "
                      "distances stay in grey levels, coarser bins only lower the resolution")
    intensity_window: Literal["percentile", "fixed", "full"] = Field(
        "percentile", description="how non-8-bit (e.g. 16-bit) images map to 0..255: per-image percentiles, "
        "a fixed range (fixed_range) or the dtype's full range; 8-bit images are used as they are")
    percentiles: tuple[float, float] = Field((0.5, 99.5), description="low/high percentile of the window when "
                                             "intensity_window is 'percentile'")
    fixed_range: tuple[float, float] | None = Field(None, description="[low, high] raw intensities mapped to 0 and 255 "
                                                    "when intensity_window is 'fixed'")

    @model_validator(mode="after")
    def _check(self) -> "WassersteinOptions":
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError("percentiles must satisfy 0 <= low < high <= 100")
        if self.intensity_window == "fixed" and (self.fixed_range is None or self.fixed_range[1] <= self.fixed_range[0]):
            raise ValueError("intensity_window 'fixed' needs fixed_range: [low, high] with high > low")
        return self


@dataclass
class HistogramSummary:
    """A dataset's average histogram: ``hist`` sums to 1 over ``bins``; ``centres`` in grey levels."""

    task: str
    hist: np.ndarray  # (bins,) float64
    centres: np.ndarray  # (bins,) grey level of each bin's centre
    image_ids: list[int]
    n_skipped: int = 0  # images with no pixel in 1..254


def bin_centres(bins: int) -> np.ndarray:
    edges = np.linspace(1.0, GREY_LEVELS + 1.0, bins + 1)  # bin b covers grey levels [edges[b], edges[b+1])
    return (edges[:-1] + edges[1:] - 1.0) / 2.0


def grey_level_histogram(gray: np.ndarray, bins: int = GREY_LEVELS) -> np.ndarray:
    """Counts of grey levels 1..254 of a uint8 image, merged into ``bins`` equal bins (not normalised)."""
    counts = np.bincount(gray.ravel(), minlength=256)[1:255].astype(np.float64)
    if bins == GREY_LEVELS:
        return counts
    which = (np.arange(GREY_LEVELS) * bins) // GREY_LEVELS  # grey level 1+i -> bin
    return np.bincount(which, weights=counts, minlength=bins)


def wasserstein_1d_hist(a: np.ndarray, b: np.ndarray, positions: np.ndarray) -> float:
    """W1 between two normalised histograms on the same positions (POT, ground cost ``|x_i - x_j|``)."""
    return float(ot.wasserstein_1d(positions, positions, a, b, p=1))


class WassersteinSimilarity(SimilarityMetric):
    """Wasserstein-1 distance between the datasets' average grayscale histograms (grey levels 1..254).

    Example::

        similarity:
          metrics: [wasserstein]
          options:
            wasserstein: {sample_size: 50, bins: 254, intensity_window: percentile}
    """

    PLUGIN_NAME: ClassVar[str] = "wasserstein"
    UNIT: ClassVar[str] = "grey levels"
    Options: ClassVar[type[WassersteinOptions]] = WassersteinOptions
    options: WassersteinOptions

    def summarize(self, task) -> HistogramSummary:
        o = self.options
        indices = sample_indices(task, o.sample_size, self.ctx.seed)
        total = np.zeros(o.bins)
        used, skipped = 0, 0
        for i in indices:
            gray = to_gray_uint8(load_image_checked(task, i), o.intensity_window, o.percentiles, o.fixed_range)
            h = grey_level_histogram(gray, o.bins)
            s = h.sum()
            if s == 0:  # only pure black/white pixels: nothing to compare
                skipped += 1
                continue
            total += h / s
            used += 1
        if used == 0:
            raise DataError(f"task {task.name!r}: none of the {len(indices)} sampled images has a pixel value in "
                            "1..254 (all pure black/white); check the images or the 16-bit intensity window")
        return HistogramSummary(task=task.name, hist=total / total.sum(), centres=bin_centres(o.bins),
                                image_ids=[task.records[i].image_id for i in indices], n_skipped=skipped)

    def distance(self, a: HistogramSummary, b: HistogramSummary) -> float:
        if len(a.hist) != len(b.hist):
            raise ValueError("histograms with different bin counts cannot be compared")
        return wasserstein_1d_hist(a.hist, b.hist, a.centres)

    def describe(self) -> str:
        return (f"up to {self.options.sample_size} sampled images/dataset, {self.options.bins} bins over grey levels 1..254, "
                "distance in grey levels")


@hookimpl
def megatron_register_similarity_metrics() -> list[type]:
    return [WassersteinSimilarity]
