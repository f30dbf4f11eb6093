"""The generic `mmdet` detector plugin: config lookup and bad configs, and every verified family (YOLOX, RTMDet, FCOS,
ATSS, RetinaNet, Faster R-CNN, Cascade R-CNN, Deformable DETR) through megatron's interface at 64 px, one step each:
loss, predict, parameter groups, classifier re-initialisation, MAML (second order where the family allows it), ANIL's
head-only inner loop, Reptile, and weights saved, reloaded and resumed to the same loss."""
from __future__ import annotations

import copy

import pytest
import torch

from learner_models import make_episode
from megatron.api.detector import CAPABILITY_SECOND_ORDER
from megatron.api.learner import LearnerContext
from megatron.errors import ConfigError
from megatron.training.weights import load_weights, save_detector_checkpoint
from megatron_plugins.detectors.mmdet import FAMILIES, VERIFIED_FAMILIES, MMDet
from megatron_plugins.detectors.mmdet import SMALL_CONFIGS as FAMILY_CONFIGS
from megatron_plugins.detectors.mmdet_configs import configs_by_family, resolve_config
from megatron_plugins.learners.anil import ANIL
from megatron_plugins.learners.maml import MAML
from megatron_plugins.learners.proto import Proto
from megatron_plugins.learners.reptile import Reptile
from test_detectors import make_batch

SIZE = 64
#: the families whose loss autograd can differentiate twice (the others: RoIAlign, deformable attention)
SECOND_ORDER_FAMILIES = {"yolox", "rtmdet", "fcos", "atss", "retinanet"}
#: families whose whole check takes well over 20 s on a shared CPU
SLOW = {"cascade_rcnn", "retinanet", "faster_rcnn", "fcos", "atss"}


@pytest.fixture(autouse=True)
def _single_torch_thread(_torch_threads):
    torch.set_num_threads(1)


def build(family: str, num_classes: int = 3) -> MMDet:
    config, cfg_options = FAMILY_CONFIGS[family]
    torch.manual_seed(0)
    return MMDet(num_classes, SIZE, MMDet.Options(config=config, cfg_options=cfg_options))


def episode():
    return make_episode("t", make_batch(2, SIZE, seed=0), make_batch(2, SIZE, seed=1), categories=("a", "b", "c"))


def ctx() -> LearnerContext:
    return LearnerContext(inner_steps=1, inner_lr=0.001, outer_lr=1e-4)


# --- config lookup and bad input -----------------------------------------------------------------------
def test_every_verified_family_has_a_test_config():
    assert set(VERIFIED_FAMILIES) == set(FAMILY_CONFIGS)
    families = configs_by_family()
    assert all(name in families for name in VERIFIED_FAMILIES)


def test_an_unknown_config_name_lists_the_closest_packaged_names():
    with pytest.raises(ConfigError, match=r"rtmdet/rtmdet_tiny_8xb32-300e_coco\.py") as info:
        resolve_config("rtmdet/rtmdet_tiny_8xb32-300e_cocoo.py")
    assert "megatron detectors --configs" in str(info.value)


def test_a_config_mmdet_cannot_build_gives_mmdets_message_and_the_file(tmp_path):
    own = tmp_path / "mine.py"
    own.write_text(f"_base_ = ['{resolve_config(FAMILY_CONFIGS['yolox'][0])}']\nmodel = dict(type='NoSuchDetector')\n")
    with pytest.raises(ConfigError, match=r"NoSuchDetector.*not in the") as info:
        MMDet(2, SIZE, MMDet.Options(config=str(own)))
    assert str(own) in str(info.value)


def test_a_users_own_config_inherits_from_a_packaged_one_and_urls_are_stripped(tmp_path, caplog):
    own = tmp_path / "my_atss.py"
    own.write_text(f"_base_ = ['{resolve_config(FAMILY_CONFIGS['atss'][0])}']\n"
                   "model = dict(backbone=dict(init_cfg=dict(type='Pretrained', checkpoint='https://x/r18.pth')))\n")
    with caplog.at_level("INFO"):
        det = MMDet(2, SIZE, MMDet.Options(config=str(own)))
    assert det.family.name == "atss"
    assert "https://x/r18.pth" in caplog.text and "removed" in caplog.text


# --- every verified family ----------------------------------------------------------------------------
def _params(family):
    return [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in FAMILY_CONFIGS]


@pytest.mark.parametrize("family", _params(FAMILY_CONFIGS))
def test_family_trains_predicts_and_resizes_through_the_interface(family):
    det = build(family).train()
    assert det.family.name == family
    batch = make_batch(2, SIZE)
    out = det.loss(batch)
    assert torch.isfinite(out["loss"])
    dets = det.predict(batch)
    assert len(dets) == 2 and all((d.labels < 3).all() for d in dets)
    groups = det.parameter_groups()
    names = {n for n, _ in det.named_parameters()}
    main = [set(groups[g]) for g in ("backbone", "neck", "head")]
    assert set.union(*main) == names and sum(map(len, main)) == len(names)
    assert all(main) and groups["head_cls"] and set(groups["head_cls"]) <= set(groups["head"])
    before = {k: v.clone() for k, v in det.state_dict().items()}
    det.set_num_classes(5)
    after = det.state_dict()
    for k, v in before.items():
        if k not in groups["head_cls"] and after[k].shape == v.shape:
            assert torch.equal(after[k], v), f"{k} changed"
    assert any(after[k].shape != before[k].shape for k in groups["head_cls"])
    batch.labels = [torch.full_like(lab, 4) for lab in batch.labels]
    assert torch.isfinite(det.loss(batch)["loss"])


@pytest.mark.parametrize("family", _params(FAMILY_CONFIGS))
def test_family_meta_learns_with_maml_anil_and_reptile(family):
    det = build(family).train()
    second_order = CAPABILITY_SECOND_ORDER not in MMDet.unsupported(det.options)
    assert second_order == (family in SECOND_ORDER_FAMILIES)
    start = {k: v.clone() for k, v in det.state_dict().items()}
    for cls, options in ((MAML, MAML.Options(first_order=not second_order)),
                         (ANIL, ANIL.Options(first_order=not second_order)), (Reptile, Reptile.Options())):
        stats = cls(det, options, ctx()).meta_step([episode()])
        assert torch.isfinite(torch.tensor(stats["loss"])), cls.PLUGIN_NAME
    assert any(not torch.equal(v, start[k]) for k, v in det.state_dict().items()), "the meta-steps moved the weights"


@pytest.mark.parametrize("family", _params(FAMILY_CONFIGS))
def test_family_weights_save_reload_and_resume_to_the_same_loss(family, tmp_path):
    det = build(family).train()
    learner = MAML(det, MAML.Options(first_order=True), ctx())
    learner.meta_step([episode()])
    path = save_detector_checkpoint(det, tmp_path / "w.pth", {"kind": "test"})
    state = copy.deepcopy(learner.state_dict())
    again = build(family)
    report = load_weights(again, path)
    assert report.complete
    resumed = MAML(again, MAML.Options(first_order=True), ctx())
    resumed.load_state_dict(state)
    for a, b in zip(det.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    again.train()  # a DETR-style loss exists in train mode only; both update their BatchNorm statistics alike
    torch.manual_seed(5)
    one = det.loss(make_batch(2, SIZE))["loss"]
    torch.manual_seed(5)
    two = again.loss(make_batch(2, SIZE))["loss"]
    torch.testing.assert_close(one, two)
    torch.manual_seed(6)
    next_a = learner.meta_step([episode()])["loss"]
    torch.manual_seed(6)
    next_b = resumed.meta_step([episode()])["loss"]
    assert next_a == pytest.approx(next_b, rel=1e-5)


def test_the_family_table_names_every_family_once():
    names = [f.name for f in FAMILIES]
    assert len(names) == len(set(names))


def test_modules_shared_between_levels_get_their_parameters_back_after_a_functional_loss():
    det = build("rtmdet").train()  # RTMDet's head shares its convs across the FPN levels
    shared = det.model.bbox_head.cls_convs[1][0].conv
    assert shared is det.model.bbox_head.cls_convs[0][0].conv
    adapted = {n: p - 0.01 for n, p in det.named_parameters()}
    det.loss(make_batch(2, SIZE), params=adapted)
    assert all(p.is_leaf for p in det.parameters())
    assert isinstance(shared.weight, torch.nn.Parameter)


def test_second_order_learners_are_refused_for_deformable_attention_with_the_learners_that_work(make_plugin_manager):
    from megatron.config import ExperimentConfig
    from megatron.experiment import check_learners_fit_detector

    config, cfg_options = FAMILY_CONFIGS["deformable_detr"]
    cfg = ExperimentConfig.model_validate({"detector": {"name": "mmdet", "options": {"config": config,
                                                                                     "cfg_options": cfg_options}},
                                           "learner": {"name": "maml"}})
    pm = make_plugin_manager()
    with pytest.raises(ConfigError, match=r"(?s)learner 'maml' cannot train.*once-differentiable.*reptile.*"
                                          r"maml \(first_order: true\)"):
        check_learners_fit_detector(cfg, pm, ["maml"])
    check_learners_fit_detector(cfg, pm, ["reptile", "finetune"])
    first_order = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"options": {"first_order": True}})})
    check_learners_fit_detector(first_order, pm, ["maml"])


def test_embedding_similarity_takes_a_detector_backbone_and_says_which_weights_it_used(tmp_path, caplog):
    import torchvision

    from megatron_plugins.similarity.embedding import EmbeddingSimilarity

    torch.manual_seed(1)
    trunk = torchvision.models.resnet34(weights=None).state_dict()
    path = tmp_path / "zoo.pth"  # an mmdet model-zoo layout: state_dict with backbone.*, neck.*, bbox_head.*
    torch.save({"state_dict": {**{f"backbone.{k}": v for k, v in trunk.items() if not k.startswith("fc.")},
                               "neck.conv.weight": torch.zeros(1)}, "meta": {"epoch": 12}}, path)
    metric = EmbeddingSimilarity(EmbeddingSimilarity.Options(extractor="resnet18", weights=path, input_size=32))
    described = metric.describe()
    assert "ResNet-34" in described and str(path) in described and "detector backbone" in described
    loaded = metric._get_extractor().net.state_dict()
    assert torch.equal(loaded["layer4.2.conv2.weight"], trunk["layer4.2.conv2.weight"])
    with caplog.at_level("WARNING"):
        random = EmbeddingSimilarity(EmbeddingSimilarity.Options(extractor="resnet18", input_size=32)).describe()
    assert "RANDOM" in random and "RANDOM" in caplog.text


def test_megatron_detectors_lists_packaged_configs_by_family_marking_verified_ones(capsys):
    import json

    from megatron.cli import main

    assert main(["detectors", "--configs", "--family", "rtmdet", "--family", "gfl", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["rtmdet"]["verified"] and not listed["gfl"]["verified"]
    assert "rtmdet/rtmdet_tiny_8xb32-300e_coco.py" in listed["rtmdet"]["configs"]


def test_rtmdet_box_features_feed_prototypes_through_its_per_level_classifiers():
    det = build("rtmdet").eval()
    batch = make_batch(2, SIZE)
    with torch.no_grad():
        feats, labels = det.box_features(batch)
    assert feats.shape == (4, det.model.bbox_head.feat_channels) and labels.tolist() == [0, 1, 2, 1]
    det.set_prototypes(torch.stack([feats[labels == c].mean(0) for c in range(3)]))
    assert all(type(m).__name__ == "CosineClassifier" for m in det.model.bbox_head.rtm_cls)
    det.train()
    assert torch.isfinite(det.loss(batch)["loss"])
    det.set_prototypes(None)
    assert all(isinstance(m, torch.nn.Conv2d) for m in det.model.bbox_head.rtm_cls)
    stats = Proto(det, Proto.Options(), ctx()).meta_step([episode()])  # the prototype learner end to end
    assert torch.isfinite(torch.tensor(stats["loss"]))


def test_a_family_megatron_does_not_know_finds_its_classifier_by_comparing_builds(caplog):
    options = MMDet.Options(config="foveabox/fovea_r50_fpn_4xb4-1x_coco.py",
                            cfg_options={"model.backbone.depth": 18, "model.neck.in_channels": [64, 128, 256, 512]})
    with caplog.at_level("WARNING"):
        det = MMDet(3, SIZE, options)
    assert det.family is None and "not a family megatron has verified" in caplog.text
    assert det.parameter_groups()["head_cls"] == ["model.bbox_head.conv_cls.weight", "model.bbox_head.conv_cls.bias"]
    assert set(MMDet.unsupported(options)) == {"prototypes"}
    det.set_num_classes(5)
    assert det.model.bbox_head.conv_cls.out_channels == 5
    assert torch.isfinite(det.train().loss(make_batch(2, SIZE))["loss"])
