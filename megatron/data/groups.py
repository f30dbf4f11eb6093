"""Patients as groups: where a record's group comes from, and what a dataset's grouping looks like.

The patient is the unit of independence (DESIGN.md, "Medical images"): every split and every draw that must
not leak is made over :attr:`~megatron.types.ImageRecord.group_id`. Readers fill ``ImageRecord.group`` from

- a COCO image entry's field (``group_field``, default ``patient_id``): see :mod:`megatron.data.coco`;
- a DICOM file's ``PatientID`` (or ``StudyInstanceUID``): :func:`dicom_group`;
- a regex on the image's path relative to its folder (``group_pattern``: the named group ``group``, else the
  first group, else the whole match): :func:`assign_file_groups`;
- a CSV ``file_name,patient_id`` (``groups_csv``): :func:`read_groups_csv`.

Without any of them every image is its own group (:data:`GROUPING_NONE`), and the run record says so.
:func:`grouping_hints` looks for signs that a dataset without a group source holds several images per
patient (file names sharing a prefix, DICOM patient ids present but unused), for ``megatron data check``.
"""
from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Iterable, Literal

import numpy as np

from megatron.data.problems import Problem
from megatron.errors import DataError
from megatron.types import ImageRecord, Task

#: how a task without a group source is split (``run.json["split"]["grouping"]``)
GROUPING_NONE = "none: every image its own group"
#: ``record.meta`` key holding a DICOM file's PatientID (also when it is not the group: data check's hint)
DICOM_PATIENT_META = "dicom_patient_id"
#: how many examples a problem about many files lists
SHOWN = 5
#: CSV column names accepted for the group (the first present is used)
CSV_GROUP_COLUMNS = ("patient_id", "group")

DicomGrouping = Literal["patient", "study", "none"]

# the dataset plugins' option descriptions (one wording for every plugin that has the option)
GROUP_PATTERN_HELP = ("regex searched in each image's path relative to the image folder; its named group `group` "
                      "(else its first group, else the whole match) is the patient, e.g. '^(patient\\d+)_'. A file "
                      "it does not match is an error. Default: every image its own patient")
GROUPS_CSV_HELP = ("CSV with the header `file_name,patient_id` (file_name relative to the image folder, or the bare "
                   "name) giving each image's patient; a file it does not list is an error")
GROUP_BY_HELP = ("DICOM files: the group (patient) a split keeps together: `patient` (PatientID), `study` "
                 "(StudyInstanceUID) or `none` (every image its own group)")
GROUP_FIELD_HELP = ("the COCO image-entry field naming the patient (present on every image, or on none: every image "
                    "is then its own patient); null: ignore it")


def one_group_source(options):
    """A dataset options model's validator body: ``group_pattern`` and ``groups_csv`` are two answers to one
    question, so both set is an error (pydantic reports it under the options). Returns ``options``."""
    if getattr(options, "group_pattern", None) is not None and getattr(options, "groups_csv", None) is not None:
        raise ValueError("group_pattern and groups_csv are both set; keep one of them")
    return options


# -- where groups come from ---------------------------------------------------------------------------------

def compile_group_pattern(pattern: str, where: str) -> re.Pattern:
    """``pattern`` compiled; a DataError naming ``where`` and the fix when it is not a valid regex."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise DataError(f"{where}: group_pattern {pattern!r} is not a valid regular expression ({exc}); fix: "
                        r"write a Python regex such as '^(patient\d+)_' (first group = the patient)") from None


def group_from_pattern(pattern: re.Pattern, file_name: str) -> str | None:
    """The patient named in ``file_name`` by ``pattern`` (named group ``group``, else the first group, else the
    whole match); None when it does not match (or the group is empty)."""
    match = pattern.search(file_name)
    if match is None:
        return None
    if "group" in pattern.groupindex:
        value = match.group("group")
    elif pattern.groups:
        value = match.group(1)
    else:
        value = match.group(0)
    return value or None


def read_groups_csv(path: Path) -> dict[str, str]:
    """``{file_name: patient}`` from a CSV with a header holding ``file_name`` and ``patient_id`` (or ``group``).

    A DataError naming the file (and the line) when the columns are missing, a row lacks a value or one file
    is given two different patients."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"groups_csv {path} does not exist; fix: pass a CSV with the header file_name,patient_id")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        column = next((c for c in CSV_GROUP_COLUMNS if c in fields), None)
        if "file_name" not in fields or column is None:
            raise DataError(f"groups_csv {path}: the header is {fields or 'missing'}, it needs the columns file_name "
                            "and patient_id; fix: make the first line `file_name,patient_id`")
        out: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            name, group = row.get("file_name", ""), row.get(column, "")
            if not name or not group:
                raise DataError(f"groups_csv {path}, line {line}: file_name and {column} must both be given "
                                f"(got {name!r}, {group!r}); fix: complete or delete the row")
            name = PurePosixPath(name.replace("\\", "/")).as_posix()
            if out.get(name, group) != group:
                raise DataError(f"groups_csv {path}, line {line}: {name!r} is given two patients ({out[name]!r} and "
                                f"{group!r}); fix: keep one row per file")
            out[name] = group
    return out


def _csv_lookup(table: dict[str, str], file_name: str) -> str | None:
    """The CSV's patient for ``file_name``: by the path relative to the image folder, else by the bare name."""
    if file_name in table:
        return table[file_name]
    return table.get(PurePosixPath(file_name).name)


def assign_file_groups(records: list[ImageRecord], pattern: str | None, groups_csv: Path | None, file: str,
                       problems: list[Problem]) -> str:
    """Fill ``record.group`` from ``group_pattern`` or ``groups_csv`` (one of them) and return the grouping's
    description for the run record. A file the pattern or the CSV does not cover is an error (one problem
    counting them, with examples): an image left as its own group next to grouped ones could leak."""
    if pattern is not None and groups_csv is not None:
        raise DataError(f"{file}: both group_pattern and groups_csv are set; fix: keep one of them")
    if pattern is None and groups_csv is None:
        return GROUPING_NONE
    if pattern is not None:
        regex = compile_group_pattern(pattern, file)
        lookup, source = (lambda name: group_from_pattern(regex, name)), f"group_pattern {pattern!r}"
        fix = "adjust group_pattern so it matches every file name (it is searched in the path relative to the " \
              "image folder), or move the files out"
    else:
        table = read_groups_csv(groups_csv)
        lookup, source = (lambda name: _csv_lookup(table, name)), f"groups_csv {groups_csv}"
        fix = f"add a row `file_name,patient_id` for each of them to {groups_csv}"
    uncovered = []
    for record in records:
        record.group = lookup(record.file_name)
        if record.group is None:
            uncovered.append(record.file_name)
    if uncovered:
        shown = ", ".join(map(repr, uncovered[:SHOWN])) + (" ..." if len(uncovered) > SHOWN else "")
        problems.append(Problem("error", "group_missing", file, "",
                                f"{len(uncovered)} of {len(records)} image(s) have no patient under {source}: {shown}",
                                fix))
    return f"{source}: {count_groups(records)} patients"


def dicom_group(header, grouping: DicomGrouping) -> str | None:
    """The group of a DICOM file (its :class:`~megatron.data.dicom.DicomHeader`): its PatientID or
    StudyInstanceUID; None when ``grouping`` is ``none`` or the tag is empty."""
    if grouping == "none":
        return None
    return (header.patient_id if grouping == "patient" else header.study_uid) or None


# -- what a grouping looks like -----------------------------------------------------------------------------

def count_groups(records: Iterable[ImageRecord]) -> int:
    return len({r.group_id for r in records})


def has_groups(task: Task) -> bool:
    """Whether any record names a group (else every image is its own group)."""
    return any(r.group is not None for r in task.records)


def describe_grouping(task: Task) -> str:
    """How the task's records are grouped: the reader's description, else derived from the records."""
    if not has_groups(task):
        return GROUPING_NONE
    return task.grouping or f"{count_groups(task.records)} groups set by {task.source or 'the dataset plugin'}"


def images_per_group(records: list[ImageRecord]) -> dict[str, float]:
    """``{"groups", "images", "min", "median", "max"}``: images per patient."""
    sizes = np.array(list(Counter(r.group_id for r in records).values()) or [0], dtype=np.float64)
    return {"groups": int(np.count_nonzero(sizes)), "images": len(records), "min": float(sizes.min()),
            "median": float(np.median(sizes)), "max": float(sizes.max())}


def _prefix(file_name: str) -> str | None:
    """A file name's stem without its last ``_``/``-``/``.``/space-separated token (``p12_view3`` -> ``p12``);
    None for a one-token stem (``000123``), which says nothing about patients."""
    tokens = [t for t in re.split(r"[_\-. ]+", PurePosixPath(file_name).stem) if t]
    return "_".join(tokens[:-1]) if len(tokens) > 1 else None


def _shared_keys(keys: list[str | None], n: int) -> tuple[int, str, int] | None:
    """``(distinct keys, most common key, its count)`` when the keys suggest several images per patient: at
    least 3 distinct keys (one or two are a naming scheme or a train/val split, not patients) and at least 1.5
    images per key on average."""
    if any(k is None for k in keys) or not keys:
        return None
    counts = Counter(keys)
    if len(counts) < 3 or n / len(counts) < 1.5:
        return None
    key, top = counts.most_common(1)[0]
    return len(counts), key, top


def grouping_hints(task: Task) -> list[str]:
    """Signs that ``task`` (without a group source) holds several images per patient, each a sentence with
    the fix; empty when the task has groups or nothing suggests it."""
    if has_groups(task) or len(task) < 3:
        return []
    n, hints = len(task), []
    patients = [r.meta.get(DICOM_PATIENT_META) for r in task.records]
    if all(patients):
        n_patients = len(set(patients))
        if n_patients < n:
            hints.append(f"the DICOM files name {n_patients} PatientIDs for {n} images, but the images are not "
                         "grouped by patient; fix: set the dataset option group_by: patient")
    folders = [PurePosixPath(r.file_name).parent.as_posix() for r in task.records]
    for what, keys, example in (("sub-folders", folders, "'^([^/]+)/'"),
                                ("file-name prefixes", [_prefix(r.file_name) for r in task.records],
                                 r"'^(.+)_[^_]+$'")):
        shared = _shared_keys(keys, n)
        if shared:
            n_keys, key, top = shared
            hints.append(f"{n} images share {n_keys} {what} (e.g. {key!r}: {top} images), which suggests several "
                         "images per patient, but the config gives no group source, so the split treats every "
                         f"image as its own patient; fix: set the dataset option group_pattern (e.g. {example}) or "
                         f"groups_csv (`megatron data check PATH --group-pattern {example}` checks it first)")
            break
    return hints
