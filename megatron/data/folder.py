"""A folder of images without annotations -> one :class:`~megatron.types.Task` (no boxes).

For the question megatron asks before anything is annotated (which legacy datasets resemble my new images?):
image-only similarity metrics need pixels, not boxes. :func:`read_image_folder` walks a folder (recursively
by default) for raster images (PNG, JPEG, TIFF, BMP, ...) and DICOM files, and returns a task whose records
have no boxes and no categories, plus the problems found. Each frame of a multi-frame DICOM file is one
image (``frames``: all of them, the first or the middle one). Image ids are ``1..N`` in sorted path order.
Hidden files and folders (``.name``) are skipped.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np

from megatron.data.dicom import DEFAULT_DISPLAY, DicomDisplay, is_dicom_file, read_header
from megatron.data.groups import DICOM_PATIENT_META, GROUPING_NONE, DicomGrouping, assign_file_groups, dicom_group
from megatron.data.io import IMAGE_SUFFIXES, DicomImageLoader, read_image_size
from megatron.data.paths import check_inside, walk_files
from megatron.data.problems import Problem
from megatron.errors import DataError
from megatron.types import ImageRecord, Task

log = logging.getLogger(__name__)

Frames = Literal["all", "first", "middle"]


def read_image_folder(root: Path, name: str, modality: str = "", dicom_only: bool = False, recursive: bool = True,
                      frames: Frames = "all", display: DicomDisplay = DEFAULT_DISPLAY,
                      source: str | None = None, group_by: DicomGrouping = "patient", group_pattern: str | None = None,
                      groups_csv: Path | None = None, allow_outside_paths: bool = False) -> tuple[Task, list[Problem]]:
    """The images under ``root`` as one task without boxes, and every problem found.

    ``dicom_only``: only DICOM files are images (other files are ignored, with one warning that counts
    them). Sizes come from file headers (nothing is decoded here; ``megatron data check`` decodes every
    image). Groups (patients): ``group_pattern`` or ``groups_csv`` when given (every file), else a DICOM file's
    PatientID (``group_by: patient``) or StudyInstanceUID (``study``); ``none`` and raster images without a
    pattern: every image its own group. ``allow_outside_paths``: read files that are symlinks leading out of
    ``root`` (by default each is an error). Raises DataError only when ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        where = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"image folder {root} {where}; fix: pass the folder that holds the images")
    problems: list[Problem] = []
    records: list[ImageRecord] = []
    ignored: list[str] = []
    for path in walk_files(root, recursive):
        rel = path.relative_to(root).as_posix()
        if not allow_outside_paths and not check_inside(path, root, rel, str(path), "", problems):
            continue
        if is_dicom_file(path):
            records.extend(_dicom_records(path, rel, len(records) + 1, frames, group_by, problems))
        elif dicom_only or path.suffix.lower() not in IMAGE_SUFFIXES:
            ignored.append(rel)
        else:
            records.extend(_raster_record(path, rel, len(records) + 1, problems))
    if group_pattern is not None or groups_csv is not None:
        grouping = assign_file_groups(records, group_pattern, groups_csv, str(root), problems)
    else:
        grouping = dicom_grouping(records, group_by, str(root), problems)
    _folder_problems(root, records, ignored, dicom_only, recursive, problems)
    task = Task(name=name, categories=[], records=records, modality=modality,
                source=source or f"folder:{root}", image_loader=DicomImageLoader(display), grouping=grouping)
    return task, problems


def _dicom_records(path: Path, rel: str, first_id: int, frames: Frames, group_by: DicomGrouping,
                   problems: list[Problem]) -> list[ImageRecord]:
    """One record per chosen frame of a DICOM file (none, with a problem, when it is unreadable or no image)."""
    try:
        header = read_header(path)
    except DataError as exc:
        message, _, fix = str(exc).partition("; fix: ")
        problems.append(Problem("error", "image_unreadable", str(path), "", message, fix or "remove the file"))
        return []
    if not header.has_pixels or not header.rows or not header.columns:
        what = header.sop_class or header.modality or "no pixel data"
        problems.append(Problem("warning", "dicom_not_an_image", str(path), "",
                                f"DICOM file holds no image ({what}); it is skipped",
                                "nothing to do, or move non-image DICOM objects out of the image folder"))
        return []
    n = max(header.frames, 1)
    chosen = [None] if n == 1 else {"all": list(range(n)), "first": [0], "middle": [n // 2]}[frames]
    meta: dict = {}
    if header.patient_id:
        meta[DICOM_PATIENT_META] = header.patient_id
    if header.spacing is not None:
        meta["spacing"] = list(header.spacing)
    return [ImageRecord(image_id=first_id + k, path=path, width=header.columns, height=header.rows,
                        boxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64), file_name=rel, frame=frame,
                        group=dicom_group(header, group_by), meta=dict(meta))
            for k, frame in enumerate(chosen)]


def _raster_record(path: Path, rel: str, image_id: int, problems: list[Problem]) -> list[ImageRecord]:
    try:
        width, height = read_image_size(path)
    except DataError as exc:
        message, _, fix = str(exc).partition("; fix: ")
        problems.append(Problem("error", "image_unreadable", str(path), "", message, fix or "remove the file"))
        return []
    return [ImageRecord(image_id=image_id, path=path, width=width, height=height,
                        boxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64), file_name=rel)]


def dicom_grouping(records: list[ImageRecord], group_by: DicomGrouping, root: str, problems: list[Problem]) -> str:
    """The description of DICOM-header groups, with a warning for files lacking the tag or sharing one value."""
    grouped = [r for r in records if r.group is not None]
    if group_by == "none" or not grouped:
        return GROUPING_NONE
    tag = "PatientID" if group_by == "patient" else "StudyInstanceUID"
    lacking = len([r for r in records if r.group is None])
    if lacking:
        problems.append(Problem("warning", "group_missing", root, "",
                                f"{lacking} of {len(records)} image(s) have no DICOM {tag}; each of them is its own "
                                "patient", f"fill {tag} in those files, or set group_pattern / groups_csv"))
    values = {r.group for r in grouped}
    if len(values) == 1 and len(grouped) > 1:
        problems.append(Problem("warning", "group_single", root, "",
                                f"all {len(grouped)} DICOM images share {tag} {next(iter(values))!r}, so they are one "
                                "patient and cannot be split into pool and held-out parts",
                                "if the IDs were anonymised to one value, set group_by: study or none, or give the "
                                "patients through group_pattern / groups_csv"))
    return f"DICOM {tag}: {len(values)} patients"


def _folder_problems(root: Path, records: list[ImageRecord], ignored: list[str], dicom_only: bool, recursive: bool,
                     problems: list[Problem]) -> None:
    kind = "DICOM files" if dicom_only else "images or DICOM files"
    if ignored:
        shown = ", ".join(ignored[:3]) + (f" (+{len(ignored) - 3} more)" if len(ignored) > 3 else "")
        problems.append(Problem("warning", "file_ignored", str(root), "",
                                f"{len(ignored)} file(s) are not {kind} and were ignored: {shown}",
                                "nothing to do if they are not images; DICOM files without the .dcm suffix need the "
                                "DICM preamble"))
    if not records:
        problems.append(Problem("error", "task_empty", str(root), "", f"the folder holds no {kind}",
                                f"put {kind} in {root} (sub-folders are searched"
                                + (")" if recursive else " only with recursive: true)")))
