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
from megatron.data.io import DicomImageLoader
from megatron.data.io import IMAGE_SUFFIXES, read_image_size
from megatron.data.problems import Problem
from megatron.errors import DataError
from megatron.types import ImageRecord, Task

log = logging.getLogger(__name__)

Frames = Literal["all", "first", "middle"]


def _walk(root: Path, recursive: bool) -> list[Path]:
    files = root.rglob("*") if recursive else root.iterdir()
    out = []
    for p in files:
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def read_image_folder(root: Path, name: str, modality: str = "", dicom_only: bool = False, recursive: bool = True,
                      frames: Frames = "all", display: DicomDisplay = DEFAULT_DISPLAY,
                      source: str | None = None) -> tuple[Task, list[Problem]]:
    """The images under ``root`` as one task without boxes, and every problem found.

    ``dicom_only``: only DICOM files are images (other files are ignored, with one warning that counts
    them). Sizes come from file headers (nothing is decoded here; ``megatron data check`` decodes every
    image). Raises DataError only when ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        where = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"image folder {root} {where}; fix: pass the folder that holds the images")
    problems: list[Problem] = []
    records: list[ImageRecord] = []
    ignored: list[str] = []
    for path in _walk(root, recursive):
        rel = path.relative_to(root).as_posix()
        suffix = path.suffix.lower()
        if is_dicom_file(path):
            try:
                header = read_header(path)
            except DataError as exc:
                message, _, fix = str(exc).partition("; fix: ")
                problems.append(Problem("error", "image_unreadable", str(path), "", message, fix or "remove the file"))
                continue
            if not header.has_pixels or not header.rows or not header.columns:
                what = header.sop_class or header.modality or "no pixel data"
                problems.append(Problem("warning", "dicom_not_an_image", str(path), "",
                                        f"DICOM file holds no image ({what}); it is skipped",
                                        "nothing to do, or move non-image DICOM objects out of the image folder"))
                continue
            n = max(header.frames, 1)
            if n == 1:
                chosen = [None]
            else:
                chosen = {"all": list(range(n)), "first": [0], "middle": [n // 2]}[frames]
            for frame in chosen:
                records.append(ImageRecord(image_id=len(records) + 1, path=path, width=header.columns,
                                           height=header.rows, boxes=np.zeros((0, 4), np.float32),
                                           labels=np.zeros(0, np.int64), file_name=rel, frame=frame))
            continue
        if dicom_only or suffix not in IMAGE_SUFFIXES:
            ignored.append(rel)
            continue
        try:
            width, height = read_image_size(path)
        except DataError as exc:
            message, _, fix = str(exc).partition("; fix: ")
            problems.append(Problem("error", "image_unreadable", str(path), "", message, fix or "remove the file"))
            continue
        records.append(ImageRecord(image_id=len(records) + 1, path=path, width=width, height=height,
                                   boxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64), file_name=rel))
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
    loader = DicomImageLoader(display)
    task = Task(name=name, categories=[], records=records, modality=modality,
                source=source or f"folder:{root}", image_loader=loader)
    return task, problems
