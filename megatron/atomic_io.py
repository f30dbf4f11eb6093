"""Atomic writes: a killed process never leaves a half-written checkpoint, record or results file; a full
disk is a :class:`StorageFullError` naming the file, the folder and its free space; :func:`safe_torch_load` reads
megatron's own files with torch's safe loader."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from megatron.errors import MegatronError
from megatron.safe_globals import safe_load


#: how the temporary file of an atomic write is named: ``.<name>.megatron-<host>-<pid>-<random>.tmp`` beside
#: the target (``<host>``: :func:`host_token`), so a write killed half-way leaves only such a file, which
#: :func:`remove_stale_tmp_files` recognises by this exact pattern (and its writer) and nothing else: a user's
#: ``.draft.v2.tmp`` is never touched. Names without ``<host>-`` were written by megatron before 0.1.1.
TMP_PREFIX = "."
TMP_MARK = ".megatron-"
TMP_SUFFIX = ".tmp"
TMP_PATTERN = re.compile(
    r"^\.(?P<name>.+)\.megatron-(?:(?P<host>[0-9a-f]{8})-)?(?P<pid>[0-9]+)-(?P<rand>[0-9a-f]{8})\.tmp$")
#: a file another machine is writing (a cache or run folder on a shared file system: SLURM array jobs) cannot be
#: judged by its PID here; it counts as abandoned only when untouched this long
OTHER_HOST_STALE_S = 7 * 24 * 3600

#: the errnos of a write refused for lack of room: no space, over the file-size limit (``ulimit -f``), over quota
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
#: what torch's zip writer says when the underlying write failed (it hides the OSError behind a RuntimeError)
_TORCH_WRITE_FAILED = ("inline_container", "unexpected pos", "file write failed", "PytorchStreamWriter failed")


class StorageFullError(MegatronError):
    """A write failed for lack of room (full disk, file-size limit, quota); nothing half-written was left."""


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


def host_token() -> str:
    """8 hex digits naming this machine (a hash of its host name) in the names of files a process is writing,
    so a process on another machine sharing the folder never takes them for a dead local writer's."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def writer_token() -> str:
    """``<host>-<pid>``: who is writing a temporary file, across the machines that share a folder."""
    return f"{host_token()}-{os.getpid()}"


def writer_gone(host: str | None, pid: int, path: Path) -> bool:
    """Whether the writer of ``path`` (``host`` as :func:`host_token`; None: this machine, an old name) is gone:
    on this machine its process no longer runs; on another machine (unknowable here) the file is untouched for
    :data:`OTHER_HOST_STALE_S`."""
    if host is None or host == host_token():
        return not process_alive(pid)
    try:
        return time.time() - path.stat().st_mtime > OTHER_HOST_STALE_S
    except OSError:
        return False


def tmp_name(target: str | Path) -> str:
    """The name of a new temporary file for an atomic write of ``target`` (see :data:`TMP_PATTERN`)."""
    return f"{TMP_PREFIX}{Path(target).name}{TMP_MARK}{writer_token()}-{secrets.token_hex(4)}{TMP_SUFFIX}"


def _create_tmp(path: Path) -> tuple[int, Path]:
    for _ in range(100):
        tmp = path.parent / tmp_name(path)
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def _atomic(path: Path, write) -> None:
    path = Path(path)
    with storage_errors(path, "write"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_tmp(path)
        try:
            os.fchmod(fd, file_mode())
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def is_out_of_room(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a write refused for lack of room: ENOSPC / EFBIG / EDQUOT, or
    torch's zip writer reporting a failed write (its RuntimeError hides the OSError)."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
            return True
        if isinstance(exc, RuntimeError) and any(m in str(exc) for m in _TORCH_WRITE_FAILED):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def free_space_note(folder: str | Path) -> str:
    """``"<N> MB free on that file system"`` (or why it is unknown) for a message about a full disk."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return f"{shutil.disk_usage(folder).free / 1e6:.0f} MB free on that file system"
    except OSError:
        return "free space unknown"


@contextlib.contextmanager
def storage_errors(path: str | Path, what: str = "write") -> Iterator[None]:
    """Turn a write refused for lack of room inside the block into a :class:`StorageFullError` naming ``path``,
    its folder's free space and the fix (the file-size limit too: ``ulimit -f`` gives EFBIG)."""
    try:
        yield
    except StorageFullError:
        raise
    except (OSError, RuntimeError) as exc:
        if not is_out_of_room(exc):
            raise
        raise StorageFullError(out_of_room_message(exc, path, what)) from exc


def out_of_room_message(exc: BaseException, path: str | Path | None, what: str = "write") -> str:
    """What a write refused for lack of room says: what, where, the free space there, and the fix."""
    cause = getattr(exc, "strerror", None) or "the write failed"
    if path is None:
        where, free = "a file", "free space unknown"
    else:
        where, free = str(path), free_space_note(Path(path).parent)
    return (f"could not {what} {where}: no room ({cause}; {free}; the shell's file-size limit, `ulimit -f`, counts "
            "too). Nothing half-written was kept. Fix: free space there or write elsewhere (--out / --run-dir; "
            "data.cache_dir for the stage-1 cache), then run again (--resume continues a run from its last "
            "checkpoint)")


def remove_stale_tmp_files(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Delete the temporary files megatron's atomic writes left in ``folder`` when killed half-way: only names
    matching :data:`TMP_PATTERN` whose writer is gone (:func:`writer_gone`; a live writer's file is left alone); returns
    what was removed. A run calls it only on the folder it owns (its run directory, the stage-1 cache)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = folder.rglob(f"*{TMP_MARK}*{TMP_SUFFIX}") if recursive else folder.glob(f"*{TMP_MARK}*{TMP_SUFFIX}")
    removed = []
    for tmp in candidates:
        match = TMP_PATTERN.match(tmp.name)
        if match is None or tmp.is_symlink() or not tmp.is_file() or not writer_gone(match["host"], int(match["pid"]),
                                                                                      tmp):
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (this process counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


#: the checksum file beside a file written for reuse: ``<file>.sha256`` in ``sha256sum`` format
CHECKSUM_SUFFIX = ".sha256"


def sha256_of(path: str | Path) -> str:
    """The sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checksum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def write_checksum(path: str | Path) -> str:
    """Record ``path``'s sha256 beside it (``<file>.sha256``, as ``sha256sum`` writes it); returns the digest."""
    digest = sha256_of(path)
    atomic_write_text(checksum_path(path), f"{digest}  {Path(path).name}\n")
    return digest


def verify_checksum(path: str | Path) -> str | None:
    """``None`` when ``path`` matches the checksum recorded beside it (or none was recorded); else why not."""
    recorded_at = checksum_path(path)
    try:
        recorded = recorded_at.read_text().split()[0]
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        return f"its checksum file {recorded_at} cannot be read ({exc})"
    actual = sha256_of(path)
    if actual != recorded:
        return (f"its content changed since megatron wrote it (sha256 {actual[:16]}..., recorded in {recorded_at.name}: "
                f"{recorded[:16]}...): a corrupted or replaced file")
    return None


def atomic_torch_save(obj: Any, path: str | Path, checksum: bool = False) -> None:
    """``torch.save`` atomically; ``checksum``: also record its sha256 beside it (a file written for reuse).
    The old checksum goes first, so a kill between the two writes leaves an unverified file, never a file
    with a checksum that is not its own."""
    path = Path(path)
    if checksum:
        with contextlib.suppress(FileNotFoundError):
            checksum_path(path).unlink()
    _atomic(path, lambda f: torch.save(obj, f))
    if checksum:
        with storage_errors(checksum_path(path)):
            write_checksum(path)


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
    """``torch.load(weights_only=True)`` with exactly the harmless extra types of :mod:`megatron.safe_globals`
    allowed (numpy values, mmengine's message hub): tensors, containers, numbers, strings — no code runs on
    load; anything else is a ``pickle.UnpicklingError``."""
    return safe_load(Path(path))
