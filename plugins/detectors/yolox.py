"""``yolox``: YOLOX (Ge et al., 2021, "YOLOX: Exceeding YOLO Series in 2021") from MMDetection.

Anchor-free single-stage detector with a decoupled head (separate classification, regression and
objectness branches) and SimOTA label assignment. ``size: tiny`` (5 M parameters) is the CPU default.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import ConfigDict, Field
from torch import nn

from megatron import hookimpl
from megatron.api.detector import DetectorOptions
from megatron_plugins.detectors.mmdet_adapter import (
    PREDICT_MAX_PER_IMAGE,
    PREDICT_SCORE_THRESHOLD,
)
from megatron_plugins.detectors.mmdet import MMDet

CONFIGS = {
    "nano": "yolox/yolox_nano_8xb8-300e_coco.py",
    "tiny": "yolox/yolox_tiny_8xb8-300e_coco.py",
    "s": "yolox/yolox_s_8xb8-300e_coco.py",
    "m": "yolox/yolox_m_8xb8-300e_coco.py",
}


class YOLOXOptions(DetectorOptions):
    model_config = ConfigDict(extra="forbid")

    size: Literal["nano", "tiny", "s", "m"] = Field(
        "tiny", description="model size (mmdet config yolox_<size>); tiny (5 M parameters) runs on CPU")
    nms_iou: float = Field(0.65, gt=0, lt=1, description="IoU threshold of the non-maximum suppression at prediction")


class YOLOX(MMDet):
    """YOLOX behind the megatron detector interface (see :class:`MMDetDetector` for the BatchNorm policy).

    - classifier (``head_cls``; re-initialised by ``set_num_classes``): ``bbox_head.multi_level_conv_cls``
      (one 1x1 conv per FPN level, sigmoid scores; the final score is class score x objectness).
    - ``box_features``: the output of the classification branch (``multi_level_cls_convs``, i.e. exactly what
      ``multi_level_conv_cls`` sees), sampled at each annotated box centre on the level (stride 8/16/32) that
      fits the box size; ``D = feat_channels`` (96 for tiny).
    - ``set_prototypes``: a cosine classifier per level (sigmoid head: bias = -temperature * 0.5, learnable).
    """

    PLUGIN_NAME = "yolox"
    PRESET_FAMILY = "yolox"
    Options = YOLOXOptions
    CLASSIFIER = "bbox_head.multi_level_conv_cls"

    @property
    def CONFIG(self) -> str:  # type: ignore[override]
        return CONFIGS[self.options.size]

    def configure(self, model_cfg: dict) -> dict:
        model_cfg["bbox_head"]["num_classes"] = self.num_classes
        model_cfg["test_cfg"] = dict(
            score_thr=PREDICT_SCORE_THRESHOLD,
            nms=dict(type="nms", iou_threshold=self.options.nms_iou),
            max_per_img=PREDICT_MAX_PER_IMAGE,
        )
        return model_cfg

    def _box_features(self, inputs, data_samples):
        head = self.model.bbox_head
        feats = self.model.extract_feat(inputs)
        towers = [convs(f) for convs, f in zip(head.multi_level_cls_convs, feats)]
        strides = [int(s[0]) if isinstance(s, (tuple, list)) else int(s) for s in head.prior_generator.strides]
        return self.sample_at_centres(towers, strides, self.gt_rois(data_samples, inputs.device))

    def _resize_classifier(self, num_classes: int) -> None:
        head = self.model.bbox_head
        head.num_classes = num_classes
        head.cls_out_channels = num_classes
        for i, old in enumerate(head.multi_level_conv_cls):
            new = nn.Conv2d(old.in_channels, num_classes, 1).to(device=old.weight.device, dtype=old.weight.dtype)
            # YOLOXHead.init_weights: default conv init, bias at prior probability 0.01
            nn.init.kaiming_uniform_(new.weight, a=5 ** 0.5)
            with torch.no_grad():
                new.bias.fill_(reinit_bias())
            head.multi_level_conv_cls[i] = new


def reinit_bias(prior_prob: float = 0.01) -> float:
    """The classifier bias YOLOXHead.init_weights uses: every class starts at probability ``prior_prob``."""
    return -math.log((1 - prior_prob) / prior_prob)


@hookimpl
def megatron_register_detectors():
    return [YOLOX]
