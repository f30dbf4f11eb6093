"""Image paths stay inside their dataset's image folder.

A dataset file names its images (COCO ``file_name``, a YOLO or image folder's files); an absolute name, a
``../`` or a symlink could otherwise make megatron read any file the user can read (``/etc/passwd``) or a
different dataset's images. :func:`outside_folder` resolves the path (symlinks included) and says whether it
leaves the folder; readers turn that into an ``image_outside_folder`` error unless the dataset option
``allow_outside_paths: true`` says files elsewhere are intended.
"""
from __future__ import annotations

import os
from pathlib import Path

from megatron.data.problems import Problem

#: the dataset option that allows image paths outside the image folder
ALLOW_OPTION = "allow_outside_paths"
OUTSIDE_CODE = "image_outside_folder"
ALLOW_HELP = ("read image paths that leave the image folder (absolute paths, `../`, symlinks leading out); by "
              "default each is an error naming the file")


def outside_folder(path: Path, folder: Path) -> Path | None:
    """``path`` resolved (symlinks followed) when it lies outside ``folder`` (resolved too), else None."""
    try:
        resolved = Path(path).resolve()
        root = Path(folder).resolve()
    except (OSError, RuntimeError):  # a symlink loop: treat it as leaving the folder
        return Path(path)
    return None if resolved.is_relative_to(root) else resolved


def check_inside(path: Path, folder: Path, name: str, file: str, record: str, problems: list[Problem]) -> bool:
    """Whether ``path`` (named ``name`` in ``file``) may be read: True when it lies inside ``folder``; else an
    error naming the file, where it leads and the option, appended to ``problems``."""
    resolved = outside_folder(path, folder)
    if resolved is None:
        return True
    how = "is a symlink that leads" if not Path(name).is_absolute() and ".." not in Path(name).parts else "leads"
    problems.append(Problem("error", OUTSIDE_CODE, file, record,
                            f"image path {name!r} {how} to {resolved}, outside the image folder {folder}; it is "
                            "not read",
                            f"put the image inside {folder} and name it relative to that folder, or set the "
                            f"dataset option {ALLOW_OPTION}: true if images elsewhere are intended"))
    return False


def walk_files(root: Path, recursive: bool = True) -> list[Path]:
    """Every file under ``root`` (sorted by its path relative to ``root``), symlinked sub-folders followed — a
    patient folder linked into a dataset is part of it, not silently left out (``Path.rglob`` skips them before
    Python 3.13) — each real folder once, so a link back up does not loop. Hidden files and folders (``.name``)
    are skipped. Whether a linked file may be read is the readers' :func:`check_inside`'s call."""
    root = Path(root)
    if not recursive:
        return sorted(p for p in root.iterdir() if not p.name.startswith(".") and p.is_file())
    seen: set[str] = set()
    out = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(folder) / f for f in files if not f.startswith(".") and os.path.isfile(os.path.join(folder, f))]
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())
