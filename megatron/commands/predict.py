"""``megatron predict --checkpoint FILE PATH...``: a saved model's detections on images and folders.

Writes ``DIR/detections.json`` (COCO results format: ``image_id``, ``file_name``, ``category_id`` = label + 1,
``category_name``, ``bbox`` ``[x, y, w, h]`` in original pixels, ``score``), ``DIR/images.json`` (one entry per
image: ``id``, ``file_name``, ``width``, ``height``, ``drawing``) and one PNG per image with the boxes, class names
and scores drawn on the original image (grayscale shown as grey, non-8-bit input windowed as the model sees it).

Images are read by the core reader (:func:`megatron.data.io.read_image`); folders are searched recursively for
the suffixes it supports (:data:`megatron.data.io.READABLE_SUFFIXES`, DICOM included; DICOM files without a suffix are found by their header), and files given by name are read whatever
their suffix. The preprocessing is the model file's own (input size, CLAHE, padding) and the prediction loop is
the runner's (:func:`megatron.evaluation.predictions.predict_task`), so predictions match those of the run that
trained the model. An image that cannot be read is reported (file and fix) and skipped; the exit code is then 1.

``--volumes``: the PATHs are volumes (NIfTI, DICOM series) read by the ``volume`` dataset plugin (its options through
``--set``, every slice): ``DIR/detections.json`` gains ``volume_id`` and ``slice_index`` per entry, the slice
detections scoring at least the threshold are linked into 3D candidates (:mod:`megatron.evaluation.volume`) written to
``DIR/candidates.json`` (per volume id: class, score, centre in voxels and in world mm, RAS and LPS, diameter, slice
range), and ``DIR/<volume id>_strip.png`` shows the central slices of the best candidates with their boxes.
"""
from __future__ import annotations

# lazy imports: start-up time (heavy modules are imported inside the command functions; see megatron/commands/__init__.py)

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from megatron.errors import DataError
from megatron.runtime.console import output_console, print_full_width

#: box colours (RGB) by label, cycled: saturated, so no colour can be mistaken for a grey pixel
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (0, 200, 0), (0, 90, 255), (255, 160, 0), (200, 0, 255),
    (0, 220, 220), (255, 0, 140), (150, 220, 0), (140, 70, 0), (255, 255, 0),
)
DEFAULT_OUT = "predictions"
BBOX_DECIMALS = 2


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="detect with a saved model on images/folders; JSON + drawn PNGs",
                       description="Run a model file (RUN_DIR/models/<learner>-best.pth) on images and folders "
                       "(searched recursively). Writes DIR/detections.json in COCO results format (with file_name "
                       "per entry), DIR/images.json and one PNG per image with the boxes, class names and scores drawn.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders of images")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="a megatron model file (RUN_DIR/models/*.pth)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default: {DEFAULT_OUT}/)")
    p.add_argument("--score-threshold", type=float, metavar="S",
                   help="keep detections scoring at least S (default: the model file's operating point, chosen on "
                        "the run's validation split; without one, its fixed evaluation.score_threshold, 0.3)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per forward pass (default 8)")
    p.add_argument("--no-draw", action="store_true", help="write detections.json only, no PNGs")
    p.add_argument("--volumes", action="store_true", help="PATHs are volumes (NIfTI files, folders of them, DICOM "
                   "series folders): every slice is predicted, detections on neighbouring slices are linked into 3D "
                   "candidates -> DIR/candidates.json (world mm), and one PNG strip per volume")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="with --volumes: an option of the "
                   "`volume` dataset plugin (axis, channels, intensity default to those the model file recorded for its "
                   "target; older files: give the ones the model was trained with)")
    p.set_defaults(func=_run)


# --- finding images ---------------------------------------------------------------------------------
def collect_images(paths: list[str | Path]) -> list[tuple[Path, Path]]:
    """``(image path, name for the drawing)`` for every image under ``paths``, in order, each file once.

    A folder contributes every file (recursively) with a suffix the core reader supports, named
    ``<folder name>/<path inside it>``; a file given by name is taken whatever its suffix. A path that does not
    exist, or a folder with no image, is a DataError.
    """
    from megatron.data.dicom import is_dicom_file
    from megatron.data.io import READABLE_SUFFIXES

    out: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            # images by suffix, and DICOM files by their header (hospital exports often have no suffix)
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts)
                           and (p.suffix.lower() in READABLE_SUFFIXES or (not p.suffix and is_dicom_file(p))))
            if not found:
                raise DataError(f"folder {path} holds no image file (searched recursively for "
                                f"{', '.join(READABLE_SUFFIXES)} and DICOM files); fix: pass image files or a folder of images")
            for p in found:
                if p.resolve() not in seen:
                    seen.add(p.resolve())
                    out.append((p, Path(path.resolve().name or "images") / p.relative_to(path)))
        elif path.is_file():
            if path.resolve() not in seen:
                seen.add(path.resolve())
                out.append((path, Path(path.name)))
        else:
            raise DataError(f"{path} does not exist; fix: pass image files or folders of images")
    return out


def drawing_names(names: list[Path]) -> list[str]:
    """One unique ``.png`` name (relative, POSIX) per image."""
    used: set[str] = set()
    out = []
    for name in names:
        base = name.with_suffix(".png").as_posix() if name.suffix else name.as_posix() + ".png"
        candidate, k = base, 2
        while candidate in used:
            candidate = f"{base[:-4]}-{k}.png"
            k += 1
        used.add(candidate)
        out.append(candidate)
    return out


# --- drawing ----------------------------------------------------------------------------------------
def box_colour(label: int) -> tuple[int, int, int]:
    return PALETTE[int(label) % len(PALETTE)]


def display_image(raw: np.ndarray) -> np.ndarray:
    """The original pixels as ``(H, W, 3)`` uint8 RGB: non-8-bit input windowed (as the model's preprocessing
    does), grayscale repeated in three channels (shown as grey)."""
    from megatron.data.preprocess import normalise_intensity

    img = normalise_intensity(raw)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    return np.ascontiguousarray(img)


def box_pixels(box, width: int, height: int) -> tuple[int, int, int, int]:
    """The pixel rectangle ``(left, top, right, bottom)`` (inclusive) a box ``[x1, y1, x2, y2]`` (continuous pixel
    edges) is drawn on: its outline covers columns ``left`` and ``right`` and rows ``top`` and ``bottom``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    left = min(max(int(round(x1)), 0), width - 1)
    top = min(max(int(round(y1)), 0), height - 1)
    right = min(max(int(round(x2)) - 1, left), width - 1)
    bottom = min(max(int(round(y2)) - 1, top), height - 1)
    return left, top, right, bottom


def draw_detections(image: np.ndarray, boxes, labels, scores, class_names: list[str]) -> np.ndarray:
    """A copy of ``image`` (``(H, W, 3)`` uint8 RGB, see :func:`display_image`) with each box outlined in its class
    colour (:func:`box_colour`) and a ``name score`` tag in that colour just outside the box (above it, else below
    it, else inside it clear of its top and left edges). Boxes are drawn from the lowest score up, each outline
    then its tag, so the best box's outline is never covered (its own tag keeps clear of it)."""
    canvas = np.ascontiguousarray(image.copy())
    h, w = canvas.shape[:2]
    thickness = max(1, int(round(max(h, w) / 500)))
    font_scale = max(0.3, max(h, w) / 1600)
    font = cv2.FONT_HERSHEY_SIMPLEX
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    for i in np.argsort(scores, kind="stable"):  # lowest score first: a better box is drawn over a worse one
        left, top, right, bottom = box_pixels(boxes[i], w, h)
        lab = int(labels[i])
        colour = box_colour(lab)
        for t in range(thickness):  # inward, so the outline stays on the box's own pixels
            cv2.rectangle(canvas, (left + t, top + t), (max(right - t, left + t), max(bottom - t, top + t)), colour, 1)
        name = class_names[lab] if 0 <= lab < len(class_names) else str(lab)
        text = f"{name} {scores[i]:.2f}"
        (tw, th), base = cv2.getTextSize(text, font, font_scale, 1)
        tag_h = th + base + 2
        x0 = max(0, min(left, w - tw - 3))  # kept inside the image
        if top - tag_h >= 0:  # above the box
            y0, y1 = top - tag_h, top - 1
        elif bottom + tag_h < h:  # no room above: below it
            y0, y1 = bottom + 1, bottom + tag_h
        else:  # the box fills the height: inside, clear of the top and left edges
            y0, y1 = min(top + thickness, h - 1), min(top + thickness + tag_h - 1, h - 1)
            x0 = min(left + thickness, w - 1)
        x1 = min(x0 + tw + 2, w - 1)
        cv2.rectangle(canvas, (x0, y0), (x1, y1), colour, -1)
        ink = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
        cv2.putText(canvas, text, (x0 + 1, y1 - base), font, font_scale, ink, 1, cv2.LINE_AA)
    return canvas


# --- the command ------------------------------------------------------------------------------------
def _results(image_id: int, file_name: str, det, class_names: list[str], threshold: float) -> list[dict]:
    keep = (det.scores >= threshold) & np.isfinite(det.scores) & np.isfinite(det.boxes).all(axis=1)
    out = []
    order = np.argsort(-det.scores[keep], kind="stable")
    for box, score, lab in zip(det.boxes[keep][order], det.scores[keep][order], det.labels[keep][order]):
        x1, y1, x2, y2 = (float(v) for v in box)
        lab = int(lab)
        out.append({
            "image_id": int(image_id), "file_name": file_name, "category_id": lab + 1,
            "category_name": class_names[lab] if 0 <= lab < len(class_names) else str(lab),
            "bbox": [round(x1, BBOX_DECIMALS), round(y1, BBOX_DECIMALS),
                     round(x2 - x1, BBOX_DECIMALS), round(y2 - y1, BBOX_DECIMALS)],
            "score": round(float(score), 5),
        })
    return out


def entries_as_arrays(entries: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COCO result entries -> ``(boxes xyxy, labels, scores)`` (what the drawing shows)."""
    boxes = np.array([[e["bbox"][0], e["bbox"][1], e["bbox"][0] + e["bbox"][2], e["bbox"][1] + e["bbox"][3]]
                      for e in entries], dtype=np.float64).reshape(-1, 4)
    labels = np.array([e["category_id"] - 1 for e in entries], dtype=np.int64)
    scores = np.array([e["score"] for e in entries], dtype=np.float64)
    return boxes, labels, scores


def _run(args: argparse.Namespace) -> int:
    from megatron.training.model_file import load_model, resolve_device

    console = output_console()
    _check_args(args)
    if args.volumes:
        return _run_volumes(args, console)
    images = collect_images(args.paths)
    out = Path(args.out)
    names = drawing_names([name for _, name in images])
    if not args.no_draw:
        _refuse_overwriting_inputs(images, names, out)
    device = resolve_device(args.device)
    detector, info = load_model(args.checkpoint, device=device)
    threshold, threshold_source = _threshold(args, info)
    out.mkdir(parents=True, exist_ok=True)
    done = _predict_images(images, names, detector, info, device, threshold, args, console)
    _write_outputs(out, done)
    _print_summary(console, info, threshold, threshold_source, done, out, args.no_draw)
    return 1 if done.failures else 0


def _check_args(args: argparse.Namespace) -> None:
    from megatron.errors import ConfigError

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.score_threshold is not None and not 0.0 <= args.score_threshold <= 1.0:
        raise ConfigError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    if args.set and not args.volumes:
        raise ConfigError("--set gives options of the `volume` plugin: use it with --volumes")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder: predict writes detections.json, images.json and the "
                          "drawings into a folder. Fix: give a folder name (a new one is created), e.g. "
                          f"--out {out.with_suffix('')}-predictions")


def _threshold(args: argparse.Namespace, info) -> tuple[float, str]:
    threshold, threshold_source = info.default_threshold
    if args.score_threshold is not None:
        threshold, threshold_source = args.score_threshold, f"score >= {args.score_threshold:g}: --score-threshold"
    return threshold, threshold_source


def _refuse_overwriting_inputs(images: list[tuple[Path, Path]], names: list[str], out: Path) -> None:
    inputs = {p.resolve(): p for p, _ in images}
    for name in names:
        clash = inputs.get((out / name).resolve())
        if clash is not None:
            raise DataError(f"the drawing {out / name} would overwrite the input image {clash}; "
                            "fix: choose another --out folder")


@dataclass
class Predicted:
    """What the prediction loop produced: COCO result entries, image entries, unreadable images, counts per class."""

    results: list[dict] = field(default_factory=list)
    image_entries: list[dict] = field(default_factory=list)
    failures: list[tuple[Path, str]] = field(default_factory=list)
    per_class: dict[str, int] = field(default_factory=dict)


def _progress(console: Console, total: int) -> tuple[Progress, Any]:
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True, disable=not console.is_terminal)
    return progress, progress.add_task("predicting", total=total)


def _predict_images(images, names, detector, info, device, threshold, args, console) -> Predicted:
    """Read, predict and draw the images batch by batch; an unreadable image is recorded and skipped."""
    from megatron.evaluation.predictions import predict_task
    from megatron.types import Task

    done = Predicted(per_class={n: 0 for n in info.class_names})
    pre = info.preprocessor()
    progress, bar = _progress(console, len(images))
    with progress:
        for start in range(0, len(images), args.batch_size):
            raws, records = _read_batch(images, start, args.batch_size, done, lambda: progress.advance(bar))
            if not records:
                continue
            # the pixels were read once above; the runner's prediction loop gets them through the task's loader
            chunk = Task(name="predict", categories=list(info.class_names), records=records,
                         image_loader=lambda r, raws=raws: raws[r.image_id])
            try:
                preds = predict_task(detector, chunk, pre, args.batch_size, device)
            except DataError as exc:  # e.g. pixels the preprocessing cannot use
                done.failures.extend((r.path, str(exc)) for r in records)
                progress.advance(bar, len(records))
                continue
            for record, det in zip(records, preds):
                _record_image(record, det, raws[record.image_id], names, info, threshold, args, done)
                progress.advance(bar)
    return done


def _read_batch(images, start: int, batch_size: int, done: Predicted, advance) -> tuple[dict, list]:
    from megatron.data.io import read_image
    from megatron.types import ImageRecord

    raws: dict[int, np.ndarray] = {}
    records = []
    for k in range(start, min(start + batch_size, len(images))):
        path = images[k][0]
        try:
            raws[k + 1] = raw = read_image(path)
        except DataError as exc:
            done.failures.append((path, str(exc)))
            advance()
            continue
        records.append(ImageRecord(k + 1, path, int(raw.shape[1]), int(raw.shape[0]), np.zeros((0, 4)),
                                   np.zeros(0), str(path)))
    return raws, records


def _record_image(record, det, raw, names, info, threshold, args, done: Predicted) -> None:
    from megatron.data.io import write_image

    k = record.image_id - 1
    entries = _results(record.image_id, str(record.path), det, info.class_names, threshold)
    done.results.extend(entries)
    for e in entries:
        done.per_class[e["category_name"]] = done.per_class.get(e["category_name"], 0) + 1
    entry = {"id": record.image_id, "file_name": str(record.path), "width": record.width,
             "height": record.height, "detections": len(entries)}
    if not args.no_draw:
        boxes, labels, scores = entries_as_arrays(entries)
        write_image(Path(args.out) / names[k], draw_detections(display_image(raw), boxes, labels, scores,
                                                               info.class_names))
        entry["drawing"] = names[k]
    done.image_entries.append(entry)


def _write_outputs(out: Path, done: Predicted) -> None:
    from megatron.atomic_io import atomic_write_json

    atomic_write_json(out / "detections.json", done.results)
    atomic_write_json(out / "images.json", done.image_entries)


def _print_summary(console: Console, info, threshold: float, threshold_source: str, done: Predicted, out: Path,
                   no_draw: bool, what: str = "image(s)") -> None:
    table = Table(title=f"{info.detector_name} model {escape(info.path.name)}: detections scoring >= {threshold:g}")
    table.add_column("class")
    table.add_column("detections", justify="right")
    for name, n in done.per_class.items():
        table.add_row(escape(name), str(n))
    print_full_width(console, table)
    console.print(f"threshold: {escape(threshold_source)}", highlight=False)
    console.print(f"{len(done.image_entries)} {what} -> {escape(str(out / 'detections.json'))}"
                  + ("" if no_draw else f" and {len(done.image_entries)} drawing(s) in {escape(str(out))}"),
                  highlight=False)
    for path, message in done.failures:
        console.print(f"[red]error[/] {escape(str(path))}: {escape(message)}", highlight=False, soft_wrap=True)
    if done.failures:
        console.print(f"[red]{len(done.failures)} image(s) could not be read[/] (listed above); the others were written")


# --- volumes ----------------------------------------------------------------------------------------
def _run_volumes(args: argparse.Namespace, console: Console) -> int:
    """``--volumes``: every slice of each volume (the ``volume`` plugin, options from ``--set``), slice
    detections linked into 3D candidates (world mm) -> DIR/candidates.json, and per volume a PNG strip of the
    slices holding candidates, boxes drawn."""
    from megatron.atomic_io import atomic_write_json
    from megatron.commands.common import parse_set_options
    from megatron.commands.evaluate import predict_detections, volume_task
    from megatron.training.model_file import VOLUME_READING_KEY, load_model, resolve_device

    options = parse_set_options(args.set)
    device = resolve_device(args.device)
    detector, info = load_model(args.checkpoint, device=device)
    tasks = [volume_task(Path(p), options, info.preprocessing.get(VOLUME_READING_KEY)) for p in args.paths]
    out = Path(args.out)
    threshold, threshold_source = _threshold(args, info)
    out.mkdir(parents=True, exist_ok=True)
    done = Predicted(per_class={n: 0 for n in info.class_names})
    candidates: dict[str, list[dict]] = {}
    for task in tasks:
        detections = predict_detections(detector, info, task, device, args.batch_size)
        for record, det in zip(task.records, detections):
            entries = _results(record.image_id, record.file_name, det, info.class_names, threshold)
            done.results.extend(dict(e, volume_id=record.meta["volume_id"], slice_index=record.meta["slice_index"])
                                for e in entries)
            for e in entries:
                done.per_class[e["category_name"]] = done.per_class.get(e["category_name"], 0) + 1
        found = volume_candidates(task, detections, threshold, info.class_names)
        candidates.update(found)
        if not args.no_draw:
            done.image_entries += draw_strips(task, detections, threshold, info.class_names, found, out)
    atomic_write_json(out / "candidates.json", candidates)
    _write_outputs(out, done)
    _print_summary(console, info, threshold, threshold_source, done, out, True, what="volume strip(s)")
    console.print(f"{sum(len(c) for c in candidates.values())} 3D candidate(s) in {len(candidates)} volume(s) -> "
                  f"{escape(str(out / 'candidates.json'))}", highlight=False)
    return 0


def volume_candidates(task, detections, threshold: float, class_names: list[str]) -> dict[str, list[dict]]:
    """Per volume id: the 3D candidates (linked slice detections scoring >= ``threshold``), each with its class
    name, world centre (RAS and LPS mm), diameter and slice range, best score first."""
    from megatron.evaluation.volume import volume_objects

    objects = volume_objects(task.records, [(d.boxes, d.scores, d.labels) for d in detections], False,
                             min_score=threshold)
    out: dict[str, list[dict]] = {str(r.meta["volume_id"]): [] for r in task.records}
    for volume_id, found in objects.items():
        out[volume_id] = [dict(o.to_dict(), category_name=class_names[o.label]) for o in found]
    return out


#: slices shown per volume strip (the central slice of each of the best candidates)
STRIP_SLICES = 6


def draw_strips(task, detections, threshold: float, class_names: list[str], found: dict, out: Path) -> list[dict]:
    """One PNG per volume, ``<volume id>_strip.png``: side by side, the central slice of each of its best
    candidates (else its middle slice), with that slice's detections scoring >= ``threshold`` drawn."""
    from megatron.data.io import write_image

    entries = []
    for volume_id, cands in found.items():
        by_slice = {int(r.meta["slice_index"]): (r, d) for r, d in zip(task.records, detections)
                    if str(r.meta["volume_id"]) == volume_id}
        axis = int(next(iter(by_slice.values()))[0].meta["slice_axis"])
        centres = {int(round(c["centre_voxel"][axis])) for c in cands[:STRIP_SLICES]}
        chosen = sorted(centres & set(by_slice)) or [sorted(by_slice)[len(by_slice) // 2]]
        panels = []
        for s in chosen:
            record, det = by_slice[s]
            raw = task.load_image(record)
            grey = raw[:, :, 1] if raw.ndim == 3 else raw  # 2.5D: the slice itself is the middle channel
            keep = det.scores >= threshold
            panels.append(draw_detections(display_image(grey), det.boxes[keep], det.labels[keep], det.scores[keep],
                                          class_names))
        write_image(out / f"{volume_id}_strip.png", np.concatenate(panels, axis=1))
        entries.append({"volume_id": volume_id, "drawing": f"{volume_id}_strip.png", "slices": chosen})
    return entries
