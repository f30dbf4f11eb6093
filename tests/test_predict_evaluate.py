"""``megatron predict`` and ``megatron evaluate`` on a saved model, through the CLI main function."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import tiny_detector  # noqa: E402

from megatron.cli import main  # noqa: E402
from megatron.commands.predict import (  # noqa: E402
    box_colour,
    box_pixels,
    display_image,
    draw_detections,
    entries_as_arrays,
)
from megatron.data.episodes import iterate_batches  # noqa: E402
from megatron.data.io import read_image, write_image  # noqa: E402
from megatron.data.preprocess import Preprocessor, collate, normalise_intensity  # noqa: E402
from megatron.training.model_file import load_model, preprocessing_settings, save_model  # noqa: E402

CLASSES = ["square", "disc"]
THRESHOLD = 0.3


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> Path:
    """A tiny detector trained briefly on blobs (so it finds the squares and discs), saved as a model file."""
    torch.manual_seed(0)
    det = tiny_detector.TinyDetector(2, 64, tiny_detector.TinyDetectorOptions(score_threshold=0.05))
    task = tiny_detector.BlobsDataset(tiny_detector.BlobsOptions(tasks=["target"], images_per_task=24)).load()[0]
    pre = Preprocessor(64)
    opt = torch.optim.Adam(det.parameters(), 5e-3)
    det.train()
    for _ in range(40):
        for batch in iterate_batches(task, 8, pre):
            opt.zero_grad()
            det.loss(batch)["loss"].backward()
            opt.step()
    det.eval()
    path = tmp_path_factory.mktemp("model") / "models" / "finetune-best.pth"
    save_model(det, path, detector_name="tiny", detector_options=det.options.model_dump(), class_names=CLASSES,
               input_size=64, preprocessing=preprocessing_settings(pre),
               provenance={"learner": "finetune", "meta_epoch": 1}, evaluation={"score_threshold": THRESHOLD})
    return path


@pytest.fixture
def tiny_plugin(monkeypatch):
    """The tiny detector reaches the CLI's own plugin manager the way a non-installed plugin does."""
    monkeypatch.setenv("MEGATRON_PLUGINS", "tiny_detector")
    monkeypatch.setenv("COLUMNS", "200")


def blob_pixels(i: int, bits: int = 8) -> np.ndarray:
    """A 96 x 80 (h x w) blob image: not square and not the model's input size."""
    img, _, _ = tiny_detector.blob_image(i, 3, 96, 2)
    img = img[:, :80]
    return (img.astype(np.uint16) * 16 + 7) if bits == 16 else img


@pytest.fixture
def image_folder(tmp_path) -> Path:
    root = tmp_path / "data" / "images"
    for i in range(4):
        write_image(root / f"case{i}.png", blob_pixels(i))
    write_image(root / "sub" / "case4.tif", blob_pixels(4, bits=16))  # 16-bit, another suffix, a sub-folder
    (root / "notes.txt").write_text("not an image")
    return root


def run_predict(model: Path, paths: list, out: Path, *extra: str) -> int:
    return main(["predict", "--checkpoint", str(model), *map(str, paths), "--out", str(out), "--device", "cpu", *extra])


def test_predict_writes_coco_results_and_draws_exactly_those_boxes(trained_model, tiny_plugin, image_folder, tmp_path,
                                                                   capsys):
    out = tmp_path / "pred"
    assert run_predict(trained_model, [image_folder], out) == 0, capsys.readouterr()
    results = json.loads((out / "detections.json").read_text())
    images = json.loads((out / "images.json").read_text())
    assert [Path(e["file_name"]).name for e in images] == ["case0.png", "case1.png", "case2.png", "case3.png", "case4.tif"]
    assert results, "the trained tiny detector should find blobs"
    for e in results:
        assert set(e) == {"image_id", "file_name", "category_id", "category_name", "bbox", "score"}
        assert e["category_name"] == CLASSES[e["category_id"] - 1] and e["score"] >= THRESHOLD
    detector, info = load_model(trained_model, pm=_pm())
    pre = info.preprocessor()
    for image in images:
        raw = read_image(Path(image["file_name"]))
        assert (image["height"], image["width"]) == raw.shape[:2] == (96, 80)
        mine = [e for e in results if e["image_id"] == image["id"]]
        assert all(e["file_name"] == image["file_name"] for e in mine) and len(mine) == image["detections"]
        # the boxes are the detector's own, in original pixels (not the 64 px letterboxed input)
        det = detector.predict(collate([pre(raw, np.zeros((0, 4)), np.zeros(0), image_id=image["id"])]))[0]
        keep = det.scores >= THRESHOLD
        order = np.argsort(-det.scores[keep], kind="stable")
        boxes, labels, scores = entries_as_arrays(mine)
        np.testing.assert_allclose(boxes, det.boxes[keep][order], atol=0.01)
        np.testing.assert_array_equal(labels, det.labels[keep][order])
        np.testing.assert_allclose(scores, det.scores[keep][order], atol=1e-5)
        # the PNG shows exactly these boxes: the same drawing from the JSON entries, pixel for pixel ...
        drawing = read_image(out / image["drawing"])
        assert drawing.shape == (96, 80, 3)
        np.testing.assert_array_equal(drawing, draw_detections(display_image(raw), boxes, labels, scores, CLASSES))
        # ... and, independently of the drawing helper, the best box's outline is all in its class colour
        if len(mine):
            left, top, right, bottom = box_pixels(boxes[0], 80, 96)
            colour = np.array(box_colour(labels[0]))
            for edge in (drawing[top, left:right + 1], drawing[bottom, left:right + 1],
                         drawing[top:bottom + 1, left], drawing[top:bottom + 1, right]):
                assert np.all(edge == colour)
        # the rest is the original image, grey (R = G = B), 16-bit input windowed as the model sees it
        grey = normalise_intensity(raw)
        assert np.mean(np.all(drawing == grey[..., None], axis=-1)) > 0.5


def _pm():
    import megatron

    return megatron.get_plugin_manager(autoload=False, extra=[("tiny_detector", tiny_detector)])


def test_a_drawing_shows_the_box_where_the_json_says(tmp_path):
    """The drawing helper on its own: one box, every outline pixel in the class colour, nothing else coloured
    outside the box but its tag."""
    image = display_image(np.full((60, 50), 100, np.uint8))
    drawn = draw_detections(image, [[10.2, 20.0, 30.0, 45.4]], [1], [0.87], CLASSES)
    colour = np.array(box_colour(1))
    left, top, right, bottom = box_pixels([10.2, 20.0, 30.0, 45.4], 50, 60)
    assert (left, top, right, bottom) == (10, 20, 29, 44)
    for edge in (drawn[top, left:right + 1], drawn[bottom, left:right + 1], drawn[top:bottom + 1, left],
                 drawn[top:bottom + 1, right]):
        assert np.all(edge == colour)
    assert np.all(drawn[top + 1:bottom, left + 1:right] == 100)  # inside: untouched
    below = drawn[bottom + 1:]
    assert np.all(below == 100)
    tag = drawn[:top, left:]
    assert np.any(np.all(tag == colour, axis=-1))  # the tag sits above the box, in its colour


def test_predict_on_single_files_with_a_threshold_and_a_bad_file(trained_model, tiny_plugin, image_folder, tmp_path,
                                                                  capsys):
    bad = image_folder / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    out = tmp_path / "pred"
    rc = run_predict(trained_model, [image_folder / "case0.png", bad, image_folder / "sub" / "case4.tif"], out,
                     "--score-threshold", "0.9")
    captured = capsys.readouterr()
    assert rc == 1  # the unreadable image is reported, the others are written
    assert "broken.png" in " ".join(captured.out.split())
    images = json.loads((out / "images.json").read_text())
    assert [Path(i["file_name"]).name for i in images] == ["case0.png", "case4.tif"]
    assert all((out / i["drawing"]).is_file() for i in images)
    assert all(e["score"] >= 0.9 for e in json.loads((out / "detections.json").read_text()))


def test_predict_errors_are_clear(trained_model, tiny_plugin, tmp_path, capsys, monkeypatch):
    assert run_predict(trained_model, [tmp_path / "nowhere"], tmp_path / "o") == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run_predict(trained_model, [tmp_path / "empty"], tmp_path / "o") == 2
    assert "holds no image file" in capsys.readouterr().err
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00" * 100)
    write_image(tmp_path / "x.png", blob_pixels(0))
    assert run_predict(junk, [tmp_path / "x.png"], tmp_path / "o") == 2
    assert "not a megatron model file" in " ".join(capsys.readouterr().err.split())
    # drawings never overwrite the input images
    assert run_predict(trained_model, [tmp_path / "x.png"], tmp_path) == 2
    assert "would overwrite the input image" in " ".join(capsys.readouterr().err.split())
    assert np.array_equal(read_image(tmp_path / "x.png"), blob_pixels(0))
    monkeypatch.delenv("MEGATRON_PLUGINS")  # the tiny detector is not installed
    assert run_predict(trained_model, [tmp_path / "x.png"], tmp_path / "o") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "'tiny' detector" in err and "installed" in err


# --- evaluate -------------------------------------------------------------------------------------------
def dataset_from_predictions(out: Path, images_dir: Path, dest: Path, layout: str, names=CLASSES) -> Path:
    """A COCO or YOLO dataset whose ground truth is the detections ``predict`` wrote."""
    results = json.loads((out / "detections.json").read_text())
    images = json.loads((out / "images.json").read_text())
    if layout == "coco":
        doc = {"images": [{"id": i["id"], "file_name": str(Path(i["file_name"]).relative_to(images_dir)),
                           "width": i["width"], "height": i["height"]} for i in images],
               "annotations": [{"id": k + 1, "image_id": e["image_id"], "category_id": e["category_id"],
                                "bbox": e["bbox"], "area": e["bbox"][2] * e["bbox"][3], "iscrowd": 0}
                               for k, e in enumerate(results)],
               "categories": [{"id": c + 1, "name": n} for c, n in enumerate(names)]}
        path = images_dir.parent / "annotations" / f"{dest.name}.json"  # COCO layout: images/ beside annotations/
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(doc))
        return path
    (dest / "images").mkdir(parents=True)
    (dest / "labels").mkdir()
    (dest / "data.yaml").write_text(yaml.safe_dump({"names": list(names)}))
    for i in images:
        src = Path(i["file_name"])
        stem = f"img{i['id']}"
        (dest / "images" / f"{stem}{src.suffix}").write_bytes(src.read_bytes())
        lines = []
        for e in results:
            if e["image_id"] == i["id"]:
                x, y, w, h = e["bbox"]
                lines.append(f"{e['category_id'] - 1} {(x + w / 2) / i['width']:.6f} {(y + h / 2) / i['height']:.6f} "
                             f"{w / i['width']:.6f} {h / i['height']:.6f}")
        (dest / "labels" / f"{stem}.txt").write_text("\n".join(lines))
    return dest


@pytest.mark.parametrize("layout", ["coco", "yolo"])
def test_evaluate_on_the_models_own_predictions_gives_map50_of_one(layout, trained_model, tiny_plugin, image_folder,
                                                                   tmp_path, capsys):
    out = tmp_path / "pred"
    assert run_predict(trained_model, [image_folder], out, "--no-draw") == 0
    n_boxes = len(json.loads((out / "detections.json").read_text()))
    assert n_boxes > 0
    dataset = dataset_from_predictions(out, image_folder, tmp_path / "gt", layout)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(trained_model), str(dataset), "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    m = report["metrics"]
    assert m["n_gt"] == n_boxes and m["n_images"] == 5
    assert m["mAP50"] == pytest.approx(1.0)
    assert m["recall"] == pytest.approx(1.0) and m["precision"] == pytest.approx(1.0)  # same threshold as predict
    assert set(m["per_class_AP50"]) <= set(CLASSES) and all(v == pytest.approx(1.0) for v in m["per_class_AP50"].values())
    # the table form
    assert main(["evaluate", "--checkpoint", str(trained_model), str(dataset), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "mAP50:95" in table and "100.0%" in table and "AP50 per class" in table


def test_evaluate_matches_classes_by_name(trained_model, tiny_plugin, image_folder, tmp_path, capsys):
    out = tmp_path / "pred"
    assert run_predict(trained_model, [image_folder], out, "--no-draw") == 0
    # the dataset lists the classes in the other order: labels are mapped by name, the score is unchanged
    results = json.loads((out / "detections.json").read_text())
    swapped = out / "swapped"
    swapped.mkdir()
    for e in results:
        e["category_id"] = 3 - e["category_id"]
    (swapped / "detections.json").write_text(json.dumps(results))
    (swapped / "images.json").write_text((out / "images.json").read_text())
    dataset = dataset_from_predictions(swapped, image_folder, tmp_path / "gt", "coco", names=["disc", "square"])
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(trained_model), str(dataset), "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["mAP50"] == pytest.approx(1.0)
    # a class the model does not know: an error listing both
    other = dataset_from_predictions(out, image_folder, tmp_path / "gt2", "coco", names=["square", "circle"])
    assert main(["evaluate", "--checkpoint", str(trained_model), str(other), "--device", "cpu"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "['square', 'circle']" in err and "['square', 'disc']" in err and "by name" in err
