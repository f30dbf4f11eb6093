"""Every hook megatron calls. A plugin implements any of them with ``@megatron.hookimpl``.

Registration hooks return plugin *classes*, each carrying a ``PLUGIN_NAME``; megatron puts them in one typed
register per kind. Lifecycle hooks let loggers and callbacks watch a run; their return values are ignored.
Each hook has a page in ``registry_docs/hooks/`` (a test keeps the two in step).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("megatron")


@hookspec
def megatron_register_datasets() -> list[type]:
    """Return dataset plugin classes (subclasses of :class:`megatron.datasets.DatasetPlugin`).

    Each class has a unique ``PLUGIN_NAME`` and an ``Options`` pydantic model; ``load()`` returns tasks.
    """


@hookspec
def megatron_register_detectors() -> list[type]:
    """Return detector plugin classes (subclasses of :class:`megatron.detector.Detector`)."""


@hookspec
def megatron_register_learners() -> list[type]:
    """Return learner plugin classes (subclasses of :class:`megatron.learner.MetaLearner`)."""


@hookspec
def megatron_register_similarity_metrics() -> list[type]:
    """Return similarity-metric plugin classes (subclasses of :class:`megatron.similarity.SimilarityMetric`)."""


@hookspec
def megatron_run_start(config: Any, run_dir: Path) -> None:
    """Called once when a run starts, after the config is validated and the run directory exists.

    ``config`` is the frozen :class:`megatron.config.ExperimentConfig`. Return value ignored.
    """


@hookspec
def megatron_meta_step_end(learner: str, meta_epoch: int, step: int, stats: dict[str, float]) -> None:
    """Called after every outer update with the learner's scalar statistics (``loss`` at least)."""


@hookspec
def megatron_evaluation_end(learner: str, meta_epoch: int, metrics: dict[str, float]) -> None:
    """Called after every evaluation on the target's held-out split with its metrics (``mAP50`` …)."""


@hookspec
def megatron_run_end(run_dir: Path, record: dict[str, Any]) -> None:
    """Called once when a run ends successfully, with the run record as written to ``run_dir``."""
