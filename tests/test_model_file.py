"""Self-describing model files (megatron/training/model_file.py): what goes in, what comes back, clear errors."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_detector  # noqa: E402

from megatron.data.preprocess import Preprocessor, collate  # noqa: E402
from megatron.errors import ConfigError  # noqa: E402
from megatron.training.model_file import (  # noqa: E402
    MODEL_FORMAT,
    ModelFileError,
    load_model,
    preprocessing_settings,
    read_model_file,
    save_model,
)
from megatron.training.weights import save_detector_checkpoint  # noqa: E402

CLASSES = ["square", "disc"]


@pytest.fixture
def pm(make_plugin_manager):
    return make_plugin_manager(tiny_detector)


def tiny(seed: int = 0, width: int = 16, classes: int = 2) -> tiny_detector.TinyDetector:
    torch.manual_seed(seed)
    opts = tiny_detector.TinyDetectorOptions(width=width, score_threshold=0.01)
    return tiny_detector.TinyDetector(classes, 64, opts).eval()


def batch_of_blobs(pre: Preprocessor, n: int = 3, size: int = 80):
    samples = []
    for i in range(n):
        img, _, _ = tiny_detector.blob_image(i, 1, size, 2)
        img = img[:, : size - 10]  # not square, not the input size: the letterbox matters
        samples.append(pre(img, np.zeros((0, 4)), np.zeros(0), image_id=i))
    return collate(samples)


def assert_same_predictions(a, b):
    assert len(a) == len(b)
    for da, db in zip(a, b):
        assert da.image_id == db.image_id
        np.testing.assert_allclose(da.boxes, db.boxes, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(da.scores, db.scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(da.labels, db.labels)


def save(det, path, **overrides):
    pre = Preprocessor(64, clahe=True, pad_value=7)
    kwargs = dict(detector_name="tiny", detector_options=det.options.model_dump(), class_names=CLASSES,
                  input_size=64, preprocessing=preprocessing_settings(pre),
                  provenance={"learner": "proto", "run_dir": Path("runs/x"), "meta_epoch": 3,
                              "metrics": {"mAP50": np.float32(0.5)}, "seed": 0},
                  evaluation={"score_threshold": 0.4})
    kwargs.update(overrides)
    return save_model(det, path, **kwargs)


def test_a_model_file_loads_with_no_config_and_predicts_identically(pm, tmp_path):
    det = tiny(seed=1)
    path = save(det, tmp_path / "models" / "proto-best.pth")
    # plain torch.load with weights_only: nothing but tensors and plain values inside
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == MODEL_FORMAT and raw["class_names"] == CLASSES and raw["input_size"] == 64
    assert raw["provenance"]["run_dir"] == "runs/x" and raw["provenance"]["metrics"]["mAP50"] == 0.5
    assert raw["provenance"]["megatron_version"] and raw["detector"]["options"]["score_threshold"] == 0.01

    loaded, info = load_model(path, pm=pm)
    assert isinstance(loaded, tiny_detector.TinyDetector) and not loaded.training
    assert info.class_names == CLASSES and info.input_size == 64 and info.detector_name == "tiny"
    assert loaded.num_classes == 2 and loaded.options.width == 16 and loaded.options.score_threshold == 0.01
    assert info.score_threshold == 0.4 and info.provenance["learner"] == "proto" and not info.prototypes
    # the preprocessing travels: CLAHE and the padding value come back
    pre = info.preprocessor()
    assert pre.clahe and pre.pad_value == 7 and not pre.augment and pre.input_size == 64
    batch = batch_of_blobs(pre)
    before = det.predict(batch)
    assert sum(len(d.boxes) for d in before) > 0
    assert_same_predictions(before, loaded.predict(batch))
    # a fresh detector (different initial weights) predicts differently: the comparison above can fail
    other = tiny(seed=2)
    assert not np.allclose(np.concatenate([d.scores for d in before])[:5],
                           np.concatenate([d.scores for d in other.predict(batch)])[:5])


def test_the_preprocessing_of_a_16_bit_image_is_reproduced(pm, tmp_path):
    pre = Preprocessor(64, clahe=True, clahe_clip_limit=3.0, clahe_tiles=4, pad_value=9)
    det = tiny()
    path = save(det, tmp_path / "m.pth", preprocessing=pre)  # the Preprocessor itself will do
    _, info = load_model(path, pm=pm)
    img = (np.random.default_rng(0).random((70, 90)) * 4000).astype(np.uint16)
    again = info.preprocessor()
    assert (again.clahe_clip_limit, again.clahe_tiles, again.pad_value) == (3.0, 4, 9)
    empty = (np.zeros((0, 4)), np.zeros(0))
    assert torch.equal(pre(img, *empty).image, again(img, *empty).image)
    # and the default Preprocessor would have given another input
    assert not torch.equal(Preprocessor(64)(img, *empty).image, again(img, *empty).image)


def test_a_proto_adapted_tiny_model_keeps_its_prototypes(pm, tmp_path):
    det = tiny(seed=3)
    pre = Preprocessor(64)
    batch = batch_of_blobs(pre)
    learned = det.predict(batch)
    det.set_prototypes(torch.randn(2, det.dim, generator=torch.Generator().manual_seed(0)), temperature=7.0)
    proto = det.predict(batch)
    assert not all(np.array_equal(a.labels, b.labels) and np.allclose(a.scores, b.scores)
                   for a, b in zip(learned, proto))
    path = save(det, tmp_path / "proto.pth")
    loaded, info = load_model(path, pm=pm)
    assert info.prototypes
    assert_same_predictions(proto, loaded.predict(batch))


def test_a_proto_adapted_yolox_model_reloads_identically(tmp_path):
    """mmdet detectors swap their classifier for cosine modules (a scalar bias, no weight): the file must hold
    them, and load_model must rebuild them before loading the weights."""
    import megatron

    pm = megatron.get_plugin_manager(autoload=False)
    cls = pm.registers["detector"].get("yolox")
    torch.manual_seed(0)
    det = cls(2, 64, cls.Options(size="nano")).eval()
    dim = det.model.bbox_head.multi_level_conv_cls[0].in_channels
    det.set_prototypes(torch.randn(2, dim), temperature=5.0)
    with torch.no_grad():  # as if fine-tuned: not the initial bias any more
        for m in det.model.bbox_head.multi_level_conv_cls:
            m.bias.fill_(-1.0)
    pre = Preprocessor(64)
    batch = batch_of_blobs(pre, n=2)
    before = det.predict(batch)
    path = save_model(det, tmp_path / "yolox.pth", detector_name="yolox", detector_options={"size": "nano"},
                      class_names=CLASSES, input_size=64, preprocessing=preprocessing_settings(pre))
    loaded, info = load_model(path, pm=pm)
    assert info.prototypes and info.detector_options["size"] == "nano"
    protos, temperature = loaded.get_prototypes()
    assert temperature == 5.0 and protos.shape == (2, dim)
    assert float(loaded.model.bbox_head.multi_level_conv_cls[0].bias.detach()) == -1.0
    assert_same_predictions(before, loaded.predict(batch))


# --- what save_model refuses ------------------------------------------------------------------------
def test_save_model_refuses_arguments_that_contradict_the_detector(tmp_path):
    det = tiny()
    with pytest.raises(ValueError, match="3 class names"):
        save(det, tmp_path / "a.pth", class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="input_size=128"):
        save(det, tmp_path / "a.pth", input_size=128)
    with pytest.raises(ValueError, match="detector is 'tiny'"):
        save(det, tmp_path / "a.pth", detector_name="yolox")
    with pytest.raises(ValueError, match="differ from the detector's own options"):
        save(det, tmp_path / "a.pth", detector_options={"width": 8})
    with pytest.raises(ValueError, match="unknown preprocessing"):
        save(det, tmp_path / "a.pth", preprocessing={"clahe": True, "gamma": 2})
    with pytest.raises(TypeError, match="provenance.when"):
        save(det, tmp_path / "a.pth", provenance={"when": object()})
    assert not (tmp_path / "a.pth").exists()


# --- clear errors on load -----------------------------------------------------------------------------
def test_random_bytes_are_not_a_model_file(pm, tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(ModelFileError, match="not a megatron model file") as exc:
        load_model(path, pm=pm)
    assert str(path) in str(exc.value) and "models/<learner>-best.pth" in str(exc.value)


def test_an_mmdet_checkpoint_is_recognised_and_sent_to_run(pm, tmp_path):
    path = tmp_path / "epoch_12.pth"
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(2, 3, 1, 1)}, "meta": {"epoch": 12}}, path)
    with pytest.raises(ModelFileError, match="mmdet") as exc:
        load_model(path, pm=pm)
    assert "--checkpoint" in str(exc.value) and "megatron run" in str(exc.value)


def test_a_pretrain_checkpoint_and_a_plain_state_dict_are_recognised(pm, tmp_path):
    det = tiny()
    pre = save_detector_checkpoint(det, tmp_path / "pretrained.pth")
    with pytest.raises(ModelFileError, match="megatron pretrain"):
        load_model(pre, pm=pm)
    plain = tmp_path / "weights.pth"
    torch.save(det.state_dict(), plain)
    with pytest.raises(ModelFileError, match="plain state dict"):
        load_model(plain, pm=pm)
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "nope.pth", pm=pm)


def test_a_missing_detector_plugin_is_named(tmp_path, make_plugin_manager):
    path = save(tiny(), tmp_path / "m.pth")
    with pytest.raises(ModelFileError, match="'tiny' detector") as exc:
        load_model(path, pm=make_plugin_manager())  # built-ins only: no `tiny`
    assert "installed" in str(exc.value) and "yolox" in str(exc.value)


def test_weights_that_do_not_fit_are_reported(pm, tmp_path):
    path = save(tiny(), tmp_path / "m.pth")
    obj = torch.load(path, weights_only=True)
    obj["detector"]["options"]["width"] = 8  # the file's weights are for width 16
    torch.save(obj, path)
    with pytest.raises(ModelFileError, match="do not fit") as exc:
        load_model(path, pm=pm)
    assert "with another shape" in str(exc.value) and "backbone.0.weight" in str(exc.value)
    obj["detector"]["options"] = {"widht": 16}
    torch.save(obj, path)
    with pytest.raises(ConfigError, match="widht"):
        load_model(path, pm=pm)


def test_read_model_file_gives_the_header_without_building_anything(tmp_path):
    path = save(tiny(), tmp_path / "m.pth")
    info, state, protos = read_model_file(path)
    assert info.class_names == CLASSES and protos is None and "head.cls.weight" in state
    assert info.to_dict()["preprocessing"]["clahe"] is True
