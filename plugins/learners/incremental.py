"""Incremental transfer learning: the source tasks one after another, then the target — the sequential
transfer baseline of the method's source material, compared "with freeze" and "no freeze" (cf. the
incremental / sequential fine-tuning of Tajbakhsh et al. 2016, "Convolutional Neural Networks for Medical
Image Analysis: Full Training or Fine Tuning?").

Schedule (:meth:`Incremental.source_tasks`): the run's ``meta_epochs`` are split into ``len(tasks)`` equal
phases and meta-epoch ``e`` trains on the single task of its phase, ``tasks[floor(e * n / meta_epochs)]``, in
the given order (meta-epochs past the planned ones — a compute budget — stay on the last task). With fewer
meta-epochs than tasks, each meta-epoch trains on its consecutive share of the tasks.

Each step is the ``finetune`` step (one optimiser step per support and per query batch). When the phase moves
to a new task the outer optimiser starts afresh (``reset_optimizer``), as a new fine-tuning stage would.
Moving to the target, ``freeze`` selects which groups stay fixed: ``backbone`` or ``backbone+neck`` is the
method's "with freeze", ``none`` its "no freeze"; unset, the runner's ``detector.freeze`` applies.

Example::

    from megatron.api.learner import LearnerContext
    from megatron_plugins.learners.incremental import Incremental

    learner = Incremental(detector, Incremental.Options(freeze="backbone"), LearnerContext())
    for e in range(meta_epochs):
        tasks = learner.source_tasks(e, meta_epochs, source_tasks)   # [one task]
        learner.meta_step(sampler.meta_batch(tasks, 1))
    adapted = learner.adapt(target_pool_batches)          # backbone frozen

Compute accounting: as ``finetune`` (per episode forward ``S + Q``, backward ``S + Q``).
"""
from __future__ import annotations

import logging
from typing import ClassVar, Iterable, Literal

from pydantic import Field

from megatron import hookimpl
from megatron.api.detector import Detector
from megatron.api.learner import LearnerOptions
from megatron.types import Batch, Task

from megatron_plugins.learners.finetune import Finetune

log = logging.getLogger(__name__)


class IncrementalOptions(LearnerOptions):
    freeze: Literal["none", "backbone", "backbone+neck"] | None = Field(
        None, description="groups frozen when moving to the target ('backbone'/'backbone+neck': with freeze; "
        "'none': no freeze); null: the runner's detector.freeze"
    )
    reset_optimizer: bool = Field(True, description="start the outer optimiser afresh when moving to the next source task")


def phase_tasks(meta_epoch: int, meta_epochs: int, tasks: list[Task]) -> list[Task]:
    """The tasks of meta-epoch ``meta_epoch`` (0-based) when ``meta_epochs`` are split into ``len(tasks)``
    equal consecutive phases."""
    n = len(tasks)
    if n == 0:
        return []
    total = max(1, meta_epochs)
    e = min(meta_epoch, total - 1)  # beyond the plan (budgeted runs): stay on the last phase
    start = e * n // total
    stop = max(start + 1, (e + 1) * n // total) if total < n else start + 1
    return tasks[start:stop]


class Incremental(Finetune):
    """Incremental transfer: source tasks one after another, then the target, with or without freezing."""

    PLUGIN_NAME = "incremental"
    PAPER = "Incremental (sequential) transfer learning; cf. Tajbakhsh et al. (2016), IEEE TMI 35(5)"
    Options: ClassVar[type[LearnerOptions]] = IncrementalOptions

    _current_phase: list[str] | None = None

    def source_tasks(self, meta_epoch: int, meta_epochs: int, tasks: list[Task]) -> list[Task]:
        if meta_epochs < len(tasks) and meta_epoch == 0:
            log.warning("incremental: %d meta-epochs for %d source tasks; some meta-epochs train on several tasks "
                        "in a row", meta_epochs, len(tasks))
        chosen = phase_tasks(meta_epoch, meta_epochs, tasks)
        phase = [t.name for t in chosen]
        if phase != self._current_phase:
            if self._current_phase is not None and self.options.reset_optimizer:
                log.info("incremental: moving from %s to %s; the optimiser starts afresh", self._current_phase, phase)
                self.reset_outer_optimizer()
            self._current_phase = phase
        return chosen

    def adapt(self, batches: Iterable[Batch], freeze: str = "none") -> Detector:
        return super().adapt(batches, self.options.freeze if self.options.freeze is not None else freeze)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "current_phase": self._current_phase}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._current_phase = state.get("current_phase")


@hookimpl
def megatron_register_learners() -> list[type]:
    return [Incremental]
