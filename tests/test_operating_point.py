"""The operating point chosen on validation (issue 25, item 7): the max-F1 and sensitivity thresholds on score
sets whose answer is known by hand, the same counts as the evaluator's fixed-threshold P/R/F1, the threshold
applied to another split, kept in the model file, and `megatron predict`'s default coming from that file."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import tiny_detector
from megatron.cli import main
from megatron.data.io import write_image
from megatron.data.preprocess import Preprocessor
from megatron.evaluation import evaluate
from megatron.evaluation.operating_point import (ScoredHits, choose_operating_point, counts_at, describe,
                                                 model_operating_point)
from megatron.training.model_file import preprocessing_settings, read_model_file, save_model
from megatron.training.record import summary_markdown
from megatron.types import Detections, ImageRecord

# ten detections, scores descending, hit or not; 6 lesions in all (two are never found)
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
HITS = np.array([1, 1, 0, 1, 1, 0, 0, 0, 0, 0], bool)
KNOWN = ScoredHits(SCORES, HITS, n_gt=6, n_images=4)


def f1_by_hand(threshold: float) -> float:
    keep = SCORES >= threshold
    tp = int(HITS[keep].sum())
    p, r = tp / keep.sum(), tp / 6
    return 2 * p * r / (p + r) if p + r else 0.0


def test_the_max_f1_threshold_is_the_one_found_by_hand():
    # kept at 0.5: 4 hits of 5 boxes, P 0.8, R 4/6 -> F1 0.727; every other threshold is lower
    best = max(SCORES, key=lambda t: (f1_by_hand(t), t))
    assert best == 0.5
    point = choose_operating_point(KNOWN, "max_f1", fixed_threshold=0.3)
    assert point.threshold == 0.5 and point.chosen_on == "validation"
    assert point.counts["F1"] == pytest.approx(f1_by_hand(0.5))
    assert (point.counts["precision"], point.counts["recall"]) == pytest.approx((0.8, 4 / 6))
    # the FROC point at that threshold: 1 false positive on 4 images, sensitivity = recall
    assert (point.counts["fp_per_image"], point.counts["sensitivity"]) == pytest.approx((0.25, 4 / 6))


def test_the_sensitivity_rule_takes_the_highest_threshold_that_reaches_it():
    half = choose_operating_point(KNOWN, "sensitivity", 0.3, target_sensitivity=0.5)
    assert half.threshold == 0.6 and half.reached  # 3 hits of 6 at 0.6; 2 at 0.7
    never = choose_operating_point(KNOWN, "sensitivity", 0.3, target_sensitivity=0.9)
    assert never.threshold == 0.05 and not never.reached  # every box, and it says the target was missed
    assert "was not reached" in describe(never.to_dict(), 0.3)


def test_nothing_to_choose_on_falls_back_to_the_fixed_threshold_and_says_so():
    empty = ScoredHits(np.zeros(0), np.zeros(0, bool), n_gt=3, n_images=2)
    point = choose_operating_point(empty, "max_f1", fixed_threshold=0.3)
    assert (point.threshold, point.chosen_on) == (0.3, "fixed default")
    assert "the fixed default" in describe(point.to_dict(), 0.3)
    assert "fixed default" in describe(None, 0.3) and "no validation split" in describe(None, 0.3)
    fixed = choose_operating_point(KNOWN, "fixed", fixed_threshold=0.3)
    assert fixed.threshold == 0.3 and counts_at(KNOWN, 0.3)["precision"] == pytest.approx(4 / 7)


def _records_and_detections() -> tuple[list[ImageRecord], list[Detections]]:
    """Two images of two lesions each; detections that hit, miss and duplicate at spread-out scores."""
    gt = np.array([[10, 10, 30, 30], [50, 50, 70, 70]], np.float32)
    records = [ImageRecord(i, f"img{i}.png", 100, 100, gt.copy(), np.zeros(2, np.int64)) for i in (1, 2)]
    far = [80, 5, 95, 20]
    dets = [Detections(np.array([gt[0], gt[1], far, gt[0]], np.float32), np.array([0.9, 0.2, 0.15, 0.1]),
                       np.zeros(4, np.int64), image_id=1),
            Detections(np.array([gt[0], far, gt[1]], np.float32), np.array([0.8, 0.4, 0.05]),
                       np.zeros(3, np.int64), image_id=2)]
    return records, dets


def test_counts_at_the_chosen_threshold_equal_the_evaluator_s_at_that_fixed_threshold():
    records, dets = _records_and_detections()
    chosen = evaluate(dets, records, ["lesion"], operating_point="max_f1")["operating_point"]
    assert chosen["chosen_on"] == "validation" and chosen["rule"] == "max_f1"
    again = evaluate(dets, records, ["lesion"], score_threshold=chosen["threshold"])
    assert (chosen["precision"], chosen["recall"], chosen["F1"]) == pytest.approx(
        (again["precision"], again["recall"], again["F1"]))
    # the max-F1 point beats the fixed 0.3 here: 0.2 adds a hit for no false positive
    assert chosen["threshold"] == pytest.approx(0.2) and chosen["F1"] > evaluate(dets, records, ["lesion"])["F1"]


def test_a_point_chosen_elsewhere_is_applied_with_its_provenance():
    records, dets = _records_and_detections()
    point = {"threshold": 0.5, "rule": "max_f1", "chosen_on": "validation", "target_sensitivity": None,
             "reached": True, "precision": 0.123}
    applied = evaluate(dets, records, ["lesion"], operating_point=point)["operating_point"]
    assert applied["threshold"] == 0.5 and applied["chosen_on"] == "validation"
    assert applied["precision"] == 1.0 and applied["recall"] == 0.5  # 2 boxes >= 0.5, both hits, of 4 lesions
    assert applied["fp_per_image"] == 0.0


def _tiny_model_file(path, operating_point):
    torch.manual_seed(0)
    det = tiny_detector.TinyDetector(2, 64, tiny_detector.TinyDetectorOptions(score_threshold=0.0))
    det.eval()
    return save_model(det, path, detector_name="tiny", detector_options=det.options.model_dump(),
                      class_names=["square", "disc"], input_size=64, preprocessing=preprocessing_settings(
                          Preprocessor(64)), evaluation={"score_threshold": 0.3}, operating_point=operating_point)


def test_the_model_file_keeps_the_operating_point(tmp_path):
    validation = {"operating_point": {"threshold": 0.12, "rule": "max_f1", "chosen_on": "validation",
                                      "target_sensitivity": None, "reached": True, "precision": 0.7, "recall": 0.6,
                                      "F1": 0.646, "fp_per_image": 0.5, "sensitivity": 0.6}}
    heldout = {"operating_point": {**validation["operating_point"], "precision": 0.65, "recall": 0.55}}
    entry = model_operating_point(validation, heldout)
    info, _, _ = read_model_file(_tiny_model_file(tmp_path / "m.pth", entry))
    assert info.operating_point["validation"]["precision"] == 0.7
    assert info.operating_point["heldout"]["recall"] == 0.55
    threshold, source = info.default_threshold
    assert threshold == 0.12 and "highest F1 on the validation split" in source
    older, _, _ = read_model_file(_tiny_model_file(tmp_path / "old.pth", None))
    assert older.default_threshold[0] == 0.3 and "fixed default" in older.default_threshold[1]


def test_predict_keeps_boxes_at_the_model_file_s_threshold_and_says_where_it_came_from(tmp_path, monkeypatch,
                                                                                       capsys):
    monkeypatch.setenv("MEGATRON_PLUGINS", "tiny_detector")
    monkeypatch.setenv("COLUMNS", "200")
    images = tmp_path / "images"
    for i in range(3):
        write_image(images / f"case{i}.png", tiny_detector.blob_image(i, 3, 64, 2)[0])
    every = _tiny_model_file(tmp_path / "every.pth", None)
    assert main(["predict", "--checkpoint", str(every), str(images), "--out", str(tmp_path / "all"),
                 "--device", "cpu", "--no-draw", "--score-threshold", "0"]) == 0
    scores = sorted(d["score"] for d in json.loads((tmp_path / "all" / "detections.json").read_text()))
    assert len(scores) >= 4
    # a threshold between two distinct scores near the median (detections.json rounds scores), keeping about half
    m = next(i for i in range(len(scores) // 2, len(scores)) if scores[i] > scores[i - 1])
    chosen = round((scores[m - 1] + scores[m]) / 2, 7)
    point = {"threshold": chosen, "rule": "max_f1", "chosen_on": "validation", "target_sensitivity": None,
             "reached": True}
    model = _tiny_model_file(tmp_path / "chosen.pth", {**point, "validation": None, "heldout": None})
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(model), str(images), "--out", str(tmp_path / "op"),
                 "--device", "cpu", "--no-draw"]) == 0
    out = capsys.readouterr().out
    kept = [d["score"] for d in json.loads((tmp_path / "op" / "detections.json").read_text())]
    assert kept and min(kept) >= chosen and len(kept) == sum(s >= chosen for s in scores)
    assert f"threshold: score >= {chosen:.4g}: the threshold with the highest F1 on the validation split" in out
    # an older model file (no operating point): the fixed default, and the output says so
    assert main(["predict", "--checkpoint", str(every), str(images), "--out", str(tmp_path / "fixed"),
                 "--device", "cpu", "--no-draw"]) == 0
    assert "threshold: score >= 0.3: the fixed default" in capsys.readouterr().out


def test_the_run_summary_reports_the_operating_point_beside_the_fixed_figures():
    point = {"threshold": 0.08, "rule": "max_f1", "chosen_on": "validation", "target_sensitivity": None,
             "reached": True, "precision": 0.71, "recall": 0.64, "F1": 0.673, "fp_per_image": 1.25,
             "sensitivity": 0.64}
    final = {"mAP50": 0.6, "precision": 1.0, "recall": 0.044, "F1": 0.084, "operating_point": point}
    record = {"target": "nuclei", "shots": 6, "seed": 0, "sources": [], "config": {"evaluation": {
        "score_threshold": 0.3}}, "learners": {"finetune": {"final": final, "epochs": [{}]}}}
    text = summary_markdown(record)
    line = next(line for line in text.splitlines() if line.startswith("- finetune: score >= 0.08"))
    assert "highest F1 on the validation split" in line
    assert "held-out precision 0.710, recall 0.640, F1 0.673" in line
    assert "FROC point 1.250 false positives per image at sensitivity 0.640" in line
    assert "at the fixed score >= 0.3" in text and math.isclose(final["recall"], 0.044)


def test_a_run_chooses_the_point_on_validation_and_applies_it_to_the_held_out_split(tmp_path):
    from tiny_run import make_pm, tiny_config

    from megatron.training.runner import run_experiment

    cfg = tiny_config(tmp_path, **{"training.meta_epochs": 1, "data.validation_images": 3})
    record = run_experiment(cfg, run_dir=tmp_path / "run", pm=make_pm(), progress=False, learners=["joint_test"])
    lrec = record["learners"]["joint_test"]
    epoch = lrec["epochs"][0]
    chosen, applied = epoch["validation"]["operating_point"], epoch["metrics"]["operating_point"]
    assert chosen["rule"] == "max_f1" and applied["threshold"] == chosen["threshold"]
    assert applied["chosen_on"] == chosen["chosen_on"]  # validation, or the fixed default when nothing was found
    info, _, _ = read_model_file(lrec["models"]["final"])
    assert info.operating_point["threshold"] == chosen["threshold"]
    assert info.operating_point["heldout"]["F1"] == applied["F1"]
    # without a validation split the held-out figures are at the fixed threshold, and the record says so
    cfg = tiny_config(tmp_path, **{"training.meta_epochs": 1, "data.validation_images": 0})
    record = run_experiment(cfg, run_dir=tmp_path / "plain", pm=make_pm(), progress=False, learners=["joint_test"])
    point = record["learners"]["joint_test"]["final"]["operating_point"]
    assert point["threshold"] == 0.3 and point["chosen_on"] == "fixed default (no validation split)"
    assert point["F1"] == record["learners"]["joint_test"]["final"]["F1"]
