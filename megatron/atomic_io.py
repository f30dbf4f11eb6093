"""Atomic writes: a killed process never leaves a half-written checkpoint, record or results file."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


#: how the temporary file of an atomic write is named: ``.<name>.<random>.tmp`` beside the target, so a write
#: killed half-way leaves only such a file (removed by :func:`remove_stale_tmp_files` at the next start)
TMP_PREFIX = "."
TMP_SUFFIX = ".tmp"


def file_mode() -> int:
    """The mode a new file gets from ``open()`` under the process umask (0o644 under the usual 022, 0o664
    under 002): results stay readable by the user's group, as the umask says. ``mkstemp`` alone gives 0o600."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read the umask by setting it (and put it back at once)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_tmp_files(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Delete the temporary files (``.<name>.<random>.tmp``) that atomic writes killed half-way left in
    ``folder``; returns what was removed. Call it only while no other process writes there (a run holds the
    run directory's lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f"{TMP_PREFIX}*{TMP_SUFFIX}"
    removed = []
    for tmp in (folder.rglob(pattern) if recursive else folder.glob(pattern)):
        if tmp.is_file() and not tmp.is_symlink() and tmp.name.count(".") >= 3:
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    _atomic(Path(path), lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic(Path(path), lambda f: f.write(text.encode()))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)``: tensors, dicts, lists and numbers only — no code runs on load."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)
