"""Progress bars for a run, as a lifecycle plugin (rich): one row per learner's meta-epochs, one per
meta-epoch's outer steps. Driven only by the lifecycle hooks a third-party plugin also receives."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from megatron import hookimpl

PROGRESS_PLUGIN_NAME = "megatron.progress"


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[Any]:
    """Rich progress bars (one row per loop) on stderr when it is a terminal and ``enabled``; else ``None``."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        yield bar


class RunProgress:
    """Bars for meta-training; ``bar`` is a rich ``Progress``."""

    def __init__(self, bar: Any):
        self.bar = bar
        self.epochs: dict[str, Any] = {}
        self.steps: dict[str, Any] = {}

    @hookimpl
    def megatron_stage_start(self, stage: str, info: dict[str, Any]) -> None:
        learner = info.get("learner")
        if stage == "meta_train":
            self.epochs[learner] = self.bar.add_task(f"{learner}: meta-epochs", total=info.get("meta_epochs"),
                                                     completed=info.get("meta_epochs_done", 0))
        elif stage == "meta_epoch":
            self.steps[learner] = self.bar.add_task(f"{learner}: meta-epoch {info['meta_epoch']} steps",
                                                    total=info.get("steps"))
        elif stage == "adapt" and learner in self.epochs:
            self.bar.update(self.epochs[learner], description=f"{learner}: fine-tuning on the target pool")

    @hookimpl
    def megatron_meta_step_end(self, learner: str, meta_epoch: int, step: int, stats: dict[str, float]) -> None:
        if learner in self.steps:
            self.bar.update(self.steps[learner], advance=1,
                            description=f"{learner}: meta-epoch {meta_epoch} loss {stats.get('loss', float('nan')):.3f}")

    @hookimpl
    def megatron_stage_end(self, stage: str, info: dict[str, Any]) -> None:
        learner = info.get("learner")
        if stage == "meta_epoch" and learner in self.steps:
            self.bar.remove_task(self.steps.pop(learner))
        elif stage == "meta_train" and learner in self.epochs:
            self.bar.remove_task(self.epochs.pop(learner))

    @hookimpl
    def megatron_evaluation_end(self, learner: str, meta_epoch: int, split: str, metrics: dict[str, Any]) -> None:
        if split == "heldout" and learner in self.epochs:
            self.bar.update(self.epochs[learner], advance=1,
                            description=f"{learner}: meta-epochs (mAP50 {100 * metrics['mAP50']:.1f}%)")
