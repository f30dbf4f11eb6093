"""The ``csv`` logger: one row per outer step and one per evaluation, in plain CSV files a spreadsheet opens.

Files under ``<run_dir>/<subdir>/``:

- ``steps.csv``: ``learner, meta_epoch, step, global_step, compute_spent, loss`` and a column for every other
  scalar a learner returns (e.g. ``support_loss``), one row per outer step of every learner;
- ``evaluations.csv``: ``learner, meta_epoch, split`` and every scalar metric of the evaluation (``mAP50``,
  ``mAP50_95``, ``precision``, ``recall``, ``F1``, the counts and thresholds; with ``per_class: true`` also
  ``AP50/<class>``), one row per evaluation;
- ``pretrain.csv``: ``megatron pretrain``'s loss per optimiser step.

Rows are flushed as they are written. A column that first appears later (another learner's statistics) rewrites
the file with the wider header. A resumed run drops the rows logged after the point it resumed from before
writing again, so every step and evaluation appears once.
"""
from __future__ import annotations

import csv
import math
from numbers import Real
from pathlib import Path
from typing import Any, ClassVar, Mapping

from pydantic import Field

from megatron import hookimpl
from megatron.api.logger import Logger, LoggerOptions


class CSVOptions(LoggerOptions):
    subdir: str = Field("csv", description="folder under the run directory for steps.csv and evaluations.csv")
    per_class: bool = Field(False, description="add an `AP50/<class>` column per class to evaluations.csv")


def _cell(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class _Table:
    """One CSV file: fixed leading columns, more added as they appear; rows kept for rewrites."""

    def __init__(self, path: Path, lead: list[str]):
        self.path = path
        self.columns = list(lead)
        self.rows: list[dict[str, Any]] = []
        self._fh = None
        if path.exists():  # a resumed run: keep what was logged, the caller drops what is replayed
            with path.open(newline="") as fh:
                reader = csv.DictReader(fh)
                self.columns = list(reader.fieldnames or self.columns)
                self.rows = [dict(r) for r in reader]

    def drop(self, keep) -> None:
        before = len(self.rows)
        self.rows = [r for r in self.rows if keep(r)]
        if len(self.rows) != before:
            self._rewrite()

    def add(self, row: dict[str, Any]) -> None:
        new = [k for k in row if k not in self.columns]
        self.rows.append(row)
        if new or self._fh is None and not self.path.exists():
            self.columns += new
            self._rewrite()
            return
        if self._fh is None:
            self._fh = self.path.open("a", newline="")
        csv.DictWriter(self._fh, self.columns).writerow(row)
        self._fh.flush()

    def _rewrite(self) -> None:
        self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)
        self._fh = self.path.open("a", newline="")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return default


class CSVLogger(Logger):
    """One CSV row per outer step (``steps.csv``) and per evaluation (``evaluations.csv``)."""

    PLUGIN_NAME: ClassVar[str] = "csv"
    Options: ClassVar[type[LoggerOptions]] = CSVOptions

    def __init__(self, options: CSVOptions | None, run_dir: Path):
        super().__init__(options, run_dir)
        self.folder = self.run_dir / self.options.subdir
        self._tables: dict[str, _Table] = {}
        self._seen: set[tuple[str, str]] = set()  # (file, learner) already written by this process

    def _table(self, name: str, lead: list[str]) -> _Table:
        if name not in self._tables:
            self._tables[name] = _Table(self.folder / f"{name}.csv", lead)
        return self._tables[name]

    @hookimpl
    def megatron_meta_step_end(self, learner, meta_epoch, step, stats):
        table = self._table("steps", ["learner", "meta_epoch", "step", "global_step", "compute_spent", "loss"])
        global_step = _int(stats.get("global_step", step))
        if ("steps", learner) not in self._seen:  # first step of this learner here: drop what a resume replays
            self._seen.add(("steps", learner))
            table.drop(lambda r: r.get("learner") != learner or _int(r.get("global_step")) < global_step)
        row = {"learner": learner, "meta_epoch": meta_epoch, "step": step}
        row.update({k: _cell(v) for k, v in stats.items()})
        table.add(row)

    @hookimpl
    def megatron_evaluation_end(self, learner, meta_epoch, split, metrics):
        table = self._table("evaluations", ["learner", "meta_epoch", "split"])
        if ("evaluations", learner) not in self._seen:
            self._seen.add(("evaluations", learner))
            table.drop(lambda r: r.get("learner") != learner or _int(r.get("meta_epoch")) < meta_epoch)
        row: dict[str, Any] = {"learner": learner, "meta_epoch": meta_epoch, "split": split}
        for key, value in metrics.items():
            if _cell(value) is not None:
                row[key] = _cell(value)
        if self.options.per_class:
            for cls, value in (metrics.get("per_class_AP50") or {}).items():
                row[f"AP50/{cls}"] = _cell(value)
        table.add(row)

    def log_scalars(self, section: str, step: int, scalars: Mapping[str, float]) -> None:
        table = self._table(section, ["step"])
        if (section, "") not in self._seen:
            self._seen.add((section, ""))
            table.drop(lambda r: _int(r.get("step")) < step)
        table.add({"step": step, **{k: _cell(v) for k, v in scalars.items()}})

    def close(self) -> None:
        for table in self._tables.values():
            table.close()


@hookimpl
def megatron_register_loggers() -> list[type]:
    return [CSVLogger]
