"""The `voc` dataset plugin: Pascal VOC XML read into a megatron task, bad input named by file and object."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from megatron.errors import DataError
from megatron_voc_dataset import plugin
from megatron_voc_dataset.plugin import VOCDataset


def xml(filename: str, objects: list[tuple], size: tuple[int, int] | None = (60, 40)) -> str:
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>1</depth></size>" if size else ""
    objs = "".join(
        f"<object><name>{name}</name><difficult>{int(difficult)}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for name, x1, y1, x2, y2, difficult in objects)
    return f"<annotation><folder>JPEGImages</folder><filename>{filename}</filename>{size_xml}{objs}</annotation>"


def make_voc(root: Path, files: dict[str, str], images=("a.png", "b.jpg"), splits: dict[str, str] | None = None) -> Path:
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for name in images:
        image = np.full((40, 60), 1000, np.uint16) if name.endswith(".png") else np.full((40, 60, 3), 90, np.uint8)
        cv2.imwrite(str(root / "JPEGImages" / name), image)
    for stem, text in files.items():
        (root / "Annotations" / f"{stem}.xml").write_text(text)
    for split, ids in (splits or {}).items():
        (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text(ids)
    return root


GOOD = {
    "a": xml("a.png", [("WBC", 1, 1, 10, 20, False), ("RBC", 21, 5, 60, 40, True)]),
    "b": xml("b.jpg", [("RBC", 11, 11, 30, 30, False)], size=None),  # no <size>: read from the image
}


def load(root: Path, **options):
    return VOCDataset(VOCDataset.Options(root=root, **options)).load()


def test_registered_by_name(make_plugin_manager):
    pm = make_plugin_manager(plugin, builtins=False)
    assert pm.registers["dataset"].get("voc") is VOCDataset
    assert all(f.description for f in VOCDataset.Options.model_fields.values())


def test_reads_boxes_as_zero_based_pixel_edges_with_labels_sizes_and_pixels(tmp_path):
    (task,) = load(make_voc(tmp_path / "bccd", GOOD), modality="microscopy")
    assert (task.name, task.categories, task.modality) == ("bccd", ["RBC", "WBC"], "microscopy")
    a, b = task.records
    assert a.boxes.tolist() == [[0, 0, 10, 20], [20, 4, 60, 40]] and a.labels.tolist() == [1, 0]
    assert (a.image_id, a.width, a.height, a.file_name) == (1, 60, 40, "JPEGImages/a.png")
    assert (b.width, b.height) == (60, 40) and b.boxes.tolist() == [[10, 10, 30, 30]]
    assert task.load_image(a).dtype == np.uint16 and task.load_image(b).shape == (40, 60, 3)


def test_options_fix_the_class_order_skip_difficult_objects_and_select_a_split(tmp_path):
    root = make_voc(tmp_path / "v", GOOD, splits={"train": "b\n"})
    (task,) = load(root, classes=["WBC", "RBC", "Platelets"], skip_difficult=True, name="smear")
    assert task.name == "smear" and task.categories == ["WBC", "RBC", "Platelets"]
    assert task.records[0].labels.tolist() == [0]  # the difficult RBC is left out
    (train,) = load(root, split="train")
    assert [r.file_name for r in train.records] == ["JPEGImages/b.jpg"]
    (zero,) = load(root, one_based=False)
    assert zero.records[0].boxes.tolist()[0] == [1, 1, 10, 20]


@pytest.mark.parametrize("files, options, message", [
    ({"a": "<annotation><filename>a.png"}, {}, r"a\.xml: not valid XML"),
    ({"a": xml("a.png", [("WBC", 10, 1, 5, 20, False)])}, {}, r"a\.xml: object 1 \(WBC\) has no area"),
    ({"a": xml("a.png", [("WBC", "x", 1, 5, 20, False)])}, {}, r"a\.xml: object 1 \(WBC\): <bndbox> needs numeric"),
    ({"a": xml("a.png", [("", 1, 1, 5, 20, False)])}, {}, r"a\.xml: object 1 has no <name>"),
    ({"a": xml("c.png", [("WBC", 1, 1, 5, 20, False)])}, {}, r"a\.xml: its image .*c\.png does not exist"),
    ({"a": xml("a.png", [("WBC", 1, 1, 5, 20, False)])}, {"classes": ["RBC"]}, r"class 'WBC'.*not in the `classes`"),
    ({"a": xml("a.png", [])}, {}, r"no object in any"),
    ({"a": xml("a.png", [("WBC", 1, 1, 5, 20, False)])}, {"split": "val"}, r"split 'val'.*val\.txt does not exist"),
])
def test_bad_input_is_a_data_error_naming_file_object_and_fix(tmp_path, files, options, message):
    root = make_voc(tmp_path / "v", files)
    with pytest.raises(DataError, match=message) as err:
        load(root, **options)
    assert "fix" in str(err.value)


def test_missing_root_names_the_folder(tmp_path):
    with pytest.raises(DataError, match=r"nowhere.Annotations does not exist"):
        load(tmp_path / "nowhere")


def test_data_export_writes_coco_and_reports_bad_input_without_a_traceback(tmp_path, monkeypatch, capsys):
    from megatron.cli import main

    monkeypatch.setenv("MEGATRON_PLUGINS", "megatron_voc_dataset.plugin")
    root = make_voc(tmp_path / "bccd", GOOD)
    assert main(["data", "export", "voc", "--set", f"root={root}", "--out", str(tmp_path / "coco")]) == 0
    coco = json.loads((tmp_path / "coco" / "bccd" / "annotations.json").read_text())
    assert len(coco["images"]) == 2 and len(coco["annotations"]) == 3
    bad = make_voc(tmp_path / "bad", {"a": xml("a.png", [("WBC", 10, 1, 5, 20, False)])})
    capsys.readouterr()
    assert main(["data", "export", "voc", "--set", f"root={bad}", "--out", str(tmp_path / "coco2")]) == 2
    err = capsys.readouterr().err.replace("\n", "")  # rich wraps long lines
    assert "a.xml" in err and "has no area" in err and "Traceback" not in err


def test_the_options_page_is_up_to_date(monkeypatch):
    from megatron.cli import main

    monkeypatch.setenv("MEGATRON_PLUGINS", "megatron_voc_dataset.plugin")  # whether or not entry points autoload
    docs = Path(__file__).resolve().parent.parent / "docs"
    assert main(["docs", "voc", "--check", "--out", str(docs)]) == 0, "run `megatron docs voc --out docs`"
