"""The run directory: one run per folder, failures recorded, checkpoints that survive a bad write.

What lives here (the runner calls it; nothing here trains):

- **The lock.** :func:`lock_run_dir` takes an exclusive ``fcntl.flock`` on ``<run_dir>/.lock`` for the run's
  lifetime and writes the holder's PID and host into it. The operating system releases the lock when the
  process ends, however it ends (SIGKILL included), so a killed run never blocks its own ``--resume``; a
  second run into a locked folder gets :class:`RunDirBusy` (a ConfigError: exit 2) naming the holder.
- **What to do with a folder** (:func:`claim_run_dir`, :func:`decide`): no ``run.json`` -> a fresh run; a
  complete run -> refused without ``--resume``; a run that failed (or was killed) before its first checkpoint
  -> started afresh, saying so; an unfinished run with checkpoints -> needs ``--resume``. With the default
  run name, folders that are taken (complete, in use, or unfinished with checkpoints) are skipped for the
  next free ``<name>-N``.
- **Ownership.** A folder is megatron's only when it says so: claiming it writes the marker ``.megatron-run``
  (:data:`MARKER_FILE`). A folder that exists, holds anything besides megatron's own lock and temp files, and has
  no marker is refused (:class:`RunDirNotOwned`, exit 2) *before anything is written into it*, listing what it
  holds and suggesting a new name or ``--force`` (which adopts it: files of megatron's names are replaced,
  nothing else is touched). Folders of runs made before the marker existed are recognised by their
  ``run.json`` carrying megatron's ``status`` field and adopted (the marker is added), so they still resume; a
  ``run.json`` without ``status`` is not megatron's. With the default run name, a folder that is not megatron's
  is skipped for the next free ``<name>-N``.
- **Leftovers.** The temporary files of atomic writes killed half-way are removed when a run claims a folder it
  owns, by their exact name pattern and only when their writer's process is gone
  (:func:`megatron.atomic_io.remove_stale_tmp_files`); a user's own ``.notes.v2.tmp`` is never touched.
- **Checkpoints.** :func:`save_checkpoint` keeps the previous good checkpoint (``last.pt`` + ``previous.pt``,
  both written atomically); :func:`load_resume_state` validates what it reads (format, learner name, any check
  of the caller) and falls back to ``previous.pt`` with a logged warning, or raises
  :class:`CheckpointUnusable` naming the file and what to do. It never touches ``run.json``.
- **Failures.** :func:`mark_failed` writes ``status: failed`` and the error into ``run.json``, keeping
  everything recorded so far; :func:`carry_history` keeps a resumed run's recorded learners.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Literal

from megatron import __version__
from megatron.atomic_io import (TMP_PATTERN, atomic_torch_save, atomic_write_json, file_mode, remove_stale_tmp_files,
                                safe_torch_load)
from megatron.errors import ConfigError, MegatronError
from megatron.training.run_files import RECORD_FILE

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
#: written when a run claims a folder: the folder is megatron's (see "Ownership" above)
MARKER_FILE = ".megatron-run"
CHECKPOINTS_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
PREVIOUS_CHECKPOINT = "previous.pt"

Mode = Literal["fresh", "restart", "resume"]


# --- errors -----------------------------------------------------------------------------------------------

class RunDirBusy(ConfigError):
    """Another live process holds the run directory's lock."""

    def __init__(self, path: Path, holder: dict[str, Any] | None):
        self.path = Path(path)
        self.holder = holder or {}
        pid, host = self.holder.get("pid", "unknown"), self.holder.get("host", "unknown host")
        since = f", since {self.holder['started']}" if self.holder.get("started") else ""
        super().__init__(
            f"{self.path} is in use by another run (PID {pid} on {host}{since}): one run per folder. Wait for it "
            "to finish, or choose another directory (--run-dir, or --name / output.name). The lock is released "
            "when that process ends, however it ends, so a stopped run's folder can always be resumed."
        )

    def __reduce__(self):  # picklable (torch.distributed sends rank 0's errors to every rank)
        return (type(self), (self.path, self.holder))

    @property
    def pid(self) -> Any:
        return self.holder.get("pid")

    @property
    def host(self) -> Any:
        return self.holder.get("host")


class RunDirTaken(ConfigError):
    """The folder holds a run this run may not replace (complete, or unfinished with checkpoints)."""


class RunDirNotOwned(RunDirTaken):
    """A non-empty folder that is not megatron's (no marker, no megatron run.json): never written into."""

    def __init__(self, path: Path, contents: list[str]):
        self.path, self.contents = Path(path), list(contents)
        shown = ", ".join(self.contents[:8]) + (f" (+{len(self.contents) - 8} more)" if len(self.contents) > 8 else "")
        super().__init__(
            f"{self.path} is not a megatron run folder (no {MARKER_FILE} marker and no run.json of a megatron run) and "
            f"is not empty: it holds {shown}. A run writes run.json, config.yaml, summary.md, models/ and "
            "checkpoints/ there and would replace your files of those names, so nothing was written. Fix: choose a "
            "new folder (--run-dir NEW_DIR, or --name / output.name), or pass --force to use this one anyway (files "
            "of those names are replaced; nothing else is touched or deleted)")

    def __reduce__(self):  # picklable (torch.distributed sends rank 0's errors to every rank)
        return (type(self), (self.path, self.contents))


class CheckpointUnusable(ConfigError):
    """No checkpoint of a learner can be resumed from (``last.pt`` and ``previous.pt`` unreadable or foreign)."""


# --- the lock ----------------------------------------------------------------------------------------------

class RunDirLock:
    """An exclusive lock on a run directory, held until :meth:`release` (or the process ends)."""

    def __init__(self, path: Path, fd: int):
        self.path = Path(path)
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a lock that is garbage-collected is released, never leaked
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"RunDirLock({str(self.path)!r}, held={self.held})"


def _holder_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}


def read_lock_holder(run_dir: str | Path, lock_file: str = LOCK_FILE) -> dict[str, Any] | None:
    """What the lock file of ``run_dir`` says about its (last) holder: ``{"pid", "host", "started"}``."""
    path = Path(run_dir) / lock_file
    for _ in range(10):  # the holder writes its details right after taking the lock: give it a moment
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
            if isinstance(data, dict) and "pid" in data:
                return data
        except json.JSONDecodeError:
            pass
        time.sleep(0.02)
    return None


def lock_run_dir(run_dir: str | Path, lock_file: str = LOCK_FILE) -> RunDirLock:
    """Take the exclusive lock of ``run_dir`` (created if needed) or raise :class:`RunDirBusy` at once.
    ``lock_file``: another lock in the same folder (a benchmark shard's)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / lock_file
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, file_mode())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunDirBusy(run_dir, read_lock_holder(run_dir, lock_file)) from None
        raise ConfigError(f"{path}: cannot lock the run directory ({exc.strerror}); flock is needed to keep one "
                          "run per folder: use a local file system for --out / --run-dir") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder_info()) + "\n").encode(), 0)
    except OSError:
        pass  # the lock holds; the details are a courtesy for the error message of a second run
    return RunDirLock(run_dir, fd)


# --- what a folder holds -------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunDirState:
    """What :func:`inspect_run_dir` found in a run directory."""

    path: Path
    record: dict[str, Any] | None = None  # run.json, when readable
    record_problem: str | None = None  # why run.json cannot be read
    checkpoints: list[Path] = dataclasses.field(default_factory=list)
    started_here: bool = False  # a lock file: some run started in this folder

    @property
    def has_record(self) -> bool:
        return self.record is not None or self.record_problem is not None

    @property
    def status(self) -> str | None:
        return (self.record or {}).get("status")

    @property
    def error(self) -> str | None:
        return (self.record or {}).get("error")


def inspect_run_dir(run_dir: str | Path) -> RunDirState:
    run_dir = Path(run_dir)
    state = RunDirState(run_dir, started_here=(run_dir / LOCK_FILE).exists())
    path = run_dir / RECORD_FILE
    try:
        record = json.loads(path.read_text())
        if isinstance(record, dict):
            state.record = record
        else:
            state.record_problem = f"{path} is not a run record (top level: {type(record).__name__})"
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        state.record_problem = f"{path} cannot be read ({exc})"
    ckpt_root = run_dir / CHECKPOINTS_DIR
    if ckpt_root.is_dir():
        state.checkpoints = sorted(p for p in ckpt_root.glob("*/*.pt")
                                   if p.name in (LAST_CHECKPOINT, PREVIOUS_CHECKPOINT) and p.is_file())
    return state


def foreign_contents(run_dir: str | Path) -> list[str]:
    """What makes ``run_dir`` not megatron's: its entries (``sub/`` for folders), when it exists, holds more than
    megatron's lock and temp files, and has neither the marker nor a megatron ``run.json`` (one with ``status``:
    a run made before the marker existed); ``[]`` when megatron may use it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or (run_dir / MARKER_FILE).is_file() or _legacy_run(run_dir):
        return []
    return sorted(f"{p.name}/" if p.is_dir() else p.name for p in run_dir.iterdir()
                  if p.name != LOCK_FILE and not TMP_PATTERN.match(p.name))


def _legacy_run(run_dir: Path) -> bool:
    """A run made before the marker existed: its run.json is a dict with megatron's ``status`` field."""
    try:
        record = json.loads((run_dir / RECORD_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and isinstance(record.get("status"), str)


def write_marker(run_dir: str | Path) -> None:
    """Mark ``run_dir`` as megatron's (kept as written first: the marker says who made the folder)."""
    path = Path(run_dir) / MARKER_FILE
    if not path.is_file():
        atomic_write_json(path, {"megatron_version": __version__, **_holder_info(),
                                 "note": "this folder is a megatron run directory (see megatron run --help)"})


@dataclasses.dataclass
class Decision:
    mode: Mode
    note: str | None = None


def decide(state: RunDirState, resume: bool) -> Decision:
    """What a run started with (or without) ``--resume`` does with the folder described by ``state``: a
    :class:`Decision` (``fresh`` / ``restart`` (afresh, over a failed start) / ``resume``), or
    :class:`RunDirTaken` (a ConfigError: exit 2) saying why not and what to do."""
    path = state.path
    if not state.has_record:
        if resume and not state.started_here:
            raise RunDirTaken(f"--resume: {path} holds no run to resume (no {RECORD_FILE}); run without --resume")
        if resume:
            return Decision("restart", f"{path}: the run started there stopped before writing {RECORD_FILE}, so "
                                       "there is nothing to resume; starting it afresh")
        return Decision("fresh")
    if state.record_problem is not None:
        if not state.checkpoints:
            return Decision("restart", f"{state.record_problem}, and the folder holds no checkpoint; starting the "
                                       "run afresh")
        raise RunDirTaken(f"{state.record_problem}, but the folder holds checkpoints; restore {RECORD_FILE} to "
                          f"resume, or move {path} aside and start again")
    status = state.status
    if status == "complete":
        if resume:
            return Decision("resume")
        raise RunDirTaken(f"{path} already holds a complete run; choose another directory (--run-dir, or --name / "
                          "output.name), or move it aside to run again (--resume on it changes nothing)")
    what = f"failed ({state.error})" if status == "failed" and state.error else \
        "failed" if status == "failed" else f"stopped (status {status!r}; its process is gone)"
    if not state.checkpoints:
        return Decision("restart", f"{path}: the run recorded there {what} before its first checkpoint; "
                                   "starting it afresh")
    if resume:
        return Decision("resume")
    raise RunDirTaken(f"{path} holds an unfinished run that {what} after writing checkpoints; pass --resume to "
                      "continue it from its last checkpoint, or choose another directory (--run-dir, or --name / "
                      "output.name)")


# --- claiming a folder for a run -----------------------------------------------------------------------------

@dataclasses.dataclass
class RunDirClaim:
    """A run directory held by this process: its lock, what the run does there, and what was cleaned."""

    path: Path
    mode: Mode
    lock: RunDirLock
    note: str | None = None
    record: dict[str, Any] | None = None  # the run.json found there (resume: the history to keep)
    removed_tmp: list[Path] = dataclasses.field(default_factory=list)

    @property
    def resume(self) -> bool:
        """Whether the runner resumes (``--resume`` over a failed start is ``False``: it starts afresh)."""
        return self.mode == "resume"

    def release(self) -> None:
        self.lock.release()

    def __enter__(self) -> "RunDirClaim":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _take(path: Path, resume: bool, force: bool = False) -> RunDirClaim:
    created = not path.exists()
    if not force and (contents := foreign_contents(path)):
        raise RunDirNotOwned(path, contents)  # before the lock file: nothing is written into a folder not ours
    started_before = (path / LOCK_FILE).exists()  # before this process's own lock file
    lock = lock_run_dir(path)
    try:
        if not force and (contents := foreign_contents(path)):
            raise RunDirNotOwned(path, contents)  # filled between the look and the lock
        state = inspect_run_dir(path)
        state.started_here = started_before
        decision = decide(state, resume)
        write_marker(path)
        removed = remove_stale_tmp_files(path)
    except BaseException:
        lock.release()
        if created:  # refused (e.g. --resume of a mistyped folder): leave nothing behind
            with contextlib.suppress(OSError):
                (path / LOCK_FILE).unlink()
                path.rmdir()
        raise
    if removed:
        log.info("%s: removed %d temporary file(s) left by a write that was killed", path, len(removed))
    if decision.note:
        log.warning("%s", decision.note)
    return RunDirClaim(path, decision.mode, lock, decision.note, state.record, removed)


def claim_run_dir(run_dir: str | Path | None, default_base: str | Path, resume: bool, force: bool = False
                  ) -> RunDirClaim:
    """Lock and claim the folder a run writes to; the claim holds the lock until released (keep it for the
    whole run).

    ``run_dir`` given (``--run-dir``): that folder, or :class:`RunDirBusy` / :class:`RunDirNotOwned` / a
    ConfigError (see :func:`decide`); ``force`` adopts a folder that is not megatron's. Otherwise the default
    ``default_base`` (``<output.dir>/<name>``): a fresh run takes the first of ``<name>``, ``<name>-2``, ...
    that is free or holds a run that failed before its first checkpoint (skipping folders in use, complete,
    unfinished with checkpoints, or not megatron's); ``resume`` takes the newest of them that holds a run.
    """
    if run_dir is not None:
        return _take(Path(run_dir), resume, force)
    base = Path(default_base)
    if resume:
        existing = [p for p in _numbered(base) if (p / RECORD_FILE).exists() and not foreign_contents(p)]
        if not existing:
            raise ConfigError(f"--resume: no run to resume under {base} (run without --resume first)")
        return _take(existing[-1], True)
    n = 1
    while True:
        path = base if n == 1 else base.parent / f"{base.name}-{n}"
        n += 1
        if path.exists() and (path / RECORD_FILE).exists():
            state = inspect_run_dir(path)
            if state.status == "complete" or state.checkpoints:
                if state.status != "complete":
                    log.warning("%s holds an unfinished run with checkpoints (status %s); this run goes to the next "
                                "free folder. To continue that run instead, pass --resume", path, state.status)
                continue
        try:
            claim = _take(path, False)
        except RunDirNotOwned:
            log.warning("%s holds files that are not a megatron run; this run goes to the next free folder", path)
            continue
        except RunDirBusy as exc:
            log.warning("%s is in use by PID %s on %s; this run goes to the next free folder", path, exc.pid, exc.host)
            continue
        except RunDirTaken:
            continue  # taken between the look and the lock
        return claim


def _numbered(base: Path) -> list[Path]:
    """``base``, ``base-2``, ``base-3`` ... that exist, in order of N."""
    found = [base] if base.is_dir() else []
    numbered = []
    if base.parent.is_dir():
        for p in base.parent.glob(f"{base.name}-*"):
            suffix = p.name[len(base.name) + 1:]
            if suffix.isdigit() and int(suffix) >= 2 and p.is_dir():
                numbered.append((int(suffix), p))
    return found + [p for _, p in sorted(numbered)]


# --- the record ---------------------------------------------------------------------------------------------

def describe_error(error: BaseException | str) -> str:
    """The text a failed run records: a MegatronError's message as is, other exceptions with their type."""
    if isinstance(error, str):
        return error
    if isinstance(error, MegatronError):
        return str(error)
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C / SIGINT)"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def mark_failed(run_dir: str | Path, error: BaseException | str, record: dict[str, Any] | None = None
                ) -> dict[str, Any] | None:
    """Record in ``run_dir/run.json`` that the run failed: ``status: failed``, ``error`` (text) and
    ``failed_at``, keeping everything recorded so far (``record``, the runner's in-memory record, else the
    file's). Call it only for a run this process started or resumed (never for a folder it was refused).
    Never raises: a failure to record the failure is logged, and the original error is what the user sees.
    Returns the record written (``None`` when nothing could be written)."""
    run_dir = Path(run_dir)
    try:
        if record is None:
            state = inspect_run_dir(run_dir)
            record = state.record if state.record is not None else {"learners": {}}
        record["status"] = "failed"
        record["error"] = describe_error(error)
        record["failed_at"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        atomic_write_json(run_dir / RECORD_FILE, record)
        return record
    except Exception as exc:  # noqa: BLE001 - never mask the error being recorded
        log.error("could not record the failure in %s: %s", run_dir / RECORD_FILE, exc)
        return None


def carry_history(new_record: dict[str, Any], old_record: dict[str, Any] | None) -> dict[str, Any]:
    """A resumed run's record: ``new_record`` (the fresh header: config, versions, ``status: running``) with
    what ``old_record`` (the run.json found) holds beyond it — every learner recorded so far, the split — so
    that nothing recorded is lost even if the resumed run fails before it reaches its checkpoints. An earlier
    failure moves from ``error`` to ``earlier_errors``."""
    if not old_record:
        return new_record
    merged = {**old_record, **new_record}
    merged["learners"] = {**dict(old_record.get("learners") or {}), **dict(new_record.get("learners") or {})}
    earlier = list(old_record.get("earlier_errors") or [])
    if old_record.get("error"):
        earlier.append(old_record["error"])
    merged.pop("error", None)
    merged.pop("failed_at", None)
    if earlier:
        merged["earlier_errors"] = earlier
    return merged


# --- checkpoints -------------------------------------------------------------------------------------------

def checkpoint_dir(run_dir: str | Path, learner: str) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / learner


def save_checkpoint(state: dict[str, Any], directory: str | Path) -> Path:
    """Write ``state`` as ``directory/last.pt``, keeping the one it replaces as ``previous.pt``.

    Both steps are atomic (a rename, then temp file + rename): a kill at any moment leaves a complete
    ``last.pt`` or, between the two steps, a complete ``previous.pt`` that :func:`load_resume_state` falls back
    to."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    last = directory / LAST_CHECKPOINT
    if last.exists():
        os.replace(last, directory / PREVIOUS_CHECKPOINT)
    atomic_torch_save(state, last)
    return last


@dataclasses.dataclass
class LoadedCheckpoint:
    state: dict[str, Any]
    path: Path  # the file used (last.pt, or previous.pt after a fallback)
    fell_back: bool = False
    problems: list[str] = dataclasses.field(default_factory=list)  # why the files not used were refused


def _check_state(state: Any, fmt: Any, learner: str, required: tuple[str, ...],
                 check: Callable[[dict[str, Any]], None] | None) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"not a megatron run checkpoint (top level: {type(state).__name__})")
    if state.get("format") != fmt:
        raise ValueError(f"checkpoint format {state.get('format')!r}, expected {fmt!r} (not a checkpoint of this "
                         "megatron version, or not a run checkpoint)")
    if state.get("learner_name") != learner:
        raise ValueError(f"it is a checkpoint of learner {state.get('learner_name')!r}, not {learner!r}")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"it lacks {', '.join(missing)}")
    if check is not None:
        check(state)


def load_resume_state(directory: str | Path, learner: str, fmt: Any, *, required: tuple[str, ...] = (),
                    check: Callable[[dict[str, Any]], None] | None = None) -> LoadedCheckpoint | None:
    """The newest usable checkpoint in ``directory`` (``last.pt``, else ``previous.pt``), or ``None`` when
    there is none at all (the learner starts from scratch).

    A file is usable when it loads with ``torch.load(weights_only=True)``, its ``format`` is ``fmt``, its
    ``learner_name`` is ``learner``, it holds every ``required`` key, and ``check(state)`` (the caller's own
    test, e.g. that the weights fit the detector) does not raise. A refused ``last.pt`` is renamed
    ``last.pt.corrupt`` (kept for inspection; the next save then cannot rotate it over the good
    ``previous.pt``) and the fallback is logged as a warning. When no file is usable:
    :class:`CheckpointUnusable` naming the files, why, and what to do. ``run.json`` is never touched."""
    directory = Path(directory)
    problems: list[str] = []
    candidates = [directory / LAST_CHECKPOINT, directory / PREVIOUS_CHECKPOINT]
    if not any(p.exists() for p in candidates):
        return None
    for i, path in enumerate(candidates):
        if not path.exists():
            problems.append(f"{path}: missing")
            continue
        try:
            state = safe_torch_load(path)
            _check_state(state, fmt, learner, required, check)
        except Exception as exc:  # noqa: BLE001 - any failure makes this file unusable; the next is tried
            reason = " ".join(str(exc).split()) or type(exc).__name__
            if len(reason) > 400:
                reason = reason[:400].rsplit(" ", 1)[0] + " ..."
            problems.append(f"{path}: {reason}")
            continue
        if i > 0:
            bad = candidates[0]
            if bad.exists():
                aside = _aside(bad)
                os.replace(bad, aside)
                problems[-1] += f" (moved to {aside.name})"
            log.warning("learner %r: cannot resume from %s; resuming from the previous good checkpoint %s "
                        "(meta-epoch %s): the meta-epoch after it is trained again", learner, problems[0],
                        path, state.get("meta_epoch", "?"))
        return LoadedCheckpoint(state, path, fell_back=i > 0, problems=problems)
    run_dir = directory.parent.parent
    raise CheckpointUnusable(
        f"cannot resume learner {learner!r}: no usable checkpoint in {directory}:\n  " + "\n  ".join(problems)
        + f"\n{run_dir / RECORD_FILE} is unchanged. To train {learner!r} again from its start (the other "
        f"learners' results are kept), move {directory} aside and resume again; or start a new run in another "
        "directory."
    )


def _aside(path: Path) -> Path:
    aside = path.with_name(path.name + ".corrupt")
    n = 2
    while aside.exists():
        aside = path.with_name(f"{path.name}.corrupt-{n}")
        n += 1
    return aside
