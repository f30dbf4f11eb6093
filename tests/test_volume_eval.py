"""Volume-level evaluation (megatron.evaluation.volume): slice detections linked into 3D candidates at the right
world position, FROC per scan with the LUNA16 counting (a repeat hit ignored, false positives per volume)."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from megatron.data.volumes import SliceSettings, VolumeAnnotations, read_volume_task, voxel_to_world
from megatron.errors import DataError
from megatron.evaluation.volume import link_boxes, volume_froc
from megatron.types import Detections, ImageRecord

AFFINE = np.array([[0.8, 0, 0, -10.0], [0, 0.8, 0, 4.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]])


def sphere_scan(folder, name, centres, shape=(32, 32, 12), radius_mm=3.2):
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    spacing = np.array([0.8, 0.8, 2.0])
    label = np.zeros(shape, np.uint8)
    for c in centres:
        label[np.sqrt(sum(((g - x) * s) ** 2 for g, x, s in zip(grid, c, spacing))) <= radius_mm] = 1
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image((label * 100).astype(np.int16), AFFINE), folder / "images" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label, AFFINE), folder / "labels" / f"{name}.nii.gz")


@pytest.fixture
def scans(tmp_path):
    sphere_scan(tmp_path, "a", [(10, 10, 5), (24, 24, 6)])  # two lesions
    sphere_scan(tmp_path, "b", [(16, 8, 4)])
    sphere_scan(tmp_path, "c", [])  # lesion-free
    task, _ = read_volume_task(tmp_path / "images", "t", VolumeAnnotations(label_dir=tmp_path / "labels"),
                               SliceSettings(empty_fraction=1.0))
    return task


def perfect(records, score=0.9):
    return [Detections(r.boxes.copy(), np.full(len(r.boxes), score, np.float32), r.labels.copy(), r.image_id)
            for r in records]


def test_perfect_slice_detections_give_one_candidate_per_lesion_at_its_world_position(scans):
    result = volume_froc(scans.records, perfect(scans.records))
    assert result["n_volumes"] == 3 and result["n_lesions"] == 3 and result["n_candidates"] == 3
    assert result["sensitivity"] == [1.0] * 7 and result["mean_sensitivity"] == 1.0
    assert result["slices_evaluated"] == result["slices_total"] == 36
    [cand_b] = result["candidates"]["b"]
    assert np.allclose(cand_b["centre_ras"], voxel_to_world(AFFINE, np.array([16, 8, 4]))[0], atol=0.5)
    assert cand_b["centre_lps"][:2] == pytest.approx([-cand_b["centre_ras"][0], -cand_b["centre_ras"][1]])
    assert cand_b["slices"] == [3, 5] and cand_b["diameter_mm"] >= 4.8


def test_false_positives_are_counted_per_volume_and_a_repeat_hit_is_not_one(scans):
    dets = perfect(scans.records, score=0.5)
    far = [r for r in scans.records if r.meta["volume_id"] == "c" and r.meta["slice_index"] in (2, 3)]
    for r in far:  # a 2-slice false positive in the lesion-free scan, scoring above every true lesion
        i = scans.records.index(r)
        dets[i] = Detections(np.array([[2, 2, 6, 6]], np.float32), np.array([0.95], np.float32), np.zeros(1, np.int64))
    a5 = next(i for i, r in enumerate(scans.records) if r.meta["volume_id"] == "a" and r.meta["slice_index"] == 5)
    rec = scans.records[a5]
    repeat = rec.boxes[:1] + np.array([[0.5, 0.5, 0.5, 0.5]], np.float32)  # shifted copy, isolated by score
    dets[a5] = Detections(np.r_[dets[a5].boxes, repeat], np.r_[dets[a5].scores, [0.2]].astype(np.float32),
                          np.r_[dets[a5].labels, [0]], rec.image_id)
    result = volume_froc(scans.records, dets, link_overlap=0.99)
    # 1 false positive over 3 volumes = 1/3 per scan before any lesion: 0 sensitivity at 1/8 and 1/4
    assert result["sensitivity"][:2] == [0.0, 0.0] and result["sensitivity"][2:] == [1.0] * 5
    assert len(result["candidates"]["a"]) == 3  # its 2 lesions and the repeat ...
    assert result["curve"]["fp_per_scan"][-1] == pytest.approx(1 / 3)  # ... which is not a false positive
    assert result["n_candidates"] == 4


def test_boxes_on_neighbouring_slices_link_and_distant_ones_do_not():
    slices = np.array([3, 4, 5, 4, 9])
    boxes = np.array([[10, 10, 14, 14], [9, 9, 15, 15], [11, 11, 13, 13], [40, 40, 44, 44], [10, 10, 14, 14]], float)
    chains = link_boxes(slices, boxes, np.ones(5), np.zeros(5, int))
    assert sorted(sorted(c) for c in chains) == [[0, 1, 2], [3], [4]]


def test_records_that_are_not_volume_slices_are_an_error():
    record = ImageRecord(1, None, 8, 8, np.zeros((0, 4)), np.zeros(0), "x.png")
    with pytest.raises(DataError, match="not a slice of a volume.*`volume` plugin"):
        volume_froc([record], [Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))])


# ------------------------------------------------------------------------------------ the CLI on volumes
@pytest.fixture
def untrained_model(tmp_path, monkeypatch):
    """An untrained tiny detector saved as a model file (it finds boxes anywhere: fine for checking the outputs)."""
    import torch
    import tiny_detector
    from megatron.data.preprocess import Preprocessor
    from megatron.training.model_file import preprocessing_settings, save_model

    torch.manual_seed(0)
    det = tiny_detector.TinyDetector(1, 64, tiny_detector.TinyDetectorOptions(score_threshold=0.0))
    path = tmp_path / "models" / "finetune-best.pth"
    save_model(det, path, detector_name="tiny", detector_options=det.options.model_dump(), class_names=["lesion"],
               input_size=64, preprocessing=preprocessing_settings(Preprocessor(64)), provenance={},
               evaluation={"score_threshold": 0.3})
    monkeypatch.setenv("MEGATRON_PLUGINS", "tiny_detector")
    return path


def test_evaluate_on_volumes_reports_froc_per_scan_beside_the_slice_metrics(untrained_model, tmp_path, capsys):
    import json

    from megatron.cli import main

    sphere_scan(tmp_path, "a", [(10, 10, 5)], shape=(32, 32, 8))
    sphere_scan(tmp_path, "b", [(20, 12, 3)], shape=(32, 32, 8))
    code = main(["evaluate", "--checkpoint", str(untrained_model), str(tmp_path / "images"), "--format", "volume",
                 "--set", f"labels={tmp_path / 'labels'}", "--set", "channels=2.5d", "--device", "cpu", "--json"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    froc = metrics["volume_froc"]
    assert metrics["n_images"] == 16 and froc["n_volumes"] == 2 and froc["n_lesions"] == 2
    assert froc["slices_evaluated"] == froc["slices_total"] == 16 and len(froc["sensitivity"]) == 7


def test_predict_on_volumes_writes_world_candidates_and_a_strip_per_scan(untrained_model, tmp_path, capsys):
    import json

    from megatron.cli import main

    sphere_scan(tmp_path, "a", [(10, 10, 5)], shape=(32, 32, 8))
    out = tmp_path / "pred"
    code = main(["predict", "--checkpoint", str(untrained_model), "--volumes", str(tmp_path / "images" / "a.nii.gz"),
                 "--score-threshold", "0", "--out", str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr()
    candidates = json.loads((out / "candidates.json").read_text())
    assert list(candidates) == ["a"] and candidates["a"]
    lo = voxel_to_world(AFFINE, np.array([-0.5, -0.5, -0.5]))[0]
    hi = voxel_to_world(AFFINE, np.array([31.5, 31.5, 7.5]))[0]
    for c in candidates["a"]:
        assert np.all(np.asarray(c["centre_ras"]) >= lo - 1e-6) and np.all(np.asarray(c["centre_ras"]) <= hi + 1e-6)
        assert c["category_name"] == "lesion" and c["slices"][0] <= c["slices"][1]
    assert (out / "a_strip.png").is_file()
    detections = json.loads((out / "detections.json").read_text())
    assert detections and all(d["volume_id"] == "a" and 0 <= d["slice_index"] < 8 for d in detections)


def test_a_model_file_keeps_the_volume_targets_reading_options_and_evaluate_and_predict_use_them(
        untrained_model, tmp_path, monkeypatch, capsys):
    import megatron.commands.evaluate as evaluate_command
    from megatron.cli import main
    from megatron.config import DataConfig, DatasetSpec
    from megatron.data.preprocess import Preprocessor
    from megatron.training.model_file import load_model, model_preprocessing, save_model

    sphere_scan(tmp_path, "a", [(10, 10, 5)], shape=(32, 32, 8))
    volume = DatasetSpec(plugin="volume", options={"root": str(tmp_path / "images"), "labels": str(tmp_path / "labels"),
                                                   "channels": "2.5d", "intensity": (50, 400), "empty_fraction": 0.2})
    other = DatasetSpec(plugin="medsynth", options={})
    recorded = model_preprocessing(Preprocessor(64), DataConfig(datasets=[other, volume], target="images"))
    assert recorded["volume"] == {"channels": "2.5d", "intensity": [50, 400]}  # reading options only, no paths
    assert "volume" not in model_preprocessing(Preprocessor(64), DataConfig(datasets=[other, volume], target="eit"))
    detector, info = load_model(untrained_model)
    save_model(detector, untrained_model, detector_name="tiny", detector_options=info.detector_options,
               class_names=["lesion"], input_size=64, preprocessing=recorded)

    tasks = []
    real_volume_task = evaluate_command.volume_task
    monkeypatch.setattr(evaluate_command, "volume_task", lambda *a: tasks.append(real_volume_task(*a)) or tasks[-1])
    assert main(["evaluate", "--checkpoint", str(untrained_model), str(tmp_path / "images"), "--format", "volume",
                 "--set", f"labels={tmp_path / 'labels'}", "--device", "cpu", "--json"]) == 0
    assert main(["predict", "--checkpoint", str(untrained_model), "--volumes", str(tmp_path / "images"),
                 "--set", "intensity=lung", "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0, capsys.readouterr()
    evaluated, predicted = (t.image_loader for t in tasks)
    assert evaluated.offset == predicted.offset == 1  # 2.5D, as recorded
    assert evaluated.intensity.window == (50.0, 400.0)  # the recorded window
    assert predicted.intensity.window == (-600.0, 1500.0)  # --set overrides the record
