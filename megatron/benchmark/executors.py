"""Where a benchmark's cells run, behind one interface: :meth:`CellExecutor.run` takes the cells still to do and
reports each one's outcome (``None`` or the error) to a callback, which writes it the same way for every executor.

- ``local`` (:class:`LocalPool`, the default): this process, or a spawn-context process pool with ``workers > 1``
  (each process ``cores // workers`` torch threads).
- ``slurm`` (:class:`SubmititCells` through submitit's ``SlurmExecutor``): the cells as one SLURM job array,
  submitted into ``<out>/submitit/`` (pickled jobs, sbatch files, each job's stdout/stderr); waits for them, or
  returns at once with ``wait=False`` (``megatron report OUT`` later).
- ``submitit-local``: the same submitit path with submitit's ``LocalExecutor`` (jobs are processes on this
  machine) — what the tests use.

A submitit job that ends without a result (pre-empted, a node fault, killed, out of time) is resubmitted, at most
``max_resubmits`` times; as cells resume from their checkpoints, the new job goes on where the old one stopped.
A cell that raised is a failed cell (its error in ``error.txt``), not resubmitted: it would fail again.

submitit is an optional dependency (``pip install 'megatron[slurm]'``), imported only by the submitit executors.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from megatron.atomic_io import atomic_write_json
from megatron.config import ExperimentConfig
from megatron.errors import ConfigError
from megatron.training.run_files import ERROR_FILE, RECORD_FILE

log = logging.getLogger(__name__)

EXECUTOR_NAMES = ("local", "submitit-local", "slurm")
ExecutorName = Literal["local", "submitit-local", "slurm"]
#: the submitit job folder under the benchmark's --out folder
SUBMITIT_DIR = "submitit"
#: what a submitted array is remembered by (``megatron report`` needs nothing of it; a person checking on jobs does)
JOBS_FILE = "jobs.json"
SLURM_EXTRA = "pip install 'megatron[slurm]'"
LOCAL_RESULT_WAIT_S = 1
#: SLURM job states in which a job may still write its cell
ACTIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                       "REQUEUE_HOLD", "REQUEUE_FED", "STAGE_OUT", "SIGNALING"}

#: (cell id, error or None when the cell completed)
CellDone = Callable[[str, "str | None"], None]


class SlurmOptions(BaseModel):
    """The ``executor.slurm`` section of a benchmark file (each key also a ``--slurm-*`` option)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    partition: str | None = Field(None, description="SLURM partition (default: the cluster's default partition)")
    gpus_per_cell: int = Field(1, ge=0, description="GPUs each cell's job asks for")
    cpus_per_cell: int = Field(8, ge=1, description="CPU cores each cell's job asks for")
    time: int = Field(240, ge=1, description="time limit of each cell's job in minutes (`--slurm-time` also takes "
                      "H:MM:SS); a cell that runs out is resubmitted and resumes from its checkpoint")
    array_parallelism: int = Field(32, ge=1, description="how many cells of the array run at once")
    max_resubmits: int = Field(2, ge=0, description="resubmissions of a cell whose job ended without a result "
                               "(pre-empted, node fault, killed, out of time)")
    poll_s: float = Field(15.0, gt=0, description="seconds between checks on the jobs while waiting")

    @field_validator("time", mode="before")
    @classmethod
    def _clock_time(cls, v: Any) -> Any:
        return parse_slurm_time(v) if isinstance(v, str) else v


class ExecutorSpec(BaseModel):
    """The ``executor`` section of a benchmark file: where the cells run (``--executor`` overrides ``name``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ExecutorName = Field("local", description="local (process pool) | submitit-local | slurm")
    slurm: SlurmOptions = Field(default_factory=SlurmOptions)


def parse_slurm_time(text: str) -> int:
    """Whole minutes (rounded up) from SLURM's time forms: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``,
    ``D-HH:MM``, ``D-HH:MM:SS``."""
    m = re.fullmatch(r"\s*(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?\s*", str(text))
    if not m:
        raise ValueError(f"{text!r}: expected minutes (e.g. 240) or SLURM's [D-]HH:MM:SS (e.g. 4:00:00)")
    days, fields = m.group(1), [int(x) for x in m.groups()[1:] if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (fields + [0, 0])[:3]
    elif len(fields) == 3:
        hours, minutes, seconds = fields
    else:  # MM[:SS]
        hours, (minutes, seconds) = 0, (fields + [0])[:2]
    total_s = ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds
    return max(1, -(-total_s // 60))


@dataclass(frozen=True)
class CellJob:
    """One cell to run: its config, where it writes, and whether it resumes a killed run."""

    cell_id: str
    cfg_json: dict
    run_dir: str
    resume: bool


class CellExecutor(Protocol):
    name: str

    def run(self, jobs: list[CellJob], done: CellDone) -> None:
        """Run ``jobs``, calling ``done(cell_id, error_or_None)`` as each ends (not for jobs left running)."""


# ------------------------------------------------------------------------------------------------ one cell
def set_threads(n_threads: int) -> None:
    """Pin this (worker) process to ``n_threads`` so parallel cells do not oversubscribe the cores."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n_threads)
    import torch  # a pool worker's start: torch is imported where the cell runs

    torch.set_num_threads(n_threads)


def run_cell(runner: Callable[..., dict], job: CellJob, pm=None, prune: bool = False) -> dict:
    """Run one cell (in this process, a worker or a submitit job); returns its record, also written to
    ``run_dir/run.json``. ``prune``: delete the cell's checkpoints once it is complete (never resumed again)."""
    cfg = ExperimentConfig.model_validate(job.cfg_json)
    run_dir = Path(job.run_dir)
    t0 = time.perf_counter()
    record = dict(runner(cfg, run_dir, pm=pm, resume=job.resume, progress=False))
    record.setdefault("wall_s", time.perf_counter() - t0)
    atomic_write_json(run_dir / RECORD_FILE, record)
    (run_dir / ERROR_FILE).unlink(missing_ok=True)  # an earlier failure of this cell is history now
    if prune and record.get("status") == "complete":
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return record


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def submitted_cell(runner: Callable[..., dict], job: CellJob, prune: bool) -> str | None:
    """The function a submitit job runs: the cell, and its error as text (``None``: complete). A cell that raises
    is a result, not a job failure, so submitit's "no result" means only that the job itself died."""
    try:
        run_cell(runner, job, None, prune)
    except Exception as exc:  # the cell failed; the job did its work
        log.error("cell %s failed", job.cell_id, exc_info=True)
        return error_text(exc)
    return None


# ----------------------------------------------------------------------------------------------------- local
class LocalPool:
    """Today's executor: the cells one after the other in this process, or in a process pool."""

    name = "local"

    def __init__(self, runner: Callable[..., dict], *, workers: int = 1, cores: int | None = None, pm=None,
                 prune: bool = False, on_start: Callable[[str], None] | None = None):
        if workers < 1:
            raise ConfigError("--workers must be at least 1")
        self.runner, self.workers, self.cores, self.pm, self.prune = runner, workers, cores, pm, prune
        self.on_start = on_start or (lambda cell_id: None)

    def run(self, jobs: list[CellJob], done: CellDone) -> None:
        if self.workers == 1 or len(jobs) <= 1:
            for job in jobs:
                self.on_start(job.cell_id)
                try:
                    run_cell(self.runner, job, self.pm, self.prune)
                except Exception as exc:  # one broken cell must not lose the rest of the grid
                    done(job.cell_id, error_text(exc))
                else:
                    done(job.cell_id, None)
            return
        threads = max(1, (self.cores or os.cpu_count() or 1) // self.workers)
        with cf.ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=set_threads, initargs=(threads,)) as pool:
            futures = {pool.submit(run_cell, self.runner, job, None, self.prune): job for job in jobs}
            for fut in cf.as_completed(futures):
                try:
                    fut.result()
                except Exception as exc:  # a worker's error must not lose the other cells
                    done(futures[fut].cell_id, error_text(exc))
                else:
                    done(futures[fut].cell_id, None)


# -------------------------------------------------------------------------------------------------- submitit
def import_submitit() -> Any:
    try:
        import submitit  # optional dependency (megatron[slurm]): only the submitit executors need it
    except ImportError:
        raise ConfigError(f"--executor slurm / submitit-local need submitit, which is not installed: {SLURM_EXTRA} "
                          "(or run the cells with --executor local, or split them over machines with --shard I/N)") from None
    return submitit


def check_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise ConfigError("--executor slurm: there is no `sbatch` on this machine (not a SLURM login node, or SLURM "
                          "is not on PATH). Run it on the cluster's login node; here use --executor submitit-local "
                          "(the same jobs as processes on this machine) or --executor local, or split the grid over "
                          "machines by hand with --shard I/N and merge with `megatron report DIR1 DIR2 ...`")


class SubmititCells:
    """The cells as one submitit job array (SLURM, or submitit's local executor), waited on and resubmitted when a
    job dies without a result (module docstring)."""

    def __init__(self, kind: Literal["slurm", "local"], folder: Path, runner: Callable[..., dict],
                 options: SlurmOptions, *, prune: bool = False, wait: bool = True,
                 on_start: Callable[[str], None] | None = None):
        self.name = "slurm" if kind == "slurm" else "submitit-local"
        self.kind, self.folder, self.runner, self.options = kind, Path(folder), runner, options
        self.prune, self.wait = prune, wait
        self.on_start = on_start or (lambda cell_id: None)
        self.submitit = import_submitit()
        if kind == "slurm":
            check_sbatch()
        self.resubmits: dict[str, int] = {}
        self.job_ids: dict[str, str] = {}

    def executor(self) -> Any:
        o = self.options
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.kind == "slurm":
            ex = self.submitit.AutoExecutor(folder=self.folder / "%j", cluster="slurm")
            ex.update_parameters(name="megatron-cell", timeout_min=o.time, gpus_per_node=o.gpus_per_cell,
                                 cpus_per_task=o.cpus_per_cell, tasks_per_node=1, nodes=1,
                                 slurm_array_parallelism=o.array_parallelism,
                                 **({"slurm_partition": o.partition} if o.partition else {}))
        else:
            ex = self.submitit.LocalExecutor(folder=self.folder / "%j")
            ex.update_parameters(timeout_min=o.time)  # gpus: the local executor would hide the GPUs beyond them
        return ex

    def submit(self, jobs: list[CellJob]) -> list[tuple[CellJob, Any]]:
        """The jobs as one array; a submission sbatch refuses is an error with sbatch's whole message."""
        try:
            submitted = self.executor().map_array(submitted_cell, [self.runner] * len(jobs), jobs,
                                                  [self.prune] * len(jobs))
        except self.submitit.core.utils.FailedJobError as exc:
            where = f" (partition {self.options.partition!r})" if self.options.partition else ""
            raise ConfigError(f"--executor {self.name}: sbatch refused the job array{where}:\n{exc}\n"
                              "Fix the --slurm-* options (or the benchmark file's executor.slurm section); "
                              "`sinfo -s` lists the partitions") from None
        for job, sjob in zip(jobs, submitted):
            self.job_ids[job.cell_id] = str(sjob.job_id)
            if self.kind == "local":
                # submitit waits this long for a finished job's result file (for slow shared filesystems); a local
                # job's files are on this machine, so a killed job is known at once
                sjob._results_timeout_s = LOCAL_RESULT_WAIT_S
            self.on_start(job.cell_id)
        self._write_jobs_file()
        log.info("submitted %d cell(s) as %s job array %s into %s", len(jobs), self.name,
                 submitted[0].job_id.split("_")[0] if submitted else "-", self.folder)
        return list(zip(jobs, submitted))

    def _refuse_cells_still_running(self, jobs: list[CellJob]) -> None:
        """Cells whose job of an earlier submission (``--no-wait``) is still queued or running are not submitted
        twice: two jobs would write one cell folder at once."""
        try:
            earlier = json.loads((self.folder / JOBS_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return
        wanted = {job.cell_id for job in jobs}
        busy = {cid: jid for cid, jid in (earlier.get("jobs") or {}).items()
                if cid in wanted and self._job_active(str(jid))}
        if busy:
            listed = ", ".join(f"{cid} (job {jid})" for cid, jid in sorted(busy.items())[:5])
            more = f" and {len(busy) - 5} more" if len(busy) > 5 else ""
            cancel = "scancel them" if self.kind == "slurm" else "stop them"
            raise ConfigError(f"--executor {self.name}: {len(busy)} cell(s) of this grid are still queued or running "
                              f"from an earlier submission: {listed}{more}. Wait for them (then run this again, or "
                              f"`megatron report`), or {cancel} first")
        self.job_ids.update(earlier.get("jobs") or {})
        self.resubmits.update(earlier.get("resubmits") or {})

    def _job_active(self, job_id: str) -> bool:
        if self.kind == "local":  # a local job's id is its controller's process id
            try:
                os.kill(int(job_id), 0)
            except (ProcessLookupError, ValueError):
                return False
            except PermissionError:
                return True
            return True
        state = self.submitit.SlurmJob(self.folder / "%j", job_id).state
        return state.split()[0] in ACTIVE_SLURM_STATES if state else False

    def _write_jobs_file(self) -> None:
        atomic_write_json(self.folder / JOBS_FILE, {"executor": self.name, "jobs": self.job_ids,
                                                    "resubmits": self.resubmits})

    def run(self, jobs: list[CellJob], done: CellDone) -> None:
        if not jobs:
            return
        self._refuse_cells_still_running(jobs)
        pending = self.submit(jobs)
        if not self.wait:
            return
        while pending:
            still = []
            for job, sjob in pending:
                if not sjob.done():
                    still.append((job, sjob))
                    continue
                retry = self._collect(job, sjob, done)
                if retry is not None:
                    still += self.submit([retry])
            pending = still
            if pending:
                time.sleep(self.options.poll_s)

    def _collect(self, job: CellJob, sjob: Any, done: CellDone) -> CellJob | None:
        """Report a finished job's cell; the same cell again when its job died without a result and may be
        resubmitted."""
        utils = self.submitit.core.utils
        try:
            error = sjob.result()
        except utils.FailedJobError as exc:  # the job's Python failed outside the cell (unpickling, imports)
            done(job.cell_id, f"submitit job {sjob.job_id} failed: {str(exc).strip().splitlines()[-1]} "
                              f"(logs: {sjob.paths.stderr})")
            return None
        except utils.UncompletedJobError:
            used = self.resubmits.get(job.cell_id, 0)
            state = sjob.state
            if used >= self.options.max_resubmits:
                done(job.cell_id, f"submitit job {sjob.job_id} ended without a result ({state}) after {used} "
                                  f"resubmission(s); logs: {sjob.paths.stdout}. Run the command again to resume it")
                return None
            self.resubmits[job.cell_id] = used + 1
            log.warning("cell %s: job %s ended without a result (%s); resubmitting (%d of at most %d), it resumes "
                        "from its checkpoint", job.cell_id, sjob.job_id, state, used + 1, self.options.max_resubmits)
            resume = (Path(job.run_dir) / RECORD_FILE).exists()  # a record: the runner resumes from its checkpoint
            return CellJob(job.cell_id, job.cfg_json, job.run_dir, resume)
        done(job.cell_id, error)
        return None


def make_executor(name: str, *, runner: Callable[..., dict], out_dir: Path, workers: int = 1,
                  cores: int | None = None, pm=None, prune: bool = False, wait: bool = True,
                  slurm: SlurmOptions | None = None, on_start: Callable[[str], None] | None = None) -> CellExecutor:
    """The executor called ``name`` (one of :data:`EXECUTOR_NAMES`)."""
    if name == "local":
        if not wait:
            raise ConfigError("--no-wait needs --executor slurm or submitit-local: the local executor runs the cells "
                              "in this process")
        return LocalPool(runner, workers=workers, cores=cores, pm=pm, prune=prune, on_start=on_start)
    if name in ("slurm", "submitit-local"):
        if workers != 1:
            raise ConfigError(f"--workers {workers} is for --executor local; with {name} every cell is its own job "
                              "(--slurm-array-parallelism sets how many run at once)")
        return SubmititCells("slurm" if name == "slurm" else "local", Path(out_dir) / SUBMITIT_DIR, runner,
                             slurm or SlurmOptions(), prune=prune, wait=wait, on_start=on_start)
    raise ConfigError(f"unknown executor {name!r}; the executors are: {', '.join(EXECUTOR_NAMES)}")

