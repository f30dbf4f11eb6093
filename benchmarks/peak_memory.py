"""Peak memory above the start of a block, for the benchmarks (CPU memory; CUDA has
``torch.cuda.max_memory_allocated``): this process's resident set plus the proportional set size (shared pages
split between the processes sharing them) of its child processes, sampled by a thread.

    with PeakMemory(interval_s=0.001, trim=True) as mem:
        step()
    mem.peak  # bytes above the start
"""
from __future__ import annotations

import threading
import time
from pathlib import Path


def malloc_trim() -> None:
    """Hand freed heap back to the OS (glibc), so the growth measured next is the block's working set."""
    try:
        import ctypes  # glibc only: imported where it is used

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measure is then an upper bound of new growth only
        pass


def _kib(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children() -> list[int]:
    pids = []
    for task in Path("/proc/self/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def memory_now() -> int:
    """Bytes: this process's resident set plus its child processes' proportional set size (Linux /proc)."""
    own = _kib("/proc/self/status", "VmRSS:")
    return 1024 * (own + sum(_kib(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in _children()))


class PeakMemory:
    """Peak of :func:`memory_now` above its value at the start while the block runs, every ``interval_s``
    (and once more at the end); ``trim``: :func:`malloc_trim` first."""

    def __init__(self, interval_s: float = 0.02, trim: bool = False) -> None:
        self.interval_s, self.trim = interval_s, trim
        self.peak = 0
        self.base = 0

    def __enter__(self) -> "PeakMemory":
        if self.trim:
            malloc_trim()
        self.base = memory_now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, memory_now() - self.base)
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, memory_now() - self.base)
