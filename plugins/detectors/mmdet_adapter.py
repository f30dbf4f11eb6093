"""The shared adapter between megatron's :class:`~megatron.api.detector.Detector` interface and MMDetection.

Every built-in detector (``yolox``, ``faster-rcnn``, ``retinanet``) is a small subclass of
:class:`MMDetDetector`, and a third-party package adds any other mmdet model the same way::

    from megatron import hookimpl
    from megatron_plugins.detectors.mmdet_adapter import MMDetDetector, SigmoidDenseHeadMixin

    class FCOS(SigmoidDenseHeadMixin, MMDetDetector):
        PLUGIN_NAME = "fcos"
        CONFIG = "fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py"   # inside mmdet/.mim/configs
        CLASSIFIER = "bbox_head.conv_cls"

    @hookimpl
    def megatron_register_detectors():
        return [FCOS]

How a model is built (:meth:`MMDetDetector.build_model`): the config file shipped inside the mmdet package is read
with ``mmengine.Config.fromfile``; :meth:`MMDetDetector.configure` sets the number of classes, the test settings
(``score_thr`` 0.001 so mAP sees the full ranking, at most 100 boxes per image) and whatever the subclass needs;
every pretrained-weight ``init_cfg`` and ``load_from`` entry is removed (megatron never downloads; start from a
local file with ``detector.checkpoint``); then ``init_default_scope('mmdet')`` + ``MODELS.build``.

Input handling: megatron batches hold ``[0, 255]`` RGB images at a fixed square size. The mmdet data
preprocessor is *not* run (its training-time tricks, such as YOLOX's ``BatchSyncRandomResize``, would change
the input size); instead :meth:`MMDetDetector.normalise` applies the config's ``mean``/``std`` and channel
order itself: a config with ``bgr_to_rgb=True`` gets RGB, otherwise the channels are flipped to the BGR order
mmdet's pretrained weights were trained with.

BatchNorm policy: with ``loss(batch, params=...)`` (fast adaptation, functional) the forward runs through
``torch.func.functional_call`` with the given parameters and *clones of the module's buffers*, so BatchNorm
layers in train mode normalise with batch statistics but the module's own running statistics are left
untouched (the meta-parameters' statistics only move in plain ``loss(batch)`` calls, i.e. outer/fine-tune
steps). BatchNorm layers in frozen groups (:meth:`Detector.freeze`) stay in eval mode and use their running
statistics in both paths.

The loss split at the body/head boundary (:meth:`MMDetDetector.body_features` + :meth:`MMDetDetector.head_loss`,
for mmdet's single- and two-stage detectors): ``body_features`` is ``model.extract_feat`` (backbone + neck),
``head_loss`` runs mmdet's own ``model.loss`` with those features standing in for ``extract_feat``'s output, so
``head_loss(body_features(batch, params), batch, params) == loss(batch, params)``; ANIL's inner loop uses it to
compute the body once per episode.
"""
from __future__ import annotations

import contextlib
import logging
import math
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from megatron.api.detector import Detector, DetectorOptions
from megatron.errors import ConfigError
from megatron.types import Batch, Detections, to_original_coords
from megatron_plugins.detectors.mmdet_configs import (  # noqa: F401  (strip_pretrained: re-exported)
    mmdet_config_dir,
    read_config,
    strip_pretrained,
)

log = logging.getLogger(__name__)
# mmdet 3.3 calls the deprecated torch.cuda.amp.autocast; the warning is mmdet's, not actionable here
warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.autocast.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning)

#: score threshold for predictions: low, so that mAP is computed over the full ranking
PREDICT_SCORE_THRESHOLD = 0.001
PREDICT_MAX_PER_IMAGE = 100


@contextlib.contextmanager
def quiet_mmengine():
    """mmengine's logger at WARNING for the duration (``init_weights`` logs a paragraph per parameter)."""
    from mmengine.logging import MMLogger  # optional dependency: only the mmdet detectors need it

    mm_logger = MMLogger.get_current_instance()
    level = mm_logger.level
    mm_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        mm_logger.setLevel(level)


class CosineClassifier(nn.Module):
    """``logits = temperature * cos(f, p_c) + bias`` against fixed prototypes ``(C, D)``.

    Works as a drop-in for an ``nn.Linear`` classifier (features ``(..., D)``) or a 1x1/3x3 ``nn.Conv2d``
    classifier (features ``(N, D, H, W)``, logits ``(N, repeat * C, H, W)``; ``repeat`` copies the logits for
    heads with several anchors per location).

    Sigmoid heads (YOLOX, RetinaNet, FCOS) score every class independently, so the bias is a threshold: it is
    initialised to ``-temperature * threshold`` so that a location scores 0.5 for class ``c`` exactly when its
    cosine similarity to ``p_c`` equals ``threshold`` (without it every class would score ~1 and the ranking
    would carry no information). Softmax heads (Faster R-CNN) need a background logit: it is a constant
    ``temperature * threshold`` appended as the last column (mmdet's background index), so a box is foreground
    when its best cosine exceeds ``threshold``. The bias is a learnable parameter (a learner may fit it).
    """

    def __init__(self, prototypes: torch.Tensor, temperature: float, threshold: float, softmax_background: bool,
                 repeat: int = 1):
        super().__init__()
        protos = F.normalize(prototypes.float(), dim=1)
        if protos.requires_grad:
            # keep the graph: meta-gradients reach the body through the support features (proto learner)
            self.prototypes = protos
        else:
            self.register_buffer("prototypes", protos, persistent=False)
        self.temperature = float(temperature)
        self.softmax_background = softmax_background
        self.repeat = int(repeat)
        init = temperature * threshold if softmax_background else -temperature * threshold
        self.bias = nn.Parameter(torch.tensor(float(init), device=prototypes.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        protos = self.prototypes.to(device=x.device, dtype=x.dtype)
        if x.dim() == 4:  # dense head: (N, D, H, W)
            cos = torch.einsum("ndhw,cd->nchw", F.normalize(x, dim=1), protos)
            logits = self.temperature * cos + self.bias
            return logits.repeat(1, self.repeat, 1, 1) if self.repeat > 1 else logits
        cos = F.normalize(x, dim=-1) @ protos.t()
        logits = self.temperature * cos
        if self.softmax_background:
            bg = self.bias.to(logits.dtype).expand(*logits.shape[:-1], 1)
            return torch.cat([logits, bg], dim=-1)
        return logits + self.bias


class MMDetDetector(Detector):
    """A megatron detector around one mmdet model (``self.model``).

    Subclasses set:

    - ``CONFIG``: a config path relative to ``mmdet/.mim/configs`` (e.g. ``"yolox/yolox_tiny_8xb8-300e_coco.py"``);
      or override :meth:`config_path`.
    - ``CLASSIFIER``: dotted name(s) (relative to ``self.model``) of the classifier module(s) that
      :meth:`set_num_classes` re-initialises and :meth:`set_prototypes` swaps (a ``ModuleList`` counts as all
      its members).
    - and implement :meth:`configure` (set ``num_classes``/input size in the config dict),
      :meth:`_resize_classifier`, :meth:`_box_features`.

    See the module docstring for input normalisation and the BatchNorm policy of the functional loss.
    """

    CONFIG: ClassVar[str] = ""
    CLASSIFIER: ClassVar[tuple[str, ...] | str] = ()
    #: further modules that :meth:`set_num_classes` re-initialises (listed in ``head_cls``, not swapped by
    #: :meth:`set_prototypes`), e.g. Faster R-CNN's class-specific box regressor
    CLASSIFIER_EXTRA: ClassVar[tuple[str, ...]] = ()
    #: module-name prefixes (relative to ``self.model``) of the parameter groups
    GROUP_PREFIXES: ClassVar[dict[str, tuple[str, ...]]] = {
        "backbone": ("backbone.",),
        "neck": ("neck.",),
        "head": ("bbox_head.", "rpn_head.", "roi_head."),
    }
    #: cosine threshold at which a prototype classifier scores 0.5 (see :class:`CosineClassifier`)
    PROTOTYPE_THRESHOLD: ClassVar[float] = 0.5
    #: True for heads that score classes with a softmax over ``C + 1`` (background last)
    SOFTMAX_CLASSIFIER: ClassVar[bool] = False

    def __init__(self, num_classes: int, input_size: int, options: DetectorOptions | None = None):
        super().__init__(num_classes, input_size, options)
        if self.num_classes < 1:
            raise ConfigError(f"detector {self.PLUGIN_NAME!r}: num_classes must be >= 1, got {num_classes}")
        if self.input_size % 32:
            raise ConfigError(
                f"detector {self.PLUGIN_NAME!r}: data.input_size={input_size} must be a multiple of 32 "
                "(the stride of the coarsest feature map); e.g. 128, 256, 320, 512"
            )
        self.model = self.build_model()
        self._saved_classifiers: dict[str, nn.Module] | None = None

    # --- building ------------------------------------------------------------------------------
    def config_path(self) -> Path:
        path = mmdet_config_dir() / self.CONFIG
        if not path.is_file():
            raise ConfigError(
                f"detector {self.PLUGIN_NAME!r}: mmdet config {path} not found; is mmdet (3.x) installed with its "
                "configs (the `.mim/configs` folder)?"
            )
        return path

    def configure(self, model_cfg: dict) -> dict:
        """Edit the mmdet model config dict: number of classes, input size, test settings. Return it."""
        raise NotImplementedError

    def config_overrides(self) -> dict[str, Any]:
        """Dotted config overrides merged in after reading the file (the ``mmdet`` plugin's ``cfg_options``)."""
        return {}

    def model_config(self) -> dict:
        """The model config dict as built: read (``_base_`` resolved, overrides merged), pretrained weights
        stripped, without the data preprocessor, edited by :meth:`configure`."""
        cfg = read_config(self.config_path(), self.config_overrides())
        model_cfg = strip_pretrained(cfg.model.to_dict())
        model_cfg.pop("data_preprocessor", None)
        return self.configure(model_cfg)

    def build_model(self) -> nn.Module:
        cfg = read_config(self.config_path(), self.config_overrides())
        pre = cfg.model.get("data_preprocessor", None) or {}
        mean = pre.get("mean") or [0.0, 0.0, 0.0]
        std = pre.get("std") or [1.0, 1.0, 1.0]
        # mmdet pipelines load BGR; bgr_to_rgb=True means the model wants RGB, else it wants BGR
        self.channel_order = "rgb" if pre.get("bgr_to_rgb", False) else "bgr"
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._identity_normalisation = all(m == 0 for m in mean) and all(v == 1 for v in std)
        return self.build_mmdet_model()

    def build_mmdet_model(self) -> nn.Module:
        """``MODELS.build`` of :meth:`model_config` and mmdet's ``init_weights``; a model mmdet cannot build is
        a :class:`ConfigError` with mmdet's own message and the config file."""
        from mmengine.config import ConfigDict  # optional dependency: only the mmdet detectors need it
        from mmengine.registry import init_default_scope
        from mmdet.registry import MODELS

        model_cfg = ConfigDict(self.model_config())
        init_default_scope("mmdet")
        try:
            model = MODELS.build(model_cfg)
        except Exception as exc:
            raise ConfigError(
                f"detector {self.PLUGIN_NAME!r}: mmdet cannot build the model of config {self.config_path()} "
                f"(model.type {model_cfg.get('type')!r}): {type(exc).__name__}: {exc}"
            ) from exc
        with quiet_mmengine():  # init_weights logs one INFO paragraph per parameter
            model.init_weights()
        # the data preprocessor is replaced by normalise(); drop any batch augment it may hold
        if hasattr(model, "data_preprocessor") and hasattr(model.data_preprocessor, "batch_augments"):
            model.data_preprocessor.batch_augments = None
        return model

    # --- inputs ---------------------------------------------------------------------------------
    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """``[0, 255]`` RGB ``(B, 3, S, S)`` -> what the mmdet model expects (channel order, mean/std)."""
        if self.channel_order == "bgr":
            images = images.flip(1)
        if self._identity_normalisation:  # YOLOX: mean 0, std 1 — skip two full passes over the batch
            return images
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    def data_samples(self, batch: Batch) -> list:
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData

        h, w = int(batch.images.shape[-2]), int(batch.images.shape[-1])
        device = batch.images.device
        samples = []
        for i in range(len(batch)):
            meta = batch.meta[i] if i < len(batch.meta) else {}
            scale = float(meta.get("scale", 1.0))
            sample = DetDataSample(metainfo=dict(
                img_id=meta.get("image_id", i),
                img_shape=(h, w), pad_shape=(h, w), batch_input_shape=(h, w),
                ori_shape=tuple(meta.get("orig_size", (h, w))),
                scale_factor=(scale, scale),
            ))
            gt = InstanceData()
            gt.bboxes = batch.boxes[i].to(device=device, dtype=torch.float32).reshape(-1, 4)
            gt.labels = batch.labels[i].to(device=device, dtype=torch.long).reshape(-1)
            sample.gt_instances = gt
            samples.append(sample)
        return samples

    # --- the functional entry point -------------------------------------------------------------
    def forward(self, inputs: torch.Tensor, data_samples: list | None = None, mode: str = "loss"):
        """Dispatch used by :func:`torch.func.functional_call` (so every parameter name stays ``model.*``)."""
        if mode == "box_features":
            return self._box_features(inputs, data_samples)
        if mode == "body":
            return self._body(inputs)
        if mode == "head_loss":  # ``inputs`` are the body's features here
            return self._head_loss(inputs, data_samples)
        return self.model(inputs, data_samples, mode=mode)

    def _call(self, params: dict[str, torch.Tensor] | None, *args, **kwargs):
        if params is None:
            return self(*args, **kwargs)
        # cloned buffers: BN running stats of the meta-parameters are not updated during fast adaptation
        buffers = {n: b.clone() for n, b in self.named_buffers()}
        # tie_weights=False: a module shared between places (RTMDet's head convs across levels) is one object,
        # swapped once under its first name; torch's tying would swap it again under each alias and restore the
        # adapted tensor instead of the parameter after the call
        return torch.func.functional_call(self, {**buffers, **params}, args, kwargs, strict=False, tie_weights=False)

    # --- Detector interface -----------------------------------------------------------------------
    def loss(self, batch: Batch, params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        if params is not None:
            unknown = set(params) - set(dict(self.named_parameters()))
            if unknown:
                raise KeyError(f"{self.PLUGIN_NAME}: unknown parameter name(s) in params: {sorted(unknown)[:5]}")
        inputs = self.normalise(batch.images)
        raw = self._call(params, inputs, self.data_samples(batch), mode="loss")
        return sum_losses(raw)

    def supports_head_loss(self) -> bool:
        """mmdet's single- and two-stage detectors: their ``loss`` is ``extract_feat`` then the head(s)."""
        from mmdet.models.detectors import SingleStageDetector, TwoStageDetector

        return isinstance(self.model, (SingleStageDetector, TwoStageDetector))

    def body_features(self, batch: Batch, params: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        """The neck's output levels (``model.extract_feat``), through the functional path when ``params`` is a
        dict (BatchNorm: batch statistics, running statistics untouched), as :meth:`loss` computes them."""
        return self._call(params, self.normalise(batch.images), None, mode="body")

    def head_loss(self, features: tuple[torch.Tensor, ...], batch: Batch,
                  params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """mmdet's own ``model.loss`` with ``features`` standing in for ``extract_feat``'s output, so the head
        losses (RPN + RoI head for two-stage models) are exactly those :meth:`loss` computes."""
        if not self.supports_head_loss():
            raise NotImplementedError(f"{self.PLUGIN_NAME}: {type(self.model).__name__} has no separable head loss")
        if params is not None:
            unknown = set(params) - set(dict(self.named_parameters()))
            if unknown:
                raise KeyError(f"{self.PLUGIN_NAME}: unknown parameter name(s) in params: {sorted(unknown)[:5]}")
        return sum_losses(self._call(params, tuple(features), self.data_samples(batch), mode="head_loss"))

    def _body(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.model.extract_feat(inputs)
        return tuple(feats) if isinstance(feats, (list, tuple)) else (feats,)

    def _head_loss(self, feats: tuple[torch.Tensor, ...], data_samples: list) -> dict:
        model = self.model
        # an instance attribute shadows the method for this one call: mmdet's loss runs unchanged after it
        model.__dict__["extract_feat"] = lambda _inputs: feats
        try:
            return model.loss(None, data_samples)
        finally:
            del model.__dict__["extract_feat"]

    @torch.no_grad()
    def predict(self, batch: Batch) -> list[Detections]:
        was_training = self.training
        self.eval()
        try:
            results = self.model.predict(self.normalise(batch.images), self.data_samples(batch), rescale=False)
        finally:
            self.train(was_training)
        out = []
        for i, res in enumerate(results):
            pred = res.pred_instances
            meta = batch.meta[i]
            out.append(Detections(
                boxes=to_original_coords(pred.bboxes.float(), meta),
                scores=pred.scores.detach().float().cpu().numpy().astype(np.float32),
                labels=pred.labels.detach().cpu().numpy().astype(np.int64),
                image_id=int(meta.get("image_id", -1)),
            ))
        return out

    def classifier_names(self) -> list[str]:
        """Module names (relative to ``self.model``) of the classifier layers, ``ModuleList``s expanded."""
        names = [self.CLASSIFIER] if isinstance(self.CLASSIFIER, str) else list(self.CLASSIFIER)
        out = []
        for name in names:
            mod = self.model.get_submodule(name)
            if isinstance(mod, nn.ModuleList):
                out.extend(f"{name}.{i}" for i in range(len(mod)))
            else:
                out.append(name)
        return out

    def parameter_groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {g: [] for g in self.GROUP_PREFIXES}
        for name, _ in self.named_parameters():
            rel = name[len("model."):] if name.startswith("model.") else name
            for group, prefixes in self.GROUP_PREFIXES.items():
                if rel.startswith(prefixes):
                    groups[group].append(name)
                    break
        cls_prefixes = tuple(f"model.{n}." for n in [*self.classifier_names(), *self.CLASSIFIER_EXTRA])
        groups["head_cls"] = [n for n, _ in self.named_parameters() if n.startswith(cls_prefixes)]
        return groups

    def extract_features(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.model.extract_feat(self.normalise(images))
        return tuple(feats) if isinstance(feats, (list, tuple)) else (feats,)

    def features(self, batch: Batch) -> torch.Tensor:
        """Global average of every neck level, concatenated: ``(B, levels * C)``. Runs in eval mode (BN uses
        running statistics and does not update them)."""
        was_training = self.training
        self.eval()
        try:
            feats = self.extract_features(batch.images)
        finally:
            self.train(was_training)
        return torch.cat([f.mean(dim=(2, 3)) for f in feats], dim=1)

    def box_features(self, batch: Batch, params: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.normalise(batch.images)
        feats = self._call(params, inputs, self.data_samples(batch), mode="box_features")
        labels = torch.cat([lab.reshape(-1).long() for lab in batch.labels]).to(feats.device) if batch.labels \
            else torch.zeros(0, dtype=torch.long, device=feats.device)
        return feats, labels

    def _box_features(self, inputs: torch.Tensor, data_samples: list) -> torch.Tensor:
        raise NotImplementedError

    def set_prototypes(self, prototypes: torch.Tensor | None, temperature: float = 10.0) -> None:
        """Swap the classifier for :class:`CosineClassifier` modules against ``prototypes`` ``(C, D)``
        (``D`` as returned by :meth:`box_features`); ``None`` restores the learned classifier."""
        names = self.classifier_names()
        if prototypes is None:
            if self._saved_classifiers is not None:
                for name, mod in self._saved_classifiers.items():
                    _set_submodule(self.model, name, mod)
                self._saved_classifiers = None
            return
        if prototypes.dim() != 2 or prototypes.shape[0] != self.num_classes:
            raise ValueError(
                f"{self.PLUGIN_NAME}: prototypes must be (num_classes={self.num_classes}, D), got {tuple(prototypes.shape)}"
            )
        if self._saved_classifiers is None:
            self._saved_classifiers = {n: self.model.get_submodule(n) for n in names}
        for name in names:
            original = self._saved_classifiers[name]
            repeat = self._classifier_repeat(original)
            device = next(original.parameters()).device
            _set_submodule(self.model, name, CosineClassifier(
                prototypes.to(device), temperature, self.PROTOTYPE_THRESHOLD, self.SOFTMAX_CLASSIFIER, repeat))

    def _classifier_repeat(self, classifier: nn.Module) -> int:
        return 1

    def get_prototypes(self) -> tuple[torch.Tensor, float] | None:
        """The (L2-normalised) prototypes and temperature of the cosine classifiers, or ``None``."""
        if self._saved_classifiers is None:
            return None
        cosine = self.model.get_submodule(self.classifier_names()[0])
        return cosine.prototypes.detach().clone(), float(cosine.temperature)

    def set_num_classes(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"{self.PLUGIN_NAME}: num_classes must be >= 1, got {num_classes}")
        self.set_prototypes(None)
        self.num_classes = int(num_classes)
        self._resize_classifier(self.num_classes)

    def _resize_classifier(self, num_classes: int) -> None:
        raise NotImplementedError

    # --- helpers for subclasses -----------------------------------------------------------------
    def gt_rois(self, data_samples: list, device: torch.device) -> torch.Tensor:
        """``(N, 5)`` rois ``(batch_index, x1, y1, x2, y2)`` of the annotated boxes."""
        rois = [torch.cat([torch.full((len(s.gt_instances.bboxes), 1), float(i), device=device),
                           s.gt_instances.bboxes.to(device)], dim=1) for i, s in enumerate(data_samples)]
        return torch.cat(rois) if rois else torch.zeros(0, 5, device=device)

    @staticmethod
    def sample_at_centres(levels: list[torch.Tensor], strides: list[int], rois: torch.Tensor) -> torch.Tensor:
        """Bilinearly sample each roi's centre on the feature level that fits its size (FPN rule: a box of side
        ``s`` goes to the level with ``4 * stride <= s < 8 * stride``, clamped), ``(N, C)``."""
        c = levels[0].shape[1]
        out = levels[0].new_zeros(len(rois), c)
        if len(rois) == 0:
            return out
        wh = (rois[:, 3:5] - rois[:, 1:3]).clamp(min=1.0)
        size = wh.prod(dim=1).sqrt()
        lvl = torch.floor(torch.log2(size / (4.0 * strides[0]))).clamp(0, len(levels) - 1).long()
        cx = (rois[:, 1] + rois[:, 3]) / 2
        cy = (rois[:, 2] + rois[:, 4]) / 2
        rows = []
        idx_all = []
        for k, (feat, stride) in enumerate(zip(levels, strides)):
            sel = (lvl == k).nonzero(as_tuple=True)[0]
            if len(sel) == 0:
                continue
            h, w = feat.shape[-2:]
            # pixel centre -> feature-map coordinate (cell i covers [i*stride, (i+1)*stride)) -> [-1, 1]
            gx = (cx[sel] / stride - 0.5) / max(w - 1, 1) * 2 - 1 if w > 1 else torch.zeros_like(cx[sel])
            gy = (cy[sel] / stride - 0.5) / max(h - 1, 1) * 2 - 1 if h > 1 else torch.zeros_like(cy[sel])
            for b in rois[sel, 0].long().unique():
                m = rois[sel, 0].long() == b
                grid = torch.stack([gx[m], gy[m]], dim=-1).view(1, 1, -1, 2).to(feat.dtype)
                sampled = F.grid_sample(feat[b:b + 1], grid, align_corners=True, padding_mode="border")
                rows.append(sampled[0, :, 0, :].t())
                idx_all.append(sel[m])
        order = torch.cat(idx_all)
        return out.index_put((order,), torch.cat(rows).to(out.dtype))


def roi_box_features(det: MMDetDetector, inputs: torch.Tensor, data_samples: list) -> torch.Tensor:
    """RoIAlign over each annotated box through a two-stage model's box head up to (not including) ``fc_cls``:
    the vector the classifier sees for a proposal equal to the box (Faster R-CNN's ``box_features``)."""
    feats = det.model.extract_feat(inputs)
    roi_head = det.model.roi_head
    head = roi_head.bbox_head
    rois = det.gt_rois(data_samples, inputs.device).to(feats[0].dtype)
    if len(rois) == 0:
        return feats[0].new_zeros(0, head.cls_last_dim)
    x = roi_head.bbox_roi_extractor(feats[: roi_head.bbox_roi_extractor.num_inputs], rois)
    if roi_head.with_shared_head:
        x = roi_head.shared_head(x)
    # the shared + classification branch of ConvFCBBoxHead.forward, up to (not including) fc_cls
    for conv in getattr(head, "shared_convs", []):
        x = conv(x)
    if getattr(head, "num_shared_fcs", 0) > 0:
        if head.with_avg_pool:
            x = head.avg_pool(x)
        x = x.flatten(1)
        for fc in head.shared_fcs:
            x = head.relu(fc(x))
    for conv in getattr(head, "cls_convs", []):
        x = conv(x)
    if x.dim() > 2:
        if head.with_avg_pool:
            x = head.avg_pool(x)
        x = x.flatten(1)
    for fc in getattr(head, "cls_fcs", []):
        x = head.relu(fc(x))
    return x


def sum_losses(raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    """mmdet's loss dict -> ``{"loss": total, **parts}``: list values are summed (per-level losses); only keys
    containing ``loss`` count towards the total (mmdet's convention; ``acc`` etc. are kept as metrics)."""
    out: dict[str, torch.Tensor] = {}
    total = None
    for key, value in raw.items():
        if isinstance(value, (list, tuple)):
            value = sum(value)
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
        out[key] = value
        if "loss" in key:
            total = value if total is None else total + value
    if total is None:
        raise RuntimeError(f"the mmdet model returned no loss term (keys: {sorted(raw)})")
    out["loss"] = total
    return out


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and child.isdigit():
        parent[int(child)] = module
    else:
        setattr(parent, child, module)


def reinit_prior_conv(conv: nn.Conv2d, std: float = 0.01, prior_prob: float = 0.01) -> None:
    """mmdet's classifier init for sigmoid heads: normal weights, bias set so every class starts at ``prior_prob``."""
    nn.init.normal_(conv.weight, 0.0, std)
    nn.init.constant_(conv.bias, -math.log((1 - prior_prob) / prior_prob))


class SigmoidDenseHeadMixin:
    """Shared behaviour of single-stage dense heads with sigmoid class scores and ``cls_convs`` towers
    (RetinaNet, FCOS, ATSS ...): the classifier is one conv (``CLASSIFIER``) over the tower's output.

    ``box_features`` are the tower's output features (what the classifier sees) sampled at each annotated box
    centre on the FPN level that fits the box size."""

    def configure(self, model_cfg: dict) -> dict:
        model_cfg["bbox_head"]["num_classes"] = self.num_classes
        test_cfg = model_cfg.setdefault("test_cfg", {})
        test_cfg["score_thr"] = PREDICT_SCORE_THRESHOLD
        test_cfg["max_per_img"] = PREDICT_MAX_PER_IMAGE
        return model_cfg

    def _cls_tower(self, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for conv in head.cls_convs:
            x = conv(x)
        return x

    def _box_features(self, inputs, data_samples):
        feats = self.model.extract_feat(inputs)
        head = self.model.bbox_head
        towers = [self._cls_tower(head, f) for f in feats]
        strides = [int(s[0]) if isinstance(s, (tuple, list)) else int(s) for s in head.prior_generator.strides]
        return self.sample_at_centres(towers, strides, self.gt_rois(data_samples, inputs.device))

    def _classifier_repeat(self, classifier: nn.Module) -> int:
        return int(getattr(self.model.bbox_head, "num_base_priors", 1))

    def _resize_classifier(self, num_classes: int) -> None:
        head = self.model.bbox_head
        name = self.CLASSIFIER if isinstance(self.CLASSIFIER, str) else self.CLASSIFIER[0]
        old = self.model.get_submodule(name)
        head.num_classes = num_classes
        head.cls_out_channels = num_classes if getattr(head, "use_sigmoid_cls", True) else num_classes + 1
        repeat = int(getattr(head, "num_base_priors", 1))
        new = nn.Conv2d(old.in_channels, repeat * head.cls_out_channels, old.kernel_size, old.stride, old.padding)
        new = new.to(device=old.weight.device, dtype=old.weight.dtype)
        reinit_prior_conv(new)
        _set_submodule(self.model, name, new)

