"""The interface of similarity-metric plugins, and the ranking/selection of source tasks (core).

A metric turns a task into a summary once (:meth:`SimilarityMetric.summarize`: decoding images, computing
histograms or embeddings) and compares two summaries (:meth:`SimilarityMetric.distance`). Splitting the two
lets the core cache summaries and time decoding and distance separately.
"""
from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from megatron.errors import ConfigError, DataError, PluginError
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
# Ranking and selection (core; metrics live in plugins)
# ------------------------------------------------------------------------------------------------------

def metric_name(metric: SimilarityMetric) -> str:
    return getattr(metric, "PLUGIN_NAME", type(metric).__name__)


def summarize_cached(metric: SimilarityMetric, task: Task) -> tuple[Any, float]:
    """The metric's summary of ``task`` and the seconds spent making it (0.0 when it came from the cache).

    Summaries are cached on the metric object, keyed by the task's name and its ``records`` list (held by
    the cache, so the identity cannot be reused), so ranking a target against sources after a pairwise
    matrix decodes nothing twice.
    """
    cache = metric.__dict__.setdefault("_summary_cache", {})
    key = (task.name, id(task.records), len(task.records))
    hit = cache.get(key)
    if hit is not None and hit[0] is task.records:
        return hit[1], 0.0
    t0 = time.perf_counter()
    summary = metric.summarize(task)
    elapsed = time.perf_counter() - t0
    cache[key] = (task.records, summary)
    log.debug("similarity %s: summarised %s in %.2fs", metric_name(metric), task.name, elapsed)
    return summary, elapsed


def _checked_distance(metric: SimilarityMetric, a: Any, b: Any, name_a: str, name_b: str) -> float:
    d = float(metric.distance(a, b))
    if not np.isfinite(d):
        raise PluginError(f"similarity metric {metric_name(metric)!r} returned {d} for {name_a!r} vs {name_b!r}")
    return max(d, 0.0)  # tiny negative values are round-off of an exact 0


def pairwise_distances(metric: SimilarityMetric, tasks: list[Task],
                       progress: Callable[[str], None] | None = None) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """Distance between every pair of ``tasks``: ``(names, matrix, timings)``.

    ``matrix[i, j]`` is the distance between ``tasks[i]`` and ``tasks[j]``; it is symmetric with a zero
    diagonal (each pair is computed once). ``timings`` splits the wall time into ``summarize_s`` (decoding
    images and building summaries; cached summaries cost 0) and ``distance_s`` (the distance computations),
    with ``summarize_per_task_s`` and ``n_pairs``. ``progress(text)`` is called before each step when given.
    """
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"similarity: task names must be unique, got {names}")
    summaries, per_task = [], {}
    for t in tasks:
        if progress:
            progress(f"{metric_name(metric)}: summarising {t.name}")
        s, dt = summarize_cached(metric, t)
        summaries.append(s)
        per_task[t.name] = dt
    n = len(tasks)
    matrix = np.zeros((n, n))
    t0 = time.perf_counter()
    for i in range(n):
        for j in range(i + 1, n):
            if progress:
                progress(f"{metric_name(metric)}: {names[i]} vs {names[j]}")
            matrix[i, j] = matrix[j, i] = _checked_distance(metric, summaries[i], summaries[j], names[i], names[j])
    distance_s = time.perf_counter() - t0
    timings = {"summarize_s": float(sum(per_task.values())), "distance_s": float(distance_s),
               "summarize_per_task_s": per_task, "n_pairs": n * (n - 1) // 2}
    return names, matrix, timings


def rank_sources(metric: SimilarityMetric, target: Task, sources: list[Task]) -> list[tuple[str, float]]:
    """Every source as ``(name, distance to target)``, closest first (ties broken by name)."""
    target_summary, _ = summarize_cached(metric, target)
    ranked = []
    for s in sources:
        if s.name == target.name:
            continue
        summary, _ = summarize_cached(metric, s)
        ranked.append((s.name, _checked_distance(metric, target_summary, summary, target.name, s.name)))
    return sorted(ranked, key=lambda nd: (nd[1], nd[0]))


@dataclass
class SourceSelection:
    """The outcome of :func:`select_sources`, self-describing for the run record (:meth:`to_dict`)."""

    metric: str
    unit: str
    target: str
    k: int
    chosen: list[str]
    ranking: list[tuple[str, float]]  # every source, closest first
    reason: str
    note: str = ""  # metric caveats (e.g. random CNN weights)

    @property
    def distances(self) -> dict[str, float]:
        return dict(self.ranking)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "unit": self.unit, "target": self.target, "k": self.k,
                "chosen": list(self.chosen), "distances": self.distances,
                "ranking": [{"name": n, "distance": d, "chosen": n in self.chosen} for n, d in self.ranking],
                "reason": self.reason, "note": self.note}


def select_sources(metric: SimilarityMetric, target: Task, sources: list[Task], k: int) -> SourceSelection:
    """The ``k`` sources closest to ``target`` under ``metric`` (all of them when ``k >= len(sources)``)."""
    if k < 1:
        raise ConfigError(f"similarity.select_sources must be >= 1, got {k}")
    if not sources:
        raise ConfigError("similarity.select_sources: there are no source tasks to choose from")
    ranking = rank_sources(metric, target, sources)
    chosen = [n for n, _ in ranking[:k]]
    name, unit = metric_name(metric), metric.unit or "metric units"
    listing = ", ".join(f"{n} {d:.4g}" for n, d in ranking)
    reason = (f"kept the {len(chosen)} of {len(ranking)} source tasks closest to target {target.name!r} under "
              f"the {name!r} metric (distance in {unit}, smaller = more similar): {', '.join(chosen)}. "
              f"All distances: {listing}.")
    if k > len(ranking):
        reason += f" (asked for {k}, only {len(ranking)} available)"
    return SourceSelection(metric=name, unit=unit, target=target.name, k=k, chosen=chosen, ranking=ranking,
                           reason=reason, note=metric.describe())


def build_metric(pm: Any, cfg: Any, name: str, ctx: SimilarityContext | None = None) -> SimilarityMetric:
    """The metric ``name`` from the plugin manager's register, with options from ``cfg.similarity``.

    Options: ``cfg.similarity.options[name]``; ``cfg.similarity.sample_size`` fills ``sample_size`` unless
    given there. The context defaults to the config's seed and input size.
    """
    from megatron.config import validate_plugin_options

    try:
        cls = pm.registers["similarity"].get(name)
    except KeyError as exc:
        raise ConfigError(f"similarity metric: {exc}") from None
    opts = dict(cfg.similarity.options.get(name, {}))
    if "sample_size" in cls.Options.model_fields:
        opts.setdefault("sample_size", cfg.similarity.sample_size)
    options = validate_plugin_options(cls, opts, f"similarity.options.{name}")
    if ctx is None:
        ctx = SimilarityContext(seed=cfg.seed, input_size=cfg.data.input_size)
    return cls(options, ctx)
