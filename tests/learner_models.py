"""Tiny detectors whose losses can be worked out by hand, for pinning the learners' algorithms.

Both implement the :class:`megatron.api.detector.Detector` interface (functional ``loss(batch, params)``,
``parameter_groups``, ``box_features``, ``set_prototypes``, ``set_num_classes``) in float64, with groups
``backbone`` / ``neck`` / ``head``.

- :class:`QuadraticDetector`: ``L = 0.5 * a * sum_g m_g * ||w_g - c||^2`` where ``a = 1 + s_2`` and
  ``c = (s_0, s_1)`` come from the batch's mean channel intensities ``s = mean(images) / 255``, and the group
  weights are ``m = (1, 2, 3)`` for backbone, neck, head. Gradient steps have closed forms. A plain (not
  functional) forward in train mode also moves a running-average buffer, like BatchNorm.
- :class:`CoupledDetector`: a small nonlinear model in which the groups interact (backbone -> neck -> head),
  for finite-difference checks and prototype heads. Box ``j`` of image ``i`` has the feature
  ``f = (tanh(x_i @ W_b) + box_j / S) * w_n`` where ``x_i`` are image ``i``'s mean channel intensities / 255;
  the loss is cross-entropy of the box labels (linear classifier ``head.cls.weight`` or cosine against
  prototypes) plus the squared error of ``f . head.reg`` against the box width / S.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.api.detector import Detector
from megatron.api.learner import LearnerContext
from megatron.types import Batch, Detections, Episode

GROUP_WEIGHTS = {"backbone": 1.0, "neck": 2.0, "head": 3.0}


class _Holder(nn.Module):
    pass


def _lookup(module: nn.Module, name: str, params: dict | None) -> torch.Tensor:
    if params is not None and name in params:
        return params[name]
    return module.get_parameter(name)


def batch_stats(batch: Batch) -> torch.Tensor:
    """``s``: the mean intensity of each channel over the batch, / 255, float64 ``(3,)``."""
    return batch.images.double().mean(dim=(0, 2, 3)) / 255.0


class QuadraticDetector(Detector):
    PLUGIN_NAME = "test-quadratic"

    def __init__(self, num_classes: int = 2, input_size: int = 8, options=None, init=None):
        super().__init__(num_classes, input_size, options)
        init = init or {"backbone": (0.5, -1.0), "neck": (1.5, 0.25), "head": (-0.75, 2.0)}
        for group, values in init.items():
            holder = _Holder()
            holder.w = nn.Parameter(torch.tensor(values, dtype=torch.float64))
            setattr(self, group, holder)
        self.backbone.register_buffer("running", torch.zeros((), dtype=torch.float64))
        self.backbone.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def loss(self, batch, params=None):
        s = batch_stats(batch)
        a, c = 1.0 + s[2], s[:2]
        total = 0.0
        for group, m in GROUP_WEIGHTS.items():
            w = _lookup(self, f"{group}.w", params)
            total = total + 0.5 * a * m * ((w - c) ** 2).sum()
        if params is None and self.training:  # like BatchNorm: plain forwards move the running statistics
            with torch.no_grad():
                self.backbone.running.mul_(0.9).add_(0.1 * a)
                self.backbone.num_batches_tracked.add_(1)
        return {"loss": total}

    def predict(self, batch):
        return [Detections(boxes=torch.zeros(0, 4).numpy(), scores=torch.zeros(0).numpy(),
                           labels=torch.zeros(0, dtype=torch.long).numpy(), image_id=m.get("image_id", -1))
                for m in batch.meta]

    def parameter_groups(self):
        return {"backbone": ["backbone.w"], "neck": ["neck.w"], "head": ["head.w"], "head_cls": ["head.w"]}

    def features(self, batch):
        return batch.images.double().mean(dim=(2, 3)) / 255.0

    def set_num_classes(self, num_classes):
        self.num_classes = int(num_classes)


class CoupledDetector(Detector):
    PLUGIN_NAME = "test-coupled"
    DIM = 4

    def __init__(self, num_classes: int = 2, input_size: int = 8, options=None, seed: int = 0):
        super().__init__(num_classes, input_size, options)
        g = torch.Generator().manual_seed(seed)
        d = self.DIM
        self.backbone = _Holder()
        self.backbone.weight = nn.Parameter(0.5 * torch.randn(3, d, generator=g, dtype=torch.float64))
        self.neck = _Holder()
        self.neck.weight = nn.Parameter(1.0 + 0.2 * torch.randn(d, generator=g, dtype=torch.float64))
        self.head = _Holder()
        self.head.reg = nn.Parameter(0.3 * torch.randn(d, generator=g, dtype=torch.float64))
        self.head.cls = nn.Linear(d, num_classes, bias=False).double()
        with torch.no_grad():
            self.head.cls.weight.copy_(0.5 * torch.randn(num_classes, d, generator=g, dtype=torch.float64))
        self.prototypes: torch.Tensor | None = None
        self.temperature = 10.0

    def box_features(self, batch, params=None):
        wb = _lookup(self, "backbone.weight", params)
        wn = _lookup(self, "neck.weight", params)
        x = batch.images.double().mean(dim=(2, 3)) / 255.0  # (B, 3)
        body = torch.tanh(x @ wb)  # (B, D)
        feats = [(body[i] + box.double() / self.input_size) * wn
                 for i, image_boxes in enumerate(batch.boxes) for box in image_boxes]
        labels = [lab for labs in batch.labels for lab in labs.reshape(-1)]
        if not feats:
            return body.new_zeros(0, self.DIM), torch.zeros(0, dtype=torch.long)
        return torch.stack(feats), torch.stack(labels).long()

    def logits(self, feats, params=None):
        if self.prototypes is not None:
            return self.temperature * F.normalize(feats, dim=-1) @ F.normalize(self.prototypes.double(), dim=-1).t()
        return feats @ _lookup(self, "head.cls.weight", params).t()

    def loss(self, batch, params=None):
        feats, labels = self.box_features(batch, params)
        reg = _lookup(self, "head.reg", params)
        if len(labels) == 0:
            return {"loss": 0.0 * (reg.sum() + _lookup(self, "backbone.weight", params).sum())}
        widths = torch.cat([(b[:, 2] - b[:, 0]).double() for b in batch.boxes]) / self.input_size
        cls_loss = F.cross_entropy(self.logits(feats, params), labels)
        reg_loss = ((feats @ reg - widths) ** 2).mean()
        return {"loss": cls_loss + reg_loss, "loss_cls": cls_loss, "loss_reg": reg_loss}

    def predict(self, batch):
        with torch.no_grad():
            feats, _ = self.box_features(batch)
            scores = self.logits(feats).softmax(-1)
        out, j = [], 0
        for i, boxes in enumerate(batch.boxes):
            n = len(boxes)
            sc, lab = scores[j:j + n].max(-1) if n else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
            out.append(Detections(boxes=boxes.numpy(), scores=sc.float().numpy(), labels=lab.numpy(),
                                  image_id=batch.meta[i].get("image_id", -1)))
            j += n
        return out

    def parameter_groups(self):
        return {"backbone": ["backbone.weight"], "neck": ["neck.weight"], "head": ["head.reg", "head.cls.weight"],
                "head_cls": ["head.cls.weight"]}

    def features(self, batch):
        x = batch.images.double().mean(dim=(2, 3)) / 255.0
        return torch.tanh(x @ self.backbone.weight)

    def set_prototypes(self, prototypes, temperature=10.0):
        # keeps the graph (no detach) so a meta-gradient can flow through the support features
        self.prototypes = prototypes
        self.temperature = float(temperature)

    def set_num_classes(self, num_classes):
        self.num_classes = int(num_classes)
        self.head.cls = nn.Linear(self.DIM, num_classes, bias=False).double()


# --- building batches and episodes by hand -------------------------------------------------------------
def make_batch(channel_values, boxes=None, labels=None, size: int = 8, first_id: int = 0) -> Batch:
    """One constant image per entry of ``channel_values`` (three intensities each, 0..255)."""
    n = len(channel_values)
    images = torch.tensor(channel_values, dtype=torch.float32).view(n, 3, 1, 1).expand(n, 3, size, size).contiguous()
    boxes = boxes if boxes is not None else [[[1.0, 1.0, 5.0, 6.0]] for _ in range(n)]
    labels = labels if labels is not None else [[0] * len(b) for b in boxes]
    return Batch(
        images=images,
        boxes=[torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes],
        labels=[torch.tensor(lab, dtype=torch.long).reshape(-1) for lab in labels],
        meta=[{"image_id": first_id + i, "orig_size": (size, size), "scale": 1.0, "pad": (0, 0)} for i in range(n)],
    )


def make_episode(name: str, support: Batch, query: Batch, categories=("a", "b")) -> Episode:
    return Episode(task_name=name, support=support, query=query, categories=list(categories))


def ctx(**kw) -> LearnerContext:
    kw.setdefault("grad_clip", None)
    return LearnerContext(**kw)


def quad_episodes():
    """Two tasks with different support/query statistics (constant images: s = channel values / 255)."""
    return [
        make_episode("t1", make_batch([[51, 102, 127.5], [51, 102, 127.5]]), make_batch([[204, 25.5, 51]], first_id=10)),
        make_episode("t2", make_batch([[153, 76.5, 25.5]], first_id=20), make_batch([[10.2, 229.5, 204], [10.2, 229.5, 204]], first_id=30)),
    ]
