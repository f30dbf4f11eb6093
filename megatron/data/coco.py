"""COCO detection files <-> :class:`~megatron.types.Task`.

:func:`read_coco_task` parses the annotation JSON itself (so a malformed file is reported with line and
column), validates every record, indexes it with pycocotools and returns the task plus every
:class:`~megatron.data.problems.Problem` found. Boxes become xyxy float32 pixels; the kept categories become
contiguous labels ``0..C-1`` in ascending COCO id order (or in the order of ``categories`` when given).
``file_name`` may point at a DICOM file; an image entry of a multi-frame DICOM file names its 0-based frame
as ``"frame": N`` (carried in ``ImageRecord.frame``).

:func:`write_coco_task` writes a task as a COCO folder (``images/`` + ``annotations.json``) that
:func:`read_coco_task` and any COCO tool can open.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from megatron.data.io import write_image
from megatron.data.problems import Problem, clean_box
from megatron.errors import DataError
from megatron.types import ImageRecord, Task

log = logging.getLogger(__name__)

ANNOTATION_FILE = "annotations.json"
IMAGE_FOLDER = "images"


def load_json(path: Path) -> Any:
    """The parsed JSON of ``path``; a DataError naming file, line and column when it is not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file {path} does not exist; fix: pass the path of the COCO JSON file")
    text = path.read_bytes()
    try:
        return json.loads(text)
    except UnicodeDecodeError as exc:
        raise DataError(f"annotation file {path} is not UTF-8 text ({exc}); fix: save it as UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        # str(exc) keeps the parser's position ("Unterminated string starting at: line 1 column 27 (char 26)");
        # exc.msg alone would end in "starting at" with the position lost
        detail = str(exc)
        if exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string"):
            end = text.rstrip()
            line = end.count(b"\n") + 1
            column = len(end) - (end.rfind(b"\n") + 1) + 1
            where = f"the file ends early (truncated?) at line {line}, column {column} (after {len(end)} bytes)"
        else:
            where = f"malformed JSON at line {exc.lineno}, column {exc.colno}"
        raise DataError(f"annotation file {path}: {where}: {detail}; fix: repair or re-export the file "
                        "(e.g. `python -m json.tool FILE` shows where)") from None


def _as_int_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def default_image_dir(annotation_file: Path) -> Path:
    """``images/`` beside the annotation file (or beside its ``annotations/`` folder), else its folder."""
    here = Path(annotation_file).parent
    for candidate in (here / IMAGE_FOLDER, here.parent / IMAGE_FOLDER):
        if candidate.is_dir():
            return candidate
    return here


def default_task_name(annotation_file: Path) -> str:
    folder = Path(annotation_file).resolve().parent
    if folder.name == "annotations":  # the classic COCO layout: <dataset>/annotations/instances_x.json
        folder = folder.parent
    return folder.name or Path(annotation_file).stem


def read_coco_task(annotation_file: Path, image_dir: Path, name: str, modality: str = "",
                   categories: Sequence[str] | None = None, check_files: bool = True,
                   source: str | None = None) -> tuple[Task, list[Problem]]:
    """Read one COCO detection dataset as a task.

    Raises DataError only when nothing sensible can be read (missing/malformed file, missing top-level
    keys); record-level problems are returned (errors and counted warnings) for the caller to act on.
    ``check_files`` stats every image file (cheap); pixels are read lazily by ``task.image_loader``.
    """
    from pycocotools.coco import COCO

    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    data = load_json(annotation_file)
    file = str(annotation_file)
    problems: list[Problem] = []
    if not isinstance(data, dict):
        raise DataError(f"annotation file {file}: top level is a {type(data).__name__}, expected an object with "
                        "'images', 'annotations' and 'categories'; fix: export the dataset in COCO detection format")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DataError(f"annotation file {file}: missing or non-list key(s) {', '.join(map(repr, missing))}; "
                        "fix: a COCO detection file needs lists 'images', 'annotations' (may be empty) and "
                        "'categories'")
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} (for {file}) does not exist; fix: pass image_dir, the folder "
                        "the images' file_name paths are relative to")

    # --- categories
    cats: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        rec = f"categories[{i}]"
        cid = _as_int_id(cat.get("id")) if isinstance(cat, dict) else None
        cname = cat.get("name") if isinstance(cat, dict) else None
        if cid is None or not isinstance(cname, str) or not cname:
            problems.append(Problem("error", "category_malformed", file, rec,
                                    f"category {cat!r} needs an integer 'id' and a non-empty 'name'",
                                    "give every category an integer id and a name"))
            continue
        if cid in cats:
            problems.append(Problem("error", "category_duplicate_id", file, f"category id {cid}",
                                    f"category id {cid} is used twice ({cats[cid]!r} and {cname!r})",
                                    "give every category a unique id"))
            continue
        cats[cid] = cname
    names = list(cats.values())
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(Problem("error", "category_duplicate_name", file, f"category {dup!r}",
                                f"category name {dup!r} is used by several ids",
                                "merge the categories or give them distinct names"))
    if categories is not None:
        by_name = {n: cid for cid, n in cats.items()}
        unknown = [c for c in categories if c not in by_name]
        if unknown:
            raise DataError(f"{file}: categories option names {unknown}, which the file does not have; "
                            f"fix: choose from {sorted(by_name)}")
        kept_ids = [by_name[c] for c in categories]
    else:
        kept_ids = sorted(cats)
    label_of = {cid: i for i, cid in enumerate(kept_ids)}
    task_categories = [cats[cid] for cid in kept_ids]

    # --- images
    images: dict[int, dict] = {}
    duplicated: dict[int, list[str]] = {}  # image id -> the file names that share it
    for i, img in enumerate(data["images"]):
        rec = f"images[{i}]"
        if not isinstance(img, dict):
            problems.append(Problem("error", "image_malformed", file, rec, f"image entry {img!r} is not an object",
                                    "each image needs id, file_name, width, height"))
            continue
        iid = _as_int_id(img.get("id"))
        if iid is None:
            problems.append(Problem("error", "image_missing_key", file, rec, "image has no integer 'id'",
                                    "give every image a unique integer id"))
            continue
        rec = f"image id {iid}"
        miss = [k for k in ("file_name", "width", "height") if k not in img]
        if miss:
            problems.append(Problem("error", "image_missing_key", file, rec,
                                    f"image lacks {', '.join(map(repr, miss))}",
                                    "add file_name, width and height (pixels) to every image"))
            continue
        w, h = img["width"], img["height"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (w, h)):
            problems.append(Problem("error", "image_bad_size", file, rec,
                                    f"image size width={w!r}, height={h!r} is not positive",
                                    "set width and height to the image's size in pixels"))
            continue
        if iid in images or iid in duplicated:
            # an id used twice is ambiguous: neither image is used and its annotations are left out, with one
            # error for the id (reported after the annotations) instead of one per box checked on the wrong image
            if iid not in duplicated:
                duplicated[iid] = [images.pop(iid)["file_name"]]
            duplicated[iid].append(str(img["file_name"]))
            continue
        frame = img.get("frame")
        if frame is not None and (isinstance(frame, bool) or _as_int_id(frame) is None or _as_int_id(frame) < 0):
            problems.append(Problem("error", "image_bad_frame", file, rec,
                                    f"frame {frame!r} is not a frame index (0, 1, 2, ...)",
                                    "give the 0-based frame of the multi-frame DICOM file, or drop 'frame'"))
            continue
        path = image_dir / str(img["file_name"])
        if check_files and not path.is_file():
            problems.append(Problem("error", "image_missing_file", file, rec,
                                    f"image file {path} does not exist",
                                    f"put the file in {image_dir} or remove the image and its annotations"))
        images[iid] = {"id": iid, "file_name": str(img["file_name"]), "width": int(w), "height": int(h)}
        if frame is not None:
            images[iid]["frame"] = _as_int_id(frame)

    # --- annotations
    boxes: dict[int, list[np.ndarray]] = {iid: [] for iid in images}
    labels: dict[int, list[int]] = {iid: [] for iid in images}
    anns: list[dict] = []
    seen_ann_ids: set[int] = set()
    next_free_id = 1 + max([_as_int_id(a.get("id")) or 0 for a in data["annotations"] if isinstance(a, dict)] or [0])
    skipped_by_option = 0
    duplicate_anns: dict[int, int] = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            problems.append(Problem("error", "annotation_malformed", file, f"annotations[{i}]",
                                    f"annotation {ann!r} is not an object", "each annotation needs image_id, "
                                    "category_id and bbox"))
            continue
        aid = _as_int_id(ann.get("id"))
        rec = f"annotation id {aid}" if aid is not None else f"annotations[{i}]"
        if aid is None or aid in seen_ann_ids:
            what = "annotation has no integer 'id'" if aid is None else f"annotation id {aid} repeats"
            problems.append(Problem("warning", "annotation_id_renumbered", file, rec,
                                    f"{what}; it was given id {next_free_id}",
                                    "give every annotation a unique integer id"))
            aid, next_free_id = next_free_id, next_free_id + 1
        seen_ann_ids.add(aid)
        miss = [k for k in ("image_id", "category_id", "bbox") if k not in ann]
        if miss:
            problems.append(Problem("error", "annotation_missing_key", file, rec,
                                    f"annotation lacks {', '.join(map(repr, miss))}",
                                    "every annotation needs image_id, category_id and bbox [x, y, width, height]"))
            continue
        iid, cid = _as_int_id(ann["image_id"]), _as_int_id(ann["category_id"])
        if iid in duplicated:
            duplicate_anns[iid] = duplicate_anns.get(iid, 0) + 1
            continue
        if iid not in images:
            if not any(p.code in ("image_missing_key", "image_bad_size", "image_bad_frame")
                       and p.record == f"image id {iid}" for p in problems):
                problems.append(Problem("error", "annotation_unknown_image", file, rec,
                                        f"image_id {ann['image_id']!r} is not in 'images'",
                                        "add the image to 'images' or delete the annotation"))
            continue
        if cid not in cats:
            problems.append(Problem("error", "annotation_unknown_category", file, rec,
                                    f"category_id {ann['category_id']!r} is not in 'categories' "
                                    f"(known ids: {sorted(cats)})",
                                    "add the category to 'categories' or fix/delete the annotation"))
            continue
        if cid not in label_of:
            skipped_by_option += 1
            continue
        bbox = ann["bbox"]
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            problems.append(Problem("error", "annotation_bad_bbox", file, rec,
                                    f"bbox {bbox!r} is not 4 numbers", "write bbox as [x, y, width, height] in pixels"))
            continue
        if ann.get("iscrowd", 0):
            problems.append(Problem("warning", "annotation_crowd", file, rec,
                                    "iscrowd=1 region (a group, not one object); it is skipped",
                                    "annotate the objects individually if they should be detected"))
            continue
        x, y, bw, bh = (float(v) for v in bbox)
        img = images[iid]
        box = clean_box(x, y, x + bw, y + bh, img["width"], img["height"], file, rec + f" (image id {iid})", problems)
        if box is None:
            continue
        boxes[iid].append(box)
        labels[iid].append(label_of[cid])
        anns.append({"id": aid, "image_id": iid, "category_id": cid, "iscrowd": 0,
                     "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                     "area": float((box[2] - box[0]) * (box[3] - box[1]))})
    for iid, names in duplicated.items():
        n = duplicate_anns.get(iid, 0)
        problems.append(Problem("error", "image_duplicate_id", file, f"image id {iid}",
                                f"image id {iid} is used by {len(names)} images ({', '.join(map(repr, names))}), so "
                                f"its annotations are ambiguous: neither image is used and its {n} annotation(s) "
                                "are left out", "give every image a unique id"))
    if skipped_by_option:
        log.info("%s: %d annotations of categories not in the `categories` option were left out", file,
                 skipped_by_option)

    # --- the task as a whole
    if not images:
        problems.append(Problem("error", "task_empty", file, "", "the dataset has no (valid) images",
                                "add images to 'images', or remove this dataset from the config"))
    elif not anns:
        problems.append(Problem("error", "task_no_boxes", file, "",
                                "the dataset has no (valid) boxes, so a detector cannot learn from it",
                                "add annotations, or check the categories option (for similarity on unlabelled "
                                "images, use the `folder` or `dicom` dataset plugin without annotations)"))
    for cid in kept_ids:
        if cid in cats and not any(a["category_id"] == cid for a in anns):
            problems.append(Problem("warning", "category_unused", file, f"category id {cid}",
                                    f"category {cats[cid]!r} has no boxes",
                                    "annotate some objects of it, or drop it (categories option)"))

    # index through pycocotools: the same structure the evaluator uses
    coco = COCO()
    coco.dataset = {"images": list(images.values()), "annotations": anns,
                    "categories": [{"id": cid, "name": cats[cid]} for cid in kept_ids]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    records = []
    for iid in sorted(coco.imgs):
        img = coco.imgs[iid]
        b = np.stack(boxes[iid]).astype(np.float32) if boxes[iid] else np.zeros((0, 4), np.float32)
        records.append(ImageRecord(image_id=iid, path=image_dir / img["file_name"], width=img["width"],
                                   height=img["height"], boxes=b, labels=np.asarray(labels[iid], np.int64),
                                   file_name=img["file_name"], frame=img.get("frame")))
    task = Task(name=name, categories=task_categories, records=records, modality=modality,
                source=source or f"coco:{annotation_file}")
    return task, problems


def write_coco_task(task: Task, out_dir: Path, category_ids: Sequence[int] | None = None) -> Path:
    """Write ``task`` as ``out_dir/images/*`` + ``out_dir/annotations.json``; returns the annotation path.

    Category ids are ``category_ids`` (one per task category) or ``1..C``. Image files are copied byte for
    byte when the record has a readable path with a PNG/TIFF/JPEG suffix, otherwise encoded as PNG. The
    annotation file is written last through a temp file + rename, so a partial export has no annotations.
    """
    out_dir = Path(out_dir)
    image_out = out_dir / IMAGE_FOLDER
    image_out.mkdir(parents=True, exist_ok=True)
    ids = list(category_ids) if category_ids is not None else list(range(1, len(task.categories) + 1))
    if len(ids) != len(task.categories):
        raise ValueError(f"{len(ids)} category ids for {len(task.categories)} categories")
    images, anns = [], []
    used_names: set[str] = set()
    for record in task.records:
        src = Path(record.path) if record.path is not None else None
        base = Path(record.file_name or (src.name if src else f"{record.image_id:06d}.png")).name
        if src is None or src.suffix.lower() not in (".png", ".tif", ".tiff", ".jpg", ".jpeg"):
            base = Path(base).with_suffix(".png").name
        if base in used_names:  # flattening sub-folders may collide
            base = f"{record.image_id}_{base}"
        used_names.add(base)
        dst = image_out / base
        if src is not None and src.is_file() and src.suffix.lower() == dst.suffix.lower():
            shutil.copyfile(src, dst)
        else:
            write_image(dst, task.load_image(record))
        images.append({"id": int(record.image_id), "file_name": base, "width": int(record.width),
                       "height": int(record.height)})
        for box, label in zip(record.boxes, record.labels):
            x1, y1, x2, y2 = (float(v) for v in box)
            anns.append({"id": len(anns) + 1, "image_id": int(record.image_id), "category_id": int(ids[int(label)]),
                         "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                         "area": round((x2 - x1) * (y2 - y1), 3), "iscrowd": 0})
    doc = {"info": {"description": f"megatron task {task.name}", "task": task.name, "modality": task.modality,
                    "source": task.source},
           "images": images, "annotations": anns,
           "categories": [{"id": int(cid), "name": n, "supercategory": task.modality or "lesion"}
                          for cid, n in zip(ids, task.categories)]}
    target = out_dir / ANNOTATION_FILE
    fd, tmp = tempfile.mkstemp(prefix=".annotations-", suffix=".json", dir=out_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, target)
    return target

