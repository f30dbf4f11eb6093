"""The built-in recorder: a lifecycle plugin that writes the run directory's files (as mmengine's
``CheckpointHook``/``LoggerHook`` do the side work of its loop).

- ``megatron_run_start``: ``config.yaml`` (the effective config);
- ``megatron_record_update``: ``run.json``, atomically, every time the record changes;
- ``megatron_run_end``: ``summary.md`` and the plots (``map50_curve.png``, ``train_loss.png``, ``froc_curve.png``).

The runner registers it for the run's duration on rank 0 only, so other ranks write nothing; a third-party
logger implementing the same hooks sees exactly what it sees.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from megatron import hookimpl
from megatron.atomic_io import atomic_write_text
from megatron.config import dump_config
from megatron.training.record import CONFIG_FILE, CURVE_FILE, FROC_FILE, SUMMARY_FILE, summary_markdown, write_record
from megatron.training import plots

log = logging.getLogger(__name__)

RECORDER_PLUGIN_NAME = "megatron.recorder"


class RunRecorder:
    """Writes ``config.yaml``, ``run.json``, ``summary.md`` and the plots of one run."""

    def __init__(self, plots: bool = True):
        self.plots = plots

    @hookimpl
    def megatron_run_start(self, config: Any, run_dir: Path) -> None:
        atomic_write_text(Path(run_dir) / CONFIG_FILE, dump_config(config))

    @hookimpl
    def megatron_record_update(self, run_dir: Path, record: dict[str, Any]) -> None:
        write_record(Path(run_dir), record)

    @hookimpl
    def megatron_run_end(self, run_dir: Path, record: dict[str, Any]) -> None:
        run_dir = Path(run_dir)
        atomic_write_text(run_dir / SUMMARY_FILE, summary_markdown(record))
        if not self.plots:
            return

        plots.plot_map50_curve(record, run_dir / CURVE_FILE)
        plots.plot_train_loss(record, run_dir / "train_loss.png")
        plots.plot_froc(record, run_dir / FROC_FILE)  # nothing when no evaluation has a FROC curve
