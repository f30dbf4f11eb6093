"""``megatron evaluate --checkpoint FILE DATASET_PATH``: a saved model's COCO metrics on a COCO or YOLO dataset,
or on volumes (``--format volume``: NIfTI / DICOM series read by the ``volume`` plugin, options through ``--set``),
where FROC per scan (:mod:`megatron.evaluation.volume`) comes beside the slice-level COCO metrics.

The dataset is read by the same readers as the ``coco``/``yolo`` plugins and ``megatron data check`` (layout
detected the same way); its classes are matched *by name* to the model's class names (a dataset class the
model does not know is an error listing both). Images are pre-processed with the model file's own settings and
scored by :func:`megatron.evaluation.evaluate`, exactly as the run scored its held-out split (score threshold,
IoU and max detections from the model file unless given).
"""
from __future__ import annotations

# lazy imports: start-up time (heavy modules are imported inside the command functions; see megatron/commands/__init__.py)

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from megatron.errors import DataError
from megatron.runtime.console import output_console, print_full_width


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate",
                       help="COCO metrics (mAP50, mAP50:95, per-class AP50, P/R/F1) of a saved model on a dataset",
                       description="Score a model file (RUN_DIR/models/<learner>-best.pth) on a COCO or YOLO dataset "
                       "(the layouts `megatron data check` reads): mAP50, mAP50:95, precision, recall, F1 and AP50 per "
                       "class. Dataset classes are matched to the model's classes by name.")
    p.add_argument("dataset", metavar="DATASET_PATH", help="COCO annotation file, COCO folder (annotations.json or "
                   "annotations/*.json) or YOLO folder (images/ + labels/)")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="a megatron model file (RUN_DIR/models/*.pth)")
    p.add_argument("--format", choices=["coco", "yolo", "volume"], help="dataset layout (default: detected; a .nii / "
                   ".nii.gz path is a volume)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="volume: an option of the `volume` "
                   "dataset plugin (e.g. labels=DIR, lesions_csv=FILE, lesion_class=nodule). The slicing axis, 2.5D "
                   "channels and intensity default to those the model file recorded for its target (files from "
                   "before that: give them). Every slice is evaluated (empty_fraction=1) unless set")
    p.add_argument("--image-dir", help="COCO: folder the file_name paths are relative to (default: images/ beside "
                   "the annotation file, else its folder)")
    p.add_argument("--split", help="YOLO: sub-folder of images/ and labels/ to read (e.g. val)")
    p.add_argument("--score-threshold", type=float, metavar="S",
                   help="detections counted for precision/recall/F1 (default: the model file's, else 0.3)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per forward pass (default 8)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=_run)


def read_dataset(path: Path, format: str | None = None, image_dir: str | None = None,
                 split: str | None = None):
    """The dataset at ``path`` as one task, read as the ``coco``/``yolo`` plugins do (errors raise)."""
    from megatron.data.check import detect_format
    from megatron.data.coco import default_image_dir, default_task_name, read_coco_task
    from megatron.data.problems import raise_for_errors
    from megatron.data.yolo import read_yolo_task

    path = Path(path).expanduser()
    if format is None:
        fmt, where = detect_format(path)
    elif format == "coco":
        fmt, where = "coco", (detect_format(path)[1] if path.is_dir() else path)
    else:
        fmt, where = "yolo", path
    if fmt == "coco":
        task, problems = read_coco_task(where, Path(image_dir) if image_dir else default_image_dir(where),
                                        name=default_task_name(where))
    else:
        task, problems = read_yolo_task(where, name=where.resolve().name, split=split)
    raise_for_errors(problems, str(path))
    if not task.records:
        raise DataError(f"{path}: the dataset has no images; fix: check the annotation file / images folder")
    return task


def is_volume_input(path: Path, format: str | None) -> bool:
    """``--format volume``, or (format not given) a NIfTI file."""
    from megatron.data.volumes import is_nifti

    return format == "volume" or (format is None and is_nifti(Path(path)))


def volume_task(path: Path, options: dict, model_reading: dict | None = None):
    """The volumes at ``path`` as one slice task through the ``volume`` plugin; every slice unless the options
    say otherwise (per-scan FROC counts false positives on all of them). ``model_reading``: the reading options
    (axis, 2.5D channels, intensity) the model file recorded for its target, the defaults ``options`` override."""
    from megatron.config import validate_plugin_options
    from megatron.data.problems import raise_for_errors
    from megatron_plugins.datasets.volume import VolumeDataset

    merged = {"empty_fraction": 1.0, **(model_reading or {}), **options, "root": str(Path(path).expanduser())}
    plugin = VolumeDataset(validate_plugin_options(VolumeDataset, merged, "volume --set"))
    [(task, problems)] = plugin.load_with_problems()
    raise_for_errors(problems, str(path))
    if not task.records:
        raise DataError(f"{path}: no slice to evaluate; fix: check the volume options (--set)")
    return task


def match_classes(task, class_names: list[str], dataset: str, model: str):
    """``task`` with its labels renumbered to the model's label order (classes matched by name)."""
    from megatron.types import Task

    index = {name: i for i, name in enumerate(class_names)}
    unknown = [c for c in task.categories if c not in index]
    if unknown:
        raise DataError(
            f"{dataset}: the dataset's classes {list(task.categories)} do not match the model's {list(class_names)} "
            f"({model}): {unknown} {'is' if len(unknown) == 1 else 'are'} not a class of the model. Classes are matched "
            "by name: rename the dataset's categories to the model's names, or drop the annotations of classes the "
            "model was not trained on"
        )
    mapping = [index[c] for c in task.categories]
    records = [dataclasses.replace(r, labels=np.asarray([mapping[int(lab)] for lab in r.labels], dtype=np.int64))
               for r in task.records]  # everything else (frame of a multi-frame DICOM, file name) kept
    return Task(name=task.name, categories=list(class_names), records=records, modality=task.modality,
                source=task.source, image_loader=task.image_loader)


def predict_detections(detector, info, task, device, batch_size: int = 8, on_images=None) -> list:
    """The model's detections on every image of ``task`` (the runner's prediction loop, the model file's
    preprocessing); ``on_images(n)`` is called as images are done."""
    from megatron.evaluation.predictions import predict_task

    pre = info.preprocessor()
    detections = []
    step = 4 * batch_size  # progress in chunks of a few batches
    for start in range(0, len(task), step):
        part = task.subset(list(range(start, min(start + step, len(task)))))
        detections.extend(predict_task(detector, part, pre, batch_size, device))
        if on_images is not None:
            on_images(len(part))
    return detections


def evaluate_model(detector, info, task, device, batch_size: int = 8, score_threshold: float | None = None,
                   on_images=None, per_scan: bool = False) -> dict:
    """Predict on every image of ``task`` (labels already in the model's order) with the runner's own
    prediction loop and score with the core evaluator; ``on_images(n)`` is called as images are done.
    ``per_scan`` (slices of the ``volume`` plugin): ``volume_froc`` too, FROC per scan of the linked 3D candidates."""
    from megatron.evaluation import evaluate
    from megatron.evaluation.volume import volume_froc

    detections = predict_detections(detector, info, task, device, batch_size, on_images)
    ev = info.evaluation
    threshold = score_threshold if score_threshold is not None else info.score_threshold
    metrics = evaluate(detections, task.records, list(task.categories), score_threshold=threshold,
                       iou_threshold=float(ev["iou_threshold"]), max_detections=int(ev["max_detections"]))
    if per_scan:
        metrics["volume_froc"] = volume_froc(task.records, detections)
    return metrics


def _run(args: argparse.Namespace) -> int:
    from megatron.commands.common import parse_set_options
    from megatron.errors import ConfigError
    from megatron.training.model_file import VOLUME_READING_KEY, load_model, resolve_device

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.score_threshold is not None and not 0.0 <= args.score_threshold <= 1.0:
        raise ConfigError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    per_scan = is_volume_input(Path(args.dataset), args.format)
    if args.set and not per_scan:
        raise ConfigError("--set gives options of the `volume` plugin: use it with --format volume")
    device = resolve_device(args.device)
    detector, info = load_model(args.checkpoint, device=device)
    if per_scan:
        task = volume_task(Path(args.dataset), parse_set_options(args.set),
                           info.preprocessing.get(VOLUME_READING_KEY))
    else:
        task = read_dataset(Path(args.dataset), args.format, args.image_dir, args.split)
    task = match_classes(task, info.class_names, args.dataset, str(info.path))
    console = output_console()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=output_console(stderr=True), transient=True,
                        disable=args.json or not console.is_terminal)
    with progress:
        bar = progress.add_task("evaluating", total=len(task))
        metrics = evaluate_model(detector, info, task, device, args.batch_size, args.score_threshold,
                                 on_images=lambda n: progress.advance(bar, n), per_scan=per_scan)
    if args.json:
        print(json.dumps({"model": str(info.path), "dataset": str(args.dataset), "detector": info.detector_name,
                          "class_names": info.class_names, "metrics": metrics}, indent=2))
        return 0
    table = Table(title=f"{info.detector_name} model {escape(info.path.name)} on {escape(str(args.dataset))} "
                        f"({metrics['n_images']} images, {metrics['n_gt']} boxes)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, key in (("mAP50", "mAP50"), ("mAP50:95", "mAP50_95"), ("precision", "precision"),
                       ("recall", "recall"), ("F1", "F1")):
        table.add_row(label, f"{100 * metrics[key]:.1f}%")
    table.caption = (f"P/R/F1 at score >= {metrics['score_threshold']:g}, IoU >= {metrics['iou_threshold']:g}; "
                     f"TP {metrics['tp']}, FP {metrics['fp']}, FN {metrics['fn']}")
    print_full_width(console, table)
    per_class = Table(title="AP50 per class")
    per_class.add_column("class")
    per_class.add_column("AP50", justify="right")
    for name in info.class_names:
        ap = metrics["per_class_AP50"].get(name)
        per_class.add_row(escape(name), f"{100 * ap:.1f}%" if ap is not None else "[dim]no ground truth[/]")
    console.print(per_class)
    if per_scan:
        console.print(froc_table(metrics["volume_froc"]))
    return 0


def froc_table(froc: dict) -> Table:
    """FROC per scan as a table: sensitivity at each false-positive rate per volume, and their mean."""
    table = Table(title=f"FROC per scan ({froc['n_volumes']} volumes, {froc['n_lesions']} lesions, "
                        f"{froc['n_candidates']} 3D candidates)")
    table.add_column("false positives / scan")
    table.add_column("sensitivity", justify="right")
    for rate, sens in zip(froc["fp_per_scan"], froc["sensitivity"]):
        table.add_row(f"{rate:g}", f"{100 * sens:.1f}%")
    table.add_row("[bold]mean[/]", f"[bold]{100 * froc['mean_sensitivity']:.1f}%[/]")
    table.caption = (f"{froc['slices_evaluated']} of {froc['slices_total']} slices evaluated; {froc['matching']}")
    return table
