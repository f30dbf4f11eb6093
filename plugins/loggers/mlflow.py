"""The ``mlflow`` logger: the run in an MLflow tracking store (the tracker medical-imaging groups use with MONAI).

One MLflow run per megatron run (``run_name`` = the run directory's name), in experiment ``experiment``:

- **params**: the resolved config, flattened to dotted keys (``training.outer_lr`` …);
- **metrics**: per outer step ``<learner>/train/<stat>`` (``loss``, ``compute_spent``, every scalar the learner
  returns) at step = the learner's ``global_step``; per evaluation ``<learner>/<split>/<metric>`` (``mAP50``,
  ``FROC`` …) and per meta-epoch ``<learner>/train/epoch_loss`` at step = the meta-epoch; ``pretrain/<key>``
  for ``megatron pretrain``;
- **artifacts** at the end: ``run.json``, ``summary.md``, ``config.yaml``, the plots and ``models/*-best.pth``;
- **tags**: learner(s), detector, seed, target and source datasets, megatron version, the run directory.

A resumed run (``--resume``) continues the same MLflow run (found by its ``megatron.run_dir`` tag) and skips
the points already logged, so every step appears once. In a benchmark (the run directory is a cell of a
``megatron benchmark`` folder) the cells are nested runs of one parent run per grid.

mlflow is an optional dependency (``pip install 'megatron[mlflow]'``), imported when the logger starts.
Browse: ``mlflow ui --backend-store-uri sqlite:///runs/mlruns/mlflow.db`` (the default store of runs in ``runs/``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from numbers import Real
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping

from pydantic import Field

from megatron import __version__, hookimpl
from megatron.api.logger import Logger, LoggerOptions
from megatron.errors import PluginError
from megatron.training.run_files import CONFIG_FILE, CURVE_FILE, FROC_FILE, RECORD_FILE, SUMMARY_FILE

MLFLOW_EXTRA = "pip install 'megatron[mlflow]'"
#: the default store: this folder beside the run directories, holding a SQLite database and the artifacts (MLflow 3
#: keeps its plain-folder file store in maintenance mode and refuses it unless MLFLOW_ALLOW_FILE_STORE=true)
DEFAULT_STORE_DIR = "mlruns"
DEFAULT_DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
#: the tag a run is found by again on resume, and the one a benchmark's parent run is found by
RUN_DIR_TAG = "megatron.run_dir"
BENCHMARK_TAG = "megatron.benchmark_dir"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests a run under this one
#: a benchmark folder is recognised by this file beside its ``cells/`` folder (megatron.benchmark.grid)
BENCHMARK_FILE = "benchmark.json"
CELLS_DIR = "cells"
#: metrics are sent in batches of this many points (one store write each)
BATCH = 200
#: MLflow's limit on a parameter's value
PARAM_VALUE_LIMIT = 6000
PLOT_FILES = (CURVE_FILE, FROC_FILE, "train_loss.png")


class MLflowOptions(LoggerOptions):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI: `sqlite:///…/mlflow.db`, `http://host:5000`, `file:///…/mlruns` "
        "(MLflow's file store: needs MLFLOW_ALLOW_FILE_STORE=true since MLflow 3). Default: "
        "`sqlite:///<output.dir>/mlruns/mlflow.db`, artifacts in `<output.dir>/mlruns/artifacts/`")
    experiment: str = Field("megatron", description="MLflow experiment the runs go to (created when missing)")
    artifacts: bool = Field(True, description="upload run.json, summary.md, config.yaml, the plots and "
                            "models/*-best.pth at the end of the run")


def import_mlflow() -> Any:
    try:
        import mlflow  # optional dependency (megatron[mlflow]): only this logger needs it
        from mlflow.tracking import MlflowClient  # noqa: F401 - the client is what the logger uses
    except ImportError:
        raise PluginError(f"the mlflow logger needs mlflow, which is not installed: {MLFLOW_EXTRA}") from None
    return mlflow


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists as JSON; values cut to MLflow's limit."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    text = json.dumps(data, default=str) if isinstance(data, (list, tuple)) else str(data)
    out[prefix[:-1]] = text if len(text) <= PARAM_VALUE_LIMIT else text[:PARAM_VALUE_LIMIT - 3] + "..."
    return out


def _scalar(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def metric_key(*parts: str) -> str:
    """An MLflow metric name (letters, digits, ``_ - . / : space``; other characters become ``_``)."""
    return re.sub(r"[^\w\-./: ]", "_", "/".join(parts))


def benchmark_of(run_dir: Path) -> Path | None:
    """The ``megatron benchmark`` folder whose cell ``run_dir`` is, if it is one."""
    run_dir = Path(run_dir).resolve()
    bench = run_dir.parent.parent
    return bench if run_dir.parent.name == CELLS_DIR and (bench / BENCHMARK_FILE).exists() else None


def default_tracking_uri(run_dir: Path) -> str:
    """``sqlite:///<runs>/mlruns/mlflow.db``: a store in a folder beside the run directories (a benchmark's:
    ``OUT/mlruns/``, beside its ``cells/``)."""
    folder = (benchmark_of(run_dir) or Path(run_dir).resolve().parent) / DEFAULT_STORE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / DEFAULT_DB_FILE}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of a local SQLite store keeps its artifacts: beside the database (MLflow's own
    default is ``./mlruns`` under whatever folder the process runs in); ``None``: the store decides."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / ARTIFACTS_DIR).as_uri()


def open_store(uri: str) -> Any:
    """A client of the tracking store at ``uri``, checked by a query; a store that cannot be opened is an error
    naming the URI and the reason."""
    import_mlflow()
    from mlflow.tracking import MlflowClient  # optional dependency (megatron[mlflow]), imported above

    try:
        with _creating(uri):
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds (MlflowException, sqlalchemy, OSError)
        reason = " ".join(str(exc).split())[:600] or type(exc).__name__
        raise PluginError(f"mlflow: cannot open the tracking URI {uri!r}: {reason}. Give a writable "
                          "loggers[].options.tracking_uri: sqlite:///path/mlflow.db, a tracking server's http(s):// "
                          "address, or file:///path/mlruns with MLFLOW_ALLOW_FILE_STORE=true") from None
    return client


@contextlib.contextmanager
def exclusive(lock: Path, wait_s: float = 120.0) -> Iterator[None]:
    """Hold ``lock`` (a file created exclusively) for the body; waits while another process holds it, and takes
    over a lock older than ``wait_s`` (its holder died). Works on the shared filesystems of clusters."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            if time.monotonic() > deadline:
                lock.unlink(missing_ok=True)
            time.sleep(0.2)
    try:
        yield
    finally:
        os.close(fd)
        lock.unlink(missing_ok=True)


def _creating(uri: str) -> Any:
    """A local SQLite store that does not exist yet is created (MLflow's schema migrations) by one process at a
    time: benchmark cells starting together would otherwise migrate one database twice."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    db = Path(uri[len("sqlite:///"):])
    if db.exists() or not db.parent.is_dir():
        return contextlib.nullcontext()  # migrated already (or MLflow's own error for a missing folder)
    return exclusive(db.with_name(db.name + ".creating.lock"))


class MLflowLogger(Logger):
    """Params, metrics, artifacts and tags of a run in an MLflow tracking store (module docstring)."""

    PLUGIN_NAME: ClassVar[str] = "mlflow"
    Options: ClassVar[type[LoggerOptions]] = MLflowOptions

    def __init__(self, options: MLflowOptions | None, run_dir: Path):
        super().__init__(options, run_dir)
        self.tracking_uri = self.options.tracking_uri or default_tracking_uri(self.run_dir)
        self.client = open_store(self.tracking_uri)
        self.run_id: str | None = None
        self.logged_up_to: dict[str, int] = {}  # metric -> last step in the store (a resumed run skips up to it)
        self.pending: list[Any] = []
        self.finished = False

    # --- the run ----------------------------------------------------------------------------------------------
    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.options.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.options.experiment,
                                                 artifact_location=artifact_location(self.tracking_uri))
        except Exception:  # noqa: BLE001 - another process created it first
            return self.client.get_experiment_by_name(self.options.experiment).experiment_id

    def _find_run(self, experiment_id: str, tag: str, value: str) -> Any | None:
        escaped = value.replace("'", "\\'")
        runs = self.client.search_runs([experiment_id], filter_string=f"tags.`{tag}` = '{escaped}'", max_results=1)
        return runs[0] if runs else None

    @hookimpl
    def megatron_run_start(self, config, run_dir):
        experiment_id = self._experiment_id()
        key = str(Path(run_dir).resolve())
        existing = self._find_run(experiment_id, RUN_DIR_TAG, key)
        tags = {RUN_DIR_TAG: key, **run_tags(config)}
        parent = self._benchmark_parent(experiment_id, Path(run_dir))
        if parent is not None:
            tags[PARENT_TAG] = parent
        if existing is None:
            run = self.client.create_run(experiment_id, run_name=Path(run_dir).name, tags=tags)
            self.run_id = run.info.run_id
            known: dict[str, str] = {}
        else:  # a resumed run continues its MLflow run
            self.run_id = existing.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            known = dict(existing.data.params)
            self.logged_up_to = self._logged_steps(existing)
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, v)
        self._log_params(flatten(config.model_dump(mode="json")), known)

    def _logged_steps(self, run: Any) -> dict[str, int]:
        return {key: max(m.step for m in self.client.get_metric_history(self.run_id, key))
                for key in run.data.metrics}

    def _log_params(self, params: dict[str, str], known: dict[str, str]) -> None:
        """MLflow params cannot change: a resumed run logs only those it has not (its resume-free keys, e.g.
        output paths, keep their first values)."""
        from mlflow.entities import Param  # optional dependency (megatron[mlflow]), present once the logger runs

        new = [Param(k, v) for k, v in params.items() if k not in known]
        for i in range(0, len(new), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def _benchmark_parent(self, experiment_id: str, run_dir: Path) -> str | None:
        """In a benchmark cell, the grid's parent run (created by the first cell to get here)."""
        bench = benchmark_of(run_dir)
        if bench is None:
            return None
        store = hashlib.sha1(f"{self.tracking_uri}\n{self.options.experiment}".encode()).hexdigest()[:12]
        # cells in parallel (workers, job arrays): the first creates the parent, the others find it
        with exclusive(bench / f".mlflow-parent-{store}.lock"):
            found = self._find_run(experiment_id, BENCHMARK_TAG, str(bench))
            return found.info.run_id if found is not None else self._create_parent(experiment_id, bench)

    def _create_parent(self, experiment_id: str, bench: Path) -> str:
        info = json.loads((bench / BENCHMARK_FILE).read_text())
        run = self.client.create_run(experiment_id, run_name=f"benchmark {bench.name}", tags={
            BENCHMARK_TAG: str(bench), "megatron.version": __version__, "megatron.kind": "benchmark",
            "mlflow.note.content": info.get("description") or ""})
        from mlflow.entities import Param  # optional dependency (megatron[mlflow])

        params = [Param(k, v) for k, v in flatten({"grid": info.get("grid") or {}, "budget": info.get("budget"),
                                                   "n_cells": info.get("n_cells")}).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(run.info.run_id, params=params[i:i + 100])
        self.client.set_terminated(run.info.run_id, "FINISHED")  # a container: the cells are the runs
        return run.info.run_id

    # --- metrics ------------------------------------------------------------------------------------------------
    def _metric(self, key: str, value: Any, step: int) -> None:
        from mlflow.entities import Metric  # optional dependency (megatron[mlflow])

        v = _scalar(value)
        if v is None or self.run_id is None or step <= self.logged_up_to.get(key, -1):
            return
        self.pending.append(Metric(key, v, int(time.time() * 1000), int(step)))
        if len(self.pending) >= BATCH:
            self.flush()

    def flush(self) -> None:
        if self.pending and self.run_id is not None:
            self.client.log_batch(self.run_id, metrics=self.pending)
        self.pending = []

    @hookimpl
    def megatron_meta_step_end(self, learner, meta_epoch, step, stats):
        global_step = int(stats.get("global_step", step))
        for key, value in stats.items():
            if key != "global_step":
                self._metric(metric_key(learner, "train", key), value, global_step)

    @hookimpl
    def megatron_stage_end(self, stage, info):
        if stage == "meta_epoch":
            self._metric(metric_key(info["learner"], "train", "epoch_loss"), info.get("train_loss"), int(info["meta_epoch"]))

    @hookimpl
    def megatron_evaluation_end(self, learner, meta_epoch, split, metrics):
        for key, value in metrics.items():
            self._metric(metric_key(learner, split, key), value, meta_epoch)
        for cls, value in (metrics.get("per_class_AP50") or {}).items():
            self._metric(metric_key(learner, split, "AP50", str(cls)), value, meta_epoch)
        self.flush()  # evaluations are rare and what people wait for

    def log_scalars(self, section: str, step: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self._metric(metric_key(section, key), value, step)

    # --- the end ------------------------------------------------------------------------------------------------
    @hookimpl
    def megatron_run_end(self, run_dir, record):
        self.flush()
        if self.options.artifacts:
            self._log_artifacts(Path(run_dir), record)
        self.client.set_terminated(self.run_id, "FINISHED")
        self.finished = True

    def _log_artifacts(self, run_dir: Path, record: dict) -> None:
        for name in (RECORD_FILE, SUMMARY_FILE, CONFIG_FILE):
            if (run_dir / name).exists():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        for name in PLOT_FILES:
            if (run_dir / name).exists():
                self.client.log_artifact(self.run_id, str(run_dir / name), artifact_path="plots")
        for path in sorted((run_dir / "models").glob("*-best.pth")):
            self.client.log_artifact(self.run_id, str(path), artifact_path="models")

    def close(self) -> None:
        if self.run_id is None:
            return
        self.flush()
        if not self.finished:  # the run failed or was interrupted: the store says so
            self.client.set_terminated(self.run_id, "FAILED")


def run_tags(config: Any) -> dict[str, str]:
    """What a run is, as tags to filter by: learner, detector, seed, datasets, megatron version."""
    data = config.data
    datasets = [d.plugin for d in data.datasets]
    return {
        "megatron.version": __version__,
        "learner": config.learner.name,
        "detector": config.detector.name,
        "seed": str(config.seed),
        "target": str(data.target),
        "sources": ",".join(data.sources) if data.sources is not None else "all",
        "datasets": ",".join(datasets),
    }


@hookimpl
def megatron_register_loggers() -> list[type]:
    return [MLflowLogger]
