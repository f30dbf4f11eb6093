"""The adapted model as a product: one self-describing file per model (``RUN_DIR/models/<learner>-best.pth``).

A *model file* holds everything needed to use the detector, and nothing that needs the run's config:

- the detector plugin's name and options (validated again on load against the installed plugin),
- the class names (the head is built for exactly these, in this label order),
- the input size and the preprocessing settings (CLAHE and its parameters, letterbox padding, the intensity
  window of non-8-bit input; for a target read from volumes, its slicing axis, 2.5D channels and intensity
  window), so ``megatron predict`` pre-processes exactly as training did,
- the prototypes and temperature of a prototype (cosine) classifier when one is in place
  (:meth:`~megatron.api.detector.Detector.get_prototypes`): a ``proto``-adapted detector reloads identically,
- the evaluation settings (score threshold for precision/recall/F1, IoU, max detections),
- the operating point: the score threshold chosen on the validation split (``evaluation.operating_point``),
  where it came from, and precision / recall / F1 and the FROC point at it on validation and held-out — the
  default threshold of ``megatron predict`` (files without one, or from a run without a validation split,
  fall back to the fixed score threshold, and say so),
- provenance (learner, run directory, meta-epoch, metrics, seed, megatron and torch versions, time),
- the detector's ``state_dict``.

Layout (a dict; only tensors, str, int, float, bool, None, lists and dicts, so
``torch.load(weights_only=True)`` reads it and no code from the file runs)::

    {"format": "megatron-model", "version": 1,
     "detector": {"name": "yolox", "options": {...}},
     "class_names": [...], "input_size": 256,
     "preprocessing": {"clahe": False, "clahe_clip_limit": 2.0, "clahe_tiles": 8, "pad_value": 0,
                       "intensity_window_percentiles": [0.5, 99.5],
                       "volume": {"channels": "2.5d", "intensity": "lung", ...}},  # "volume": volume targets only
     "evaluation": {"score_threshold": 0.3, "iou_threshold": 0.5, "max_detections": 100, ...},
     "operating_point": None | {"threshold": 0.12, "rule": "max_f1", "chosen_on": "validation", ...,
                                "validation": {"precision": ..., "recall": ..., "F1": ..., "fp_per_image": ...},
                                "heldout": {...}},
     "prototypes": None | {"prototypes": Tensor (C, D), "temperature": 10.0},
     "provenance": {...},
     "state_dict": {...}}

:func:`save_model` writes it atomically (temp file + rename); :func:`load_model` builds the detector through
the plugin manager, sizes its head to the class names, installs the prototypes and loads the weights strictly.
Files that are not model files (a ``megatron pretrain`` checkpoint, a run's training checkpoint, an mmdet
checkpoint, a plain state dict, random bytes) are a :class:`ModelFileError` that says what the file looks like
and what to do with it.
"""
from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron.atomic_io import atomic_torch_save
from megatron.errors import UnknownNameError
from megatron.evaluation.operating_point import describe as describe_operating_point
from megatron.training.weights import FORMAT_TAG as DETECTOR_CHECKPOINT_TAG
from megatron.training.weights import CheckpointError, read_checkpoint_file
from megatron.data import preprocess
from megatron.data.volumes import target_reading_options
import megatron
from megatron.config import validate_plugin_options
from megatron.runtime.environment import resolve_device as resolve

log = logging.getLogger(__name__)

MODEL_FORMAT = "megatron-model"
MODEL_VERSION = 1
#: the preprocessing keys a model file may hold, with their defaults (those of :class:`Preprocessor`)
PREPROCESSING_DEFAULTS: dict[str, Any] = {
    "clahe": False,
    "clahe_clip_limit": 2.0,
    "clahe_tiles": 8,
    "pad_value": 0,
}
#: optional preprocessing key: the target's ``volume`` plugin reading options (slicing axis, 2.5D channels,
#: intensity window; megatron.data.volumes.READING_OPTIONS), the defaults of `evaluate --format volume` / `predict
#: --volumes`; absent when the target was not read from volumes
VOLUME_READING_KEY = "volume"
EVALUATION_DEFAULTS: dict[str, Any] = {"score_threshold": 0.3, "iou_threshold": 0.5, "max_detections": 100}
_USE_IT = ("use a model file written by `megatron run` (RUN_DIR/models/<learner>-best.pth or -final.pth) "
           "or by megatron.training.model_file.save_model")


class ModelFileError(CheckpointError):
    """A file that is not a usable megatron model file (the message says what it is and what to do)."""


@dataclass(frozen=True)
class ModelInfo:
    """What a model file says about its model (everything but the weights)."""

    path: Path
    detector_name: str
    detector_options: dict[str, Any]
    class_names: list[str]
    input_size: int
    preprocessing: dict[str, Any]
    evaluation: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)
    prototypes: bool = False  # a prototype (cosine) classifier is part of the model
    version: int = MODEL_VERSION
    operating_point: dict[str, Any] | None = None  # chosen on validation (model_operating_point); None: older file

    @property
    def score_threshold(self) -> float:
        """The fixed threshold of the run's P/R/F1 (``evaluation.score_threshold``)."""
        return float(self.evaluation.get("score_threshold", EVALUATION_DEFAULTS["score_threshold"]))

    @property
    def default_threshold(self) -> tuple[float, str]:
        """``megatron predict``'s default threshold and, in words, where it came from: the operating point chosen
        on the validation split when the file has one, else the fixed ``score_threshold``."""
        point = self.operating_point
        if point and point.get("chosen_on") == "validation":
            return float(point["threshold"]), describe_operating_point(point, self.score_threshold)
        return self.score_threshold, describe_operating_point(point, self.score_threshold)

    def preprocessor(self):
        """An evaluation :class:`~megatron.data.preprocess.Preprocessor` with the model's settings (no augmentation)."""
        return preprocessor_from_settings(self.input_size, self.preprocessing)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "detector": {"name": self.detector_name, "options": self.detector_options},
                "class_names": list(self.class_names), "input_size": self.input_size,
                "preprocessing": dict(self.preprocessing), "evaluation": dict(self.evaluation),
                "prototypes": self.prototypes, "provenance": dict(self.provenance), "version": self.version,
                "operating_point": self.operating_point}


# --- preprocessing settings --------------------------------------------------------------------------
def preprocessing_settings(pre) -> dict[str, Any]:
    """The settings of a :class:`~megatron.data.preprocess.Preprocessor` that a model file keeps (everything
    that changes what the detector sees at inference; augmentation and caching do not)."""

    return {
        "clahe": bool(pre.clahe),
        "clahe_clip_limit": float(pre.clahe_clip_limit),
        "clahe_tiles": int(pre.clahe_tiles),
        "pad_value": int(pre.pad_value),
        "intensity_window_percentiles": [float(preprocess.WINDOW_LOW_PERCENTILE),
                                         float(preprocess.WINDOW_HIGH_PERCENTILE)],
    }


def model_preprocessing(pre, data_config) -> dict[str, Any]:
    """What a run's model file keeps as ``preprocessing``: the :class:`Preprocessor`'s settings, plus the target's
    ``volume`` reading options (:data:`VOLUME_READING_KEY`) when ``data_config``'s target is read from volumes."""
    settings = preprocessing_settings(pre)
    reading = target_reading_options(data_config.datasets, data_config.target)
    if reading is not None:
        settings[VOLUME_READING_KEY] = reading
    return settings


def _check_preprocessing(settings: dict[str, Any], where: str) -> dict[str, Any]:
    known = {*PREPROCESSING_DEFAULTS, "intensity_window_percentiles", VOLUME_READING_KEY}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ModelFileError(f"{where}: unknown preprocessing setting(s) {unknown} (this megatron knows "
                             f"{sorted(known)}); was the model written by a newer megatron? upgrade megatron")
    return {**PREPROCESSING_DEFAULTS, **settings}


def preprocessor_from_settings(input_size: int, settings: dict[str, Any]):
    """An evaluation Preprocessor (no augmentation, no cache) from a model file's preprocessing settings."""

    s = _check_preprocessing(dict(settings), "preprocessing")
    window = s.get("intensity_window_percentiles")
    here = [preprocess.WINDOW_LOW_PERCENTILE, preprocess.WINDOW_HIGH_PERCENTILE]
    if window is not None and [float(v) for v in window] != [float(v) for v in here]:
        log.warning("the model was trained with the intensity window at percentiles %s of non-8-bit images; "
                    "this megatron uses %s: predictions on 16-bit input may differ", window, here)
    return preprocess.Preprocessor(int(input_size), clahe=bool(s["clahe"]), augment=False, cache_size=0,
                                   pad_value=int(s["pad_value"]), clahe_clip_limit=float(s["clahe_clip_limit"]),
                                   clahe_tiles=int(s["clahe_tiles"]))


# --- writing ------------------------------------------------------------------------------------------
def _plain(value: Any, where: str) -> Any:
    """``value`` as plain str/int/float/bool/None/list/dict (what ``weights_only`` loading accepts)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)  # str subclasses (torch.__version__ is one) do not pass weights_only loading
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.ndarray):
        return _plain(value.tolist(), where)
    if hasattr(value, "model_dump"):
        return _plain(value.model_dump(mode="json"), where)
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"save_model: {where} holds a {type(value).__name__} ({value!r:.80}); only str, numbers, bools, "
                    "None, lists and dicts can go into a model file")


def save_model(detector: torch.nn.Module, path: str | Path, *, detector_name: str, detector_options: dict[str, Any],
               class_names: list[str], input_size: int, preprocessing: dict[str, Any] | Any,
               provenance: dict[str, Any] | None = None, evaluation: dict[str, Any] | None = None,
               operating_point: dict[str, Any] | None = None) -> Path:
    """Write ``detector`` as a self-describing model file at ``path`` (atomically); returns the path.

    ``detector_options``: the plugin options (a dict or the detector's ``Options`` model); ``class_names``: one
    per class of the head, in label order; ``preprocessing``: the Preprocessor the detector was trained with
    (or its :func:`preprocessing_settings`, or a dict with some of those keys); ``evaluation``: the
    evaluation settings (``score_threshold``, ``iou_threshold``, ``max_detections``); ``operating_point``: the
    threshold chosen on the validation split and where it came from, with P/R/F1 at it
    (:func:`megatron.evaluation.operating_point.model_operating_point`) — ``megatron predict``'s default
    threshold, else ``score_threshold`` is; ``provenance``: anything plain that says where the model comes from
    (learner, run directory, meta-epoch, metrics, seed...; megatron and torch versions and the time are added).

    A prototype classifier in place (``detector.get_prototypes()``) is saved with the model. Mismatches
    between the arguments and the detector (name, number of classes, input size, options) are a ValueError:
    a file that contradicts its own weights would mislead every later use.
    """
    path = Path(path)
    names = _checked_class_names(detector, detector_name, class_names, input_size)
    prov = {"megatron_version": str(megatron.__version__), "torch_version": str(torch.__version__),
            "saved_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    prov.update(_plain(dict(provenance or {}), "provenance"))
    obj = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "detector": {"name": str(detector_name), "options": _checked_options(detector, detector_options)},
        "class_names": names,
        "input_size": int(input_size),
        "preprocessing": _checked_preprocessing(preprocessing, input_size),
        "evaluation": {**EVALUATION_DEFAULTS, **_plain(dict(evaluation or {}), "evaluation")},
        "operating_point": _plain(operating_point, "operating_point"),
        "prototypes": _prototypes_of(detector, detector_name, path),
        "provenance": prov,
        "state_dict": {k: v.detach().cpu().clone() for k, v in detector.state_dict().items()},
    }
    atomic_torch_save(obj, path)
    return path


def _checked_class_names(detector: torch.nn.Module, detector_name: str, class_names: list[str],
                         input_size: int) -> list[str]:
    """The class names as plain strings, after checking name, head size and input size against the detector."""
    plugin_name = getattr(detector, "PLUGIN_NAME", None)
    if plugin_name is not None and plugin_name != detector_name:
        raise ValueError(f"save_model: detector_name={detector_name!r} but the detector is {plugin_name!r}")
    names = [str(n) for n in class_names]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"save_model: class_names must be non-empty and unique, got {names}")
    n_cls = getattr(detector, "num_classes", None)
    if n_cls is not None and int(n_cls) != len(names):
        raise ValueError(f"save_model: {len(names)} class names {names} for a detector head of {n_cls} classes; "
                         "resize the head first (detector.set_num_classes) or pass the head's class names")
    det_size = getattr(detector, "input_size", None)
    if det_size is not None and int(det_size) != int(input_size):
        raise ValueError(f"save_model: input_size={input_size} but the detector was built for {det_size}")
    return names


def _checked_options(detector: torch.nn.Module, detector_options: dict[str, Any] | Any) -> dict[str, Any]:
    """The detector options as plain values, every option spelled out when the plugin has an Options model
    (defaults may change between versions); options that differ from the detector's own are a ValueError."""
    options = _plain(detector_options if detector_options is not None else {}, "detector_options")
    own = getattr(detector, "options", None)
    options_cls = getattr(type(detector), "Options", None)
    if hasattr(own, "model_dump") and options_cls is not None:
        given = options_cls.model_validate(options).model_dump(mode="json")
        if given != own.model_dump(mode="json"):
            raise ValueError(f"save_model: detector_options {options} differ from the detector's own options "
                             f"{own.model_dump(mode='json')}")
        options = given
    return options


def _checked_preprocessing(preprocessing: dict[str, Any] | Any, input_size: int) -> dict[str, Any]:
    """Preprocessing settings from a Preprocessor or a dict, with the defaults filled in."""
    if hasattr(preprocessing, "clahe") and hasattr(preprocessing, "input_size"):  # a Preprocessor
        if int(preprocessing.input_size) != int(input_size):
            raise ValueError(f"save_model: the Preprocessor's input_size {preprocessing.input_size} is not {input_size}")
        preprocessing = preprocessing_settings(preprocessing)
    try:
        return _check_preprocessing(_plain(dict(preprocessing), "preprocessing"), "save_model")
    except ModelFileError as exc:
        raise ValueError(str(exc)) from None


def _prototypes_of(detector: torch.nn.Module, detector_name: str, path: Path) -> dict[str, Any] | None:
    """The prototype (cosine) classifier in place, if any: ``{"prototypes": Tensor, "temperature": float}``."""
    try:
        protos = detector.get_prototypes() if hasattr(detector, "get_prototypes") else None
    except NotImplementedError:
        log.warning("detector %r implements set_prototypes but not get_prototypes: if a prototype classifier is "
                    "in place, %s will not reload identically", detector_name, path)
        return None
    if protos is None:
        return None
    tensor, temperature = protos
    return {"prototypes": tensor.detach().cpu().clone(), "temperature": float(temperature)}


# --- reading ------------------------------------------------------------------------------------------
def _describe(obj: Any) -> str:
    """What a loaded object that is not a model file looks like, and what to do with it."""
    if isinstance(obj, dict) and obj.get("format") == DETECTOR_CHECKPOINT_TAG:
        return (f"it is a `megatron pretrain` detector checkpoint ({obj.get('detector')!r}, weights only: no class "
                "names or preprocessing). Start a run from it with `megatron run --checkpoint FILE` "
                "(detector.checkpoint); the run writes the adapted models to RUN_DIR/models/")
    if isinstance(obj, dict) and "learner" in obj and "detector" in obj and "sampler" in obj:
        return ("it is a training-state checkpoint of `megatron run` (RUN_DIR/checkpoints/<learner>/last.pt, "
                "for --resume). The adapted models are RUN_DIR/models/<learner>-best.pth and -final.pth")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return ("it looks like an mmdet/mmengine checkpoint ({'state_dict': ..., 'meta': ...}): start a run from it "
                "with `megatron run --checkpoint FILE` (detector.checkpoint), then use RUN_DIR/models/<learner>-best.pth")
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return (f"it is a plain state dict ({len(obj)} tensors, e.g. {sorted(obj)[:3]}), with no detector name, "
                "classes or preprocessing: start a run from it with `megatron run --checkpoint FILE` "
                "(detector.checkpoint)")
    what = type(obj).__name__
    if isinstance(obj, dict):
        what += f" with keys {sorted(map(str, obj))[:8]}"
    return f"it holds a {what}"


def read_model_file(path: str | Path) -> tuple[ModelInfo, dict[str, torch.Tensor], dict[str, Any] | None]:
    """``(info, state_dict, prototypes)`` of a model file, read with ``torch.load(weights_only=True)``;
    :class:`ModelFileError` when it is not one (saying what it is instead)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file {path} does not exist; {_USE_IT}")
    if path.is_dir():
        models = sorted(path.glob("*.pth")) + sorted((path / "models").glob("*.pth"))
        hint = f" (it holds {', '.join(str(m) for m in models[:4])})" if models else ""
        raise ModelFileError(f"model file {path} is a folder{hint}; pass the .pth file itself")
    try:
        obj = read_checkpoint_file(path)
    except CheckpointError as exc:
        raise ModelFileError(f"{path} is not a megatron model file: {exc}\nFix: {_USE_IT}") from None
    if not (isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT):
        raise ModelFileError(f"{path} is not a megatron model file: {_describe(obj)}.\n"
                             f"`megatron predict` and `megatron evaluate` need a model file: {_USE_IT}")
    version = obj.get("version")
    if not isinstance(version, int) or version > MODEL_VERSION:
        raise ModelFileError(f"{path}: model file version {version!r} is newer than this megatron reads "
                             f"({MODEL_VERSION}); upgrade megatron")
    try:
        det = obj["detector"]
        info = ModelInfo(
            path=path,
            detector_name=str(det["name"]),
            detector_options=dict(det.get("options") or {}),
            class_names=[str(n) for n in obj["class_names"]],
            input_size=int(obj["input_size"]),
            preprocessing=_check_preprocessing(dict(obj.get("preprocessing") or {}), str(path)),
            evaluation={**EVALUATION_DEFAULTS, **dict(obj.get("evaluation") or {})},
            provenance=dict(obj.get("provenance") or {}),
            prototypes=obj.get("prototypes") is not None,
            version=version,
            operating_point=dict(obj["operating_point"]) if obj.get("operating_point") else None,
        )
        state = obj["state_dict"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: a damaged megatron model file ({type(exc).__name__}: {exc}); re-save it "
                             "from the run, or use RUN_DIR/models/<learner>-final.pth") from None
    if not info.class_names:
        raise ModelFileError(f"{path}: the model file lists no class names; re-save it from the run")
    return info, state, obj.get("prototypes")


def load_model(path: str | Path, pm=None, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelInfo]:
    """The detector in the model file at ``path`` (eval mode, on ``device``) and what the file says about it.

    The detector class comes from ``pm``'s detector register (default: a fresh plugin manager), its options are
    validated against the installed plugin, the head is built for the file's class names, a prototype classifier
    is installed when the file has one, and the weights are loaded strictly (every tensor must fit).
    """

    info, state, prototypes = read_model_file(path)
    path = info.path
    if pm is None:
        pm = megatron.get_plugin_manager()
    saved_with = info.provenance.get("megatron_version", "?")
    try:
        cls = pm.registers["detector"].get(info.detector_name)
    except (UnknownNameError, KeyError):
        known = ", ".join(pm.registers["detector"].names()) or "(none)"
        raise ModelFileError(
            f"{path}: the model is a {info.detector_name!r} detector, but no detector plugin of that name is "
            f"installed (known: {known}). Is the plugin installed? Install the package that provides "
            f"{info.detector_name!r} (check with `megatron plugins`) and try again"
        ) from None
    options = validate_plugin_options(cls, info.detector_options, f"{path}: detector options")
    detector = cls(len(info.class_names), info.input_size, options)
    if prototypes is not None:
        detector.set_prototypes(prototypes["prototypes"], float(prototypes["temperature"]))
    own = detector.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} in the file vs {tuple(own[k].shape)}"
                  for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        for title, keys in (("missing from the file", missing), ("not in the detector", unexpected),
                            ("with another shape", mismatched)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{len(keys)} {title}: {', '.join(keys[:3])}{more}")
        raise ModelFileError(
            f"{path}: the weights do not fit a {info.detector_name!r} detector with options "
            f"{options.model_dump(mode='json')} and {len(info.class_names)} classes ({'; '.join(parts)}). "
            f"The model was saved with megatron {saved_with}: has the {info.detector_name!r} plugin (or mmdet) "
            "changed since? Use the plugin version the model was trained with"
        )
    detector.load_state_dict(state, strict=True)
    detector.to(device)
    detector.eval()
    return detector, info


# --- using it -----------------------------------------------------------------------------------------
def resolve_device(name: str | None) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; clear error when unavailable."""

    return resolve(name, where="--device")
