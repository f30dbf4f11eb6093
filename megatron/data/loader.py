"""Background loading: episodes and batches decoded and augmented by workers, in order, ahead of the model.

A *job* says what to load (a task's record indices, an episode's draw) together with the randomness it needs
(an augmentation seed), all decided in the training process when the job is planned. A worker only executes
jobs, so an item's pixels do not depend on which worker loads it, when, or how many workers there are:
``workers=0`` (load in the training process, when asked) and any number of workers give identical items in
identical order.

Two kinds of worker (``data.worker_kind``):

- ``thread`` (default): a thread pool in the training process. The heavy steps (file decoding in OpenCV /
  zlib, the affine warp, torch conversions) release the GIL; workers share the decoded-image cache, so an
  image decoded once is warm for every later stream (every meta-epoch, every fine-tuning, every evaluation).
- ``process``: ``torch.utils.data.DataLoader`` worker processes, started (forked) for each stream. No GIL,
  but each worker has its own copy of the cache (``data.cache_bytes / workers`` each, see
  :meth:`DecodedImageCache.limit_to`) that ends with the stream, so every stream starts from the training
  process's cache and images decoded in a worker are decoded again in the next stream.

``benchmarks/bench_data.py`` measures both (images/s per worker, scaling with 1, 2, 4 workers, cold and warm,
peak memory). Threads are the default because, measured on the 2-core development machine, they were faster
warm on every input (4 workers: 1.4-2.0x the 1-worker rate, against 0.4-1.4x for processes, whose every
stream pays for starting its workers, copying batches between processes and decoding into a fresh cache) and
used a quarter of the memory (4 workers: +91 MiB against +395 MiB). What threads cannot escape is the GIL:
about a fifth of a warm image's time is Python (cProfile), so their scaling flattens past ~4-5 workers;
``benchmarks/device_check.sh`` measures both on the device machine's cores (``data.worker_kind`` switches).

Usage::

    loader = Loader(workers=4, prefetch=2)
    for item in loader.map(load_fn, context, jobs):   # load_fn(context, job) -> item, in job order
        ...

``context`` is what every job needs (tasks, the preprocessor): shared with threads, inherited by forked
processes, never pickled per job. ``jobs`` is iterated lazily in the calling thread, at most
``workers * prefetch`` ahead of what has been consumed; closing the returned iterator (or dropping it) stops
the workers.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Literal, TypeVar

import cv2
import torch
import torch.multiprocessing

from megatron.data.preprocess import DecodedImageCache
from megatron.errors import ConfigError, MegatronError

log = logging.getLogger(__name__)

C = TypeVar("C")
J = TypeVar("J")
T = TypeVar("T")

WorkerKind = Literal["thread", "process"]
#: items each worker has in flight (or finished, waiting to be consumed) by default
DEFAULT_PREFETCH = 2
#: ``data.workers: null`` on an accelerator uses the cores of this process's share of the machine, less one for
#: the training loop itself, but no more than this (the loader's rate per worker is in bench_data.py; past a few
#: workers a training step is no longer waiting for data)
MAX_AUTO_WORKERS = 8
#: the worker kind used unless ``data.worker_kind`` says otherwise (why: the module docstring)
DEFAULT_WORKER_KIND: WorkerKind = "thread"


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


class _Failure:
    """A :class:`MegatronError` raised in a worker process, carried back so the training process re-raises the
    same error with the same message (the DataLoader would wrap it in a traceback text)."""

    def __init__(self, exc: MegatronError):
        self.exc = exc


def _identity(item: Any) -> Any:
    return item


class _JobDataset(torch.utils.data.Dataset):
    """``dataset[job] = fn(context, job)``: the DataLoader's view of a stream of jobs."""

    def __init__(self, fn: Callable[[Any, Any], Any], context: Any):
        self.fn, self.context = fn, context

    def __getitem__(self, job: Any) -> Any:
        try:
            return self.fn(self.context, job)
        except MegatronError as exc:
            return _Failure(exc)


def _start_worker_process(cache: DecodedImageCache | None, workers: int, worker_id: int) -> None:
    """In each worker process: one OpenCV thread (the DataLoader sets torch's), and its share of the cache."""
    cv2.setNumThreads(1)
    if cache is not None:
        cache.limit_to(cache.max_bytes // workers)


@dataclass(frozen=True)
class Loader:
    """Where jobs run: in the calling thread (``workers=0``), or ``workers`` threads / processes with
    ``prefetch`` items per worker loaded ahead."""

    workers: int = 0
    prefetch: int = DEFAULT_PREFETCH
    kind: WorkerKind = DEFAULT_WORKER_KIND

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ConfigError(f"data.workers must be >= 0 (0: load in the training process), got {self.workers}")
        if self.prefetch < 1:
            raise ConfigError(f"data.prefetch must be >= 1 item per worker, got {self.prefetch}")
        if self.kind not in ("thread", "process"):
            raise ConfigError(f"data.worker_kind must be 'thread' or 'process', got {self.kind!r}")

    @classmethod
    def from_config(cls, data_cfg: Any, device: torch.device | str) -> "Loader":
        """The loader of ``cfg.data`` (``workers``, ``prefetch``, ``worker_kind``) for a run on ``device``."""
        workers = data_cfg.workers if data_cfg.workers is not None else auto_workers(device)
        return cls(workers=workers, prefetch=data_cfg.prefetch, kind=data_cfg.worker_kind)

    def map(self, fn: Callable[[C, J], T], context: C, jobs: Iterable[J],
            cache: DecodedImageCache | None = None) -> Iterator[T]:
        """``fn(context, job)`` for every job, in job order. ``cache``: the decoded-image cache ``context``
        uses, so that a worker process keeps only its share of it."""
        if self.workers == 0:
            return (fn(context, job) for job in jobs)
        if self.kind == "thread":
            return self._threads(fn, context, jobs)
        return self._processes(fn, context, jobs, cache)

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

    def _processes(self, fn: Callable[[C, J], T], context: C, jobs: Iterable[J],
                   cache: DecodedImageCache | None) -> Iterator[T]:
        methods = torch.multiprocessing.get_all_start_methods()
        loader = torch.utils.data.DataLoader(
            _JobDataset(fn, context), batch_size=None, sampler=jobs, num_workers=self.workers,
            prefetch_factor=self.prefetch, collate_fn=_identity,
            worker_init_fn=partial(_start_worker_process, cache, self.workers),
            # forked workers inherit the tasks (image loaders may be closures) and the warm cache
            multiprocessing_context="fork" if "fork" in methods else None,
            # its own generator: the DataLoader draws its workers' base seed from it, and drawing from torch's
            # global generator would change the training stream with the number of workers
            generator=torch.Generator())
        for item in loader:
            if isinstance(item, _Failure):
                raise item.exc
            yield item
