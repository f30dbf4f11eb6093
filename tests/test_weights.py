"""megatron.training.weights: checkpoints of every supported layout, with clear reports and errors."""
from __future__ import annotations

import argparse
import copy

import pytest
import torch

from megatron.errors import MegatronError
from megatron.training.weights import CheckpointError, LoadReport, load_weights, read_checkpoint_header, save_detector_checkpoint
from megatron_plugins.detectors.faster_rcnn import FasterRCNN
from megatron_plugins.detectors.yolox import YOLOX


@pytest.fixture(autouse=True)
def _single_torch_thread(_torch_threads):
    """mmdet models on small inputs: one intra-op thread is faster, and far faster on a loaded machine."""
    torch.set_num_threads(1)



@pytest.fixture(scope="module")
def yolox_pair():
    torch.manual_seed(0)
    a = YOLOX(3, 128)
    torch.manual_seed(1)
    b = YOLOX(3, 128)
    return a, b


def _equal_state(a, b, skip=()) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if k not in skip)


def test_round_trip_is_exact(tmp_path, yolox_pair):
    a, b = yolox_pair
    b = copy.deepcopy(b)
    assert not _equal_state(a, b)
    path = save_detector_checkpoint(a, tmp_path / "ckpt" / "det.pt", meta={"note": "test", "epochs": 3})
    report = load_weights(b, path)
    assert _equal_state(a, b)
    assert report.format == "megatron" and report.complete and not report.unexpected
    assert report.meta["meta"] == {"note": "test", "epochs": 3}
    header = read_checkpoint_header(path)
    assert header["detector"] == "yolox" and header["num_classes"] == 3 and header["options"]["size"] == "tiny"
    # written for the safe loader
    torch.load(path, weights_only=True)
    assert not list((tmp_path / "ckpt").glob("*.tmp")), "no temp file left behind"


def test_other_class_count_reinitialises_only_the_classifier(tmp_path, yolox_pair):
    a, _ = yolox_pair
    path = save_detector_checkpoint(a, tmp_path / "det.pt")
    torch.manual_seed(5)
    target = YOLOX(5, 128)
    report = load_weights(target, path)
    assert report.reinitialised_classifier == (3, 5)
    assert target.num_classes == 5
    cls = set(target.parameter_groups()["head_cls"])
    sa, st = a.state_dict(), target.state_dict()
    assert all(torch.equal(sa[k], st[k]) for k in st if k not in cls)
    assert all(st[k].shape[0] == 5 for k in cls)
    assert "re-initialised for 5 classes" in report.summary()


def test_checkpoint_of_another_detector_is_refused(tmp_path, yolox_pair):
    a, _ = yolox_pair
    path = save_detector_checkpoint(a, tmp_path / "det.pt")
    det = FasterRCNN(3, 128, FasterRCNN.Options(depth=18))
    with pytest.raises(CheckpointError, match="written for detector 'yolox'"):
        load_weights(det, path)


def test_mmdet_checkpoint_with_missing_and_unexpected_keys(tmp_path, yolox_pair):
    a, b = yolox_pair
    b = copy.deepcopy(b)
    state = {k: v.clone() for k, v in a.model.state_dict().items()}  # mmdet names, no "model." prefix
    dropped = "neck.out_convs.0.conv.weight"
    del state[dropped]
    state["bbox_head.extra_layer.weight"] = torch.zeros(2)
    state["bbox_head.multi_level_conv_cls.0.weight"] = torch.zeros(80, 96, 1, 1)  # a COCO classifier
    torch.save({"state_dict": state, "meta": {"epoch": 300, "classes": ["person", "car"]}}, tmp_path / "mm.pth")
    report = load_weights(b, tmp_path / "mm.pth")
    assert report.format == "mmdet"
    assert report.missing == [f"model.{dropped}"]
    assert report.unexpected == ["model.bbox_head.extra_layer.weight"]
    assert report.mismatched == [("model.bbox_head.multi_level_conv_cls.0.weight", (80, 96, 1, 1), (3, 96, 1, 1))]
    assert torch.equal(b.model.backbone.stem.conv.conv.weight, a.model.backbone.stem.conv.conv.weight)
    assert not report.complete
    text = str(report)
    assert "1 missing" in text and "1 unexpected" in text and "(80, 96, 1, 1) in file vs (3, 96, 1, 1)" in text
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(report)
    rendered = console.export_text()
    assert "shape mismatch" in rendered and "unexpected" in rendered


def test_a_checkpoint_with_an_object_off_the_allow_list_loads_only_with_the_explicit_opt_in(tmp_path, yolox_pair,
                                                                                              monkeypatch):
    a, b = yolox_pair
    b = copy.deepcopy(b)
    path = tmp_path / "mm_meta.pth"
    torch.save({"state_dict": a.model.state_dict(), "meta": {"hub": argparse.Namespace(x=1)}}, path)
    monkeypatch.delenv("MEGATRON_ALLOW_UNSAFE_CHECKPOINTS", raising=False)
    with pytest.raises(CheckpointError, match="would run code") as info:
        load_weights(b, path)
    assert str(path) in str(info.value) and "argparse.Namespace" in str(info.value)
    assert "MEGATRON_ALLOW_UNSAFE_CHECKPOINTS" not in str(info.value)  # never suggested for a file off the list
    report = load_weights(b, path, allow_unsafe=True)
    assert report.complete and _equal_state(a, b)


def test_torchvision_resnet_weights_map_onto_the_mmdet_backbone(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(tv, tmp_path / "resnet18.pth")
    det = FasterRCNN(3, 128, FasterRCNN.Options(depth=18))
    report = load_weights(det, tmp_path / "resnet18.pth")
    assert report.format == "torchvision"
    backbone = set(det.parameter_groups()["backbone"])
    assert backbone <= set(report.loaded)
    assert torch.equal(det.model.backbone.layer3[1].conv2.weight, tv["layer3.1.conv2.weight"])
    assert set(report.unexpected) == {"model.backbone.fc.weight", "model.backbone.fc.bias"}  # the ImageNet classifier
    assert any(k.startswith("model.neck.") for k in report.missing)


def test_a_file_that_fits_nothing_is_an_error(tmp_path, yolox_pair):
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="none of its 1 weights fit"):
        load_weights(copy.deepcopy(yolox_pair[0]), tmp_path / "other.pth")


def test_missing_and_corrupt_files_name_the_path(tmp_path, yolox_pair):
    det = yolox_pair[1]
    with pytest.raises(MegatronError, match="nope.pt not found"):
        load_weights(det, tmp_path / "nope.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(MegatronError, match="corrupt.pt") as info:
        load_weights(det, bad)
    assert "corrupt" in str(info.value) or "not a readable" in str(info.value)
    truncated = tmp_path / "truncated.pt"
    save_detector_checkpoint(det, truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_weights(det, truncated)
    assert isinstance(LoadReport(path=bad, format="x"), LoadReport)
