"""Configurable lifecycle plugins: loggers (TensorBoard, CSV, your own).

A logger is a class with a ``PLUGIN_NAME`` and an ``Options`` pydantic model (``extra="forbid"``), registered
through the ``megatron_register_loggers`` hook. Its instance implements lifecycle hooks as ``@hookimpl``
methods. A logger does nothing until a run switches it on, in the config::

    loggers:
      - name: tensorboard
        options: {flush_secs: 10}
      - csv                      # shorthand for {name: csv} (default options)

or on the command line (``megatron run --logger tensorboard --logger csv``; ``benchmark`` and ``pretrain``
take ``--logger`` too). The run (:func:`megatron.training.run_loggers.active_loggers`) validates the options
(errors name the key path, e.g. ``loggers.0.options.flush_secs``), builds one instance per entry, registers the
instances with the plugin manager for the run's duration and unregisters and closes them afterwards, failed run
or not.

A plain ``@hookimpl`` lifecycle function in an installed plugin module keeps working (it is called in every
run), but it has no options and no switch: write a :class:`Logger` instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Mapping

from pydantic import BaseModel, ConfigDict


class LoggerOptions(BaseModel):
    """Options every logger understands; a plugin subclasses this to add its own (``extra='forbid'``)."""

    model_config = ConfigDict(extra="forbid")


class Logger:
    """Abstract logger: one instance per run (per ``loggers:`` entry), living in ``run_dir``.

    Subclasses set ``PLUGIN_NAME`` and ``Options`` and implement any lifecycle hook as a method decorated
    with ``@megatron.hookimpl`` (``megatron_run_start``, ``megatron_stage_start``, ``megatron_stage_end``,
    ``megatron_meta_step_end``, ``megatron_evaluation_end``, ``megatron_record_update``,
    ``megatron_run_end``; pages in ``registry_docs/hooks/``). Open files lazily or in ``__init__``; close
    them in :meth:`close`, which megatron calls once when the run ends, successfully or not.
    """

    PLUGIN_NAME: ClassVar[str]
    Options: ClassVar[type[LoggerOptions]] = LoggerOptions

    def __init__(self, options: LoggerOptions | None, run_dir: Path):
        self.options = options if options is not None else self.Options()
        self.run_dir = Path(run_dir)

    def log_scalars(self, section: str, step: int, scalars: Mapping[str, float]) -> None:
        """Scalars from work that has no lifecycle hook of its own (``megatron pretrain``'s loss per optimiser
        step: ``section="pretrain"``). Default: ignored."""

    def close(self) -> None:
        """Flush and close what the logger opened. Called once, at the end of the run (failed or not)."""
