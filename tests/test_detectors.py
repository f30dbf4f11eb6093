"""The mmdet detector plugins through megatron's Detector interface (YOLOX-tiny at 128 px keeps these fast)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from megatron.types import Batch, Detections, ImageRecord, Task, to_original_coords
from megatron_plugins.detectors.faster_rcnn import FasterRCNN
from megatron_plugins.detectors.mmdet_adapter import MMDetDetector, SigmoidDenseHeadMixin
from megatron_plugins.detectors.retinanet import RetinaNet
from megatron_plugins.detectors.yolox import YOLOX

SIZE = 128


@pytest.fixture(autouse=True)
def _single_torch_thread(_torch_threads):
    """mmdet models on small inputs: one intra-op thread is faster, and far faster on a loaded machine."""
    torch.set_num_threads(1)



def make_batch(n_images: int = 2, size: int = SIZE, seed: int = 0) -> Batch:
    """Random images with one bright square per box (boxes of different sizes and classes)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n_images, 3, size, size, generator=g) * 60
    all_boxes = [
        torch.tensor([[10.0, 12.0, 50.0, 60.0], [70.0, 20.0, 120.0, 90.0]]),
        torch.tensor([[20.0, 30.0, 90.0, 100.0], [5.0, 90.0, 30.0, 120.0]]),
        torch.tensor([[40.0, 40.0, 100.0, 110.0]]),
    ]
    all_labels = [torch.tensor([0, 1]), torch.tensor([2, 1]), torch.tensor([0])]
    boxes, labels = [], []
    for i in range(n_images):
        b = all_boxes[i % 3] * size / 128
        for (x1, y1, x2, y2), lab in zip(b.long().tolist(), all_labels[i % 3].tolist()):
            images[i, :, y1:y2, x1:x2] = 120 + 60 * lab + torch.rand(3, y2 - y1, x2 - x1, generator=g) * 20
        boxes.append(b)
        labels.append(all_labels[i % 3].clone())
    meta = [dict(image_id=i, orig_size=(size * 2, size * 2), scale=0.5, pad=(0, 0)) for i in range(n_images)]
    return Batch(images=images, boxes=boxes, labels=labels, meta=meta)


@pytest.fixture(scope="module")
def yolox_base() -> YOLOX:
    torch.manual_seed(0)
    return YOLOX(3, SIZE)


@pytest.fixture
def yolox(yolox_base) -> YOLOX:
    return copy.deepcopy(yolox_base)


@pytest.fixture(scope="module")
def frcnn_base() -> FasterRCNN:
    torch.manual_seed(0)
    return FasterRCNN(3, SIZE, FasterRCNN.Options(depth=18, rois_per_image=128))


def test_builtin_detectors_are_registered(make_plugin_manager):
    reg = make_plugin_manager().register_of("detector")
    assert {"yolox", "faster-rcnn", "retinanet"} <= set(reg.names())
    assert reg.get("yolox") is YOLOX


def test_options_are_validated():
    with pytest.raises(Exception, match="size"):
        YOLOX.Options(size="huge")
    with pytest.raises(Exception, match="extra|forbid|permitted"):
        FasterRCNN.Options(dept=18)


def test_input_size_must_be_a_multiple_of_32():
    from megatron.errors import ConfigError

    with pytest.raises(ConfigError, match="multiple of 32"):
        YOLOX(2, 100)


def test_no_pretrained_entries_reach_the_model_config():
    from megatron_plugins.detectors.mmdet_adapter import strip_pretrained

    cfg = dict(backbone=dict(type="ResNet", init_cfg=dict(type="Pretrained", checkpoint="torchvision://resnet50")),
               neck=dict(init_cfg=[dict(type="Xavier")]), load_from="http://x", pretrained="y")
    out = strip_pretrained(cfg)
    assert "init_cfg" not in out["backbone"] and "load_from" not in out and "pretrained" not in out
    assert out["neck"]["init_cfg"] == [dict(type="Xavier")]  # non-download initialisers are kept


def test_normalisation_is_applied_inside_the_detector(yolox):
    # YOLOX: mean 0, std 1, BGR input (bgr_to_rgb False in its config); the batch is RGB in [0, 255]
    images = torch.zeros(1, 3, 4, 4)
    images[:, 0] = 255.0  # red
    out = yolox.normalise(images)
    assert yolox.channel_order == "bgr"
    assert torch.all(out[:, 2] == 255.0) and torch.all(out[:, 0] == 0.0)
    assert getattr(yolox.model.data_preprocessor, "batch_augments", None) is None


def test_resnet_detectors_normalise_with_imagenet_statistics(frcnn_base):
    out = frcnn_base.normalise(torch.full((1, 3, 2, 2), 123.675))
    assert frcnn_base.channel_order == "rgb"
    assert out[0, 0].abs().max() < 1e-4  # (x - mean) / std with the ImageNet mean of the red channel


def test_loss_dict_has_a_total_and_its_parts(yolox):
    yolox.train()
    out = yolox.loss(make_batch())
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    parts = [v for k, v in out.items() if k != "loss" and "loss" in k]
    assert parts and torch.allclose(out["loss"], sum(parts))


def test_functional_loss_equals_module_loss(yolox):
    yolox.train()
    batch = make_batch()
    torch.manual_seed(1)
    plain = yolox.loss(batch)["loss"]
    torch.manual_seed(1)
    functional = yolox.loss(batch, params=dict(yolox.named_parameters()))["loss"]
    assert torch.allclose(plain, functional, rtol=1e-5, atol=1e-6)
    # different weights really change the loss (the params are used, not the module's own tensors)
    shifted = {n: p + 0.05 for n, p in yolox.named_parameters() if n.startswith("model.bbox_head.")}
    assert not torch.allclose(yolox.loss(batch, params=shifted)["loss"], plain)


def test_functional_loss_equals_module_loss_two_stage(frcnn_base):
    det = copy.deepcopy(frcnn_base).train()
    batch = make_batch()
    torch.manual_seed(3)  # the RoI sampler draws random proposals
    plain = det.loss(batch)["loss"]
    torch.manual_seed(3)
    functional = det.loss(batch, params=dict(det.named_parameters()))["loss"]
    assert torch.allclose(plain, functional, rtol=1e-5, atol=1e-6)


def test_functional_loss_leaves_batchnorm_running_stats_alone(yolox):
    yolox.train()
    bn = yolox.model.backbone.stem.conv.bn
    before = bn.running_mean.clone()
    yolox.loss(make_batch(), params=dict(yolox.named_parameters()))
    assert torch.equal(bn.running_mean, before)
    yolox.loss(make_batch())  # the plain (outer-step) path does update them
    assert not torch.equal(bn.running_mean, before)


@pytest.mark.parametrize("which", ["yolox", "faster-rcnn"])
def test_head_loss_on_body_features_equals_the_loss(which, yolox, frcnn_base):
    det = (yolox if which == "yolox" else copy.deepcopy(frcnn_base)).train()
    batch = make_batch()
    assert det.supports_head_loss()
    head = {n: p for n, p in det.named_parameters() if n in det.parameter_groups()["head"]}
    shifted = {n: p + 0.01 * torch.randn_like(p) for n, p in head.items()}  # the head's params are used
    buffers = {n: b.clone() for n, b in det.named_buffers()}
    torch.manual_seed(3)  # Faster R-CNN's RoI sampler draws random proposals
    whole = det.loss(batch, params=shifted)
    torch.manual_seed(3)
    features = det.body_features(batch, params={})
    split = det.head_loss(features, batch, params=shifted)
    assert set(split) == set(whole)
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(det.head_loss(features, batch, params=head)["loss"], split["loss"])
    # the functional path of both halves leaves the running statistics alone, as loss(batch, params) does
    assert all(torch.equal(b, buffers[n]) for n, b in det.named_buffers())
    # gradients reach the body through the features and the head through its params
    g_body, g_head = torch.autograd.grad(split["loss"], [dict(det.named_parameters())[det.parameter_groups()["backbone"][0]],
                                                         next(iter(shifted.values()))])
    assert g_body.abs().sum() > 0 and g_head.abs().sum() > 0
    assert "extract_feat" not in det.model.__dict__  # the stand-in for extract_feat is gone again


def test_a_detector_without_a_head_loss_says_so():
    from learner_models import QuadraticDetector

    assert not QuadraticDetector().supports_head_loss()


def test_second_order_gradients_flow_to_params(yolox):
    yolox.train()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in yolox.named_parameters()}
    loss = yolox.loss(make_batch(), params=params)["loss"]
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True, allow_unused=True)
    assert all(g is not None for g in grads), "every parameter takes part in the loss"
    # one inner SGD step, then a loss of the adapted weights: the MAML outer gradient
    head = [n for n in names if n.startswith("model.bbox_head.")]
    g_of = dict(zip(names, grads))
    grad_norm = sum((g_of[n] ** 2).sum() for n in head)
    second = torch.autograd.grad(grad_norm, params["model.backbone.stem.conv.conv.weight"])[0]
    assert second.abs().sum() > 0


def test_predict_returns_detections_in_original_coordinates(yolox):
    batch = make_batch()
    batch.meta = [dict(image_id=7 + i, orig_size=(100, 200), scale=0.5, pad=(0, 39)) for i in range(2)]
    yolox.train()
    dets = yolox.predict(batch)
    assert yolox.training, "predict restores the train mode"
    assert len(dets) == 2 and all(isinstance(d, Detections) for d in dets)
    assert [d.image_id for d in dets] == [7, 8]
    with torch.no_grad():
        yolox.eval()
        raw = yolox.model.predict(yolox.normalise(batch.images), yolox.data_samples(batch), rescale=False)
    for d, r in zip(dets, raw):
        assert len(d.boxes) <= 100 and d.boxes.dtype == np.float32 and d.labels.dtype == np.int64
        np.testing.assert_allclose(d.boxes, to_original_coords(r.pred_instances.bboxes, batch.meta[0]), atol=1e-4)
        if len(d.boxes):
            assert d.boxes[:, [0, 2]].max() <= 200 and d.boxes[:, [1, 3]].max() <= 100
            assert d.scores.min() >= 0.001


def test_parameter_groups_partition_the_parameters(yolox, frcnn_base):
    for det in (yolox, frcnn_base):
        groups = det.parameter_groups()
        names = {n for n, _ in det.named_parameters()}
        main = [set(groups[g]) for g in ("backbone", "neck", "head")]
        assert set.union(*main) == names
        assert sum(map(len, main)) == len(names), "groups are disjoint"
        assert groups["head_cls"] and set(groups["head_cls"]) <= set(groups["head"])
    assert set(yolox.parameter_groups()["head_cls"]) == {
        f"model.bbox_head.multi_level_conv_cls.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    assert set(frcnn_base.parameter_groups()["head_cls"]) == {
        f"model.roi_head.bbox_head.{m}.{p}" for m in ("fc_cls", "fc_reg") for p in ("weight", "bias")}


def test_freeze_backbone_keeps_weights_and_batchnorm_stats(yolox):
    yolox.freeze("backbone")
    yolox.train()
    backbone = {k: v.clone() for k, v in yolox.model.backbone.state_dict().items()}
    neck_bn = yolox.model.neck.out_convs[0].bn.running_mean.clone()
    head = {k: v.clone() for k, v in yolox.model.bbox_head.state_dict().items()}
    opt = torch.optim.SGD(yolox.trainable_parameters().values(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        yolox.loss(make_batch())["loss"].backward()
        opt.step()
    for k, v in yolox.model.backbone.state_dict().items():
        assert torch.equal(v, backbone[k]), k  # weights AND running statistics
    assert not torch.equal(yolox.model.neck.out_convs[0].bn.running_mean, neck_bn)
    assert any(not torch.equal(v, head[k]) for k, v in yolox.model.bbox_head.state_dict().items())


@pytest.mark.parametrize("which", ["yolox", "faster-rcnn"])
def test_set_num_classes_reinitialises_only_the_classifier(which, yolox, frcnn_base):
    det = yolox if which == "yolox" else copy.deepcopy(frcnn_base)
    cls_names = set(det.parameter_groups()["head_cls"])
    before = {k: v.clone() for k, v in det.state_dict().items()}
    det.set_num_classes(5)
    after = det.state_dict()
    assert det.num_classes == 5
    for k, v in before.items():
        if k in cls_names:
            assert after[k].shape != v.shape or not torch.equal(after[k], v), k
        else:
            assert torch.equal(after[k], v), f"{k} changed"
    assert set(det.parameter_groups()["head_cls"]) == cls_names
    batch = make_batch()
    batch.labels = [torch.full_like(lab, 4) for lab in batch.labels]  # label 4 only exists with 5 classes
    det.train()
    torch.manual_seed(0)
    assert torch.isfinite(det.loss(batch)["loss"])
    dets = det.predict(batch)
    assert all((d.labels < 5).all() for d in dets)


def test_features_are_one_embedding_per_image(yolox):
    yolox.train()
    bn = yolox.model.backbone.stem.conv.bn
    before = bn.running_mean.clone()
    f = yolox.features(make_batch(3))
    assert f.shape == (3, 3 * 96)
    assert torch.equal(bn.running_mean, before), "features() runs in eval mode"
    assert not torch.allclose(f[0], f[1])


def _class_of_each_gt_box_yolox(det: YOLOX, batch: Batch) -> torch.Tensor:
    """Class predicted by the (swapped) classifier at each GT box centre, through the real head forward."""
    inputs = det.normalise(batch.images)
    feats = det.model.extract_feat(inputs)
    cls_scores, _, _ = det.model.bbox_head(feats)
    rois = det.gt_rois(det.data_samples(batch), inputs.device)
    logits = det.sample_at_centres(list(cls_scores), [8, 16, 32], rois)
    return logits.argmax(dim=1)


def test_prototypes_classify_the_boxes_they_came_from_yolox(yolox):
    yolox.eval()
    batch = make_batch(3)
    with torch.no_grad():
        feats, labels = yolox.box_features(batch)
    assert feats.shape == (5, 96) and labels.tolist() == [0, 1, 2, 1, 0]
    # prototypes equal to the features of one box per class (the first of each): those boxes are classified right
    first = [int((labels == c).nonzero()[0]) for c in range(3)]
    protos = feats[first]
    original = copy.deepcopy(yolox.model.bbox_head.multi_level_conv_cls)
    yolox.set_prototypes(protos, temperature=10.0)
    with torch.no_grad():
        predicted = _class_of_each_gt_box_yolox(yolox, batch)
        dets = yolox.predict(batch)
    assert predicted[first].tolist() == [0, 1, 2]
    assert all(len(d.boxes) > 0 for d in dets)
    yolox.set_prototypes(None)
    for a, b in zip(yolox.model.bbox_head.multi_level_conv_cls, original):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_box_features_take_params_and_carry_gradients(yolox):
    yolox.train()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in yolox.named_parameters()}
    feats, _ = yolox.box_features(make_batch(), params=params)
    g = torch.autograd.grad(feats.sum(), params["model.bbox_head.multi_level_cls_convs.0.0.conv.weight"],
                            allow_unused=True)[0]
    assert g is not None and g.abs().sum() > 0


def test_prototypes_classify_the_boxes_they_came_from_faster_rcnn(frcnn_base):
    det = copy.deepcopy(frcnn_base).eval()
    batch = make_batch(3)
    with torch.no_grad():
        feats, labels = det.box_features(batch)
    assert feats.shape == (5, 1024)
    first = [int((labels == c).nonzero()[0]) for c in range(3)]
    det.set_prototypes(feats[first])
    with torch.no_grad():
        inputs = det.normalise(batch.images)
        x = det.model.extract_feat(inputs)
        rois = det.gt_rois(det.data_samples(batch), inputs.device)
        cls_score = det.model.roi_head._bbox_forward(x, rois)["cls_score"]
    assert cls_score.shape == (5, 4)  # 3 classes + background (last)
    assert cls_score[first, :3].argmax(1).tolist() == [0, 1, 2]
    # cosine 1 with its own prototype: foreground logit 10 > the background logit 10 * 0.5
    assert (cls_score[first, [0, 1, 2]] > cls_score[first, 3]).all()
    det.set_prototypes(None)
    assert isinstance(det.model.roi_head.bbox_head.fc_cls, torch.nn.Linear)


def test_prototypes_must_match_the_number_of_classes(yolox):
    with pytest.raises(ValueError, match="num_classes=3"):
        yolox.set_prototypes(torch.zeros(2, 96))


def test_retinanet_builds_trains_and_predicts():
    torch.manual_seed(0)
    det = RetinaNet(3, SIZE, RetinaNet.Options(depth=18))
    det.train()
    batch = make_batch()
    out = det.loss(batch, params=dict(det.named_parameters()))
    assert torch.isfinite(out["loss"])
    feats, labels = det.box_features(batch)
    assert feats.shape == (4, 256)
    det.set_prototypes(torch.stack([feats[labels == c].mean(0) for c in range(3)]))
    assert det.model.bbox_head.retina_cls(torch.randn(1, 256, 4, 4)).shape == (1, 9 * 3, 4, 4)
    det.set_prototypes(None)
    det.set_num_classes(2)
    assert det.model.bbox_head.retina_cls.out_channels == 9 * 2


# --- a third-party detector through the same adapter ---------------------------------------------------
class FCOS(SigmoidDenseHeadMixin, MMDetDetector):
    PLUGIN_NAME = "fcos"
    CONFIG = "fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py"
    CLASSIFIER = "bbox_head.conv_cls"

    def configure(self, model_cfg: dict) -> dict:
        model_cfg["backbone"].update(depth=18, frozen_stages=-1)  # a light backbone for the test
        model_cfg["neck"]["in_channels"] = [64, 128, 256, 512]
        return super().configure(model_cfg)


class FCOSPlugin:
    from megatron import hookimpl

    @hookimpl
    def megatron_register_detectors(self):
        return [FCOS]


def test_third_party_mmdet_detector_by_subclassing(make_plugin_manager):
    pm = make_plugin_manager(FCOSPlugin())
    cls = pm.register_of("detector").get("fcos")
    assert cls is FCOS
    torch.manual_seed(0)
    det = cls(2, SIZE, cls.Options())
    det.train()
    batch = make_batch()
    batch.labels = [lab.clamp(max=1) for lab in batch.labels]
    assert torch.isfinite(det.loss(batch)["loss"])
    assert det.parameter_groups()["head_cls"] == ["model.bbox_head.conv_cls.weight", "model.bbox_head.conv_cls.bias"]
    feats, labels = det.box_features(batch)
    assert feats.shape[0] == 4
    det.set_num_classes(4)
    assert det.model.bbox_head.conv_cls.out_channels == 4
    assert len(det.predict(batch)) == 2


# --- evidence that the detectors learn (slow) ------------------------------------------------------------
def blob_task(n_images: int = 16, size: int = 160, seed: int = 0) -> Task:
    """Grey images with 1-3 bright discs (class 0) or squares (class 1) of random size and position."""
    rng = np.random.default_rng(seed)
    records, shapes = [], {}
    for i in range(n_images):
        boxes, labels, spec = [], [], []
        for _ in range(int(rng.integers(1, 4))):
            s = int(rng.integers(18, 48))
            x, y = int(rng.integers(0, size - s)), int(rng.integers(0, size - s))
            if any(not (x + s <= b[0] or b[2] <= x or y + s <= b[1] or b[3] <= y) for b in boxes):
                continue
            c = int(rng.integers(0, 2))
            boxes.append([x, y, x + s, y + s])
            labels.append(c)
            spec.append((x, y, s, c))
        shapes[i] = spec
        records.append(ImageRecord(image_id=i, path=None, width=size, height=size, boxes=np.array(boxes, np.float32),
                                   labels=np.array(labels), file_name=f"blob{i}.png"))

    def load(record: ImageRecord) -> np.ndarray:
        g = np.random.default_rng(1000 + record.image_id)
        img = (40 + g.normal(0, 8, (size, size))).clip(0, 255)
        yy, xx = np.mgrid[:size, :size]
        for x, y, s, c in shapes[record.image_id]:
            if c == 0:
                r = s / 2
                img[(xx - x - r + 0.5) ** 2 + (yy - y - r + 0.5) ** 2 <= r * r] = 220
            else:
                img[y:y + s, x:x + s] = 160
        return img.astype(np.uint8)

    return Task(name="blobs", categories=["disc", "square"], records=records, image_loader=load)


def _train_and_evaluate(det, task: Task, steps: int, lr: float) -> tuple[float, float, float, float]:
    from megatron.data.episodes import iterate_batches, load_batch
    from megatron.data.preprocess import Preprocessor
    from megatron.evaluation.coco import evaluate

    pre = Preprocessor(det.input_size)
    batch_all = load_batch(task, list(range(len(task))), pre)

    def map50() -> float:
        return evaluate(det.predict(batch_all), task.records, task.categories)["mAP50"]

    start_map = map50()
    opt = torch.optim.AdamW(det.parameters(), lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    losses = []
    det.train()
    while len(losses) < steps:
        for batch in iterate_batches(task, 8, pre, rng, shuffle=True):
            opt.zero_grad()
            loss = det.loss(batch)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(det.parameters(), 10.0)
            opt.step()
            losses.append(float(loss))
            if len(losses) >= steps:
                break
    end_map = map50()
    print(f"{det.PLUGIN_NAME}: mAP50 {start_map:.3f} -> {end_map:.3f}; loss {np.mean(losses[:5]):.3f} -> "
          f"{np.mean(losses[-5:]):.3f} over {len(losses)} steps")
    return start_map, end_map, float(np.mean(losses[:5])), float(np.mean(losses[-5:]))


@pytest.mark.slow
def test_yolox_tiny_learns_to_detect_blobs():
    torch.manual_seed(0)
    det = YOLOX(2, SIZE)
    start_map, end_map, first_loss, last_loss = _train_and_evaluate(det, blob_task(), steps=160, lr=2e-3)
    assert last_loss < 0.5 * first_loss
    assert end_map > max(0.5, start_map + 0.4), (start_map, end_map)


@pytest.mark.slow
def test_faster_rcnn_learns_to_detect_blobs():
    torch.manual_seed(0)
    det = FasterRCNN(2, SIZE, FasterRCNN.Options(depth=18, rois_per_image=128))
    start_map, end_map, first_loss, last_loss = _train_and_evaluate(det, blob_task(), steps=80, lr=1e-3)
    assert last_loss < 0.7 * first_loss
    assert end_map > max(0.4, start_map + 0.3), (start_map, end_map)
