"""Distributed meta-training on ``torch.distributed`` (launched by ``torchrun``; no home-made engine).

How the work divides (see examples/distributed/README.md, "Scaling"):

- per task: each rank runs the inner loop and the query loss of *its share* of the meta-batch's episodes
  (:func:`shard`: ranks take episodes ``rank, rank + world, ...`` of one global meta-batch that every rank
  draws with the same seed, so a 2-process run and a 1-process run see the same episodes);
- per outer step: ONE all-reduce of a single flattened buffer (:func:`all_reduce_mean`: the meta-gradient for
  MAML/ANIL/proto, the adapted-weight delta for Reptile), averaged over ranks. The transfer-learning baselines
  are plain data parallelism: one all-reduce of the gradient per optimiser step;
- rank 0 alone evaluates, logs, writes checkpoints and the run record; the other ranks wait at a barrier.

Because every rank starts from the same weights (same seed, and :func:`broadcast_module` to be sure), reduces
the same list of tensors and applies the same deterministic update to the identical averaged result, the
parameters stay bit-identical on every rank; :func:`check_in_sync` verifies it cheaply.

Backend: ``nccl`` on CUDA, ``gloo`` on CPU. The process group is joined from the environment ``torchrun`` sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).

A learner never imports this module: the runner binds :func:`all_reduce_mean` to its :class:`DistEnv` and lends
it through ``LearnerContext.all_reduce_mean`` (``make_all_reduce_mean``).
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from megatron.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: environment variable overriding the collective timeout (seconds) of :func:`init_from_env`
TIMEOUT_ENV = "MEGATRON_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the run: its rank among ``world_size`` processes and the backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that evaluates, logs and writes checkpoints and the run record."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when the environment describes a process group of more than one process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def _timeout_s(timeout_s: float | None) -> float:
    if timeout_s is not None:
        return float(timeout_s)
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds; set e.g. {TIMEOUT_ENV}=600") from None
    if value <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} must be positive")
    return value


def is_main_process() -> bool:
    """Rank 0 of the launch this process belongs to (True when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def init_from_env(device_type: str, timeout_s: float | None = None) -> DistEnv:
    """Join the process group torchrun describes in the environment (``RANK``, ``WORLD_SIZE`` ...).

    Backend ``nccl`` for ``device_type == "cuda"``, ``gloo`` otherwise. ``timeout_s`` (default: the
    ``MEGATRON_DIST_TIMEOUT_S`` environment variable, else 30 min) bounds how long a collective waits for a
    rank that stopped answering before the run fails. Returns a single-process :class:`DistEnv` when not
    launched by torchrun (or with ``WORLD_SIZE=1``).
    """
    if not launched_by_torchrun():
        return DistEnv()
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("a CUDA device was requested but CUDA is not available; use --device cpu (gloo)")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} CUDA device(s): start at "
                "most that many processes per node (torchrun --nproc_per_node / megatron run --nproc)"
            )
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if device_type == "cuda":
            kwargs["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(seconds=_timeout_s(timeout_s)), **kwargs)
    env = DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())
    log.info("joined process group: rank %d of %d (local rank %d, backend %s)", env.rank, env.world_size,
             env.local_rank, env.backend)
    return env


def shutdown() -> None:
    """Leave the process group (no-op when there is none)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for(env: DistEnv, device: torch.device) -> torch.device:
    """The device this rank computes on: ``cuda:<local rank>`` for a CUDA run, ``device`` otherwise."""
    if device.type == "cuda" and env.enabled:
        return torch.device("cuda", env.local_rank)
    return device


# --- dividing the work ----------------------------------------------------------------------------------

def shard(items: Sequence[T], env: DistEnv, even: bool = True) -> list[T]:
    """This rank's share of a global list: items ``rank, rank + world, ...`` (round robin).

    ``even`` (training): the list must divide evenly, so every rank does the same number of collective calls
    per outer step and the average over ranks weighs every task equally (a :class:`ConfigError` names
    ``training.meta_batch`` otherwise). ``even=False`` (evaluation, gathering): the last ranks may get one item
    fewer, or none.
    """
    mine = list(items[env.rank :: env.world_size])
    if env.enabled and even and len(items) % env.world_size:
        raise ConfigError(
            f"a meta-batch of {len(items)} episode(s) cannot be split evenly over {env.world_size} processes: set "
            f"training.meta_batch to a multiple of {env.world_size} (or start {_divisors_hint(len(items))} process(es))"
        )
    return mine


def _divisors_hint(n: int) -> str:
    return " or ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def shard_slices(n: int, env: DistEnv) -> list[int]:
    """The indices of :func:`shard` (``rank, rank + world, ...``) of a list of ``n`` items, no evenness check."""
    return list(range(env.rank, n, env.world_size))


# --- collectives ------------------------------------------------------------------------------------------

def _flat_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def all_reduce_mean(tensors: list[torch.Tensor], env: DistEnv) -> None:
    """Average ``tensors`` over ranks in place with ONE all-reduce of a flattened buffer.

    The buffer is float32 (float64 when any tensor is): half-precision gradients are summed in float32.
    Every rank must pass tensors of the same shapes in the same order (the learners reduce the optimiser's
    parameter list). All ranks receive the bit-identical result.
    """
    if not env.enabled or not tensors:
        return
    dtype = _flat_dtype(tensors)
    flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= env.world_size
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t).to(t.dtype))
        offset += n


@dataclass
class CommStats:
    """Time and volume spent inside the cross-rank averaging (for the benchmark and the run record)."""

    calls: int = 0
    seconds: float = 0.0
    elements: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"calls": self.calls, "seconds": round(self.seconds, 6), "elements": self.elements}


def make_all_reduce_mean(env: DistEnv, stats: CommStats | None = None) -> Callable[[list[torch.Tensor]], None] | None:
    """The callable the runner lends learners as ``LearnerContext.all_reduce_mean``; ``None`` for one process.

    With ``stats`` each call's wall time (including waiting for the slowest rank, which is what a user pays)
    and element count are added to it.
    """
    if not env.enabled:
        return None

    def reduce(tensors: list[torch.Tensor]) -> None:
        if stats is None:
            all_reduce_mean(tensors, env)
            return
        if tensors and tensors[0].is_cuda:
            torch.cuda.synchronize(tensors[0].device)
        start = time.perf_counter()
        all_reduce_mean(tensors, env)
        if tensors and tensors[0].is_cuda:
            torch.cuda.synchronize(tensors[0].device)
        stats.seconds += time.perf_counter() - start
        stats.calls += 1
        stats.elements += sum(t.numel() for t in tensors)

    return reduce


def all_reduce_buffers_mean(module: torch.nn.Module, env: DistEnv) -> int:
    """Average the floating-point buffers (BatchNorm running statistics) over ranks, in one all-reduce.

    Learners that train the detector in place (MAML's query pass, the baselines) update running statistics on
    their own shard of images only; averaging after each outer step keeps the ranks' detectors identical and
    the statistics representative of the whole meta-batch. Returns the number of buffers averaged.
    """
    if not env.enabled:
        return 0
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    all_reduce_mean(buffers, env)
    return len(buffers)


def broadcast_module(module: torch.nn.Module, env: DistEnv, src: int = 0) -> None:
    """Copy ``src``'s parameters and buffers to every rank (one flattened broadcast per dtype)."""
    if not env.enabled:
        return
    tensors = list(module.parameters()) + list(module.buffers())
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    with torch.no_grad():
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            dist.broadcast(flat, src=src)
            offset = 0
            for t in group:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n


def broadcast_object(obj: T, env: DistEnv, src: int = 0) -> T:
    """``src``'s ``obj`` on every rank (pickled; for small things: decisions, paths, records)."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: T, env: DistEnv) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (pickled; for per-rank results and statistics)."""
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum_ints(values: Sequence[int], env: DistEnv) -> list[int]:
    """Element-wise sums of integer counters over ranks (e.g. images forwarded), exact (int64)."""
    return [int(v) for v in _all_reduce_sum([int(v) for v in values], torch.int64, env)]


def _all_reduce_sum(values: list, dtype: torch.dtype, env: DistEnv) -> list:
    """One small all-reduce (SUM) of a list of numbers; on the GPU for nccl."""
    if not env.enabled:
        return values
    t = torch.tensor(values, dtype=dtype)
    if env.backend == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def barrier(env: DistEnv) -> None:
    """Wait until every rank gets here (no-op for one process)."""
    if not env.enabled:
        return
    if env.backend == "nccl":
        dist.barrier(device_ids=[env.local_rank])
    else:
        dist.barrier()


# --- checking that the ranks agree ----------------------------------------------------------------------

def parameters_checksum(module: torch.nn.Module) -> torch.Tensor:
    """A float64 vector of per-parameter sums: cheap to all-gather when checking ranks agree."""
    return torch.stack([p.detach().double().sum() for p in module.parameters()])


def check_in_sync(module: torch.nn.Module, env: DistEnv, what: str = "the detector") -> None:
    """Raise :class:`TrainingError` unless every rank holds bit-identical parameters (compared by per-parameter
    float64 sums and a weighted sum, gathered to every rank).

    Cheap (one small all-gather); the runner calls it before writing a checkpoint, so a divergence is caught
    while the last good checkpoint is still intact.
    """
    if not env.enabled:
        return
    sums = parameters_checksum(module)
    weighted = torch.stack([
        (p.detach().double().reshape(-1) * torch.arange(1, p.numel() + 1, dtype=torch.float64, device=p.device)).sum()
        for p in module.parameters()
    ])
    mine = torch.cat([sums, weighted]).cpu()
    everyone = gather_objects(mine, env)
    names = [n for n, _ in module.named_parameters()]
    for rank, theirs in enumerate(everyone):
        if not torch.equal(theirs, mine):
            differing = [names[i % len(names)] for i in torch.nonzero(theirs != mine).flatten().tolist()]
            raise TrainingError(
                f"the processes of this distributed run no longer hold identical weights of {what} (rank {env.rank} "
                f"vs rank {rank}; first differing parameters: {sorted(set(differing))[:5]}). A learner combined its "
                "update without LearnerContext.all_reduce_mean, or the ranks did not start from the same weights. "
                "The run stops; the last good checkpoint is kept."
            )


# --- what the runner needs around the learners ------------------------------------------------------------

def on_main(fn: Callable[[], T], env: DistEnv) -> T:
    """``fn()`` on rank 0 only (file system decisions, the run record), its result sent to every rank.

    An exception on rank 0 is sent too and raised on every rank, so no rank waits forever for a result that
    will never come (a ConfigError about the run directory stops all ranks with the same message).
    """
    if not env.enabled:
        return fn()
    result: Any = None
    error: BaseException | None = None
    if env.is_main:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            error = exc
    try:
        result, error = broadcast_object((result, error), env)
    except Exception as exc:  # rank 0 could not pickle its result or exception: send the reason as text
        reason = error if error is not None else exc
        result, error = broadcast_object((None, RuntimeError(f"{type(reason).__name__}: {reason}")), env)
    if error is not None:
        raise error
    return result


def sync_step(values: Sequence[float], env: DistEnv) -> list[float]:
    """Element-wise sums over ranks of a few per-step numbers (loss, images forwarded/backwarded) in one
    small float64 all-reduce; float64 keeps image counts exact (up to 2**53)."""
    return [float(v) for v in _all_reduce_sum([float(v) for v in values], torch.float64, env)]


def shard_records(records: Sequence[T], env: DistEnv) -> list[T]:
    """This rank's share of an evaluation split (round robin; the last ranks may get one fewer or none)."""
    return shard(records, env, even=False)


class local_context:
    """``with local_context(ctx):`` — the learner works alone (no cross-rank averaging, ``world_size`` 1).

    For work every rank repeats identically instead of dividing it (fine-tuning the meta-model's copy on the
    target pool before evaluation): averaging identical gradients would only cost communication.
    """

    def __init__(self, ctx: Any):
        self.ctx = ctx
        self.saved: tuple[Any, int] | None = None

    def __enter__(self) -> Any:
        self.saved = (self.ctx.all_reduce_mean, self.ctx.world_size)
        self.ctx.all_reduce_mean, self.ctx.world_size = None, 1
        return self.ctx

    def __exit__(self, *exc: Any) -> None:
        assert self.saved is not None
        self.ctx.all_reduce_mean, self.ctx.world_size = self.saved


# --- `megatron run --nproc N`: torch's own launcher underneath -------------------------------------------

def strip_option(argv: Sequence[str], option: str, takes_value: bool = True) -> list[str]:
    """``argv`` without ``option`` (``--nproc 4`` or ``--nproc=4``)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == option:
            skip = takes_value
            continue
        if takes_value and arg.startswith(option + "="):
            continue
        out.append(arg)
    return out


def launch_local(nproc: int, module_args: Sequence[str], max_restarts: int = 0) -> None:
    """Run ``python -m megatron <module_args>`` in ``nproc`` processes on this machine through
    ``torch.distributed.run`` (torchrun's launcher: a c10d rendezvous on a free local port, worker monitoring;
    when one worker fails the others are stopped).

    Raises :class:`TrainingError` naming the failed rank(s) and their exit codes when the run fails.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    args = get_args_parser().parse_args([
        "--standalone", "--nnodes", "1", "--nproc_per_node", str(nproc), "--max_restarts", str(max_restarts),
        "-m", "megatron", *module_args,
    ])
    try:
        run(args)
    except ChildFailedError as exc:
        raise TrainingError(describe_failure(exc.failures)) from None


def describe_failure(failures: dict) -> str:
    """The message for a launch whose workers failed (``ChildFailedError.failures``: rank -> ProcessFailure):
    which rank failed first and how, the ranks torchrun stopped because of it, and what to do."""
    import signal

    # torchrun stops the surviving workers with SIGTERM: those are not the cause
    first_rank, first = min(failures.items(),
                            key=lambda kv: (kv[1].exitcode == -signal.SIGTERM, kv[1].timestamp, kv[0]))
    how = f"exit code {first.exitcode}"
    if first.exitcode is not None and first.exitcode < 0:
        how = f"killed by signal {-first.exitcode}"
    stopped = sorted(r for r in failures if r != first_rank)
    also = f"; torchrun then stopped rank(s) {', '.join(map(str, stopped))}" if stopped else ""
    return (
        f"the distributed run stopped: rank {first_rank} failed first ({how}){also}. Its error, if it printed one, is "
        "above. Checkpoints are written only after every process finished a meta-epoch, so the last one in the run "
        "directory is intact: fix the cause and run the same command with --resume."
    )
