"""Background loading: episodes and batches decoded and augmented by workers, in order, ahead of the model.

A *job* says what to load (a task's record indices, an episode's draw) together with the randomness it needs
(an augmentation seed), all decided in the training process when the job is planned. A worker only executes
jobs, so an item's pixels do not depend on which worker loads it, when, or how many workers there are:
``workers=0`` (load in the training process, when asked) and any number of workers give identical items in
identical order.

Workers are threads of the training process: the heavy steps (file decoding in OpenCV / zlib / pydicom's
NumPy, the affine warp, the float conversion) release the GIL, and the workers share the decoded-image cache,
so an image decoded once is warm for every later stream (every meta-epoch, fine-tuning and evaluation).

Why not worker processes (``torch.utils.data.DataLoader``)? ``benchmarks/bench_data.py`` measures both
(images/s per worker, scaling with 1, 2, 4 workers, cold and warm, peak memory). On the 2-core development
machine (two ``--quick`` runs) threads were faster warm on every input (4 workers: 1.4-2.0x the 1-worker rate,
against 0.4-1.4x for processes, whose every stream pays for starting its workers, copying batches between
processes and decoding into caches of their own) and took a fifth of the memory (4 workers: +71-91 MiB against
+386-395 MiB). And forked
workers can deadlock: a run imports pyarrow (through pandas), whose bundled jemalloc keeps a background
thread, and a worker forked while that thread holds a lock hangs (seen in this project's tests); spawned
workers would have to pickle every image loader (closures cannot be) and start cold. What threads cannot
escape is the GIL: about a fifth of a warm image's time is Python (cProfile), so their scaling flattens past
4-5 workers; ``benchmarks/device_check.sh`` measures the loader with the device machine's cores.

Usage::

    loader = Loader(workers=4, prefetch=2)
    for item in loader.map(load_fn, context, jobs):   # load_fn(context, job) -> item, in job order
        ...

``context`` is what every job needs (tasks, the preprocessor), shared by the workers. ``jobs`` is iterated
lazily in the calling thread, at most ``workers * prefetch`` ahead of what has been consumed; closing the returned iterator (or dropping it) stops
the workers.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch

from megatron.errors import ConfigError

C = TypeVar("C")
J = TypeVar("J")
T = TypeVar("T")

#: items each worker has in flight (or finished, waiting to be consumed) by default
DEFAULT_PREFETCH = 2
#: ``data.workers: null`` on an accelerator uses the cores of this process's share of the machine, less one for
#: the training loop itself, but no more than this (past a few workers the GIL, not the cores, limits them)
MAX_AUTO_WORKERS = 8


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def auto_workers(device: torch.device | str) -> int:
    """``data.workers: null``: no workers on the CPU (the model step needs every core there, and the data path
    costs about 1 % of a CPU step: ``benchmarks/bench_data.py``); on an accelerator, the cores of this process's
    share of the machine (``LOCAL_WORLD_SIZE`` processes per machine under torchrun) less one, at most
    :data:`MAX_AUTO_WORKERS`."""
    if torch.device(device).type == "cpu":
        return 0
    per_process = usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(MAX_AUTO_WORKERS, per_process - 1))


@dataclass(frozen=True)
class Loader:
    """Where jobs run: in the calling thread (``workers=0``), or ``workers`` threads with ``prefetch`` items per
    worker loaded ahead."""

    workers: int = 0
    prefetch: int = DEFAULT_PREFETCH

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ConfigError(f"data.workers must be >= 0 (0: load in the training process), got {self.workers}")
        if self.prefetch < 1:
            raise ConfigError(f"data.prefetch must be >= 1 item per worker, got {self.prefetch}")

    @classmethod
    def from_config(cls, data_cfg: Any, device: torch.device | str) -> "Loader":
        """The loader of ``cfg.data`` (``workers``, ``prefetch``) for a run on ``device``."""
        workers = data_cfg.workers if data_cfg.workers is not None else auto_workers(device)
        return cls(workers=workers, prefetch=data_cfg.prefetch)

    def map(self, fn: Callable[[C, J], T], context: C, jobs: Iterable[J]) -> Iterator[T]:
        """``fn(context, job)`` for every job, in job order (an error in a job is raised here, unchanged)."""
        if self.workers == 0:
            return (fn(context, job) for job in jobs)
        return self._threads(fn, context, jobs)

    def _threads(self, fn: Callable[[C, J], T], context: C, jobs: Iterable[J]) -> Iterator[T]:
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="megatron-data")
        pending: deque = deque()
        try:
            for job in jobs:
                pending.append(pool.submit(fn, context, job))
                if len(pending) >= self.workers * self.prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
