"""`megatron data check` and `megatron data export`: summaries, problems, exit codes, the export round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest

from megatron.cli import main
from megatron.data.check import check_dataset, detect_format
from megatron.data.io import write_image
from megatron.errors import DataError
from megatron_plugins.datasets.coco import CocoDataset
from megatron_plugins.datasets.medsynth import MedSynthDataset

from dataset_files import make_coco, make_yolo


def test_summary_of_a_good_coco_folder(tmp_path):
    pixels = {"a.png": np.full((48, 64), 1000, np.uint16), "b.png": np.zeros((48, 64, 3), np.uint8)}
    make_coco(tmp_path, pixels=pixels)
    report = check_dataset(tmp_path)
    assert report.ok and report.format == "coco" and report.problems == []
    assert (report.n_images, report.n_boxes, report.images_without_boxes) == (2, 3, 0)
    assert report.boxes_per_class == {"nodule": 1, "mass": 2}
    assert report.pixel_types == {"uint16 gray": 1, "uint8 rgb": 1}
    assert report.image_sizes == {"64x48": 2}
    # boxes 20x10, 4x4, 8x8: sqrt(area) = 14.14, 4, 8
    assert report.box_sqrt_area_px["q0"] == 4.0 and report.box_sqrt_area_px["q100"] == pytest.approx(14.1421, 1e-3)
    assert report.box_sqrt_area_px["q50"] == 8.0
    assert report.box_relative_size["q50"] == pytest.approx(8 / np.sqrt(64 * 48), 1e-3)


def test_check_opens_every_image(tmp_path):
    make_coco(tmp_path)
    (tmp_path / "images" / "b.png").write_bytes(b"not a png")
    write_image(tmp_path / "images" / "a.png", np.zeros((10, 10), np.uint8))  # annotations say 64x48
    report = check_dataset(tmp_path / "annotations.json")
    codes = {p.code: p for p in report.errors}
    assert set(codes) == {"image_unreadable", "image_size_mismatch"}
    assert "b.png" in codes["image_unreadable"].file and codes["image_unreadable"].record == "image id 2"
    assert "10x10" in codes["image_size_mismatch"].message and "64x48" in codes["image_size_mismatch"].message


def test_detects_yolo_and_reports_warnings(tmp_path):
    make_yolo(tmp_path, {"a": "0 0.95 0.5 0.2 0.2\n1 0.5 0.5 0.1 0.1\n"})
    assert detect_format(tmp_path)[0] == "yolo"
    report = check_dataset(tmp_path)
    assert report.ok and report.format == "yolo" and [p.code for p in report.warnings] == ["box_clipped"]
    assert report.to_dict()["warning_counts"] == {"box_clipped": 1}
    assert report.pixel_types == {"uint16 gray": 1}


def test_unrecognised_folder_and_unreadable_file_are_problems_not_crashes(tmp_path):
    with pytest.raises(DataError, match="neither a COCO dataset"):
        detect_format(tmp_path)
    (tmp_path / "annotations.json").write_text('{"images": [')
    report = check_dataset(tmp_path)
    assert not report.ok and "line 1" in report.errors[0].message


def test_cli_exit_codes_and_json(tmp_path, capsys):
    make_coco(tmp_path / "good")
    assert main(["data", "check", str(tmp_path / "good")]) == 0
    out = capsys.readouterr().out
    assert "boxes per class" in out and "check: OK" in out
    make_coco(tmp_path / "bad", annotations=[{"id": 1, "image_id": 1, "category_id": 99, "bbox": [1, 1, 2, 2]}])
    assert main(["data", "check", str(tmp_path / "bad"), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["n_errors"] >= 1
    assert any(p["code"] == "annotation_unknown_category" and p["record"] == "annotation id 1" and p["fix"]
               for p in doc["problems"])
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "annotations.json").write_text('{"images": [], "annot')
    assert main(["data", "check", str(tmp_path / "trunc")]) == 1
    assert "truncated" in capsys.readouterr().out


def test_export_medsynth_then_check_round_trip(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "export"
    tasks = ["eit", "breast_ultrasound"]
    rc = main(["data", "export", "medsynth", "--out", str(out), "--set", "images_per_task=4",
               "--set", "target_images=5", "--set", f"cache_dir={cache}", "--set", f"tasks={json.dumps(tasks)}"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(tasks)
    loaded = {t.name: t for t in MedSynthDataset(MedSynthDataset.Options(
        images_per_task=4, target_images=5, cache_dir=cache, tasks=tasks)).load()}
    for name in tasks:
        assert main(["data", "check", str(out / name)]) == 0
        [back] = CocoDataset(CocoDataset.Options(annotation_file=out / name / "annotations.json")).load()
        orig = loaded[name]
        assert back.name == name and back.categories == orig.categories and len(back) == len(orig)
        for a, b in zip(orig.records, back.records):
            np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
            assert a.labels.tolist() == b.labels.tolist()
            np.testing.assert_array_equal(orig.load_image(a), back.load_image(b))


def test_export_unknown_plugin_and_bad_option(tmp_path, capsys):
    assert main(["data", "export", "nosuch", "--out", str(tmp_path)]) == 2
    assert main(["data", "export", "medsynth", "--out", str(tmp_path), "--set", "images=3"]) == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and "unknown option" in err
