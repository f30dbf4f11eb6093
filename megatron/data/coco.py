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
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from megatron.data.groups import GROUPING_NONE, assign_file_groups
from megatron.data.io import write_image
from megatron.data.paths import OUTSIDE_CODE, check_inside
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


#: the COCO image-entry field that names the patient, unless a dataset's ``group_field`` option says otherwise
DEFAULT_GROUP_FIELD = "patient_id"
#: image-entry fields that look like a patient/study identifier (data check suggests them as ``group_field``)
GROUP_LIKE_FIELD = re.compile(r"patient|subject|case|study|series", re.IGNORECASE)
#: image problems after which the image's annotations are not reported again as "unknown image"
_IMAGE_REJECTED = ("image_missing_key", "image_bad_size", "image_bad_frame", OUTSIDE_CODE)


def read_coco_task(annotation_file: Path, image_dir: Path, name: str, modality: str = "",
                   categories: Sequence[str] | None = None, check_files: bool = True,
                   source: str | None = None, group_field: str | None = DEFAULT_GROUP_FIELD,
                   allow_outside_paths: bool = False, group_pattern: str | None = None,
                   groups_csv: Path | None = None) -> tuple[Task, list[Problem]]:
    """Read one COCO detection dataset as a task.

    Raises DataError only when nothing sensible can be read (missing/malformed file, missing top-level
    keys); record-level problems are returned (errors and counted warnings) for the caller to act on.
    ``check_files`` stats every image file (cheap); pixels are read lazily by ``task.image_loader``.
    ``group_field``: the image-entry field naming the patient (None: every image its own group); present on
    some images only, it is an error counting the others. ``allow_outside_paths``: accept ``file_name`` paths
    that leave ``image_dir`` (absolute, ``../``, symlinks); by default each is an error. ``group_pattern`` /
    ``groups_csv``: the patients from the file names instead (most COCO exports carry no patient field; see
    :func:`megatron.data.groups.assign_file_groups`); either one replaces ``group_field``.
    """
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    by_file = group_pattern is not None or groups_csv is not None
    reading = _CocoReading(str(annotation_file), image_dir, check_files, allow_outside_paths)
    data = reading.top_level(load_json(annotation_file))
    reading.read_categories(data["categories"], categories)
    reading.read_images(data["images"], None if by_file else group_field)
    reading.read_annotations(data["annotations"])
    reading.whole_task_problems()
    records = reading.records()
    grouping = (assign_file_groups(records, group_pattern, groups_csv, str(annotation_file), reading.problems)
                if by_file else reading.grouping(group_field))
    task = Task(name=name, categories=[reading.cats[cid] for cid in reading.kept_ids], records=records,
                modality=modality, source=source or f"coco:{annotation_file}", grouping=grouping)
    return task, reading.problems


class _CocoReading:
    """The state of one :func:`read_coco_task`: what was read so far and every problem found, section by section."""

    def __init__(self, file: str, image_dir: Path, check_files: bool, allow_outside_paths: bool):
        self.file, self.image_dir = file, image_dir
        self.check_files, self.allow_outside_paths = check_files, allow_outside_paths
        self.problems: list[Problem] = []
        self.cats: dict[int, str] = {}
        self.kept_ids: list[int] = []
        self.label_of: dict[int, int] = {}
        self.images: dict[int, dict] = {}
        self.duplicated: dict[int, list[str]] = {}  # image id -> the file names that share it
        self.boxes: dict[int, list[np.ndarray]] = {}
        self.labels: dict[int, list[int]] = {}
        self.anns: list[dict] = []

    def error(self, code: str, record: str, message: str, fix: str) -> None:
        self.problems.append(Problem("error", code, self.file, record, message, fix))

    def warning(self, code: str, record: str, message: str, fix: str) -> None:
        self.problems.append(Problem("warning", code, self.file, record, message, fix))

    # --- the file as a whole
    def top_level(self, data: Any) -> dict:
        file = self.file
        if not isinstance(data, dict):
            raise DataError(f"annotation file {file}: top level is a {type(data).__name__}, expected an object with "
                            "'images', 'annotations' and 'categories'; fix: export the dataset in COCO detection "
                            "format")
        missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
        if missing:
            raise DataError(f"annotation file {file}: missing or non-list key(s) {', '.join(map(repr, missing))}; "
                            "fix: a COCO detection file needs lists 'images', 'annotations' (may be empty) and "
                            "'categories'")
        if not self.image_dir.is_dir():
            raise DataError(f"image folder {self.image_dir} (for {file}) does not exist; fix: pass image_dir, the "
                            "folder the images' file_name paths are relative to")
        return data

    # --- categories
    def read_categories(self, entries: list, categories: Sequence[str] | None) -> None:
        cats = self.cats
        for i, cat in enumerate(entries):
            cid = _as_int_id(cat.get("id")) if isinstance(cat, dict) else None
            cname = cat.get("name") if isinstance(cat, dict) else None
            if cid is None or not isinstance(cname, str) or not cname:
                self.error("category_malformed", f"categories[{i}]",
                           f"category {cat!r} needs an integer 'id' and a non-empty 'name'",
                           "give every category an integer id and a name")
            elif cid in cats:
                self.error("category_duplicate_id", f"category id {cid}",
                           f"category id {cid} is used twice ({cats[cid]!r} and {cname!r})",
                           "give every category a unique id")
            else:
                cats[cid] = cname
        names = list(cats.values())
        for dup in sorted({n for n in names if names.count(n) > 1}):
            self.error("category_duplicate_name", f"category {dup!r}", f"category name {dup!r} is used by several "
                       "ids", "merge the categories or give them distinct names")
        if categories is not None:
            by_name = {n: cid for cid, n in cats.items()}
            unknown = [c for c in categories if c not in by_name]
            if unknown:
                raise DataError(f"{self.file}: categories option names {unknown}, which the file does not have; "
                                f"fix: choose from {sorted(by_name)}")
            self.kept_ids = [by_name[c] for c in categories]
        else:
            self.kept_ids = sorted(cats)
        self.label_of = {cid: i for i, cid in enumerate(self.kept_ids)}

    # --- images
    def read_images(self, entries: list, group_field: str | None) -> None:
        for i, img in enumerate(entries):
            entry = self._image_entry(i, img)
            if entry is None:
                continue
            iid = entry["id"]
            if iid in self.images or iid in self.duplicated:
                # an id used twice is ambiguous: neither image is used and its annotations are left out, with one
                # error for the id (reported after the annotations) instead of one per box checked on the wrong
                # image
                if iid not in self.duplicated:
                    self.duplicated[iid] = [self.images.pop(iid)["file_name"]]
                self.duplicated[iid].append(entry["file_name"])
                continue
            if not self._file_usable(entry):
                continue
            if group_field is not None and _group_value(img.get(group_field)) is not None:
                entry["group"] = _group_value(img.get(group_field))
            self.images[iid] = entry
        self._check_groups(entries, group_field)
        self.boxes = {iid: [] for iid in self.images}
        self.labels = {iid: [] for iid in self.images}

    def _image_entry(self, i: int, img: Any) -> dict | None:
        """The usable fields of ``images[i]`` (id, file_name, width, height, frame), or None with an error."""
        if not isinstance(img, dict):
            self.error("image_malformed", f"images[{i}]", f"image entry {img!r} is not an object",
                       "each image needs id, file_name, width, height")
            return None
        iid = _as_int_id(img.get("id"))
        if iid is None:
            self.error("image_missing_key", f"images[{i}]", "image has no integer 'id'",
                       "give every image a unique integer id")
            return None
        rec = f"image id {iid}"
        miss = [k for k in ("file_name", "width", "height") if k not in img]
        if miss:
            self.error("image_missing_key", rec, f"image lacks {', '.join(map(repr, miss))}",
                       "add file_name, width and height (pixels) to every image")
            return None
        w, h = img["width"], img["height"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (w, h)):
            self.error("image_bad_size", rec, f"image size width={w!r}, height={h!r} is not positive",
                       "set width and height to the image's size in pixels")
            return None
        entry = {"id": iid, "file_name": str(img["file_name"]), "width": int(w), "height": int(h)}
        frame = img.get("frame")
        if frame is not None:
            if isinstance(frame, bool) or _as_int_id(frame) is None or _as_int_id(frame) < 0:
                self.error("image_bad_frame", rec, f"frame {frame!r} is not a frame index (0, 1, 2, ...)",
                           "give the 0-based frame of the multi-frame DICOM file, or drop 'frame'")
                return None
            entry["frame"] = _as_int_id(frame)
        return entry

    def _file_usable(self, entry: dict) -> bool:
        """Whether the entry's file may be read (inside the image folder, unless allowed); a missing file is an
        error but the entry stays (its annotations are still checked)."""
        rec, path = f"image id {entry['id']}", self.image_dir / entry["file_name"]
        if not self.allow_outside_paths and not check_inside(path, self.image_dir, entry["file_name"], self.file,
                                                             rec, self.problems):
            return False
        if self.check_files and not path.is_file():
            self.error("image_missing_file", rec, f"image file {path} does not exist",
                       f"put the file in {self.image_dir} or remove the image and its annotations")
        return True

    def _check_groups(self, entries: list, group_field: str | None) -> None:
        """A group field on some images only is an error (counted); a patient-like field left unused, a hint."""
        grouped = sum("group" in e for e in self.images.values())
        if group_field is not None and 0 < grouped < len(self.images):
            lacking = [e["id"] for e in self.images.values() if "group" not in e]
            shown = ", ".join(map(str, lacking[:5])) + (" ..." if len(lacking) > 5 else "")
            self.error("group_missing", f"field {group_field!r}",
                       f"{len(lacking)} of {len(self.images)} images have no {group_field!r} (image ids {shown}), "
                       f"so their patients are unknown and the split could put one patient in two parts",
                       f"give every image entry its {group_field!r} (the patient it shows), or set the dataset "
                       "option group_field: null to treat every image as its own patient")
        if grouped:
            return
        fields = Counter(k for e in entries if isinstance(e, dict) for k in e
                         if k != group_field and GROUP_LIKE_FIELD.search(str(k)))
        for field_name, n in sorted(fields.items()):
            self.warning("group_field_unused", f"field {field_name!r}",
                         f"{n} image entries carry {field_name!r}, which looks like a patient or study id, but the "
                         f"images are grouped by {group_field!r}, which they lack, so every image is its own patient",
                         f"set the dataset option group_field: {field_name} if it names the patient")

    # --- annotations
    def read_annotations(self, entries: list) -> None:
        seen_ids: set[int] = set()
        next_free_id = 1 + max([_as_int_id(a.get("id")) or 0 for a in entries if isinstance(a, dict)] or [0])
        skipped_by_option = 0
        duplicate_anns: dict[int, int] = {}
        for i, ann in enumerate(entries):
            if not isinstance(ann, dict):
                self.error("annotation_malformed", f"annotations[{i}]", f"annotation {ann!r} is not an object",
                           "each annotation needs image_id, category_id and bbox")
                continue
            aid = _as_int_id(ann.get("id"))
            rec = f"annotation id {aid}" if aid is not None else f"annotations[{i}]"
            if aid is None or aid in seen_ids:
                what = "annotation has no integer 'id'" if aid is None else f"annotation id {aid} repeats"
                self.warning("annotation_id_renumbered", rec, f"{what}; it was given id {next_free_id}",
                             "give every annotation a unique integer id")
                aid, next_free_id = next_free_id, next_free_id + 1
            seen_ids.add(aid)
            iid = _as_int_id(ann.get("image_id"))
            if iid in self.duplicated and all(k in ann for k in ("image_id", "category_id", "bbox")):
                duplicate_anns[iid] = duplicate_anns.get(iid, 0) + 1
                continue
            kept = self._annotation(ann, aid, rec)
            skipped_by_option += kept == "skipped"
        for iid, names in self.duplicated.items():
            n = duplicate_anns.get(iid, 0)
            self.error("image_duplicate_id", f"image id {iid}",
                       f"image id {iid} is used by {len(names)} images ({', '.join(map(repr, names))}), so its "
                       f"annotations are ambiguous: neither image is used and its {n} annotation(s) are left out",
                       "give every image a unique id")
        if skipped_by_option:
            log.info("%s: %d annotations of categories not in the `categories` option were left out", self.file,
                     skipped_by_option)

    def _annotation(self, ann: dict, aid: int, rec: str) -> str:
        """Check one annotation and keep its box: ``"kept"``, ``"skipped"`` (category not kept) or ``"rejected"``."""
        miss = [k for k in ("image_id", "category_id", "bbox") if k not in ann]
        if miss:
            self.error("annotation_missing_key", rec, f"annotation lacks {', '.join(map(repr, miss))}",
                       "every annotation needs image_id, category_id and bbox [x, y, width, height]")
            return "rejected"
        iid, cid = _as_int_id(ann["image_id"]), _as_int_id(ann["category_id"])
        if iid not in self.images:
            if not any(p.code in _IMAGE_REJECTED and p.record == f"image id {iid}" for p in self.problems):
                self.error("annotation_unknown_image", rec, f"image_id {ann['image_id']!r} is not in 'images'",
                           "add the image to 'images' or delete the annotation")
            return "rejected"
        if cid not in self.cats:
            self.error("annotation_unknown_category", rec, f"category_id {ann['category_id']!r} is not in "
                       f"'categories' (known ids: {sorted(self.cats)})",
                       "add the category to 'categories' or fix/delete the annotation")
            return "rejected"
        if cid not in self.label_of:
            return "skipped"
        bbox = ann["bbox"]
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            self.error("annotation_bad_bbox", rec, f"bbox {bbox!r} is not 4 numbers",
                       "write bbox as [x, y, width, height] in pixels")
            return "rejected"
        if ann.get("iscrowd", 0):
            self.warning("annotation_crowd", rec, "iscrowd=1 region (a group, not one object); it is skipped",
                         "annotate the objects individually if they should be detected")
            return "rejected"
        x, y, bw, bh = (float(v) for v in bbox)
        img = self.images[iid]
        box = clean_box(x, y, x + bw, y + bh, img["width"], img["height"], self.file, rec + f" (image id {iid})",
                        self.problems)
        if box is None:
            return "rejected"
        self.boxes[iid].append(box)
        self.labels[iid].append(self.label_of[cid])
        self.anns.append({"id": aid, "image_id": iid, "category_id": cid, "iscrowd": 0,
                          "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                          "area": float((box[2] - box[0]) * (box[3] - box[1]))})
        return "kept"

    # --- the task as a whole
    def whole_task_problems(self) -> None:
        if not self.images:
            self.error("task_empty", "", "the dataset has no (valid) images",
                       "add images to 'images', or remove this dataset from the config")
        elif not self.anns:
            self.error("task_no_boxes", "", "the dataset has no (valid) boxes, so a detector cannot learn from it",
                       "add annotations, or check the categories option (for similarity on unlabelled images, use "
                       "the `folder` or `dicom` dataset plugin without annotations)")
        for cid in self.kept_ids:
            if cid in self.cats and not any(a["category_id"] == cid for a in self.anns):
                self.warning("category_unused", f"category id {cid}", f"category {self.cats[cid]!r} has no boxes",
                             "annotate some objects of it, or drop it (categories option)")

    def records(self) -> list[ImageRecord]:
        """The image records, indexed through pycocotools (the same structure the evaluator uses)."""
        from pycocotools.coco import COCO  # imported here: pycocotools is slow to import, the CLI starts faster

        coco = COCO()
        coco.dataset = {"images": list(self.images.values()), "annotations": self.anns,
                        "categories": [{"id": cid, "name": self.cats[cid]} for cid in self.kept_ids]}
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        out = []
        for iid in sorted(coco.imgs):
            img = coco.imgs[iid]
            b = np.stack(self.boxes[iid]).astype(np.float32) if self.boxes[iid] else np.zeros((0, 4), np.float32)
            out.append(ImageRecord(image_id=iid, path=self.image_dir / img["file_name"], width=img["width"],
                                   height=img["height"], boxes=b, labels=np.asarray(self.labels[iid], np.int64),
                                   file_name=img["file_name"], frame=img.get("frame"), group=img.get("group")))
        return out

    def grouping(self, group_field: str | None) -> str:
        groups = {e["group"] for e in self.images.values() if "group" in e}
        return f"COCO image field {group_field!r}: {len(groups)} patients" if groups else GROUPING_NONE


def _group_value(value: Any) -> str | None:
    """A group field's value as the group id (numbers and strings); None when absent or empty."""
    if value is None or isinstance(value, (bool, dict, list)):
        return None
    text = str(value).strip()
    return text or None


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
        entry = {"id": int(record.image_id), "file_name": base, "width": int(record.width),
                 "height": int(record.height)}
        if record.group is not None:  # read back by read_coco_task's default group_field
            entry[DEFAULT_GROUP_FIELD] = record.group
        images.append(entry)
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

