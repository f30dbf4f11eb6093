"""Loading detector weights from local files, and writing megatron's own detector checkpoints.

Model-agnostic: works on any :class:`~megatron.api.detector.Detector` through its ``state_dict``. Three formats
are read by :func:`load_weights`:

- **megatron** checkpoints (written by :func:`save_detector_checkpoint`, e.g. by ``megatron pretrain``): the
  detector's own ``state_dict`` plus a small header. When the checkpoint's number of classes differs from the
  detector's, the classifier is loaded at the checkpoint's size and then re-initialised for the detector's
  classes (``Detector.set_num_classes``): every other weight is kept.
- **mmdet / mmengine** checkpoints (``{"state_dict": ..., "meta": ...}``): keys are those of the mmdet model.
- **plain state dicts**, including torchvision's: ``resnet18/34/50/101`` ImageNet weights (``conv1.*``,
  ``layer1.*`` ...) map onto an mmdet ResNet backbone, torchvision detection models' ``backbone.body.*`` too.

Files are read with ``torch.load(weights_only=True)`` (no code from the file runs), allowing exactly the harmless
types a model-zoo file holds in ``meta`` / ``message_hub`` (numpy scalars and arrays, mmengine's MessageHub,
HistoryBuffer, ConfigDict: :mod:`megatron.safe_globals`), so a published mmdet checkpoint loads with no opt-in.
A file that references anything else would run code when loaded: a :class:`CheckpointError` says so and never
suggests the opt-in; ``allow_unsafe=True`` (or ``MEGATRON_ALLOW_UNSAFE_CHECKPOINTS=1``) is full unpickling, for a
file you made yourself.

Weights whose shape differs from the detector's are skipped and reported, never loaded half-way.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron.atomic_io import atomic_torch_save, checksum_path, verify_checksum
from megatron.errors import MegatronError
from megatron.safe_globals import is_data_global, safe_load

log = logging.getLogger(__name__)

FORMAT_TAG = "megatron-detector"
FORMAT_VERSION = 1
ENV_ALLOW_UNSAFE = "MEGATRON_ALLOW_UNSAFE_CHECKPOINTS"


class CheckpointError(MegatronError):
    """A checkpoint file that cannot be read or does not fit the detector."""


@dataclass
class LoadReport:
    """What :func:`load_weights` did. ``rich``-printable (a table), and ``str()`` gives a plain summary."""

    path: Path
    format: str  # "megatron" | "mmdet" | "torchvision" | "state_dict"
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # detector keys the file does not have (kept as they were)
    unexpected: list[str] = field(default_factory=list)  # file keys the detector does not have (ignored)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # (key, file, detector)
    reinitialised_classifier: tuple[int, int] | None = None  # (checkpoint classes, detector classes)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Every detector weight came from the file (nothing missing or shape-mismatched)."""
        return not self.missing and not self.mismatched

    def summary(self) -> str:
        parts = [f"{self.path} ({self.format}): loaded {len(self.loaded)} tensors"]
        if self.reinitialised_classifier:
            a, b = self.reinitialised_classifier
            parts.append(f"classifier re-initialised for {b} classes (checkpoint: {a})")
        if self.missing:
            parts.append(f"{len(self.missing)} missing (kept at initialisation)")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} with a different shape (skipped)")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected (ignored)")
        return "; ".join(parts)

    def __str__(self) -> str:
        lines = [self.summary()]
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                lines.append(f"  {title}: {_abbrev(keys)}")
        if self.mismatched:
            shown = ", ".join(f"{k} {tuple(a)} in file vs {tuple(b)}" for k, a, b in self.mismatched[:5])
            more = f" (+{len(self.mismatched) - 5} more)" if len(self.mismatched) > 5 else ""
            lines.append(f"  shape mismatch: {shown}{more}")
        return "\n".join(lines)

    def __rich__(self):
        from rich.table import Table

        table = Table(title=f"checkpoint {self.path} ({self.format})", show_lines=False)
        table.add_column("", style="bold")
        table.add_column("count", justify="right")
        table.add_column("keys (first ones)")
        table.add_row("[green]loaded", str(len(self.loaded)), "")
        table.add_row("[yellow]missing", str(len(self.missing)), _abbrev(self.missing))
        table.add_row("[yellow]shape mismatch", str(len(self.mismatched)),
                      ", ".join(f"{k} {tuple(a)}->{tuple(b)}" for k, a, b in self.mismatched[:4]))
        table.add_row("[dim]unexpected", str(len(self.unexpected)), _abbrev(self.unexpected))
        if self.reinitialised_classifier:
            a, b = self.reinitialised_classifier
            table.caption = f"classifier re-initialised for {b} classes (checkpoint: {a})"
        return table


def _abbrev(keys: list[str], n: int = 4) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# --- reading ------------------------------------------------------------------------------------------
def read_checkpoint_file(path: str | Path, allow_unsafe: bool = False) -> Any:
    """The object in a checkpoint file, read with the safe loader (tensors, containers, numbers, strings and the
    numpy / mmengine types of :mod:`megatron.safe_globals`); a clear :class:`CheckpointError` naming ``path``
    on failure. A file that references anything else would run code when loaded: refused, unless the caller
    opted in (``allow_unsafe`` / ``MEGATRON_ALLOW_UNSAFE_CHECKPOINTS=1``: full unpickling of a file you trust)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found (detector.checkpoint / --checkpoint expects a local file)")
    allow_unsafe = allow_unsafe or os.environ.get(ENV_ALLOW_UNSAFE, "") not in ("", "0")
    changed = verify_checksum(path)
    if changed is not None:
        raise CheckpointError(f"checkpoint {path}: {changed}. Fix: write it again (the command that made it), or "
                              f"delete {checksum_path(path).name} if you changed it on purpose")
    try:
        return safe_load(path)
    except pickle.UnpicklingError as exc:
        return _refused(path, torch_reason(str(exc)).rstrip("."), allow_unsafe)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is not a PyTorch checkpoint that can be read (truncated or corrupt?): "
            f"{type(exc).__name__}: {_sentences(' '.join(str(exc).split()), 400)}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - random bytes can trip the safe unpickler in any way (IndexError...)
        raise CheckpointError(
            f"checkpoint {path} is not a PyTorch checkpoint: the safe loader could not parse it ({type(exc).__name__}: "
            f"{_sentences(' '.join(str(exc).split()), 200)}; random, truncated or another kind of file?). Fix: point "
            "detector.checkpoint / --checkpoint at the .pt/.pth file written by torch.save, `megatron pretrain` or mmdet"
        ) from None


def _refused(path: Path, reason: str, allow_unsafe: bool) -> Any:
    """What to do with a file the safe loader refused: say why (never suggesting the opt-in for it), or load it
    fully when the caller opted in."""
    kind, names = inspect_pickle(path)
    if kind == "not-a-checkpoint":
        raise CheckpointError(
            f"checkpoint {path} is not a PyTorch checkpoint: it is neither a torch.save zip archive nor a pickle "
            f"(random, truncated or another kind of file?); torch says: {reason}. Fix: point "
            "detector.checkpoint / --checkpoint at the .pt/.pth file written by torch.save, `megatron pretrain` "
            "or mmdet"
        ) from None
    if not allow_unsafe:
        what = (f"its pickle references {', '.join(names[:4])}" + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
                + ", which is not among what a weights file holds") if kind == "code" else \
            "its pickle uses the types a weights file holds in a way that calls code"
        raise CheckpointError(
            f"checkpoint {path} would run code when loaded: {what} (tensors, containers, numbers, strings, numpy "
            f"scalars and arrays, mmengine's MessageHub / HistoryBuffer / ConfigDict); the safe loader refused it: "
            f"{reason}. Do not load this file unless you made it yourself: weights never need code. Ask whoever made "
            "it for the weights alone (a state dict of tensors saved with torch.save)"
        ) from None
    log.warning("loading %s with weights_only=False (unsafe loading explicitly allowed): it references %s",
                path, ", ".join(names[:8]) or "nothing megatron recognises")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc2:  # noqa: BLE001 - any failure here means the file is unreadable
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(exc2).__name__}: {exc2}") from None


# --- why the safe loader refused a file ---------------------------------------------------------------------
#: the lines of torch's message that are advice about torch.load, not the reason
_TORCH_BOILERPLATE = ("weights only load failed", "in pytorch 2.6", "re-running `torch.load`", "please file an issue",
                      "check the documentation", "this file can still be loaded", "alternatively, to load",
                      "(1) in pytorch", "(2) alternatively")


#: torch's advice, inside its reason, to allow-list the refused global (megatron never gives that advice)
_ALLOWLIST_ADVICE = re.compile(r"\s*Please use `torch\.serialization\.add_safe_globals.*?(if you trust this class/function\.|$)")


def torch_reason(message: str, limit: int = 400) -> str:
    """torch's own reason in a ``weights_only`` UnpicklingError (e.g. ``Unsupported global: GLOBAL
    numpy.dtype was not an allowed global by default.``), without its general advice, in whole sentences."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", message)
    kept = []
    for line in text.splitlines():
        line = " ".join(line.split())
        low = line.lower()
        if not line or any(low.startswith(b) or b in low[:60] for b in _TORCH_BOILERPLATE):
            continue
        line = re.sub(r"^(WeightsUnpickler error:\s*)", "", line)
        line = _ALLOWLIST_ADVICE.sub("", line).strip()  # torch's advice to allow-list the global: never ours
        if line:
            kept.append(line)
    reason = " ".join(kept) or " ".join(text.split())
    return _sentences(reason, limit)


def _sentences(text: str, limit: int) -> str:
    """``text`` cut to whole sentences within ``limit`` characters (never mid-sentence unless one sentence is
    longer, then at a word with "...")."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = max(cut.rfind(". "), cut.rfind("; "))
    if end > 0:
        return cut[:end + 1]
    return cut.rsplit(" ", 1)[0] + " ..."


def inspect_pickle(path: Path) -> tuple[str, list[str]]:
    """Read the pickle opcodes of a checkpoint *without running them* (``pickletools``) and classify it:
    ``("not-a-checkpoint", [])`` for bytes that are neither a torch zip nor a pickle; ``("code", names)`` with
    the globals it references that are not on the allow-list of :mod:`megatron.safe_globals` (anything that is
    not a tensor, container, number, string, numpy or mmengine data type: ``os.system``, ``cProfile.run``,
    ``runpy._run_code``, ``pickle.loads`` alike); ``("objects", names)`` when every global is allowed (the
    file then misuses one, e.g. ``getattr`` on something other than a HistoryBuffer)."""
    streams: list[bytes] = []
    try:
        raw = path.read_bytes()
    except OSError:
        return "not-a-checkpoint", []
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                streams = [zf.read(n) for n in zf.namelist() if n.endswith(".pkl")]
        except (zipfile.BadZipFile, OSError, KeyError):
            return "not-a-checkpoint", []
        if not streams:
            return "not-a-checkpoint", []
    else:
        streams = [raw]
    names: list[str] = []
    for data in streams:
        found = _pickle_globals(data)
        if found is None:
            return "not-a-checkpoint", []
        names += [n for n in found if n not in names]
    if not names:  # a pickle the safe loader refuses that imports nothing: not something torch.save wrote
        return "not-a-checkpoint", []
    foreign = [n for n in names if not is_data_global(n)]
    return ("code", foreign) if foreign else ("objects", names)


def _pickle_globals(data: bytes) -> list[str] | None:
    """``module.name`` of every GLOBAL / STACK_GLOBAL / INST in the pickle(s) of ``data`` (legacy torch files hold
    several pickles back to back); ``None`` when ``data`` does not start with a valid pickle."""
    import io
    import pickletools

    names: list[str] = []
    stream = io.BytesIO(data)
    first = True
    while stream.tell() < len(data):
        strings: list[str] = []
        memo: dict[int, str] = {}
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":  # a name built in a way not followed here is not data
                    names.append(f"{strings[-2]}.{strings[-1]}" if len(strings) >= 2 else "<a global of unknown name>")
                elif isinstance(arg, str) and op.name.endswith("UNICODE") or op.name in ("STRING", "SHORT_BINSTRING",
                                                                                          "BINSTRING"):
                    strings.append(str(arg))
                elif op.name in ("MEMOIZE",) and strings:
                    memo[len(memo)] = strings[-1]
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                    memo[int(arg)] = strings[-1]
                elif op.name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:
                    strings.append(memo[int(arg)])
        except Exception:  # noqa: BLE001 - not a pickle (or not one any more: trailing tensor bytes)
            if first:
                return None
            break
        first = False
    return names


def _tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _split(obj: Any, path: Path) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """(format, state dict, header/meta) of a loaded checkpoint object."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT_TAG:
        return "megatron", obj["state_dict"], {k: v for k, v in obj.items() if k != "state_dict"}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        return "mmdet", obj["state_dict"], meta
    if isinstance(obj, dict) and _tensor_dict(obj.get("model")):
        return "state_dict", obj["model"], {}
    if _tensor_dict(obj):
        keys = obj.keys()
        if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
            return "torchvision", obj, {}
        if any(k.startswith("backbone.body.") for k in keys):
            return "torchvision", obj, {}
        return "state_dict", obj, {}
    raise CheckpointError(
        f"checkpoint {path}: not a recognised layout (expected a megatron checkpoint, an mmdet checkpoint with "
        f"'state_dict', or a dict of tensors); top-level type {type(obj).__name__}"
        + (f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else "")
    )


def _map_keys(fmt: str, state: dict[str, torch.Tensor], target_keys: set[str]) -> dict[str, torch.Tensor]:
    """Rename file keys to the detector's names (``model.`` + mmdet names)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = key[len("module."):] if key.startswith("module.") else key  # DataParallel / DDP wrappers
        if fmt == "torchvision":
            if k.startswith("backbone.body."):
                k = "backbone." + k[len("backbone.body."):]
            elif not k.startswith(("backbone.", "neck.", "rpn.", "roi_heads.", "head.")):
                k = "backbone." + k  # ImageNet classification ResNet: its trunk is the mmdet ResNet backbone
        if k not in target_keys and f"model.{k}" in target_keys or not k.startswith("model."):
            k = f"model.{k}"  # the detector holds the mmdet model as ``self.model``
        out[k] = value
    return out


def load_weights(detector: torch.nn.Module, path: str | Path, *, allow_unsafe: bool = False) -> LoadReport:
    """Load the weights in ``path`` into ``detector`` (in place); returns what was loaded, missing, skipped.

    Raises :class:`CheckpointError` for a missing/corrupt file, an unsafe file without ``allow_unsafe``, a
    megatron checkpoint of another detector, or a file none of whose weights fit the detector.
    """
    path = Path(path)
    obj = read_checkpoint_file(path, allow_unsafe=allow_unsafe)
    fmt, state, meta = _split(obj, path)
    report = LoadReport(path=path, format=fmt, meta=dict(meta))

    if fmt == "megatron":
        name = getattr(detector, "PLUGIN_NAME", None)
        if meta.get("detector") and name and meta["detector"] != name:
            raise CheckpointError(
                f"checkpoint {path} was written for detector {meta['detector']!r}, not {name!r}; "
                f"set detector.name: {meta['detector']} (and the same detector.options: {meta.get('options', {})})"
            )
        ckpt_classes = int(meta.get("num_classes", getattr(detector, "num_classes", 0)))
        det_classes = int(getattr(detector, "num_classes", ckpt_classes))
        if ckpt_classes != det_classes and hasattr(detector, "set_num_classes"):
            # load the classifier at its trained size, then re-initialise only it for the new label space
            detector.set_num_classes(ckpt_classes)
            _load_matching(detector, state, report)
            detector.set_num_classes(det_classes)
            report.reinitialised_classifier = (ckpt_classes, det_classes)
            cls_names = set(detector.parameter_groups().get("head_cls", []))
            report.loaded = [k for k in report.loaded if k not in cls_names]
            return _finish(report, path)
        _load_matching(detector, state, report)
        return _finish(report, path)

    target_keys = set(detector.state_dict())
    _load_matching(detector, _map_keys(fmt, state, target_keys), report)
    return _finish(report, path)


def _load_matching(detector: torch.nn.Module, state: dict[str, torch.Tensor], report: LoadReport) -> None:
    own = detector.state_dict()
    to_load: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(own[key].shape) != tuple(value.shape):
            report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            to_load[key] = value
    report.missing = [k for k in own if k not in state]
    if to_load:
        detector.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)


def _finish(report: LoadReport, path: Path) -> LoadReport:
    if not report.loaded:
        raise CheckpointError(
            f"checkpoint {path} ({report.format}): none of its {len(report.unexpected) + len(report.mismatched)} "
            f"weights fit this detector (e.g. {_abbrev(report.unexpected or [m[0] for m in report.mismatched], 3)}); "
            "is it a checkpoint of another model or backbone depth?"
        )
    log.info("%s", report.summary())
    return report


# --- writing ------------------------------------------------------------------------------------------
def save_detector_checkpoint(detector: torch.nn.Module, path: str | Path, meta: dict[str, Any] | None = None,
                             checksum: bool = True) -> Path:
    """Write ``detector``'s weights and a header (detector name, classes, input size, options) atomically, with
    its sha256 beside it (``<file>.sha256``, checked whenever it is read) unless ``checksum`` is false.

    ``meta`` must hold only plain values (str, numbers, lists, dicts): the file stays loadable with
    ``torch.load(weights_only=True)``.
    """
    options = getattr(detector, "options", None)
    obj = {
        "format": FORMAT_TAG,
        "version": FORMAT_VERSION,
        "detector": getattr(detector, "PLUGIN_NAME", type(detector).__name__),
        "num_classes": int(getattr(detector, "num_classes", 0)),
        "input_size": int(getattr(detector, "input_size", 0)),
        "options": options.model_dump(mode="json") if hasattr(options, "model_dump") else {},
        "meta": dict(meta or {}),
        "state_dict": {k: v.detach().cpu().clone() for k, v in detector.state_dict().items()},
    }
    path = Path(path)
    atomic_torch_save(obj, path, checksum=checksum)
    return path


def read_checkpoint_header(path: str | Path) -> dict[str, Any]:
    """The header of a megatron checkpoint (detector, num_classes, input_size, options, meta); ``{}`` for
    other formats."""
    obj = read_checkpoint_file(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT_TAG:
        return {k: v for k, v in obj.items() if k != "state_dict"}
    return {}
