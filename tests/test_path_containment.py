"""Image paths stay inside the dataset's image folder: a COCO ``file_name`` that is absolute or climbs out with
``../``, and a symlink leading out of a COCO, YOLO or image folder, are refused with a message naming the file
and the ``allow_outside_paths`` option; the option lets them through; ``megatron data check`` reports each one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from megatron.cli import main
from megatron.data.check import check_dataset
from megatron.data.coco import read_coco_task
from megatron.data.folder import read_image_folder
from megatron.data.io import write_image
from megatron.data.problems import raise_for_errors
from megatron.data.yolo import read_yolo_task
from megatron.errors import DataError


def coco_with(root: Path, file_names: list[str]) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    write_image(root / "images" / "inside.png", np.zeros((32, 32), np.uint8))
    names = ["inside.png", *file_names]
    doc = {"images": [{"id": i + 1, "file_name": n, "width": 32, "height": 32} for i, n in enumerate(names)],
           "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 2, 8, 8]}
                           for i in range(len(names))],
           "categories": [{"id": 1, "name": "lesion"}]}
    (root / "annotations.json").write_text(json.dumps(doc))
    return root / "annotations.json"


@pytest.fixture
def outside_image(tmp_path) -> Path:
    path = tmp_path / "elsewhere" / "secret.png"
    path.parent.mkdir()
    write_image(path, np.zeros((32, 32), np.uint8))
    return path


def _outside(problems) -> list:
    return [p for p in problems if p.code == "image_outside_folder"]


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_a_coco_file_name_leaving_the_image_folder_is_refused_naming_the_file_and_the_option(tmp_path, outside_image,
                                                                                            how):
    root = tmp_path / "ds"
    name = {"dotdot": "../../elsewhere/secret.png", "absolute": str(outside_image), "symlink": "link.png"}[how]
    ann = coco_with(root, [name])
    if how == "symlink":
        os.symlink(outside_image, root / "images" / "link.png")
    task, problems = read_coco_task(ann, root / "images", name="ds")
    [problem] = _outside(problems)
    assert problem.severity == "error" and name in problem.message and str(outside_image) in problem.message
    assert "allow_outside_paths: true" in problem.fix
    assert [r.file_name for r in task.records] == ["inside.png"]  # never read, its annotation not reported twice
    assert not [p for p in problems if p.code == "annotation_unknown_image"]
    with pytest.raises(DataError, match="outside the image folder"):
        raise_for_errors(problems, str(ann))
    task, problems = read_coco_task(ann, root / "images", name="ds", allow_outside_paths=True)
    assert not _outside(problems) and len(task) == 2


def test_enough_dotdots_do_not_reach_system_files(tmp_path):
    ann = coco_with(tmp_path / "ds", ["../" * 30 + "etc/passwd"])
    _, problems = read_coco_task(ann, tmp_path / "ds" / "images", name="ds")
    assert "/etc/passwd" in _outside(problems)[0].message


def test_symlinks_out_of_yolo_and_image_folders_are_refused(tmp_path, outside_image):
    yolo = tmp_path / "y"
    (yolo / "images").mkdir(parents=True)
    (yolo / "labels").mkdir()
    (yolo / "classes.txt").write_text("lesion\n")
    write_image(yolo / "images" / "a.png", np.zeros((32, 32), np.uint8))
    (yolo / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    os.symlink(outside_image, yolo / "images" / "b.png")
    task, problems = read_yolo_task(yolo, "y")
    assert [r.file_name for r in task.records] == ["a.png"] and "'b.png'" in _outside(problems)[0].message
    assert len(read_yolo_task(yolo, "y", allow_outside_paths=True)[0]) == 2
    folder = tmp_path / "f"
    folder.mkdir()
    write_image(folder / "a.png", np.zeros((32, 32), np.uint8))
    os.symlink(outside_image, folder / "b.png")
    task, problems = read_image_folder(folder, "f")
    assert [r.file_name for r in task.records] == ["a.png"] and "'b.png'" in _outside(problems)[0].message
    assert "symlink" in _outside(problems)[0].message


def test_data_check_reports_each_escaping_path(tmp_path, outside_image, capsys):
    ann = coco_with(tmp_path / "ds", ["../../elsewhere/secret.png", str(outside_image)])
    report = check_dataset(ann)
    assert not report.ok and len(_outside(report.problems)) == 2
    assert main(["data", "check", str(ann)]) == 1
    out = capsys.readouterr().out
    assert out.count("outside the image folder") == 2 and "allow_outside_paths" in out
    assert main(["data", "check", str(ann), "--allow-outside-paths"]) == 0


def test_the_coco_plugin_option_allows_outside_paths(tmp_path, outside_image):
    from megatron_plugins.datasets.coco import CocoDataset

    ann = coco_with(tmp_path / "ds", [str(outside_image)])
    with pytest.raises(DataError, match="allow_outside_paths"):
        CocoDataset(CocoDataset.Options(annotation_file=ann)).load()
    [task] = CocoDataset(CocoDataset.Options(annotation_file=ann, allow_outside_paths=True)).load()
    assert len(task) == 2


def test_a_symlinked_patient_folder_is_read_and_one_leading_out_is_refused_not_skipped(tmp_path):
    # hospital exports link patient folders into a study folder; rglob (Python < 3.13) skipped them silently
    folder = tmp_path / "study"
    (folder / "pat1").mkdir(parents=True)
    write_image(folder / "pat1" / "a.png", np.zeros((32, 32), np.uint8))
    (folder / "archive" / "pat2").mkdir(parents=True)
    write_image(folder / "archive" / "pat2" / "b.png", np.zeros((32, 32), np.uint8))
    os.symlink(folder / "archive" / "pat2", folder / "zpat2")  # the same folder twice: its images once
    os.symlink(folder, folder / "pat1" / "loop")  # a link back up: walked once, no endless recursion
    task, problems = read_image_folder(folder, "study")
    assert sorted(r.file_name for r in task.records) == ["archive/pat2/b.png", "pat1/a.png"]
    assert not [p for p in problems if p.severity == "error"]
    linked_only = tmp_path / "linked"
    linked_only.mkdir()
    os.symlink(folder / "archive" / "pat2", linked_only / "pat2")  # a patient folder reachable only by a link
    assert [r.file_name for r in read_image_folder(linked_only, "l", allow_outside_paths=True)[0].records] == [
        "pat2/b.png"]
    elsewhere = tmp_path / "elsewhere" / "pat3"
    elsewhere.mkdir(parents=True)
    write_image(elsewhere / "c.png", np.zeros((32, 32), np.uint8))
    os.symlink(elsewhere, folder / "pat3")  # a link out of the folder: an error naming it, not a silent skip
    task, problems = read_image_folder(folder, "study")
    assert "'pat3/c.png'" in _outside(problems)[0].message
    task, problems = read_image_folder(folder, "study", allow_outside_paths=True)
    assert "pat3/c.png" in {r.file_name for r in task.records}
