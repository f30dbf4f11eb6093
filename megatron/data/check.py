"""``megatron data check``: validate a dataset folder/file (or every dataset of a config) and summarise it.

:func:`check_dataset` detects the layout (COCO annotation file or folder, YOLO folder, a folder of DICOM
files, a folder of unannotated images), reads it with the same readers the dataset plugins use, opens every
image (pixels, not only headers) and returns a :class:`CheckReport`: counts, box-size and image-size
distributions, pixel types, patients (images per patient, and a warning when file names or DICOM headers suggest
patients the config does not declare), the box-size fingerprint at the detector's input size
(:mod:`megatron.data.fingerprint`) and every problem found (image paths leaving the image folder included). :func:`check_config` does the same for every dataset of
an experiment config, through its plugin (``DatasetPlugin.load_with_problems``, else ``load``), third-party
plugins included, at the config's ``data.input_size`` and detector stride, and says how many patients and
images the target's pool of K is drawn from.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from megatron.data.coco import ANNOTATION_FILE, DEFAULT_GROUP_FIELD, default_image_dir, default_task_name, read_coco_task
from megatron.data.dicom import is_dicom_file
from megatron.data.fingerprint import DEFAULT_STRIDE, fingerprint, fingerprint_problems
from megatron.data.folder import read_image_folder
from megatron.data.groups import count_groups, describe_grouping, grouping_hints, images_per_group
from megatron.data.io import IMAGE_SUFFIXES
from megatron.data.paths import walk_files
from megatron.data.problems import Problem
from megatron.data.split import split_target
from megatron.data.yolo import read_yolo_task
from megatron.errors import ConfigError, DataError
from megatron.types import Task
from megatron.config import DataConfig, validate_plugin_options

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
#: the input size a dataset checked without a config is measured at: the config's default
DEFAULT_INPUT_SIZE = DataConfig.model_fields["input_size"].default
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
    grouping: str = ""  # where the patients come from (GROUPING_NONE: every image its own)
    patients: dict[str, float] = field(default_factory=dict)  # groups, images, min / median / max images per patient
    fingerprint: dict[str, Any] = field(default_factory=dict)  # box sizes at the input size (megatron.data.fingerprint)
    for_k: dict[str, Any] = field(default_factory=dict)  # the target only: patients and images the pool is drawn from
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
    for p in walk_files(root):
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
                  progress: Callable[[int, int], None] | None = None, input_size: int = DEFAULT_INPUT_SIZE,
                  stride: int = DEFAULT_STRIDE, allow_outside_paths: bool = False, group_pattern: str | None = None,
                  groups_csv: Path | None = None, group_field: str | None = None) -> CheckReport:
    """Validate the dataset at ``path`` and summarise it; opens every image. Never raises on bad data:
    every problem (including an unreadable annotation file) is in ``report.problems``. ``input_size`` and
    ``stride``: what the box-size fingerprint is measured against; ``allow_outside_paths``: image paths leaving
    the image folder are read (by default each is an error); ``group_pattern`` / ``groups_csv``
    (any format) and ``group_field`` (COCO): where the patients come from, as the dataset options of the same
    names."""
    path = Path(path)
    try:
        if format is None:
            fmt, where = detect_format(path)
        elif format == "coco":
            fmt, where = "coco", (detect_format(path)[1] if path.is_dir() else path)
        else:
            fmt, where = format, path
        _refuse_foreign_group_source(fmt, group_pattern, groups_csv, group_field)
        groups = {"group_pattern": group_pattern, "groups_csv": Path(groups_csv) if groups_csv else None}
        if fmt == "coco":
            task, problems = read_coco_task(where, Path(image_dir) if image_dir else default_image_dir(where),
                                            name=default_task_name(where), allow_outside_paths=allow_outside_paths,
                                            group_field=group_field or DEFAULT_GROUP_FIELD, **groups)
        elif fmt in ("dicom", "folder"):
            task, problems = read_image_folder(where, where.resolve().name, dicom_only=fmt == "dicom",
                                               allow_outside_paths=allow_outside_paths, **groups)
        else:
            task, problems = read_yolo_task(where, name=where.resolve().name, split=split,
                                            allow_outside_paths=allow_outside_paths, **groups)
    except DataError as exc:
        message, _, fix = str(exc).partition("; fix: ")
        return CheckReport(path=str(path), format=format or "unknown",
                           problems=[Problem("error", "unreadable", str(path), "", message,
                                             fix or "see the message")])
    report = CheckReport(path=str(where), format=fmt, task_name=task.name, categories=list(task.categories),
                         problems=list(problems))
    _summarise(task, report, progress)
    _describe_patients_and_boxes(task, report, input_size, stride)
    return report


def _refuse_foreign_group_source(fmt: str, group_pattern: str | None, groups_csv: Path | None,
                                 group_field: str | None) -> None:
    """A patient field exists only in COCO files; one group source at a time."""
    if fmt != "coco" and group_field:
        raise DataError(f"--group-field applies to COCO files; this is a {fmt} dataset; fix: use --group-pattern "
                        "REGEX or --groups-csv FILE")
    if sum(x is not None for x in (group_pattern, groups_csv, group_field)) > 1:
        raise DataError("give one group source: --group-pattern, --groups-csv or --group-field; fix: keep one of them")


def _describe_patients_and_boxes(task: Task, report: CheckReport, input_size: int, stride: int) -> None:
    """The grouping (images per patient, and hints when the config names no group source) and, for annotated
    tasks, the box-size fingerprint at ``input_size`` with its warning."""
    report.grouping = describe_grouping(task)
    if task.records:
        report.patients = images_per_group(task.records)
    for hint in grouping_hints(task):
        message, _, fix = hint.partition("; fix: ")
        report.problems.append(Problem("warning", "groups_not_declared", report.path, "", message, fix))
    if report.n_boxes:
        report.fingerprint = fingerprint(task, input_size, stride)
        report.problems.extend(fingerprint_problems(report.fingerprint, report.path))


def k_availability(task: Task, shots: int, eval_images: int | None, seed: int) -> dict[str, Any]:
    """Patients and images of the target, how many of them the evaluation split takes (whole patients, as a run
    draws it for ``seed``) and how many are left for the pool of K; ``{"error": ...}`` when K does not fit."""
    out: dict[str, Any] = {"shots": shots, "images": len(task), "patients": count_groups(task.records)}
    try:
        _, held = split_target(task, shots, eval_images, seed)
    except DataError as exc:
        return {**out, "error": str(exc)}
    held_ids = {r.image_id for r in held.records}
    rest = [r for r in task.records if r.image_id not in held_ids]
    return {**out, "evaluation_images": len(held), "evaluation_patients": count_groups(held.records),
            "available_images": len(rest), "available_patients": count_groups(rest)}


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
            _describe_patients_and_boxes(task, report, cfg.data.input_size, detector_stride(cfg, pm))
            if task.name == cfg.data.target:
                report.for_k = k_availability(task, cfg.data.shots, cfg.data.eval_images, cfg.seed)
            reports.append(report)
    return reports


def detector_stride(cfg: Any, pm: Any) -> int:
    """The configured detector's smallest stride (``Detector.SMALLEST_STRIDE``; 8 when it cannot be known)."""
    try:
        cls = pm.registers["detector"].get(cfg.detector.name)
    except KeyError:
        return DEFAULT_STRIDE
    return int(getattr(cls, "SMALLEST_STRIDE", DEFAULT_STRIDE))


def patient_and_size_lines(report: CheckReport) -> list[str]:
    """The report's patients, box-size fingerprint and K availability as plain lines (``data check`` and
    ``config validate --data`` print them)."""
    lines = []
    if report.patients:
        p = report.patients
        lines.append(f"patients: {p['groups']} for {p['images']} images (images per patient: min {p['min']:g}, "
                     f"median {p['median']:g}, max {p['max']:g}); grouping: {report.grouping}")
    f = report.fingerprint
    if f:
        px = f["box_px_at_input"]
        lines.append(f"boxes at data.input_size {f['input_size']}: sqrt(area) {px['q0']:g} / {px['q5']:g} / "
                     f"{px['q50']:g} / {px['q95']:g} / {px['q100']:g} px (min / 5% / median / 95% / max); "
                     f"{f['boxes_below_stride']} of {f['boxes']} ({f['share_below_stride']:.0%}) below the detector's "
                     f"smallest stride ({f['smallest_stride']} px)")
        if f["box_mm"]:
            mm = f["box_mm"]
            lines.append(f"boxes in mm ({f['boxes_with_spacing']} with known pixel spacing): sqrt(area) {mm['q0']:g} / "
                         f"{mm['q50']:g} / {mm['q100']:g} mm (min / median / max)")
        if f["recommended_input_size"]:
            r = f["recommended_input_size"]
            verdict = "enough" if f["input_size"] >= r else "too small"
            lines.append(f"recommended data.input_size: at least {r} (the smallest multiple of 32 keeping 95% of boxes "
                         f"at >= {f['smallest_stride']} px, at most the image size; now {f['input_size']}: {verdict})")
    k = report.for_k
    if k:
        if "error" in k:
            lines.append(f"for K={k['shots']}: {k['images']} images of {k['patients']} patients; {k['error']}")
        else:
            lines.append(f"for K={k['shots']}: {k['images']} images of {k['patients']} patients; the evaluation split "
                         f"takes {k['evaluation_images']} images ({k['evaluation_patients']} patients), leaving "
                         f"{k['available_images']} images of {k['available_patients']} patients for the pool")
    return lines
