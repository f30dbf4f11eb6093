"""``retinanet``: RetinaNet (Lin et al., 2017, "Focal Loss for Dense Object Detection") from MMDetection.

Single-stage, anchor-based ResNet-FPN detector trained with the focal loss; sigmoid class scores.
"""
from __future__ import annotations

from megatron import hookimpl
from megatron_plugins.detectors._resnet import ResNetFPNOptions, configure_resnet
from megatron_plugins.detectors.mmdet import MMDet
from megatron_plugins.detectors.mmdet_adapter import SigmoidDenseHeadMixin


class RetinaNetOptions(ResNetFPNOptions):
    pass


class RetinaNet(SigmoidDenseHeadMixin, MMDet):
    """RetinaNet behind the megatron detector interface (see :class:`MMDetDetector` for the BatchNorm policy).

    - classifier (``head_cls``; re-initialised by ``set_num_classes``): ``bbox_head.retina_cls``
      (3x3 conv, 9 anchors x C sigmoid scores per location).
    - ``box_features``: the classification tower's output (``bbox_head.cls_convs``, what ``retina_cls`` sees)
      sampled at each annotated box centre on the FPN level (stride 8...128) that fits the box size; ``D = 256``.
    - ``set_prototypes``: a cosine classifier whose logits are repeated for the 9 anchors (sigmoid head:
      bias = -temperature * 0.5, learnable).
    """

    PLUGIN_NAME = "retinanet"
    PRESET_FAMILY = "retinanet"
    Options = RetinaNetOptions
    CONFIG = "retinanet/retinanet_r50_fpn_1x_coco.py"
    CLASSIFIER = "bbox_head.retina_cls"

    def configure(self, model_cfg: dict) -> dict:
        return super().configure(configure_resnet(model_cfg, self.options))


@hookimpl
def megatron_register_detectors():
    return [RetinaNet]
