"""``megatron data check``: validate a dataset folder/file (or every dataset of a config) and summarise it.

:func:`check_dataset` detects the layout (COCO annotation file or folder, YOLO folder, a folder of DICOM
files, a folder of unannotated images), reads it with the same readers the dataset plugins use, opens every
image (pixels, not only headers) and returns a :class:`CheckReport`: counts, box-size and image-size
distributions, pixel types and every problem found. :func:`check_config` does the same for every dataset of
an experiment config, through its plugin (``DatasetPlugin.load_with_problems``, else ``load``), third-party
plugins included.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from megatron.data.coco import ANNOTATION_FILE, default_image_dir, default_task_name, read_coco_task
from megatron.data.dicom import is_dicom_file
from megatron.data.folder import read_image_folder
from megatron.data.io import IMAGE_SUFFIXES
from megatron.data.problems import Problem
from megatron.data.yolo import read_yolo_task
from megatron.errors import ConfigError, DataError
from megatron.types import Task
from megatron.config import validate_plugin_options

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
Format = Literal["coco", "yolo", "dicom", "folder"]


@dataclass
class CheckReport:
    path: str
    format: str
    task_name: str = ""
    categories: list[str] = field(default_factory=list)
    n_images: int = 0
    n_boxes: int = 0
    images_without_boxes: int = 0
    boxes_per_class: dict[str, int] = field(default_factory=dict)
    boxes_per_image: dict[str, float] = field(default_factory=dict)  # quantiles
    box_sqrt_area_px: dict[str, float] = field(default_factory=dict)  # quantiles of sqrt(w*h)
    box_relative_size: dict[str, float] = field(default_factory=dict)  # quantiles of sqrt(w*h / (W*H))
    image_width: dict[str, float] = field(default_factory=dict)
    image_height: dict[str, float] = field(default_factory=dict)
    image_sizes: dict[str, int] = field(default_factory=dict)  # "WxH" -> count, most common first
    pixel_types: dict[str, int] = field(default_factory=dict)  # e.g. "uint16 gray" -> count
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "problems"}
        out["ok"] = self.ok
        out["n_errors"], out["n_warnings"] = len(self.errors), len(self.warnings)
        out["warning_counts"] = dict(Counter(p.code for p in self.warnings))
        out["problems"] = [p.to_dict() for p in self.problems]
        return out


def _quantiles(values: list[float] | np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {}
    return {f"q{int(q * 100)}": round(float(np.quantile(v, q)), 4) for q in QUANTILES}


def detect_format(path: Path) -> tuple[Format, Path]:
    """``("coco", annotation_file)``, ``("yolo", root)``, ``("dicom", root)`` (DICOM files, no annotations) or
    ``("folder", root)`` (images, no annotations) for a file or folder; DataError when unclear."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; fix: pass a COCO annotation file/folder, a YOLO folder, or a "
                        "folder of DICOM files or images")
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "coco", path
        raise DataError(f"{path} is not a .json annotation file; fix: pass a COCO JSON file or a dataset folder "
                        "(for DICOM or image files: the folder that holds them)")
    if (path / ANNOTATION_FILE).is_file():
        return "coco", path / ANNOTATION_FILE
    if (path / "labels").is_dir() and (path / "images").is_dir():
        return "yolo", path
    candidates = sorted([*path.glob("*.json"), *(path / "annotations").glob("*.json")])
    coco = [c for c in candidates if _looks_like_coco(c)]
    if len(coco) == 1:
        return "coco", coco[0]
    if len(coco) > 1:
        raise DataError(f"{path} holds several COCO annotation files ({', '.join(c.name for c in coco)}); "
                        "fix: pass the one to check")
    kind = _unannotated_kind(path)
    if kind:
        return kind, path
    raise DataError(f"{path}: neither a COCO dataset (annotations.json or annotations/*.json), a YOLO folder "
                    "(images/ + labels/), nor a folder of DICOM files or images; fix: pass the annotation file, "
                    "or use --format")


def _unannotated_kind(root: Path) -> Format | None:
    """``dicom`` when the folder (recursively) holds DICOM files and no other images, ``folder`` when it holds
    raster images, else None."""
    has_dicom = has_raster = False
    for p in root.rglob("*"):
        if any(part.startswith(".") for part in p.relative_to(root).parts) or not p.is_file():
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            has_raster = True
            break
        has_dicom = has_dicom or is_dicom_file(p)
    return "folder" if has_raster else ("dicom" if has_dicom else None)


def _looks_like_coco(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        return b'"images"' in head or b'"annotations"' in head
    except OSError:
        return False


def check_dataset(path: Path, format: Format | None = None, image_dir: Path | None = None, split: str | None = None,
                  progress: Callable[[int, int], None] | None = None) -> CheckReport:
    """Validate the dataset at ``path`` and summarise it; opens every image. Never raises on bad data:
    every problem (including an unreadable annotation file) is in ``report.problems``."""
    path = Path(path)
    try:
        if format is None:
            fmt, where = detect_format(path)
        elif format == "coco":
            fmt, where = "coco", (detect_format(path)[1] if path.is_dir() else path)
        else:
            fmt, where = format, path
        if fmt == "coco":
            task, problems = read_coco_task(where, Path(image_dir) if image_dir else default_image_dir(where),
                                            name=default_task_name(where))
        elif fmt in ("dicom", "folder"):
            task, problems = read_image_folder(where, where.resolve().name, dicom_only=fmt == "dicom")
        else:
            task, problems = read_yolo_task(where, name=where.resolve().name, split=split)
    except DataError as exc:
        message, _, fix = str(exc).partition("; fix: ")
        return CheckReport(path=str(path), format=format or "unknown",
                           problems=[Problem("error", "unreadable", str(path), "", message,
                                             fix or "see the message")])
    report = CheckReport(path=str(where), format=fmt, task_name=task.name, categories=list(task.categories),
                         problems=list(problems))
    _summarise(task, report, progress)
    return report


def _summarise(task: Task, report: CheckReport, progress: Callable[[int, int], None] | None) -> None:
    report.n_images = len(task)
    per_class = Counter()
    sqrt_area, rel_size, per_image = [], [], []
    sizes, types = Counter(), Counter()
    already_missing = {p.record for p in report.problems if p.code == "image_missing_file"}
    for i, record in enumerate(task.records):
        if progress:
            progress(i + 1, len(task))
        n = len(record.boxes)
        per_image.append(n)
        report.n_boxes += n
        report.images_without_boxes += n == 0
        per_class.update(int(lab) for lab in record.labels)
        if n:
            wh = (record.boxes[:, 2:] - record.boxes[:, :2]).astype(np.float64)
            area = wh[:, 0] * wh[:, 1]
            sqrt_area.extend(np.sqrt(area).tolist())
            rel_size.extend(np.sqrt(area / (record.width * record.height)).tolist())
        sizes[f"{record.width}x{record.height}"] += 1
        if f"image id {record.image_id}" in already_missing:
            continue
        where = f"image id {record.image_id}" + (f", frame {record.frame}" if record.frame is not None else "")
        try:
            pixels = task.load_image(record)
        except Exception as exc:  # noqa: BLE001 - a third-party loader may raise anything; report, go on
            message, _, fix = str(exc).partition("; fix: ")
            if not isinstance(exc, DataError):
                message = f"{type(exc).__name__}: {message}"
            report.problems.append(Problem("error", "image_unreadable", str(record.path or record.file_name), where,
                                           message, fix or "replace the file with a readable PNG/TIFF/JPEG/DICOM "
                                           "or remove the image"))
            continue
        channels = "gray" if pixels.ndim == 2 else "rgb"
        types[f"{pixels.dtype} {channels}"] += 1
        h, w = pixels.shape[:2]
        if (w, h) != (record.width, record.height):
            report.problems.append(Problem(
                "error", "image_size_mismatch", str(record.path or record.file_name), where,
                f"the file is {w}x{h} but the annotations say {record.width}x{record.height}, so the boxes may be "
                "misplaced", "correct width/height in the annotations (and rescale the boxes if they were made "
                "for the other size)"))
    report.boxes_per_class = {name: per_class.get(k, 0) for k, name in enumerate(task.categories)}
    report.boxes_per_image = _quantiles(per_image)
    report.box_sqrt_area_px = _quantiles(sqrt_area)
    report.box_relative_size = _quantiles(rel_size)
    report.image_width = _quantiles([r.width for r in task.records])
    report.image_height = _quantiles([r.height for r in task.records])
    report.image_sizes = dict(sizes.most_common())
    report.pixel_types = dict(types.most_common())


def report_json(report: CheckReport) -> str:
    return json.dumps(report.to_dict(), indent=2)


def check_config(cfg: Any, pm: Any, progress: Callable[[int, int], None] | None = None,
                 on_dataset: Callable[[str], None] | None = None) -> list[CheckReport]:
    """One report per task of every dataset in ``cfg.data.datasets``, read through its plugin.

    Plugins with ``load_with_problems`` (the built-ins) report every problem; others are loaded with
    ``load()`` and a DataError becomes the report's one problem. A plugin name or option that is wrong is a
    ConfigError (nothing to check). ``on_dataset(label)`` is called before each dataset is read.
    """

    reports: list[CheckReport] = []
    for i, spec in enumerate(cfg.data.datasets):
        label = f"data.datasets.{i}"
        try:
            cls = pm.registers["dataset"].get(spec.plugin)
        except KeyError as exc:
            raise ConfigError(f"data.datasets.{i}.plugin: {exc}") from None
        options = dict(spec.options)
        if cfg.data.cache_dir is not None and "cache_dir" in cls.Options.model_fields:
            options.setdefault("cache_dir", str(cfg.data.cache_dir))
        opts = validate_plugin_options(cls, options, f"data.datasets.{i}.options")
        if on_dataset:
            on_dataset(f"{label} ({spec.plugin})")
        try:
            plugin = cls(opts)
            loaded = plugin.load_with_problems() if hasattr(plugin, "load_with_problems") else \
                [(t, []) for t in plugin.load()]
        except Exception as exc:  # noqa: BLE001 - one dataset failing must not hide the others
            message, _, fix = str(exc).partition("; fix: ")
            if not isinstance(exc, DataError):
                message = f"plugin {spec.plugin!r} failed to load: {type(exc).__name__}: {message}"
            reports.append(CheckReport(path=label, format=spec.plugin, problems=[
                Problem("error", "unreadable", label, "", message, fix or "see the message")]))
            continue
        for task, problems in loaded:
            report = CheckReport(path=f"{label}: {task.source or task.name}", format=spec.plugin,
                                 task_name=task.name, categories=list(task.categories), problems=list(problems))
            _summarise(task, report, progress)
            reports.append(report)
    return reports
