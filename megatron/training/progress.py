"""Progress of a run, as a lifecycle plugin: rich bars on a terminal, plain lines when stdout is a file or a pipe.

- On a terminal (:class:`RunProgress`, rich): one row per learner's meta-epochs, one per meta-epoch's outer steps.
- Off a terminal (:class:`PlainProgress`: SLURM, ``nohup``, CI, ``megatron run > log``): one line per stage start
  and end, a step line every ``log_every`` outer steps or :data:`LOG_EVERY_S` seconds, whichever comes first
  (stage, learner, meta-epoch, step/total, loss, image passes/s, ETA of the meta-epoch), and one line per
  evaluation with its mAP50 and FROC. Plain text, no terminal control codes, flushed line by line.

Both are driven only by the lifecycle hooks a third-party plugin also receives, and both expose ``bar``: an
object with rich's ``add_task`` / ``update`` / ``remove_task``, which stage 1 (pre-training) reports its steps to.
The runner registers one of them on rank 0 only (:func:`run_progress`), so ``torchrun`` prints once.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Any, Callable, Iterator, TextIO

from megatron import hookimpl

PROGRESS_PLUGIN_NAME = "megatron.progress"
#: a step line every this many outer steps (``megatron run --log-every N``) ...
DEFAULT_LOG_EVERY = 10
#: ... or after this many seconds since the last one, whichever comes first
LOG_EVERY_S = 30.0


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[Any]:
    """Rich progress bars (one row per loop) on stderr when it is a terminal and ``enabled``; plain step lines
    (:class:`PlainBar`) on stdout when that is not a terminal (``megatron pretrain > log``); else ``None``."""
    if not enabled:
        yield None
        return
    if not stream_is_terminal(sys.stdout):
        yield PlainProgress(sys.stdout).bar
        return
    from rich.console import Console  # rich's live display: imported only when bars are wanted (start-up time)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        yield bar


def stream_is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


@contextlib.contextmanager
def run_progress(enabled: bool, log_every: int = DEFAULT_LOG_EVERY, stream: TextIO | None = None) -> Iterator[Any]:
    """The progress plugin of a run, or ``None`` (not ``enabled``, or no terminal for bars and nowhere for
    lines): :class:`PlainProgress` on ``stream`` (default ``sys.stdout``) when it is not a terminal, else rich bars."""
    stream = stream if stream is not None else sys.stdout
    if not enabled:
        yield None
    elif not stream_is_terminal(stream):
        yield PlainProgress(stream, log_every)
    else:
        with progress_bars(True) as bar:
            yield RunProgress(bar) if bar is not None else None


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
    def megatron_evaluation_end(self, learner: str, meta_epoch: int, split: str, metrics: dict[str, Any]) -> None:
        if split == "heldout" and learner in self.epochs:
            self.bar.update(self.epochs[learner], advance=1,
                            description=f"{learner}: meta-epochs (mAP50 {100 * metrics['mAP50']:.1f}%)")


# ------------------------------------------------------------------------------------------------ plain lines
def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3700`` -> ``1h01m``; unknown -> ``?``."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _info_text(info: dict[str, Any]) -> str:
    """A stage's info as ``key=value`` pairs (lists joined by commas, long values cut)."""
    parts = []
    for key, value in info.items():
        if key == "learner" or value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        elif isinstance(value, float):
            value = f"{value:.4g}"
        text = str(value)
        parts.append(f"{key}={text if len(text) <= 80 else text[:77] + '...'}")
    return " ".join(parts)


class _Interval:
    """Says when a step line is due: every ``every`` steps or ``every_s`` seconds since the last line."""

    def __init__(self, every: int, every_s: float, clock: Callable[[], float]):
        self.every, self.every_s, self.clock = max(1, int(every)), every_s, clock
        self.reset()

    def reset(self) -> None:
        self.steps_since = 0
        self.last = self.clock()

    def due(self, step: int, total: int | None) -> bool:
        self.steps_since += 1
        return step == 1 or step == total or self.steps_since >= self.every or self.clock() - self.last >= self.every_s


class _Rate:
    """Throughput and ETA of one loop since it started: steps/s, image passes/s (from the second observation of
    the pass counter on, which excludes work done before the loop's first step) and the time left."""

    def __init__(self, clock: Callable[[], float], total: int | None):
        self.clock, self.total = clock, total
        self.started = clock()
        self.first: tuple[float, float, int] | None = None  # (time, image passes, step) at the first observation

    def text(self, step: int, passes: float | None = None) -> str:
        now = self.clock()
        elapsed = max(now - self.started, 1e-9)
        parts = [f"{step / elapsed:.2f} steps/s"]
        if passes is not None:
            if self.first is None:
                self.first = (now, passes, step)
            elif step > self.first[2] and now > self.first[0]:
                parts.append(f"{(passes - self.first[1]) / (now - self.first[0]):.1f} image passes/s")
        if self.total:
            parts.append(f"ETA {format_duration((self.total - step) * elapsed / max(step, 1))}")
        return ", ".join(parts)


class PlainProgress:
    """Plain progress lines on ``stream`` (module docstring); the plugin registered off a terminal."""

    def __init__(self, stream: TextIO, log_every: int = DEFAULT_LOG_EVERY, every_s: float = LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.stream, self.log_every, self.every_s, self.clock = stream, log_every, every_s, clock
        self.epoch_totals: dict[str, int | None] = {}  # learner -> outer steps of the current meta-epoch
        self.epoch_rates: dict[str, _Rate] = {}
        self.interval = _Interval(log_every, every_s, clock)
        self.stage_started: dict[tuple[str, Any], float] = {}
        self.bar = PlainBar(self)

    def line(self, text: str) -> None:
        self.stream.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        self.stream.flush()

    @hookimpl
    def megatron_stage_start(self, stage: str, info: dict[str, Any]) -> None:
        learner = info.get("learner")
        self.stage_started[(stage, learner)] = self.clock()
        if stage == "meta_epoch":
            self.epoch_totals[learner] = info.get("steps")
            self.epoch_rates[learner] = _Rate(self.clock, info.get("steps"))
            self.interval.reset()
        self.line(f"[{stage}] start{f' {learner}' if learner else ''} {_info_text(info)}".rstrip())

    @hookimpl
    def megatron_stage_end(self, stage: str, info: dict[str, Any]) -> None:
        learner = info.get("learner")
        started = self.stage_started.pop((stage, learner), None)
        took = f" ({format_duration(self.clock() - started)})" if started is not None else ""
        self.line(f"[{stage}] end{f' {learner}' if learner else ''} {_info_text(info)}".rstrip() + took)

    @hookimpl
    def megatron_meta_step_end(self, learner: str, meta_epoch: int, step: int, stats: dict[str, float]) -> None:
        total = self.epoch_totals.get(learner)
        rate = self.epoch_rates.setdefault(learner, _Rate(self.clock, total))
        if step == 1:
            rate.text(step, stats.get("compute_spent"))  # the pass counter's first observation
        if not self.interval.due(step, total):
            return
        self.interval.reset()
        self.line(f"[meta_train] {learner} meta-epoch {meta_epoch} step {step}/{total if total else '?'} "
                  f"loss {stats.get('loss', float('nan')):.4f} {rate.text(step, stats.get('compute_spent'))}")

    @hookimpl
    def megatron_evaluation_end(self, learner: str, meta_epoch: int, split: str, metrics: dict[str, Any]) -> None:
        froc = metrics.get("FROC")
        self.line(f"[evaluate] {learner} meta-epoch {meta_epoch} {split}: mAP50 {100 * metrics.get('mAP50', float('nan')):.1f}%"
                  f" FROC {'-' if froc is None else f'{100 * froc:.1f}%'}")


class PlainBar:
    """The rich ``Progress`` calls stage 1 makes (``add_task`` / ``update`` / ``remove_task``), as step lines."""

    def __init__(self, owner: PlainProgress):
        self.owner = owner
        self.tasks: dict[int, dict[str, Any]] = {}

    def add_task(self, description: str, total: int | None = None, **_: Any) -> int:
        task_id = len(self.tasks) + 1
        self.tasks[task_id] = {"description": description, "total": total, "done": 0,
                               "rate": _Rate(self.owner.clock, total),
                               "interval": _Interval(self.owner.log_every, self.owner.every_s, self.owner.clock)}
        return task_id

    def update(self, task_id: int, advance: int = 0, description: str | None = None, **_: Any) -> None:
        task = self.tasks.get(task_id)
        if task is None:
            return
        task["done"] += advance
        if description is not None:
            task["description"] = description
        if advance and task["interval"].due(task["done"], task["total"]):
            task["interval"].reset()
            self.owner.line(f"[{task['description'].split()[0]}] step {task['done']}/{task['total'] or '?'} "
                            f"{task['description']} {task['rate'].text(task['done'])}")

    def remove_task(self, task_id: int) -> None:
        self.tasks.pop(task_id, None)
