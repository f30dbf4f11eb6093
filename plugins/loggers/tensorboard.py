"""The ``tensorboard`` logger: TensorBoard event files under the run directory.

One TensorBoard *run* per learner and kind of x-axis, so that learners overlay in one chart:

- ``<subdir>/<learner>/train``: per outer step (x = ``global_step``): ``train/loss`` and every other scalar the
  learner returns, ``train/compute_spent``, ``train/meta_epoch``.
- ``<subdir>/<learner>/eval``: per evaluation (x = meta-epoch): ``<split>/mAP50``, ``<split>/mAP50_95``,
  precision, recall, F1, the counts, and ``<split>/AP50/<class>`` per class — the mAP50-vs-meta-epoch curve of
  the meta-model and of the baseline in one chart; per meta-epoch also ``train/epoch_loss``.
- ``<subdir>/pretrain``: ``megatron pretrain``'s loss per optimiser step.

The run's config is written as text (tag ``config``) and a custom-scalars layout groups the mAP50 curves.
A resumed run purges the events after the point it resumed from, so the curves show each step once.

View with ``tensorboard --logdir runs/`` (or the run directory).
"""
from __future__ import annotations

import math
from numbers import Real
from pathlib import Path
from typing import Any, ClassVar, Mapping

from pydantic import Field

from megatron import hookimpl
from megatron.errors import PluginError
from megatron.api.logger import Logger, LoggerOptions


class TensorBoardOptions(LoggerOptions):
    subdir: str = Field("tensorboard", description="folder under the run directory for the event files (one sub-folder per learner)")
    flush_secs: int = Field(30, ge=1, description="seconds between writes of pending events to disk")
    per_class: bool = Field(True, description="also log each class's AP50 (`<split>/AP50/<class>`)")
    log_config: bool = Field(True, description="write the run's config as text (tag `config`)")


def _scalar(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class TensorBoardLogger(Logger):
    """Scalars per meta-step and per evaluation, the mAP50 curves and the config, as TensorBoard event files."""

    PLUGIN_NAME: ClassVar[str] = "tensorboard"
    Options: ClassVar[type[LoggerOptions]] = TensorBoardOptions

    def __init__(self, options: TensorBoardOptions | None, run_dir: Path):
        super().__init__(options, run_dir)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise PluginError(f"the tensorboard logger needs the tensorboard package ({exc}): pip install tensorboard") from None
        self._SummaryWriter = SummaryWriter
        self.root = self.run_dir / self.options.subdir
        self._writers: dict[str, Any] = {}
        self._config_text: str | None = None
        self._layout_written = False

    def _writer(self, run: str, step: int):
        """The writer of ``<subdir>/<run>``, created at its first event; a folder that already holds events (a
        resumed run) is purged from ``step`` on."""
        writer = self._writers.get(run)
        if writer is None:
            folder = self.root / run
            resumed = folder.is_dir() and any(folder.glob("events.out.tfevents.*"))
            writer = self._SummaryWriter(log_dir=str(folder), flush_secs=self.options.flush_secs,
                                         purge_step=step if resumed else None)
            self._writers[run] = writer
            if not self._layout_written:
                writer.add_custom_scalars({"megatron": {
                    "mAP50 per meta-epoch (held-out)": ["Multiline", [r"heldout/mAP50$"]],
                    "mAP50 per meta-epoch (validation)": ["Multiline", [r"validation/mAP50$"]],
                    "outer loss": ["Multiline", [r"train/loss$"]],
                }})
                self._layout_written = True
            if self._config_text is not None and run.endswith("/train"):
                writer.add_text("config", self._config_text, 0)
        return writer

    @hookimpl
    def megatron_run_start(self, config, run_dir):
        if not self.options.log_config:
            return
        try:
            from megatron.config import dump_config

            text = dump_config(config)
        except Exception:  # noqa: BLE001 - a config that is not ours: its repr will do
            text = repr(config)
        # four-space indent: TensorBoard renders text as markdown, and this keeps the YAML a code block
        self._config_text = "\n".join("    " + line for line in text.splitlines())

    @hookimpl
    def megatron_meta_step_end(self, learner, meta_epoch, step, stats):
        global_step = int(stats.get("global_step", step))
        writer = self._writer(f"{learner}/train", global_step)
        for key, value in stats.items():
            if key == "global_step":
                continue
            v = _scalar(value)
            if v is not None:
                writer.add_scalar(f"train/{key}", v, global_step)
        writer.add_scalar("train/meta_epoch", meta_epoch, global_step)

    @hookimpl
    def megatron_stage_end(self, stage, info):
        if stage == "meta_epoch" and _scalar(info.get("train_loss")) is not None:
            # x = meta-epoch, like the evaluations: it lives in the eval run
            meta_epoch = int(info["meta_epoch"])
            self._writer(f"{info['learner']}/eval", meta_epoch).add_scalar("train/epoch_loss", float(info["train_loss"]), meta_epoch)

    @hookimpl
    def megatron_evaluation_end(self, learner, meta_epoch, split, metrics):
        writer = self._writer(f"{learner}/eval", meta_epoch)
        for key, value in metrics.items():
            v = _scalar(value)
            if v is not None:
                writer.add_scalar(f"{split}/{key}", v, meta_epoch)
        if self.options.per_class:
            for cls, value in (metrics.get("per_class_AP50") or {}).items():
                v = _scalar(value)
                if v is not None:
                    writer.add_scalar(f"{split}/AP50/{cls}", v, meta_epoch)
        writer.flush()  # evaluations are rare and what people wait for

    def log_scalars(self, section: str, step: int, scalars: Mapping[str, float]) -> None:
        writer = self._writer(section, step)
        for key, value in scalars.items():
            v = _scalar(value)
            if v is not None:
                writer.add_scalar(f"{section}/{key}", v, step)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


@hookimpl
def megatron_register_loggers() -> list[type]:
    return [TensorBoardLogger]
