"""What a weights file may reference: the allow-list of pickle globals megatron reads with the safe loader.

``torch.load(weights_only=True)`` refuses every global it does not know. Published mmengine / mmdet checkpoints
hold a few more harmless ones in their ``meta`` and ``message_hub``: numpy scalars and arrays (their
reconstructors and dtypes), mmengine's ``MessageHub``, ``HistoryBuffer`` and ``ConfigDict``, and the
``HistoryBuffer`` statistics methods (``min``, ``max``, ``mean``, ``current``), which protocol-2 pickles store as
``getattr(HistoryBuffer, "min")``. :func:`extra_safe_globals` lists exactly these, for torch's safe-globals
mechanism, active only while megatron loads a file (:func:`weights_only_globals`); ``builtins.getattr`` is
replaced by :func:`history_buffer_method`, which gives those four methods and nothing else.

:func:`is_data_global` is the allow-list the checkpoint diagnosis uses (torch's own safe globals plus these):
a file naming anything else "runs code" (a function call the file makes while loading), whatever module it
comes from — ``cProfile.run``, ``runpy``, ``pickle.loads`` are caught by construction, no list of dangerous
modules is needed.
"""
from __future__ import annotations

import builtins
import contextlib
import functools
import pickle
from typing import Any, Callable, Iterator

import numpy as np
import torch

#: the statistics methods a pickled ``HistoryBuffer`` names (mmengine registers these four by default)
HISTORY_BUFFER_METHODS = ("min", "max", "mean", "current")
#: the two module names numpy's array and scalar reconstructors are pickled under (numpy 1.x / 2.x)
_NUMPY_MULTIARRAY = ("numpy.core.multiarray", "numpy._core.multiarray")
#: builtins that are plain data types (torch allows some of them already; the rest are data as well)
_DATA_BUILTINS = ("set", "frozenset", "slice", "complex", "bytearray", "bytes", "range", "list", "dict", "tuple",
                  "str", "int", "float", "bool")


def _history_buffer_class() -> type | None:
    try:  # optional dependency: mmengine (installed with the mmdet detectors)
        from mmengine.logging import HistoryBuffer
    except ImportError:
        return None
    return HistoryBuffer


def history_buffer_method(obj: Any, name: str) -> Callable:
    """What ``getattr(obj, name)`` in a weights file may be: a statistics method of mmengine's
    ``HistoryBuffer`` (the class or an instance), and nothing else."""
    cls = _history_buffer_class()
    allowed = set(HISTORY_BUFFER_METHODS) | set(getattr(cls, "_statistics_methods", {}) or {})
    if cls is None or not (obj is cls or type(obj) is cls) or not isinstance(name, str) or name not in allowed:
        raise pickle.UnpicklingError(f"the file calls getattr({type(obj).__name__}, {name!r}); a weights file may use getattr "
                           f"only for mmengine HistoryBuffer statistics ({', '.join(HISTORY_BUFFER_METHODS)})")
    return getattr(obj, name)


@functools.lru_cache(maxsize=1)
def extra_safe_globals() -> tuple[tuple[Any, str], ...]:
    """``(object, "module.name")`` pairs for ``torch.serialization.safe_globals``: numpy's reconstructors,
    ``ndarray``, ``dtype`` and its classes, the mmengine types of a model-zoo file, the restricted getattr."""
    _multiarray = _numpy_multiarray()
    pairs: list[tuple[Any, str]] = [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype"),
                                    (history_buffer_method, "builtins.getattr")]
    pairs += [(getattr(builtins, name), f"builtins.{name}") for name in _DATA_BUILTINS]
    for module in _NUMPY_MULTIARRAY:
        pairs += [(_multiarray._reconstruct, f"{module}._reconstruct"), (_multiarray.scalar, f"{module}.scalar")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: one class per dtype, pickled by name in some versions
    for name in dir(dtypes) if dtypes is not None else ():
        cls = getattr(dtypes, name)
        if isinstance(cls, type) and issubclass(cls, np.dtype):
            pairs.append((cls, f"numpy.dtypes.{name}"))
    for cls in _mmengine_types():
        pairs.append((cls, f"{cls.__module__}.{cls.__qualname__}"))
    return tuple(pairs)


def _numpy_multiarray():
    try:  # numpy 2 (numpy.core is a deprecated alias there)
        from numpy._core import multiarray  # noqa: PLC0415
    except ImportError:  # numpy 1
        from numpy.core import multiarray  # noqa: PLC0415
    return multiarray


def _mmengine_types() -> list[type]:
    try:  # optional dependency: mmengine
        from mmengine.config import ConfigDict
        from mmengine.logging import HistoryBuffer, MessageHub
    except ImportError:
        return []
    return [MessageHub, HistoryBuffer, ConfigDict]


@contextlib.contextmanager
def weights_only_globals() -> Iterator[None]:
    """torch's safe loader allows :func:`extra_safe_globals` inside this block (and only there)."""
    with torch.serialization.safe_globals(list(extra_safe_globals())):
        yield


def safe_load(source: Any) -> Any:
    """``torch.load(source, weights_only=True)`` with :func:`extra_safe_globals` allowed: a model-zoo file loads;
    anything that would run code is refused (``pickle.UnpicklingError``)."""
    with weights_only_globals():
        return torch.load(source, map_location="cpu", weights_only=True)


@functools.lru_cache(maxsize=1)
def data_global_names() -> frozenset[str]:
    """Every ``module.name`` a weights file may reference: torch's safe globals and :func:`extra_safe_globals`."""
    try:
        from torch import _weights_only_unpickler  # noqa: PLC0415 - torch's own allow-list (private, so guarded)

        names = set(_weights_only_unpickler._get_allowed_globals())
    except (ImportError, AttributeError):  # a torch without it: its public tensor rebuilders still count
        names = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter"}
    names |= {name for _, name in extra_safe_globals()}
    names.discard("builtins.getattr")  # allowed only through history_buffer_method: see is_data_global
    return frozenset(names)


def is_data_global(name: str) -> bool:
    """Whether a pickle global ``name`` (``module.name``) is on the allow-list of what weights files hold.
    ``builtins.getattr`` counts as data: while loading it is :func:`history_buffer_method`, which refuses any
    other use."""
    module, _, attr = name.rpartition(".")
    if module == "__builtin__":
        module = "builtins"
    name = f"{module}.{attr}"
    if name == "builtins.getattr":
        return _history_buffer_class() is not None
    return name in data_global_names()
