"""``mmdet``: any MMDetection model, named by its config.

``detector: {name: mmdet, options: {config: rtmdet/rtmdet_tiny_8xb32-300e_coco.py, cfg_options: {...}}}`` where
``config`` is a config inside the installed mmdet package (``mmdet/.mim/configs/...``) or a path to your own
config file (``_base_`` inheritance resolved), and ``cfg_options`` are dotted overrides merged into it as mmdet's
``--cfg-options`` does (e.g. ``{"model.backbone.depth": 18, "model.neck.in_channels": [64, 128, 256, 512]}``).

megatron then sets, as for the built-in ``yolox``/``faster-rcnn``/``retinanet`` presets: every ``num_classes`` of the
model config (the task's classes), the test-time settings (score threshold 0.001 and at most 100 boxes per image, so
mAP sees the full ranking), the BatchNorm policy (every backbone stage trainable — megatron's ``detector.freeze``
decides what is frozen —, ``norm_eval`` from the options) and removes every pretrained-weight URL (nothing is
downloaded; start from the model zoo's weights with ``detector.checkpoint``).

What each family supports is in :data:`FAMILIES` (the plugin page's table): the classifier that
``set_num_classes`` re-initialises, whether ``box_features``/prototypes exist, and whether the loss can be
differentiated twice (MAML/ANIL second order). A family not in the table still builds and trains (``finetune``,
``reptile``, first-order learners); its classifier is found by building the model once more with another number of
classes and comparing shapes.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import ConfigDict, Field
from torch import nn

from megatron import hookimpl
from megatron.api.detector import CAPABILITY_PROTOTYPES, CAPABILITY_SECOND_ORDER, DetectorOptions
from megatron_plugins.detectors.mmdet_adapter import (
    PREDICT_MAX_PER_IMAGE,
    PREDICT_SCORE_THRESHOLD,
    MMDetDetector,
    _set_submodule,
    quiet_mmengine,
    roi_box_features,
)
from megatron_plugins.detectors.mmdet_configs import model_type, read_config, resolve_config

log = logging.getLogger(__name__)

#: why the deformable-attention transformers cannot be differentiated twice
DEFORMABLE_ATTENTION_NO_SECOND_ORDER = (
    "its multi-scale deformable attention runs on a GPU through mmcv's CUDA kernel, a once-differentiable autograd "
    "function, so a second-order meta-gradient fails there mid-run (mmcv's CPU fallback can be differentiated twice, "
    "but a configuration must not work on CPU and break on a GPU)")
#: why the two-stage (RoI) detectors cannot be differentiated twice
ROI_ALIGN_NO_SECOND_ORDER = (
    "its RoIAlign (mmcv.ops, CPU and CUDA) is a once-differentiable autograd function, so a second-order "
    "meta-gradient through the features it pools fails (\"trying to differentiate twice a function that was "
    "marked with @once_differentiable\")")
DETR_NEEDS_NO_BOX_FEATURES = "a DETR-style head classifies decoder queries, not boxes, so there are no box features"


@dataclass(frozen=True)
class Family:
    """What megatron knows about one mmdet detector family (``model.type`` in the config)."""

    name: str  #: mmdet's config folder of the family
    model_types: tuple[str, ...]
    classifier: tuple[str, ...]  #: module-name patterns (fnmatch, relative to the mmdet model) of the classifier(s)
    classifier_extra: tuple[str, ...] = ()  #: further class-sized modules (re-initialised, not swapped for prototypes)
    softmax: bool = False  #: classes scored with a softmax over C + 1 (background last)
    box_features: str | None = None  #: "dense" | "rtmdet" | "yolox" | "roi"; None: no prototypes
    neck: tuple[str, ...] = ("neck.",)  #: parameter-name prefixes of the neck group (the rest past the backbone: head)
    no_second_order: str | None = None  #: why loss(batch, params) cannot be differentiated twice
    verified: bool = False  #: covered by tests/test_mmdet_families.py (loss, predict, MAML/ANIL/Reptile, resume)


_DETR_NECK = ("neck.", "encoder.", "level_embed", "positional_encoding.")
FAMILIES: tuple[Family, ...] = (
    Family("yolox", ("YOLOX",), ("bbox_head.multi_level_conv_cls",), box_features="yolox", verified=True),
    Family("rtmdet", ("RTMDet",), ("bbox_head.rtm_cls",), box_features="rtmdet", verified=True),
    Family("fcos", ("FCOS",), ("bbox_head.conv_cls",), box_features="dense", verified=True),
    Family("atss", ("ATSS",), ("bbox_head.atss_cls",), box_features="dense", verified=True),
    Family("retinanet", ("RetinaNet",), ("bbox_head.retina_cls",), box_features="dense", verified=True),
    Family("faster_rcnn", ("FasterRCNN",), ("roi_head.bbox_head.fc_cls",), ("roi_head.bbox_head.fc_reg",),
           softmax=True, box_features="roi", no_second_order=ROI_ALIGN_NO_SECOND_ORDER, verified=True),
    Family("cascade_rcnn", ("CascadeRCNN",), ("roi_head.bbox_head.*.fc_cls",), ("roi_head.bbox_head.*.fc_reg",),
           softmax=True, no_second_order=ROI_ALIGN_NO_SECOND_ORDER, verified=True),
    Family("deformable_detr", ("DeformableDETR",), ("bbox_head.cls_branches",), neck=_DETR_NECK,
           no_second_order=DEFORMABLE_ATTENTION_NO_SECOND_ORDER, verified=True),
    Family("dino", ("DINO",), ("bbox_head.cls_branches",), ("dn_query_generator.label_embedding",), neck=_DETR_NECK,
           no_second_order=DEFORMABLE_ATTENTION_NO_SECOND_ORDER),
    Family("detr", ("DETR", "ConditionalDETR", "DABDETR"), ("bbox_head.fc_cls",), softmax=True, neck=_DETR_NECK),
    Family("gfl", ("GFL",), ("bbox_head.gfl_cls",), box_features="dense"),
    Family("tood", ("TOOD",), ("bbox_head.tood_cls",)),
    Family("paa", ("PAA",), ("bbox_head.atss_cls",), box_features="dense"),
    Family("centernet", ("CenterNet",), ("bbox_head.heatmap_head.2",)),
)
#: the families the tests cover (the plugin page marks them)
VERIFIED_FAMILIES = tuple(f.name for f in FAMILIES if f.verified)


#: small variants of the DETR-style configs (ResNet-18, one encoder and decoder layer, 20 queries)
SMALL_DETR = {"model.backbone.depth": 18, "model.neck.in_channels": [128, 256, 512],
              "model.encoder.num_layers": 1, "model.decoder.num_layers": 1, "model.num_queries": 20}
#: fewer proposals and sampled RoIs: the two-stage losses at 64 px in seconds, not minutes
SMALL_RPN = {"model.train_cfg.rpn_proposal.nms_pre": 200, "model.train_cfg.rpn_proposal.max_per_img": 100,
             "model.test_cfg.rpn.nms_pre": 200, "model.test_cfg.rpn.max_per_img": 100}
#: a CPU-sized config of every verified family: family -> (config, cfg_options); the tests
#: (tests/test_mmdet_families.py) and benchmarks/bench_detectors.py use them, and so can a first experiment
SMALL_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "yolox": ("yolox/yolox_tiny_8xb8-300e_coco.py", {}),
    "rtmdet": ("rtmdet/rtmdet_tiny_8xb32-300e_coco.py", {}),
    "fcos": ("fcos/fcos_r18_fpn_gn-head-center-normbbox-centeronreg-giou_8xb8-amp-lsj-200e_coco.py", {}),
    "atss": ("atss/atss_r18_fpn_8xb8-amp-lsj-200e_coco.py", {}),
    "retinanet": ("retinanet/retinanet_r18_fpn_1x_coco.py", {}),
    "faster_rcnn": ("faster_rcnn/faster-rcnn_r18_fpn_8xb8-amp-lsj-200e_coco.py",
                    {**SMALL_RPN, "model.train_cfg.rcnn.sampler.num": 64}),
    "cascade_rcnn": ("cascade_rcnn/cascade-rcnn_r18_fpn_8xb8-amp-lsj-200e_coco.py",
                     {**SMALL_RPN, **{f"model.train_cfg.rcnn.{i}.sampler.num": 64 for i in range(3)}}),
    "deformable_detr": ("deformable_detr/deformable-detr_r50_16xb2-50e_coco.py", SMALL_DETR),
}


def family_of(model_type_name: str) -> Family | None:
    return next((f for f in FAMILIES if model_type_name in f.model_types), None)


class MMDetOptions(DetectorOptions):
    model_config = ConfigDict(extra="forbid")

    config: str = Field(
        ..., description="an mmdet config: its path inside the installed mmdet package (e.g. "
                         "rtmdet/rtmdet_tiny_8xb32-300e_coco.py; `megatron detectors --configs` lists them) or a "
                         "path to your own config file (_base_ inheritance resolved)")
    cfg_options: dict[str, Any] = Field(
        default_factory=dict, description="dotted overrides merged into the config, as mmdet's --cfg-options "
                                          "(e.g. model.backbone.depth: 18); num_classes and test thresholds are "
                                          "megatron's")
    norm_eval: bool = Field(
        False, description="keep every backbone BatchNorm in eval mode (mmdet's choice for ImageNet-initialised "
                           "backbones with small batches); freezing policies do this per group anyway")


class MMDet(MMDetDetector):
    """Any mmdet model behind the megatron detector interface (see :class:`MMDetDetector` for the input
    normalisation and the BatchNorm policy of the functional loss). The built-in presets subclass it."""

    PLUGIN_NAME = "mmdet"
    Options = MMDetOptions
    #: a preset (``yolox``, ``faster-rcnn``, ``retinanet``): the family of its fixed config
    PRESET_FAMILY: ClassVar[str] = ""

    # --- building ------------------------------------------------------------------------------
    def config_path(self) -> Path:
        if self.PRESET_FAMILY:  # a preset names its packaged config
            return super().config_path()
        return resolve_config(self.options.config)

    def config_overrides(self) -> dict[str, Any]:
        return dict(getattr(self.options, "cfg_options", {}) or {})

    def build_model(self) -> nn.Module:
        model = super().build_model()
        if not self.PRESET_FAMILY:
            _twice_differentiable_activations(model)
        self.family = family_of(type(model).__name__)
        if self.family is None:
            log.warning("detector %s: %s is not a family megatron has verified; finetune and reptile work, the "
                        "classifier is found by comparing builds", self.PLUGIN_NAME, type(model).__name__)
        return model

    def configure(self, model_cfg: dict) -> dict:
        """The generic edits: every ``num_classes``, the test thresholds, the backbone's BatchNorm policy."""
        _set_every(model_cfg, "num_classes", self.num_classes)
        test_cfg = model_cfg.get("test_cfg")
        if isinstance(test_cfg, dict):
            target = test_cfg["rcnn"] if isinstance(test_cfg.get("rcnn"), dict) else test_cfg
            target["score_thr"] = PREDICT_SCORE_THRESHOLD
            target["max_per_img"] = PREDICT_MAX_PER_IMAGE
            if "num_queries" in model_cfg:  # DETR-style: top-k over queries x classes
                target["max_per_img"] = min(PREDICT_MAX_PER_IMAGE, int(model_cfg["num_queries"]) * self.num_classes)
        backbone = model_cfg.get("backbone", {})
        if "frozen_stages" in backbone:
            backbone["frozen_stages"] = -1  # megatron's detector.freeze decides what is frozen
        if "norm_eval" in backbone:
            backbone["norm_eval"] = bool(getattr(self.options, "norm_eval", False))
        if isinstance(backbone.get("norm_cfg"), dict) and backbone["norm_cfg"].get("requires_grad") is False:
            backbone["norm_cfg"]["requires_grad"] = True  # as above: frozen by detector.freeze, not by the config
        return model_cfg

    # --- what the family table decides ---------------------------------------------------------------
    @classmethod
    def unsupported(cls, options: DetectorOptions) -> dict[str, str]:
        family = cls._family_for_options(options)
        what = f"mmdet family {family.name!r}" if family else "this mmdet model"
        out = {}
        if family is not None and family.no_second_order:
            out[CAPABILITY_SECOND_ORDER] = f"{what}: {family.no_second_order}"
        if family is None or family.box_features is None:
            reason = DETR_NEEDS_NO_BOX_FEATURES if family and family.neck == _DETR_NECK else "no box features"
            out[CAPABILITY_PROTOTYPES] = f"{what}: {reason}"
        return out

    @classmethod
    def _family_for_options(cls, options: DetectorOptions) -> Family | None:
        """The family, read from the config without building (a preset names its family)."""
        if cls.PRESET_FAMILY:
            return next(f for f in FAMILIES if f.name == cls.PRESET_FAMILY)
        return family_of(model_type(options.config, options.cfg_options))

    def classifier_names(self) -> list[str]:
        patterns = self._classifier_patterns()
        return _expand(self.model, patterns)

    def _classifier_patterns(self) -> tuple[str, ...]:
        if self.CLASSIFIER:
            return (self.CLASSIFIER,) if isinstance(self.CLASSIFIER, str) else tuple(self.CLASSIFIER)
        if self.family is not None:
            return self.family.classifier
        return tuple(self._classifiers_by_comparison())

    def _extra_classifier_names(self) -> list[str]:
        if self.CLASSIFIER_EXTRA or self.CLASSIFIER:
            return list(self.CLASSIFIER_EXTRA)
        return _expand(self.model, self.family.classifier_extra) if self.family is not None else []

    def parameter_groups(self) -> dict[str, list[str]]:
        """``backbone``, ``neck`` (for DETR-style models also the transformer encoder), ``head`` (everything
        else: dense heads, RPN + RoI heads, decoder + queries), ``head_cls`` (the classifier)."""
        neck = self.family.neck if self.family is not None else ("neck.",)
        groups: dict[str, list[str]] = {"backbone": [], "neck": [], "head": []}
        for name, _ in self.named_parameters():
            rel = name[len("model."):] if name.startswith("model.") else name
            group = "backbone" if rel.startswith("backbone.") else "neck" if rel.startswith(neck) else "head"
            groups[group].append(name)
        cls_prefixes = tuple(f"model.{n}." for n in [*self.classifier_names(), *self._extra_classifier_names()])
        groups["head_cls"] = [n for n, _ in self.named_parameters() if n.startswith(cls_prefixes)]
        return groups

    @property
    def SOFTMAX_CLASSIFIER(self) -> bool:  # type: ignore[override]
        return bool(self.family and self.family.softmax)

    # --- prototypes ----------------------------------------------------------------------------------
    def _box_features(self, inputs, data_samples):
        kind = self.family.box_features if self.family is not None else None
        if kind is None:
            reason = self.unsupported(self.options).get(CAPABILITY_PROTOTYPES, "no box features")
            raise NotImplementedError(f"detector {self.PLUGIN_NAME}: {reason}; learners that need prototypes "
                                      "(proto) do not work with it")
        if kind == "roi":
            return roi_box_features(self, inputs, data_samples)
        feats = self.model.extract_feat(inputs)
        head = self.model.bbox_head
        if kind == "yolox":
            towers = [convs(f) for convs, f in zip(head.multi_level_cls_convs, feats)]
        elif kind == "rtmdet":
            towers = [_run_all(head.cls_convs[i], f) for i, f in enumerate(feats)]
        else:
            towers = [_run_all(head.cls_convs, f) for f in feats]
        strides = [int(s[0]) if isinstance(s, (tuple, list)) else int(s) for s in head.prior_generator.strides]
        return self.sample_at_centres(towers, strides, self.gt_rois(data_samples, inputs.device))

    def _classifier_repeat(self, classifier: nn.Module) -> int:
        if self.family is not None and self.family.box_features in ("dense", "rtmdet"):
            return int(getattr(self.model.bbox_head, "num_base_priors", 1))
        return 1

    # --- resizing: build the model for the new classes, take its class-sized modules ------------------
    def _resize_classifier(self, num_classes: int) -> None:
        """Build the mmdet model for ``num_classes`` and move into this one every module whose parameters depend
        on the number of classes (as mmdet's own ``init_weights`` initialised them), and the heads'
        ``num_classes``/``cls_out_channels``; every other module (and its frozen state) stays as it is."""
        fresh = self._build_for(num_classes)
        device_param = next(self.model.parameters())
        changed = sorted(set(self.classifier_names()) | set(self._extra_classifier_names())
                         | set(_class_sized_modules(self.model, fresh)))
        for name in changed:
            module = fresh.get_submodule(name).to(device=device_param.device, dtype=device_param.dtype)
            _set_submodule(self.model, name, module)
        fresh_modules = dict(fresh.named_modules())
        for name, mine in self.model.named_modules():
            theirs = fresh_modules.get(name)
            for attr in ("num_classes", "cls_out_channels"):
                if theirs is not None and isinstance(getattr(theirs, attr, None), int):
                    setattr(mine, attr, getattr(theirs, attr))

    def _build_for(self, num_classes: int) -> nn.Module:
        saved = self.num_classes
        self.num_classes = num_classes
        try:
            return self.build_mmdet_model()
        finally:
            self.num_classes = saved

    def _classifiers_by_comparison(self) -> list[str]:
        """An unknown family's classifier: the modules whose parameter shapes change with the number of classes."""
        if not hasattr(self, "_compared_classifiers"):
            self._compared_classifiers = _class_sized_modules(self.model, self._build_for(self.num_classes + 1))
        return self._compared_classifiers


class TwiceDifferentiableHardsigmoid(nn.Module):
    """``nn.Hardsigmoid`` as ``clamp(x / 6 + 1/2, 0, 1)``: the same function, but autograd can differentiate it
    twice (``hardsigmoid_backward`` has no derivative), so MAML's second order works through RTMDet's channel
    attention."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)


def _twice_differentiable_activations(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Hardsigmoid):
            _set_submodule(model, name, TwiceDifferentiableHardsigmoid())


def _set_every(cfg: Any, key: str, value: Any) -> None:
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            if k == key:
                cfg[k] = value
            else:
                _set_every(v, key, value)
    elif isinstance(cfg, (list, tuple)):
        for v in cfg:
            _set_every(v, key, value)


def _expand(model: nn.Module, patterns: tuple[str, ...] | list[str]) -> list[str]:
    """Module names matching ``patterns`` (fnmatch), a ``ModuleList`` counting as all its members."""
    names = dict(model.named_modules())
    out: list[str] = []
    for pattern in patterns:
        for name in [n for n in names if fnmatch.fnmatchcase(n, pattern)]:
            if isinstance(names[name], nn.ModuleList):
                out.extend(f"{name}.{i}" for i in range(len(names[name])))
            else:
                out.append(name)
    return list(dict.fromkeys(out))


def _class_sized_modules(mine: nn.Module, other: nn.Module) -> list[str]:
    """Names of the modules whose own parameters differ in shape between two builds of one config."""
    theirs = dict(other.named_parameters())
    out = []
    for name, param in mine.named_parameters():
        if name in theirs and tuple(theirs[name].shape) != tuple(param.shape):
            out.append(name.rsplit(".", 1)[0])
    return list(dict.fromkeys(out))


def _run_all(layers, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x



@hookimpl
def megatron_register_detectors():
    return [MMDet]
