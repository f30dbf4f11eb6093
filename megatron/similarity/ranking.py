"""Ranking and selection of source tasks by a similarity metric (core; metrics live in plugins)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from megatron.errors import ConfigError, PluginError
from megatron.api.similarity import SimilarityContext, SimilarityMetric
from megatron.types import Task
from megatron.config import validate_plugin_options

log = logging.getLogger(__name__)


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
