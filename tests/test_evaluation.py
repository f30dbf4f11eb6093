"""Known-answer tests for megatron.evaluation.coco (every number pinned by hand)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from megatron.errors import DataError, MegatronError
from megatron.evaluation.coco import box_iou, evaluate
from megatron.types import Detections, ImageRecord

CATS = ["lesion", "calcification"]


def rec(image_id, boxes, labels, size=200):
    return ImageRecord(image_id=image_id, path=None, width=size, height=size, boxes=boxes, labels=labels,
                       file_name=f"img{image_id}.png")


def det(image_id, boxes, scores, labels):
    return Detections(boxes=np.asarray(boxes, np.float32).reshape(-1, 4), scores=np.asarray(scores, np.float32),
                      labels=np.asarray(labels, np.int64), image_id=image_id)


def test_box_iou_known_values():
    iou = box_iou(np.array([[0, 0, 100, 100]]), np.array([[0, 0, 100, 61], [50, 0, 150, 100], [200, 200, 210, 210]]))
    np.testing.assert_allclose(iou[0], [0.61, 50 * 100 / (2 * 100 * 100 - 50 * 100), 0.0])


def test_perfect_predictions_score_one():
    records = [rec(1, [[10, 10, 50, 50]], [0]), rec(2, [[20, 30, 80, 90], [100, 100, 150, 140]], [0, 1])]
    dets = [det(r.image_id, r.boxes, [0.9] * len(r.labels), r.labels) for r in records]
    m = evaluate(dets, records, CATS)
    for key in ("mAP50", "mAP50_95", "precision", "recall", "F1"):
        assert m[key] == pytest.approx(1.0), key
    assert m["per_class_AP50"] == {"lesion": pytest.approx(1.0), "calcification": pytest.approx(1.0)}
    assert (m["n_images"], m["n_gt"], m["n_det"]) == (2, 3, 3)
    assert (m["tp"], m["fp"], m["fn"]) == (3, 0, 0)


def test_false_positive_ranked_above_true_positive_halves_ap():
    # precision at the single recall step is 1/2 and stays the interpolated max: AP = 0.5
    records = [rec(1, [[10, 10, 50, 50]], [0])]
    dets = [det(1, [[120, 120, 160, 160], [10, 10, 50, 50]], [0.9, 0.8], [0, 0])]
    m = evaluate(dets, records, ["lesion"])
    assert m["mAP50"] == pytest.approx(0.5)
    assert m["mAP50_95"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(1.0)
    assert m["F1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)


def test_true_positive_ranked_above_false_positive_is_full_ap():
    records = [rec(1, [[10, 10, 50, 50]], [0])]
    dets = [det(1, [[10, 10, 50, 50], [120, 120, 160, 160]], [0.9, 0.8], [0, 0])]
    m = evaluate(dets, records, ["lesion"])
    assert m["mAP50"] == pytest.approx(1.0)
    assert m["precision"] == pytest.approx(0.5)  # the FP still counts at the operating point


def test_localisation_at_iou_061_counts_for_three_of_ten_thresholds():
    # IoU 0.61 passes 0.50, 0.55, 0.60 and fails 0.65..0.95 -> mAP50_95 = 3/10
    records = [rec(1, [[0, 0, 100, 100]], [0])]
    dets = [det(1, [[0, 0, 100, 61]], [0.9], [0])]
    m = evaluate(dets, records, ["lesion"])
    assert m["mAP50"] == pytest.approx(1.0)
    assert m["mAP50_95"] == pytest.approx(0.3)
    assert m["per_class_AP50_95"] == {"lesion": pytest.approx(0.3)}
    assert m["recall"] == pytest.approx(1.0)
    # the same box fails a stricter operating point
    strict = evaluate(dets, records, ["lesion"], iou_threshold=0.7)
    assert (strict["precision"], strict["recall"], strict["F1"]) == (0.0, 0.0, 0.0)


def test_precision_recall_f1_hand_case():
    # image 1: 2 GT; dets: TP (0.9), duplicate of same GT (0.8, FP), below threshold (0.2, ignored)
    # image 2: 1 GT of class 1; det of class 0 on it (FP, wrong class) and nothing else -> FN
    # image 3: no GT; one FP
    records = [
        rec(1, [[10, 10, 50, 50], [100, 100, 140, 140]], [0, 0]),
        rec(2, [[30, 30, 70, 70]], [1]),
        rec(3, [], []),
    ]
    dets = [
        det(1, [[10, 10, 50, 50], [12, 12, 50, 50], [100, 100, 140, 140]], [0.9, 0.8, 0.2], [0, 0, 0]),
        det(2, [[30, 30, 70, 70]], [0.7], [0]),
        det(3, [[0, 0, 20, 20]], [0.6], [1]),
    ]
    m = evaluate(dets, records, CATS, score_threshold=0.3)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 3, 2)
    assert m["precision"] == pytest.approx(1 / 4)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["F1"] == pytest.approx(2 * (1 / 4) * (1 / 3) / (1 / 4 + 1 / 3))
    assert m["n_det"] == 5 and m["n_gt"] == 3 and m["n_images"] == 3


def test_per_class_ap_and_mean():
    # lesion: perfect -> 1.0; calcification: FP above TP -> 0.5; mean = 0.75
    records = [rec(1, [[10, 10, 50, 50]], [0]), rec(2, [[60, 60, 90, 90]], [1])]
    dets = [det(1, [[10, 10, 50, 50]], [0.9], [0]),
            det(2, [[0, 0, 20, 20], [60, 60, 90, 90]], [0.95, 0.5], [1, 1])]
    m = evaluate(dets, records, CATS)
    assert m["per_class_AP50"] == {"lesion": pytest.approx(1.0), "calcification": pytest.approx(0.5)}
    assert m["per_class_AP50_95"] == {"lesion": pytest.approx(1.0), "calcification": pytest.approx(0.5)}
    assert m["mAP50"] == pytest.approx(0.75)


def test_class_without_ground_truth_is_excluded_from_the_mean():
    records = [rec(1, [[10, 10, 50, 50]], [0])]
    dets = [det(1, [[10, 10, 50, 50], [100, 100, 150, 150]], [0.9, 0.95], [0, 1])]
    m = evaluate(dets, records, CATS)
    assert m["per_class_AP50"] == {"lesion": pytest.approx(1.0)}
    assert m["classes_without_gt"] == ["calcification"]
    assert m["mAP50"] == pytest.approx(1.0)
    assert m["precision"] == pytest.approx(0.5)  # its false positive still counts here


def test_zero_detections_give_zero_not_nan():
    records = [rec(1, [[10, 10, 50, 50]], [0]), rec(2, [[10, 10, 30, 30]], [1])]
    m = evaluate([], records, CATS)
    for key in ("mAP50", "mAP50_95", "precision", "recall", "F1"):
        assert m[key] == 0.0 and not math.isnan(m[key]), key
    assert m["per_class_AP50"] == {"lesion": 0.0, "calcification": 0.0}
    # empty Detections objects are the same as none
    m2 = evaluate([det(1, np.zeros((0, 4)), [], []), det(2, np.zeros((0, 4)), [], [])], records, CATS)
    assert m2["mAP50"] == 0.0 and m2["n_det"] == 0


def test_missed_image_halves_recall_and_map():
    records = [rec(1, [[10, 10, 50, 50]], [0]), rec(2, [[10, 10, 50, 50]], [0])]
    m = evaluate([det(1, [[10, 10, 50, 50]], [0.9], [0])], records, ["lesion"])
    assert m["recall"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(1.0)
    # precision 1 up to recall 0.5, nothing after: 51 of 101 recall points
    assert m["mAP50"] == pytest.approx(51 / 101)


def test_max_detections_cap_keeps_the_highest_scores():
    records = [rec(1, [[10, 10, 50, 50]], [0])]
    dets = [det(1, [[120, 120, 160, 160], [10, 10, 50, 50]], [0.9, 0.8], [0, 0])]
    m = evaluate(dets, records, ["lesion"], max_detections=1)
    assert m["n_det"] == 1 and m["mAP50"] == 0.0 and m["recall"] == 0.0


def test_bad_input_errors_name_the_problem():
    records = [rec(1, [[10, 10, 50, 50]], [0])]
    with pytest.raises(DataError, match="image_id 7"):
        evaluate([det(7, [[0, 0, 1, 1]], [0.5], [0])], records, ["lesion"])
    with pytest.raises(DataError, match="outside"):
        evaluate([det(1, [[0, 0, 1, 1]], [0.5], [3])], records, ["lesion"])
    with pytest.raises(MegatronError, match="empty"):
        evaluate([], [], ["lesion"])


def test_no_output_on_stdout(capsys):
    records = [rec(1, [[10, 10, 50, 50]], [0])]
    evaluate([det(1, [[10, 10, 50, 50]], [0.9], [0])], records, ["lesion"])
    assert capsys.readouterr().out == ""
