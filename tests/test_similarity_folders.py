"""`megatron similarity` on unannotated image folders (PNG and DICOM): image-only metrics rank them,
label-aware metrics are skipped with a note, and every output says how many images each dataset gave."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from megatron.cli import main
from megatron.data.io import write_image


def two_level_png(path: Path, low: int, high: int, size: int = 16) -> None:
    """Half the pixels at ``low``, half at ``high`` (8-bit, so the histogram metric sees exactly these)."""
    image = np.full((size, size), low, np.uint8)
    image[:, size // 2:] = high
    write_image(path, image)


@pytest.fixture
def folders(tmp_path) -> dict[str, Path]:
    target, near, far = tmp_path / "new_scanner", tmp_path / "xray", tmp_path / "mri"
    two_level_png(target / "t1.png", 100, 120)
    two_level_png(near / "a.png", 110, 130)  # every grey level +10: Wasserstein distance 10
    two_level_png(near / "sub" / "b.png", 110, 130)
    pytest.importorskip("pydicom")
    from test_dicom import make_dicom

    # a windowed DICOM, stored 50 / 150 with centre 100.5, width 201 (LINEAR: c - 0.5 = 100, w - 1 = 200):
    # displayed ((50 - 100) / 200 + 0.5) * 255 = 63.75 -> 64 and ((150 - 100) / 200 + 0.5) * 255 = 191.25 -> 191
    values = np.full((16, 16), 50, np.uint8)
    values[:, 8:] = 150
    make_dicom(far / "scan.dcm", values, bits_stored=8, WindowCenter=100.5, WindowWidth=201)
    return {"target": target, "near": near, "far": far}


def test_folders_are_ranked_with_image_only_metrics(folders, tmp_path, capsys):
    out = tmp_path / "sim"
    rc = main(["similarity", "--folders", str(folders["near"]), str(folders["far"]), "--target",
               str(folders["target"]), "--metrics", "wasserstein,label_aware", "--json", "--no-plots",
               "--out", str(out)])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == "new_scanner" and result["sources"] == ["xray", "mri"]
    assert list(result["metrics"]) == ["wasserstein"]
    assert "label_aware" in result["skipped"] and "new_scanner" in result["skipped"]["label_aware"]
    entry = result["metrics"]["wasserstein"]
    ranking = [(r["name"], r["distance"]) for r in entry["ranking"]]
    assert ranking[0][0] == "xray" and ranking[0][1] == pytest.approx(10.0, abs=1e-6)
    # target levels 100/120 vs displayed DICOM 64/191: W1 = (36 + 71) / 2 = 53.5 grey levels
    assert ranking[1] == ("mri", pytest.approx(53.5, abs=1e-6))
    assert entry["images"] == {"new_scanner": 1, "xray": 2, "mri": 1}
    assert json.loads((out / "similarity.json").read_text())["metrics"]["wasserstein"]["images"]["xray"] == 2


def test_tables_say_how_many_images_and_note_the_skip(folders, tmp_path, capsys):
    rc = main(["similarity", "--folders", str(folders["near"]), str(folders["far"]), "--target",
               str(folders["target"]), "--metrics", "wasserstein,label_aware", "--out", str(tmp_path / "o")])
    assert rc == 0
    text = " ".join(capsys.readouterr().out.split())  # undo rich's wrapping
    assert "note: label_aware skipped: it compares annotations, and new_scanner, xray, mri have none" in text
    assert "images per dataset: new_scanner 1, xray 2, mri 1" in text
    assert "50 images/dataset" not in text and "up to 50 sampled images/dataset" in text
    assert (tmp_path / "o" / "heatmap_wasserstein.png").is_file()
    assert (tmp_path / "o" / "histograms_wasserstein.png").is_file()


def test_a_config_with_unannotated_dataset_entries(folders, tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"datasets": [{"plugin": "folder", "options": {"root": str(folders["target"]), "name": "new"}},
                              {"plugin": "folder", "options": {"root": str(folders["near"])}},
                              {"plugin": "dicom", "options": {"root": str(folders["far"]), "name": "mri"}}],
                 "target": "new"},
        "similarity": {"metrics": ["wasserstein", "label_aware"], "sample_size": 5}}))
    rc = main(["similarity", "-c", str(cfg), "--json", "--no-plots", "--out", str(tmp_path / "o")])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in result["metrics"]["wasserstein"]["ranking"]] == ["xray", "mri"]
    assert set(result["skipped"]) == {"label_aware"}


def test_folder_errors_are_clear(folders, tmp_path, capsys):
    rc = main(["similarity", "--folders", str(folders["near"]), "--out", str(tmp_path / "o")])
    assert rc == 2 and "--folders needs --target DIR" in capsys.readouterr().err
    rc = main(["similarity", "--folders", str(folders["target"]), "--target", str(folders["target"]),
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "at least one folder besides the --target" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["similarity", "--folders", str(empty), "--target", str(folders["target"]), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc != 0 and "empty" in err and "holds no images or DICOM files" in err
    rc = main(["similarity", "--folders", str(folders["near"]), "--target", str(folders["target"]),
               "--metrics", "label_aware", "--out", str(tmp_path / "o")])
    assert rc == 2 and "use an image-only metric" in capsys.readouterr().err
