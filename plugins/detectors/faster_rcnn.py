"""``faster-rcnn``: Faster R-CNN (Ren et al., 2015) with a ResNet-FPN backbone, from MMDetection.

Two-stage detector: a region proposal network, then RoIAlign features of each proposal through two shared
fully-connected layers to a softmax classifier (C classes + background) and a class-specific box regressor.
"""
from __future__ import annotations

from pydantic import Field
from torch import nn

from megatron import hookimpl
from megatron_plugins.detectors._resnet import ResNetFPNOptions, configure_resnet
from megatron_plugins.detectors.mmdet_adapter import (
    PREDICT_MAX_PER_IMAGE,
    PREDICT_SCORE_THRESHOLD,
    roi_box_features,
)
from megatron_plugins.detectors.mmdet import MMDet


class FasterRCNNOptions(ResNetFPNOptions):
    rois_per_image: int = Field(
        512, ge=16, description="proposals sampled per image for the RoI-head loss (mmdet: 512, a quarter "
                                "positive); images with few objects train as well and much faster with 128")


class FasterRCNN(MMDet):
    """Faster R-CNN behind the megatron detector interface (see :class:`MMDetDetector` for the BatchNorm policy).

    - parameter groups: ``head`` holds both the RPN (``rpn_head``) and the RoI head (``roi_head``).
    - classifier (``head_cls``; re-initialised by ``set_num_classes``): ``roi_head.bbox_head.fc_cls`` (softmax
      over C + 1, background last) and the class-specific box regressor ``roi_head.bbox_head.fc_reg``
      (``4 * C`` outputs: every row belongs to one class, so it is re-initialised whole).
    - ``box_features``: RoIAlign (``bbox_roi_extractor``) over each annotated box on the FPN level mmdet maps it
      to, through the shared fully-connected layers: exactly the 1024-d vector ``fc_cls`` sees for a proposal
      equal to the box.
    - ``set_prototypes``: ``fc_cls`` becomes a cosine classifier with a background logit
      ``temperature * 0.5`` (learnable): a box is foreground when its best cosine exceeds 0.5.
    """

    PLUGIN_NAME = "faster-rcnn"
    PRESET_FAMILY = "faster_rcnn"
    Options = FasterRCNNOptions
    CONFIG = "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"
    SMALLEST_STRIDE = 4  # the FPN's P2 level (RPN anchor strides 4 ... 64)
    CLASSIFIER = "roi_head.bbox_head.fc_cls"
    CLASSIFIER_EXTRA = ("roi_head.bbox_head.fc_reg",)
    SOFTMAX_CLASSIFIER = True

    def configure(self, model_cfg: dict) -> dict:
        model_cfg = configure_resnet(model_cfg, self.options)
        model_cfg["roi_head"]["bbox_head"]["num_classes"] = self.num_classes
        model_cfg["train_cfg"]["rcnn"]["sampler"]["num"] = int(self.options.rois_per_image)
        rcnn = model_cfg["test_cfg"]["rcnn"]
        rcnn["score_thr"] = PREDICT_SCORE_THRESHOLD
        rcnn["max_per_img"] = PREDICT_MAX_PER_IMAGE
        return model_cfg

    def _box_features(self, inputs, data_samples):
        return roi_box_features(self, inputs, data_samples)

    def _resize_classifier(self, num_classes: int) -> None:
        head = self.model.roi_head.bbox_head
        head.num_classes = num_classes
        old_cls, old_reg = head.fc_cls, head.fc_reg
        cls_channels = head.loss_cls.get_cls_channels(num_classes) if head.custom_cls_channels else num_classes + 1
        fc_cls = nn.Linear(old_cls.in_features, cls_channels).to(old_cls.weight.device, old_cls.weight.dtype)
        nn.init.normal_(fc_cls.weight, 0.0, 0.01)  # mmdet BBoxHead init_cfg
        nn.init.zeros_(fc_cls.bias)
        head.fc_cls = fc_cls
        if not head.reg_class_agnostic:
            box_dim = head.bbox_coder.encode_size
            fc_reg = nn.Linear(old_reg.in_features, box_dim * num_classes).to(old_reg.weight.device, old_reg.weight.dtype)
            nn.init.normal_(fc_reg.weight, 0.0, 0.001)
            nn.init.zeros_(fc_reg.bias)
            head.fc_reg = fc_reg


@hookimpl
def megatron_register_detectors():
    return [FasterRCNN]
