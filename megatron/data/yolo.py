"""The YOLO txt layout -> :class:`~megatron.types.Task`.

Layout: ``root/images/[split/]*.png|jpg|...``, ``root/labels/[split/]<same stem>.txt`` with one
``class cx cy w h`` line per box (normalised to 0..1; a polygon ``class x1 y1 x2 y2 ...`` line becomes its
bounding box), and the class names in ``root/classes.txt`` (one per line) or ``root/data.yaml`` (``names``:
list or ``{index: name}``). An image without a label file has no objects (the YOLO convention).
Pixel coordinates need the image size, which is read from each image's header.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from megatron.data.groups import assign_file_groups
from megatron.data.io import IMAGE_SUFFIXES, read_image_size
from megatron.data.paths import check_inside, walk_files
from megatron.data.problems import Problem, clean_box
from megatron.errors import DataError
from megatron.types import ImageRecord, Task


def read_class_names(root: Path) -> tuple[list[str], Path]:
    """Class names from ``classes.txt`` / ``obj.names`` or ``data.yaml`` / ``dataset.yaml`` under ``root``."""
    for fname in ("classes.txt", "obj.names"):
        path = root / fname
        if path.is_file():
            names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
            if not names:
                raise DataError(f"{path} lists no class names; fix: write one class name per line")
            return names, path
    for fname in ("data.yaml", "dataset.yaml"):
        path = root / fname
        if path.is_file():
            try:
                doc = yaml.safe_load(path.read_text())
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                raise DataError(f"{path} is not valid YAML{where}: {exc}; fix: repair the file") from None
            names = doc.get("names") if isinstance(doc, dict) else None
            if isinstance(names, dict):
                try:
                    keys = sorted(int(k) for k in names)
                except (TypeError, ValueError):
                    keys = None
                if keys is None or keys != list(range(len(keys))):
                    raise DataError(f"{path}: `names` keys must be 0..N-1, got {list(names)}; fix: number the "
                                    "classes from 0 without gaps")
                names = [str(names[k] if k in names else names[str(k)]) for k in keys]
            if not isinstance(names, list) or not names:
                raise DataError(f"{path} has no `names` list; fix: add `names: [class0, class1, ...]`")
            return [str(n) for n in names], path
    raise DataError(f"YOLO folder {root} has no class-names file; fix: add classes.txt (one name per line) "
                    "or data.yaml with `names: [...]`")


def read_yolo_task(root: Path, name: str, split: str | None = None, modality: str = "",
                   source: str | None = None, group_pattern: str | None = None, groups_csv: Path | None = None,
                   allow_outside_paths: bool = False) -> tuple[Task, list[Problem]]:
    """Read a YOLO-layout dataset; record-level problems are returned, fatal ones raise DataError.

    ``group_pattern`` / ``groups_csv``: where the patients come from (:func:`megatron.data.groups.assign_file_groups`);
    neither: every image its own group. ``allow_outside_paths``: read images that are symlinks leading out of
    the image folder (by default each is an error)."""
    root = Path(root)
    image_dir, label_dir = _layout(root, split)
    names, _ = read_class_names(root)
    problems: list[Problem] = []
    image_paths = [p for p in walk_files(image_dir) if p.suffix.lower() in IMAGE_SUFFIXES]
    _labels_without_images(image_dir, label_dir, image_paths, problems)
    records = []
    for image_id, image_path in enumerate(image_paths, start=1):
        rel = image_path.relative_to(image_dir)
        if not allow_outside_paths and not check_inside(image_path, image_dir, rel.as_posix(), str(image_path),
                                                        f"image id {image_id}", problems):
            continue
        try:
            width, height = read_image_size(image_path)
        except DataError as exc:
            problems.append(Problem("error", "image_unreadable", str(image_path), f"image id {image_id}",
                                    str(exc), "replace or remove the image"))
            continue
        boxes, labels = _read_label_file(label_dir / rel.with_suffix(".txt"), width, height, len(names), problems)
        records.append(ImageRecord(image_id=image_id, path=image_path, width=width, height=height,
                                   boxes=np.stack(boxes) if boxes else np.zeros((0, 4), np.float32),
                                   labels=np.asarray(labels, np.int64), file_name=rel.as_posix()))
    grouping = assign_file_groups(records, group_pattern, groups_csv, str(root), problems)
    _whole_task_problems(records, names, image_dir, label_dir, problems)
    task = Task(name=name, categories=names, records=records, modality=modality,
                source=source or f"yolo:{root}", grouping=grouping)
    return task, problems


def _layout(root: Path, split: str | None) -> tuple[Path, Path]:
    """``(image folder, label folder)`` of the dataset; a DataError with the expected layout when missing."""
    if not root.is_dir():
        raise DataError(f"YOLO folder {root} does not exist; fix: pass the folder holding images/ and labels/")
    image_dir = root / "images" / (split or "")
    label_dir = root / "labels" / (split or "")
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise DataError(f"YOLO folder {root}: {folder} does not exist; fix: use the layout "
                            f"images/{split + '/' if split else ''}*.png + labels/{split + '/' if split else ''}*.txt"
                            + ("" if split else " (or set the `split` option to a sub-folder such as train)"))
    return image_dir, label_dir


def _labels_without_images(image_dir: Path, label_dir: Path, image_paths: list[Path], problems: list[Problem]) -> None:
    stems = {p.relative_to(image_dir).with_suffix("").as_posix() for p in image_paths}
    for label_path in (p for p in walk_files(label_dir) if p.suffix == ".txt"):
        if label_path.relative_to(label_dir).with_suffix("").as_posix() not in stems:
            problems.append(Problem("warning", "label_without_image", str(label_path), "",
                                    "label file has no matching image; it is ignored",
                                    f"add the image to {image_dir} or delete the label file"))


def _read_label_file(label_path: Path, width: int, height: int, n_classes: int,
                     problems: list[Problem]) -> tuple[list[np.ndarray], list[int]]:
    """The pixel boxes and labels of one label file (none when it does not exist: the YOLO convention)."""
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    if not label_path.is_file():
        return boxes, labels
    for lineno, line in enumerate(label_path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parsed = _parse_label_line(line, n_classes, str(label_path), f"line {lineno}", problems)
        if parsed is None:
            continue
        cls, (nx1, ny1, nx2, ny2) = parsed
        box = clean_box(nx1 * width, ny1 * height, nx2 * width, ny2 * height, width, height,
                        str(label_path), f"line {lineno}", problems)
        if box is not None:
            boxes.append(box)
            labels.append(cls)
    return boxes, labels


def _parse_label_line(line: str, n_classes: int, file: str, rec: str,
                      problems: list[Problem]) -> tuple[int, tuple[float, float, float, float]] | None:
    """``(class, normalised xyxy)`` of a ``class cx cy w h`` or polygon line, or None with an error."""
    parts = line.split()
    try:
        cls_f = float(parts[0])
        values = [float(v) for v in parts[1:]]
    except ValueError:
        problems.append(Problem("error", "label_malformed", file, rec, f"{line.strip()!r} is not numbers",
                                "write `class cx cy w h` per line"))
        return None
    if len(values) < 4 or (len(values) > 4 and len(values) % 2):
        problems.append(Problem("error", "label_malformed", file, rec, f"{line.strip()!r} has {len(parts)} fields",
                                "write `class cx cy w h` (5 fields, normalised) or a polygon "
                                "`class x1 y1 x2 y2 x3 y3 ...`"))
        return None
    if not cls_f.is_integer() or not 0 <= cls_f < n_classes:
        problems.append(Problem("error", "label_unknown_class", file, rec,
                                f"class {parts[0]} is not in 0..{n_classes - 1} ({n_classes} names)",
                                "fix the class index or add the class name to the names file"))
        return None
    if max(abs(v) for v in values) > 2.0:
        problems.append(Problem("error", "label_not_normalised", file, rec,
                                f"{line.strip()!r} has values > 1: looks like pixel coordinates",
                                "divide x/width by the image width and y/height by the image height"))
        return None
    if len(values) == 4:
        cx, cy, bw, bh = values
        return int(cls_f), (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
    xs, ys = values[0::2], values[1::2]
    return int(cls_f), (min(xs), min(ys), max(xs), max(ys))


def _whole_task_problems(records: list[ImageRecord], names: list[str], image_dir: Path, label_dir: Path,
                         problems: list[Problem]) -> None:
    if not records:
        problems.append(Problem("error", "task_empty", str(image_dir), "", "no (readable) images found",
                                f"put images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}"))
    elif not any(len(r.boxes) for r in records):
        problems.append(Problem("error", "task_no_boxes", str(label_dir), "", "no (valid) boxes in any label file",
                                f"put `class cx cy w h` label files in {label_dir}, named like the images"))
    for k, cname in enumerate(names):
        if records and not any((r.labels == k).any() for r in records):
            problems.append(Problem("warning", "category_unused", str(label_dir), f"class {k}",
                                    f"class {cname!r} has no boxes", "annotate some objects of it or drop it"))
