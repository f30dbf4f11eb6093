"""FROC on hand-made cases: a perfect detector, known misses and false positives, duplicates, classes,
ties; the evaluator's `froc`/`FROC`, the run summary table, the curve PNG and the benchmark report."""
from __future__ import annotations

import json

import numpy as np
import pytest

from megatron.evaluation import FROC_FP_RATES, evaluate, froc, sensitivity_at
from megatron.types import Detections, ImageRecord

LESION = np.array([[10, 10, 30, 30]], np.float32)
FAR = np.array([[60, 60, 80, 80]], np.float32)


def image(det_boxes, scores, gt=LESION, det_labels=None, gt_labels=None):
    det_boxes = np.asarray(det_boxes, np.float32).reshape(-1, 4)
    labels = np.zeros(len(det_boxes), np.int64) if det_labels is None else np.asarray(det_labels)
    gt_labels = np.zeros(len(gt), np.int64) if gt_labels is None else np.asarray(gt_labels)
    return det_boxes, np.asarray(scores, np.float64), labels, gt, gt_labels


def test_rates_are_the_luna16_seven():
    assert FROC_FP_RATES == (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8)


def test_perfect_detector_has_sensitivity_one_at_every_rate():
    result = froc([image(LESION, [0.9]) for _ in range(5)])
    assert result["sensitivity"] == [1.0] * 7 and result["mean_sensitivity"] == 1.0
    assert result["n_lesions"] == 5 and result["n_images"] == 5
    assert result["curve"]["fp_per_image"] == [0.0, 0.0] and result["curve"]["sensitivity"] == [0.0, 1.0]


def test_known_misses_and_false_positives():
    # 4 images with one lesion each. Pooled by score: .9 hit, .8 FP, .7 hit, .6 FP, .5 FP, .4 hit; image 4's
    # lesion is never found. After each: (FP/image, sensitivity) = (0, 1/4) (1/4, 1/4) (1/4, 2/4) (2/4, 2/4)
    # (3/4, 2/4) (3/4, 3/4). At 1/8 FP/image: 1/4; at 1/4 and 1/2: 2/4; from 1 on: 3/4.
    images = [image(np.r_[LESION, FAR], [0.9, 0.8]),
              image(np.r_[LESION, FAR], [0.7, 0.6]),
              image(np.r_[FAR, LESION], [0.5, 0.4]),
              image(np.zeros((0, 4)), [])]
    result = froc(images)
    assert result["sensitivity"] == pytest.approx([0.25, 0.5, 0.5, 0.75, 0.75, 0.75, 0.75])
    assert result["mean_sensitivity"] == pytest.approx((0.25 + 0.5 + 0.5 + 4 * 0.75) / 7)
    assert result["n_detections"] == 6 and result["n_lesions"] == 4
    c = result["curve"]
    assert c["fp_per_image"] == pytest.approx([0, 0, 0.25, 0.75])
    assert c["sensitivity"] == pytest.approx([0, 0.25, 0.5, 0.75])
    assert c["score"][1:] == pytest.approx([0.9, 0.7, 0.4])
    # the kept corners give the same staircase as every point would
    assert sensitivity_at(c, [0.2, 0.74, 0.76]) == pytest.approx([0.25, 0.5, 0.75])


def test_one_hit_per_lesion_a_second_detection_is_a_false_positive():
    near = LESION + np.array([1, 1, 1, 1], np.float32)  # IoU 0.82 with the lesion
    result = froc([image(np.r_[LESION, near], [0.9, 0.8]), image(np.zeros((0, 4)), [], gt=FAR)])
    # 2 images, 2 lesions: .9 hits lesion 1 (1/2), .8 is a duplicate: 1 FP over 2 images = 1/2 FP/image
    assert result["sensitivity"] == pytest.approx([0.5] * 7)
    assert result["curve"]["fp_per_image"][-1] == pytest.approx(0.5)


def test_iou_threshold_and_classes():
    half = np.array([[10, 10, 30, 20]], np.float32)  # IoU exactly 0.5 with the lesion
    assert froc([image(half, [0.9])], iou_threshold=0.5)["sensitivity"][0] == 1.0
    assert froc([image(half, [0.9])], iou_threshold=0.6)["sensitivity"] == [0.0] * 7
    wrong_class = froc([image(LESION, [0.9], det_labels=[1])])
    assert wrong_class["sensitivity"] == [0.0] * 7 and wrong_class["curve"]["fp_per_image"][-1] == 1.0


def test_tied_scores_enter_together():
    # a hit and a false positive share the score 0.9 on one image: the curve jumps to (1 FP/image, 1.0), so at
    # 1/2 FP/image nothing is detected yet (the conservative end of LUNA16's interpolation)
    result = froc([image(np.r_[LESION, FAR], [0.9, 0.9])])
    assert result["curve"]["fp_per_image"] == [0.0, 1.0] and result["curve"]["sensitivity"] == [0.0, 1.0]
    assert result["sensitivity"] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]


def test_no_lesions_gives_zeros():
    result = froc([image(FAR, [0.9], gt=np.zeros((0, 4), np.float32))])
    assert result["n_lesions"] == 0 and result["sensitivity"] == [0.0] * 7 and result["mean_sensitivity"] == 0.0


def records_and_detections():
    records = [ImageRecord(i, None, 100, 100, LESION, [0]) for i in range(1, 5)]
    dets = [Detections(np.r_[LESION, FAR], np.array([0.9, 0.8], np.float32), np.array([0, 0]), image_id=1),
            Detections(np.r_[LESION, FAR], np.array([0.7, 0.6], np.float32), np.array([0, 0]), image_id=2),
            Detections(np.r_[FAR, LESION], np.array([0.5, 0.4], np.float32), np.array([0, 0]), image_id=3)]
    return records, dets


def test_evaluate_reports_froc_next_to_the_coco_metrics():
    records, dets = records_and_detections()
    m = evaluate(dets, records, ["lesion"], score_threshold=0.3, iou_threshold=0.5)
    assert m["FROC"] == pytest.approx((0.25 + 0.5 + 0.5 + 4 * 0.75) / 7)
    assert m["froc"]["mean_sensitivity"] == m["FROC"] and m["froc"]["fp_per_image"] == list(FROC_FP_RATES)
    json.dumps(m, allow_nan=False)  # run.json must stay strict JSON
    # the per-image cap applies to FROC as to mAP: one detection per image keeps .9, .7, .5 (FP) only
    capped = evaluate(dets, records, ["lesion"], max_detections=1)
    assert capped["froc"]["n_detections"] == 3 and capped["froc"]["sensitivity"][-1] == pytest.approx(0.5)


def fake_record(froc_result: dict, mean: float) -> dict:
    final = {"mAP50": 0.5, "mAP50_95": 0.3, "precision": 0.6, "recall": 0.7, "F1": 0.65, "FROC": mean,
             "froc": froc_result}
    return {"target": "eit", "shots": 20, "seed": 0, "sources": ["a"],
            "learners": {"reptile": {"final": final, "epochs": [], "compute": {"spent": 10}},
                         "finetune": {"final": {**final, "FROC": mean / 2}, "epochs": [], "compute": {"spent": 10}}}}


def test_summary_table_and_curve_png(tmp_path):
    from megatron.training.plots import plot_froc
    from megatron.training.record import summary_markdown

    records, dets = records_and_detections()
    m = evaluate(dets, records, ["lesion"])
    record = fake_record(m["froc"], m["FROC"])
    text = summary_markdown(record)
    header = next(line for line in text.splitlines() if line.startswith("| learner"))
    assert "FROC" in header
    row = next(line for line in text.splitlines() if line.startswith("| reptile"))
    assert f"{m['FROC']:.3f}" in row
    path = plot_froc(record, tmp_path / "froc_curve.png")
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
    old = {"target": "eit", "learners": {"reptile": {"final": {"mAP50": 0.5}}}}
    assert plot_froc(old, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_benchmark_report_has_froc_with_intervals(tmp_path):
    from megatron.benchmark.report import build_report

    for seed, (a, b) in enumerate([(0.60, 0.40), (0.64, 0.42), (0.62, 0.38)]):
        run = tmp_path / "runs" / f"run{seed}"
        run.mkdir(parents=True)
        rec = fake_record({}, a)
        rec["seed"], rec["status"] = seed, "complete"
        rec["config"] = {"learner": {"name": "reptile"}, "data": {"shots": 20}}
        rec["learners"]["finetune"]["final"]["FROC"] = b
        (run / "run.json").write_text(json.dumps(rec))
    result = build_report([tmp_path / "runs"], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| learner | seeds |"))
    assert "FROC (mean sens.)" in header
    row = next(line for line in text.splitlines() if line.startswith("| reptile | 3 |"))
    assert "62.0 [" in row  # mean of 60, 64, 62 points, with its interval
    assert any(c.metric == "FROC" and c.diff is not None for c in result.comparisons)
    assert "FROC" in (tmp_path / "report" / "results.csv").read_text().splitlines()[0]
