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
    """Return dataset plugin classes (subclasses of :class:`megatron.api.dataset.DatasetPlugin`).

    Each class has a unique ``PLUGIN_NAME`` and an ``Options`` pydantic model; ``load()`` returns tasks.
    """


@hookspec
def megatron_register_detectors() -> list[type]:
    """Return detector plugin classes (subclasses of :class:`megatron.api.detector.Detector`)."""


@hookspec
def megatron_register_learners() -> list[type]:
    """Return learner plugin classes (subclasses of :class:`megatron.api.learner.MetaLearner`)."""


@hookspec
def megatron_register_similarity_metrics() -> list[type]:
    """Return similarity-metric plugin classes (subclasses of :class:`megatron.similarity.SimilarityMetric`)."""


@hookspec
def megatron_register_loggers() -> list[type]:
    """Return logger plugin classes (subclasses of :class:`megatron.api.logger.Logger`).

    A logger is switched on per run by the config's ``loggers:`` list (or ``--logger NAME``); megatron then
    validates its ``Options``, instantiates it and registers the instance for the run's duration, so its
    ``@hookimpl`` methods (the lifecycle hooks below) are called like any plugin's.
    """


@hookspec
def megatron_run_start(config: Any, run_dir: Path) -> None:
    """Called once when a run starts, after the config is validated and the run directory exists.

    ``config`` is the frozen :class:`megatron.config.ExperimentConfig`. Return value ignored.
    """


@hookspec
def megatron_stage_start(stage: str, info: dict[str, Any]) -> None:
    """Called when a stage of the run starts. ``stage`` is one of ``prepare``, ``select``, ``pretrain``,
    ``meta_train`` (once per learner), ``meta_epoch`` (once per meta-epoch of a learner) and ``adapt``; ``info``
    says what the stage is about to do (keys per stage on this hook's page). Return value ignored."""


@hookspec
def megatron_stage_end(stage: str, info: dict[str, Any]) -> None:
    """Called when a stage of the run ends, with what it produced (keys per stage on this hook's page)."""


@hookspec
def megatron_meta_step_end(learner: str, meta_epoch: int, step: int, stats: dict[str, float]) -> None:
    """Called after every outer update. ``step`` counts outer steps within ``meta_epoch`` (from 1);
    ``stats`` holds the learner's scalar statistics (``loss`` at least) plus ``global_step`` (outer steps of
    this learner so far) and ``compute_spent`` (image passes so far)."""


@hookspec
def megatron_evaluation_end(learner: str, meta_epoch: int, split: str, metrics: dict[str, Any]) -> None:
    """Called after every evaluation of an adapted model on a target split (``split`` is ``validation`` or
    ``heldout``) with the evaluator's metrics as recorded in ``run.json`` (``mAP50`` … as fractions)."""


@hookspec
def megatron_record_update(run_dir: Path, record: dict[str, Any]) -> None:
    """Called whenever the run record changes (after set-up, after every evaluation, at the end) with the whole
    record; the built-in recorder writes it to ``run_dir/run.json`` atomically. Do not modify ``record``."""


@hookspec
def megatron_run_end(run_dir: Path, record: dict[str, Any]) -> None:
    """Called once when a run ends successfully, with the run record as written to ``run_dir``."""
