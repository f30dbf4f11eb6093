"""The run's environment: seeds (one run seed, independent streams per purpose), RNG state for exact resume,
the device and mixed precision actually used, deterministic kernels and CPU threads."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import warnings
from typing import Any, Iterator

import numpy as np
import torch

from megatron.errors import ConfigError

log = logging.getLogger(__name__)


def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit seed derived from the run seed and a purpose (``derive_seed(0, "episodes")``): streams for
    different purposes are independent, and the same purpose gets the same stream for every learner."""
    digest = hashlib.sha256(repr((int(seed), *names)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_everything(seed: int) -> None:
    """One seed drives Python's ``random``, NumPy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG state, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(name: str | None, where: str = "training.device") -> torch.device:
    """``auto`` (or None) -> ``cuda`` when available, else ``cpu``; a device that is not there is a ConfigError
    naming ``where`` (the config key or the option it came from)."""
    name = (name or "auto").strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{where}: {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{where}: {name!r} asked for, but torch sees no CUDA GPU; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{where}: {name!r} does not exist; this machine has "
                              f"{torch.cuda.device_count()} GPU(s)")
    return device


def resolve_amp(amp: str, device: torch.device) -> str:
    """The precision actually used: fp16 needs CUDA (on CPU it falls back to bf16 with a warning, since a
    gradient scaler for fp16 on CPU is neither fast nor well supported); bf16 on CPU needs torch support."""
    if amp == "fp16" and device.type != "cuda":
        warnings.warn("training.amp=fp16 needs a CUDA device; using bf16 autocast on the CPU instead", stacklevel=2)
        log.warning("amp fp16 requested on %s: falling back to bf16", device)
        amp = "bf16"
    if amp == "bf16" and device.type == "cpu" and not _cpu_bf16_autocast_works():
        raise ConfigError("training.amp=bf16: this torch build cannot autocast to bf16 on the CPU; use --amp off")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"training.amp=bf16: {torch.cuda.get_device_name(device)} does not support bf16; use --amp fp16")
    return amp


def _cpu_bf16_autocast_works() -> bool:
    try:
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            out = torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2))
        return out.dtype == torch.bfloat16
    except Exception:  # noqa: BLE001 - any failure means "not supported"
        return False


@contextlib.contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels for the run (so resume and reruns give identical numbers), restored after."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
        torch.backends.cudnn.benchmark = benchmark


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)




def training_seed(cfg: Any, *names: object) -> int:
    """The seed of a training stream (initial head, episode draws, augmentation and batch order) for ``names``.

    ``training.replicate`` > 0 makes an independent repetition (the benchmark's A/A control): every training
    stream changes, while the target split and the stage-1 checkpoint (seeded by ``seed`` alone) stay."""
    replicate = int(getattr(cfg.training, "replicate", 0) or 0)
    if replicate:
        return derive_seed(cfg.seed, "replicate", replicate, *names)
    return derive_seed(cfg.seed, *names)
