"""The coco and yolo dataset plugins: reading hand-made folders, and every kind of bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dataset_files import make_coco, make_yolo
from megatron.data.coco import read_coco_task
from megatron.data.io import write_image
from megatron.data.yolo import read_yolo_task
from megatron.errors import DataError
from megatron_plugins.datasets.coco import CocoDataset
from megatron_plugins.datasets.yolo import YoloDataset


# --------------------------------------------------------------------------------------------- helpers
def coco_problems(tmp_path, **kw):
    ann = make_coco(tmp_path, **kw)
    task, problems = read_coco_task(ann, tmp_path / "images", name="t")
    return task, problems


def only(problems, code):
    found = [p for p in problems if p.code == code]
    assert found, f"no {code} in {[str(p) for p in problems]}"
    return found[0]


# --------------------------------------------------------------------------------------------- COCO: reading
def test_coco_boxes_become_xyxy_and_labels_follow_category_ids(tmp_path):
    task, problems = coco_problems(tmp_path)
    assert problems == []
    assert task.categories == ["nodule", "mass"]  # ascending COCO id: 3, 7
    rec = task.records[0]
    assert rec.image_id == 1 and (rec.width, rec.height) == (64, 48)
    order = np.argsort(rec.labels)
    np.testing.assert_allclose(rec.boxes[order], [[0, 0, 4, 4], [10, 5, 30, 15]])
    assert rec.labels[order].tolist() == [0, 1]
    assert rec.boxes.dtype == np.float32
    assert task.load_image(rec).shape == (48, 64)


def test_coco_categories_option_filters_and_orders(tmp_path):
    ann = make_coco(tmp_path)
    task, problems = read_coco_task(ann, tmp_path / "images", name="t", categories=["mass"])
    assert task.categories == ["mass"] and problems == []
    assert sum(len(r.boxes) for r in task.records) == 2 and all((r.labels == 0).all() for r in task.records)
    with pytest.raises(DataError, match="choose from"):
        read_coco_task(ann, tmp_path / "images", name="t", categories=["tumour"])


def test_coco_plugin_defaults_and_16bit_rgb_images(tmp_path, megatron_pm):
    pixels = {"a.png": np.full((48, 64), 3000, np.uint16), "b.png": np.zeros((48, 64, 3), np.uint8)}
    ann = make_coco(tmp_path / "my_data", pixels=pixels)
    cls = megatron_pm.registers["dataset"].get("coco")
    assert cls is CocoDataset
    [task] = cls(cls.Options(annotation_file=ann, modality="mri")).load()
    assert task.name == "my_data" and task.modality == "mri" and task.source.startswith("coco:")
    a, b = (task.load_image(r) for r in task.records)
    assert a.dtype == np.uint16 and a.max() == 3000 and b.shape == (48, 64, 3)


def test_coco_plugin_rejects_unknown_option():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        CocoDataset.Options(annotation_file="x.json", imagedir="oops")


# --------------------------------------------------------------------------------------------- COCO: bad input
def test_missing_image_is_an_error_naming_file_and_fix(tmp_path):
    ann = make_coco(tmp_path)
    (tmp_path / "images" / "b.png").unlink()
    task, problems = read_coco_task(ann, tmp_path / "images", name="t")
    p = only(problems, "image_missing_file")
    assert p.severity == "error" and p.record == "image id 2" and "b.png" in p.message and p.fix
    with pytest.raises(DataError) as exc:
        CocoDataset(CocoDataset.Options(annotation_file=ann)).load()
    assert "b.png" in str(exc.value) and "fix:" in str(exc.value) and "megatron data check" in str(exc.value)


def test_malformed_json_reports_line_and_column(tmp_path):
    ann = tmp_path / "annotations.json"
    ann.write_text('{\n  "images": [],\n  "annotations": [,]\n}')
    with pytest.raises(DataError) as exc:
        read_coco_task(ann, tmp_path, name="t")
    msg = str(exc.value)
    assert "annotations.json" in msg and "line 3, column" in msg and "fix:" in msg


def test_truncated_json_says_so(tmp_path):
    ann = make_coco(tmp_path)
    ann.write_text(ann.read_text()[:-40])
    with pytest.raises(DataError, match=r"ends early \(truncated\?\) at line \d+"):
        read_coco_task(ann, tmp_path / "images", name="t")


def test_missing_top_level_key(tmp_path):
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataError, match="'categories'.*fix:"):
        read_coco_task(ann, tmp_path, name="t")


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DataError, match="does not exist; fix"):
        CocoDataset(CocoDataset.Options(annotation_file=tmp_path / "none.json")).load()


def test_annotation_missing_keys(tmp_path):
    _, problems = coco_problems(tmp_path, annotations=[
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5]},
        {"id": 5, "image_id": 1, "category_id": 7}])
    p = only(problems, "annotation_missing_key")
    assert p.severity == "error" and p.record == "annotation id 5" and "'bbox'" in p.message and "bbox" in p.fix


def test_image_missing_keys_and_bad_size(tmp_path):
    _, problems = coco_problems(tmp_path, images=[
        {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
        {"id": 2, "file_name": "b.png"},
        {"id": 3, "file_name": "c.png", "width": 0, "height": 48}],
        annotations=[{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5]}])
    assert only(problems, "image_missing_key").record == "image id 2"
    bad = only(problems, "image_bad_size")
    assert bad.record == "image id 3" and "width=0" in bad.message


def test_box_partly_outside_is_clipped_with_a_counted_warning(tmp_path):
    task, problems = coco_problems(tmp_path, annotations=[
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [50, 40, 30, 30]}])
    p = only(problems, "box_clipped")
    assert p.severity == "warning" and "annotation id 1" in p.record and "clipped" in p.message and p.fix
    np.testing.assert_allclose(task.records[0].boxes, [[50, 40, 64, 48]])


def test_tiny_overshoot_is_clipped_silently(tmp_path):
    task, problems = coco_problems(tmp_path, annotations=[
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 54.5, 20]}])
    assert [p.code for p in problems] == ["category_unused"]  # nothing about the box
    assert task.records[0].boxes[0, 2] == 64


def test_box_entirely_outside_is_skipped_with_a_warning(tmp_path):
    task, problems = coco_problems(tmp_path, annotations=[
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 5, 5]},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [100, 100, 5, 5]}])
    p = only(problems, "box_outside")
    assert p.severity == "warning" and p.record.startswith("annotation id 2") and "coordinate format" in p.fix
    assert len(task.records[0].boxes) == 1


def test_non_positive_box_is_skipped_with_a_warning(tmp_path):
    task, problems = coco_problems(tmp_path, annotations=[
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 5, 5]},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [10, 10, 0, 5]},
        {"id": 3, "image_id": 1, "category_id": 7, "bbox": [10, 10, 5, -2]}])
    found = [p for p in problems if p.code == "box_non_positive"]
    assert [p.record.split(" (")[0] for p in found] == ["annotation id 2", "annotation id 3"]
    assert len(task.records[0].boxes) == 1


def test_unknown_category_id_is_an_error(tmp_path):
    _, problems = coco_problems(tmp_path, annotations=[
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5]},
        {"id": 9, "image_id": 1, "category_id": 42, "bbox": [1, 1, 5, 5]}])
    p = only(problems, "annotation_unknown_category")
    assert p.severity == "error" and p.record == "annotation id 9" and "42" in p.message and "categories" in p.fix


def test_annotation_for_unknown_image_is_an_error(tmp_path):
    _, problems = coco_problems(tmp_path, annotations=[
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5]},
        {"id": 2, "image_id": 77, "category_id": 7, "bbox": [1, 1, 5, 5]}])
    assert only(problems, "annotation_unknown_image").record == "annotation id 2"


def test_duplicate_image_ids_are_an_error(tmp_path):
    _, problems = coco_problems(tmp_path, images=[
        {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
        {"id": 1, "file_name": "b.png", "width": 64, "height": 48}])
    p = only(problems, "image_duplicate_id")
    assert p.severity == "error" and "a.png" in p.message and "b.png" in p.message and "unique" in p.fix


def test_duplicate_annotation_ids_are_renumbered_with_a_warning(tmp_path):
    task, problems = coco_problems(tmp_path, annotations=[
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5]},
        {"id": 1, "image_id": 2, "category_id": 7, "bbox": [1, 1, 5, 5]}])
    assert only(problems, "annotation_id_renumbered").severity == "warning"
    assert sum(len(r.boxes) for r in task.records) == 2


def test_annotation_without_id_gets_one_with_a_warning(tmp_path):
    task, problems = coco_problems(tmp_path, annotations=[
        {"id": 4, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5]},
        {"image_id": 2, "category_id": 7, "bbox": [1, 1, 5, 5]}])
    p = only(problems, "annotation_id_renumbered")
    assert p.record == "annotations[1]" and "no integer 'id'; it was given id 5" in p.message
    assert sum(len(r.boxes) for r in task.records) == 2


def test_empty_task_is_an_error(tmp_path):
    _, problems = coco_problems(tmp_path, images=[], annotations=[])
    assert only(problems, "task_empty").severity == "error"
    _, problems = coco_problems(tmp_path / "noboxes", annotations=[])
    assert only(problems, "task_no_boxes").severity == "error"


def test_category_without_boxes_is_a_warning(tmp_path):
    _, problems = coco_problems(tmp_path, categories=[{"id": 7, "name": "mass"}, {"id": 3, "name": "nodule"},
                                                      {"id": 8, "name": "cyst"}])
    p = only(problems, "category_unused")
    assert p.severity == "warning" and "cyst" in p.message


# --------------------------------------------------------------------------------------------- YOLO
def test_yolo_normalised_boxes_become_pixels(tmp_path):
    root = make_yolo(tmp_path / "ds", {"a": "0 0.5 0.5 0.2 0.4\n1 0.25 0.75 0.1 0.1\n", "b": ""},
                     sizes={"a": (200, 100), "b": (200, 100), "c": (50, 50)})
    task, problems = read_yolo_task(root, name="ds")
    assert problems == []
    assert task.categories == ["lesion", "cyst"] and len(task) == 3
    a = task.records[0]
    assert (a.width, a.height) == (200, 100)
    np.testing.assert_allclose(a.boxes, [[80, 30, 120, 70], [40, 70, 60, 80]], atol=1e-4)
    assert a.labels.tolist() == [0, 1]
    assert len(task.records[2].boxes) == 0  # no label file: background image (YOLO convention)
    assert task.load_image(a).dtype == np.uint16


def test_yolo_plugin_with_data_yaml_split_and_polygon(tmp_path, megatron_pm):
    root = make_yolo(tmp_path / "yolo_set", {"x": "1 0.1 0.1 0.3 0.1 0.2 0.5\n"}, names=("a", "b"),
                     split="train", names_file="data.yaml")
    cls = megatron_pm.registers["dataset"].get("yolo")
    assert cls is YoloDataset
    [task] = cls(cls.Options(root=root, split="train")).load()
    assert task.name == "yolo_set" and task.categories == ["a", "b"]
    np.testing.assert_allclose(task.records[0].boxes, [[20, 10, 60, 50]], atol=1e-4)


@pytest.mark.parametrize("line, code, text", [
    ("0 0.5 0.5 0.2\n", "label_malformed", "fields"),
    ("zero 0.5 0.5 0.2 0.2\n", "label_malformed", "not numbers"),
    ("5 0.5 0.5 0.2 0.2\n", "label_unknown_class", "not in 0..1"),
    ("0 100 50 20 20\n", "label_not_normalised", "pixel coordinates"),
])
def test_yolo_bad_lines_are_errors_naming_file_and_line(tmp_path, line, code, text):
    root = make_yolo(tmp_path, {"a": "0 0.5 0.5 0.1 0.1\n" + line})
    _, problems = read_yolo_task(root, name="t")
    p = only(problems, code)
    assert p.severity == "error" and p.file.endswith("a.txt") and p.record == "line 2" and text in p.message and p.fix
    with pytest.raises(DataError, match="a.txt"):
        YoloDataset(YoloDataset.Options(root=root)).load()


def test_yolo_box_outside_and_orphan_label_are_warnings(tmp_path):
    root = make_yolo(tmp_path, {"a": "0 0.95 0.5 0.2 0.2\n1 1.6 0.5 0.1 0.1\n", "ghost": "0 0.5 0.5 0.1 0.1\n"},
                     sizes={"a": (200, 100)})
    task, problems = read_yolo_task(root, name="t")
    assert only(problems, "box_clipped").record == "line 1"
    assert only(problems, "box_outside").record == "line 2"
    assert only(problems, "label_without_image").file.endswith("ghost.txt")
    np.testing.assert_allclose(task.records[0].boxes, [[170, 40, 200, 60]], atol=1e-4)


def test_yolo_missing_names_file_and_layout(tmp_path):
    root = make_yolo(tmp_path / "a", {"a": "0 0.5 0.5 0.1 0.1\n"}, names_file=None)
    with pytest.raises(DataError, match="classes.txt.*data.yaml"):
        read_yolo_task(root, name="t")
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="images does not exist; fix: use the layout"):
        read_yolo_task(tmp_path / "b", name="t")


def test_yolo_empty_and_corrupt_image(tmp_path):
    root = make_yolo(tmp_path, {"a": ""})
    _, problems = read_yolo_task(root, name="t")
    assert only(problems, "task_no_boxes").severity == "error"
    (root / "images" / "bad.png").write_bytes(b"garbage")
    _, problems = read_yolo_task(root, name="t")
    p = only(problems, "image_unreadable")
    assert "bad.png" in p.file and p.severity == "error"
