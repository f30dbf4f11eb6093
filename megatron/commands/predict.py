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
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from megatron.errors import DataError

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
                   help="keep detections scoring at least S (default: the model file's evaluation threshold, else 0.3)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per forward pass (default 8)")
    p.add_argument("--no-draw", action="store_true", help="write detections.json only, no PNGs")
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
    from megatron.atomic_io import atomic_write_json
    from megatron.data.io import read_image, write_image
    from megatron.errors import ConfigError
    from megatron.evaluation.predictions import predict_task
    from megatron.training.model_file import load_model, resolve_device
    from megatron.types import ImageRecord, Task

    console = Console()
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.score_threshold is not None and not 0.0 <= args.score_threshold <= 1.0:
        raise ConfigError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    images = collect_images(args.paths)
    out = Path(args.out)
    names = drawing_names([name for _, name in images])
    if not args.no_draw:
        inputs = {p.resolve(): p for p, _ in images}
        for name in names:
            clash = inputs.get((out / name).resolve())
            if clash is not None:
                raise DataError(f"the drawing {out / name} would overwrite the input image {clash}; "
                                "fix: choose another --out folder")
    device = resolve_device(args.device)
    detector, info = load_model(args.checkpoint, device=device)
    threshold = args.score_threshold if args.score_threshold is not None else info.score_threshold
    pre = info.preprocessor()
    out.mkdir(parents=True, exist_ok=True)

    results: list[dict] = []
    image_entries: list[dict] = []
    failures: list[tuple[Path, str]] = []
    per_class = {n: 0 for n in info.class_names}
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True, disable=not console.is_terminal)
    with progress:
        bar = progress.add_task("predicting", total=len(images))
        for start in range(0, len(images), args.batch_size):
            raws: dict[int, np.ndarray] = {}
            records = []
            for k in range(start, min(start + args.batch_size, len(images))):
                path = images[k][0]
                try:
                    raws[k + 1] = raw = read_image(path)
                except DataError as exc:
                    failures.append((path, str(exc)))
                    progress.advance(bar)
                    continue
                records.append(ImageRecord(k + 1, path, int(raw.shape[1]), int(raw.shape[0]), np.zeros((0, 4)),
                                           np.zeros(0), str(path)))
            if not records:
                continue
            # the pixels were read once above; the runner's prediction loop gets them through the task's loader
            chunk = Task(name="predict", categories=list(info.class_names), records=records,
                         image_loader=lambda r, raws=raws: raws[r.image_id])
            try:
                preds = predict_task(detector, chunk, pre, args.batch_size, device)
            except DataError as exc:  # e.g. pixels the preprocessing cannot use
                failures.extend((r.path, str(exc)) for r in records)
                progress.advance(bar, len(records))
                continue
            for record, det in zip(records, preds):
                k, raw = record.image_id - 1, raws[record.image_id]
                entries = _results(record.image_id, str(record.path), det, info.class_names, threshold)
                results.extend(entries)
                for e in entries:
                    per_class[e["category_name"]] = per_class.get(e["category_name"], 0) + 1
                entry = {"id": record.image_id, "file_name": str(record.path), "width": record.width,
                         "height": record.height, "detections": len(entries)}
                if not args.no_draw:
                    boxes, labels, scores = entries_as_arrays(entries)
                    write_image(out / names[k], draw_detections(display_image(raw), boxes, labels, scores,
                                                                info.class_names))
                    entry["drawing"] = names[k]
                image_entries.append(entry)
                progress.advance(bar)

    atomic_write_json(out / "detections.json", results)
    atomic_write_json(out / "images.json", image_entries)
    table = Table(title=f"{info.detector_name} model {escape(info.path.name)}: detections scoring >= {threshold:g}")
    table.add_column("class")
    table.add_column("detections", justify="right")
    for name, n in per_class.items():
        table.add_row(escape(name), str(n))
    console.print(table)
    console.print(f"{len(image_entries)} image(s) -> {escape(str(out / 'detections.json'))}"
                  + ("" if args.no_draw else f" and {len(image_entries)} drawing(s) in {escape(str(out))}"),
                  highlight=False)
    for path, message in failures:
        console.print(f"[red]error[/] {escape(str(path))}: {escape(message)}", highlight=False, soft_wrap=True)
    if failures:
        console.print(f"[red]{len(failures)} image(s) could not be read[/] (listed above); the others were written")
        return 1
    return 0
