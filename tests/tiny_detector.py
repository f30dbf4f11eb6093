"""A tiny but real detector and a tiny synthetic dataset, as plugins, for fast tests of anything that trains.

``TinyDetector`` (plugin name ``tiny``): a 2-conv backbone and a 1-conv neck (stride 8 in all) feeding a
per-cell head — objectness, class logits and a box (centre offset in the cell, log width/height in
strides). Targets use centre assignment (the cell holding a box centre is positive for it); losses are BCE
(objectness, every cell), cross-entropy (class, positive cells) and L1 (box, positive cells). Scores are
``sigmoid(objectness) * softmax(class)``; ``predict`` keeps the best class per cell and applies
torchvision's batched NMS. ``loss(batch, params)`` is functional through ``torch.func.functional_call``
so MAML's second-order gradients flow. No BatchNorm, so it is deterministic and trivially BN-policy-safe.

``BlobsDataset`` (plugin name ``blobs``): tasks of 64x64 grayscale images with bright squares (class 0)
and bright discs (class 1) on a noisy background, generated from the image id by ``Task.image_loader``
(nothing on disk). Options set the task names, the images per task and the classes per task.

Use::

    import tiny_detector
    pm = megatron.get_plugin_manager(extra=[("tiny_detector", tiny_detector)])
"""
from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torchvision.ops import batched_nms

from megatron import hookimpl
from megatron.api.dataset import DatasetOptions, DatasetPlugin
from megatron.api.detector import Detector, DetectorOptions
from megatron.types import Batch, Detections, ImageRecord, Task, to_original_coords

STRIDE = 8


class TinyDetectorOptions(DetectorOptions):
    width: int = Field(16, ge=4, description="channels of the first conv layer (the others use 2x)")
    score_threshold: float = Field(0.05, ge=0, le=1, description="drop detections below this score before NMS")
    nms_iou: float = Field(0.5, gt=0, lt=1, description="IoU threshold of the NMS in predict")
    nan_after_steps: int | None = Field(None, ge=0, description="testing aid: the loss becomes NaN after this many loss calls")


class TinyDetector(Detector):
    PLUGIN_NAME: ClassVar[str] = "tiny"
    Options: ClassVar[type[DetectorOptions]] = TinyDetectorOptions

    def __init__(self, num_classes: int, input_size: int, options: TinyDetectorOptions | None = None):
        super().__init__(num_classes, input_size, options)
        w = self.options.width
        self.dim = 2 * w
        self.backbone = nn.Sequential(
            nn.Conv2d(3, w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.neck = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.ModuleDict({"reg": nn.Conv2d(2 * w, 5, 1), "cls": nn.Conv2d(2 * w, num_classes, 1)})
        self._prototypes: torch.Tensor | None = None
        self._temperature = 10.0
        self.loss_calls = 0

    # --- forward ----------------------------------------------------------------------------------
    def _feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(images / 255.0))

    def _classify(self, feats: torch.Tensor) -> torch.Tensor:
        if self._prototypes is None:
            return self.head["cls"](feats)
        f = F.normalize(feats, dim=1)
        p = F.normalize(self._prototypes.to(feats), dim=1)
        return self._temperature * torch.einsum("bdhw,cd->bchw", f, p)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = self._feature_map(images)
        return self.head["reg"](feats), self._classify(feats), feats

    def _call(self, images: torch.Tensor, params: dict[str, torch.Tensor] | None):
        if params is None:
            return self(images)
        return torch.func.functional_call(self, params, (images,), strict=False)

    # --- targets ----------------------------------------------------------------------------------
    def _targets(self, batch: Batch, h: int, w: int, device: torch.device):
        b = len(batch)
        obj = torch.zeros(b, h, w, device=device)
        cls = torch.full((b, h, w), -1, dtype=torch.long, device=device)
        box = torch.zeros(b, 4, h, w, device=device)
        for i, (boxes, labels) in enumerate(zip(batch.boxes, batch.labels)):
            for (x1, y1, x2, y2), lab in zip(boxes.tolist(), labels.tolist()):
                cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
                gx, gy = min(int(cx // STRIDE), w - 1), min(int(cy // STRIDE), h - 1)
                obj[i, gy, gx] = 1.0
                cls[i, gy, gx] = int(lab)
                box[i, :, gy, gx] = torch.tensor([
                    cx / STRIDE - gx, cy / STRIDE - gy,
                    math.log(max(x2 - x1, 1.0) / STRIDE), math.log(max(y2 - y1, 1.0) / STRIDE),
                ], device=device)
        return obj, cls, box

    def loss(self, batch: Batch, params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        reg, logits, _ = self._call(batch.images, params)
        _, _, h, w = reg.shape
        obj_t, cls_t, box_t = self._targets(batch, h, w, reg.device)
        loss_obj = F.binary_cross_entropy_with_logits(reg[:, 0].float(), obj_t)
        pos = cls_t >= 0
        if pos.any():
            cls_logits = logits.permute(0, 2, 3, 1)[pos].float()
            loss_cls = F.cross_entropy(cls_logits, cls_t[pos])
            pred_box = reg[:, 1:].permute(0, 2, 3, 1)[pos].float()
            box_pred = torch.cat([pred_box[:, :2].sigmoid(), pred_box[:, 2:]], dim=1)
            loss_box = F.l1_loss(box_pred, box_t.permute(0, 2, 3, 1)[pos])
        else:
            loss_cls = loss_box = reg.sum() * 0.0
        total = loss_obj + loss_cls + loss_box
        self.loss_calls += 1
        limit = self.options.nan_after_steps
        if limit is not None and self.loss_calls > limit:
            total = total * float("nan")
        return {"loss": total, "loss_obj": loss_obj, "loss_cls": loss_cls, "loss_box": loss_box}

    # --- inference --------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: Batch) -> list[Detections]:
        reg, logits, _ = self(batch.images)
        b, _, h, w = reg.shape
        ys, xs = torch.meshgrid(torch.arange(h, device=reg.device), torch.arange(w, device=reg.device), indexing="ij")
        out = []
        for i in range(b):
            scores_all = reg[i, 0].float().sigmoid()[None] * logits[i].float().softmax(0)
            score, label = scores_all.max(0)
            cx = (xs + reg[i, 1].float().sigmoid()) * STRIDE
            cy = (ys + reg[i, 2].float().sigmoid()) * STRIDE
            bw = reg[i, 3].float().clamp(-4, 4).exp() * STRIDE
            bh = reg[i, 4].float().clamp(-4, 4).exp() * STRIDE
            boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1).reshape(-1, 4)
            score, label = score.reshape(-1), label.reshape(-1)
            keep = score >= self.options.score_threshold
            boxes, score, label = boxes[keep], score[keep], label[keep]
            keep = batched_nms(boxes, score, label, self.options.nms_iou)
            out.append(Detections(
                boxes=to_original_coords(boxes[keep], batch.meta[i]),
                scores=score[keep].cpu().numpy().astype(np.float32),
                labels=label[keep].cpu().numpy().astype(np.int64),
                image_id=int(batch.meta[i].get("image_id", -1)),
            ))
        return out

    # --- the rest of the interface ----------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[str]]:
        names = [n for n, _ in self.named_parameters()]
        return {
            "backbone": [n for n in names if n.startswith("backbone.")],
            "neck": [n for n in names if n.startswith("neck.")],
            "head": [n for n in names if n.startswith("head.")],
            "head_cls": [n for n in names if n.startswith("head.cls.")],
        }

    def features(self, batch: Batch) -> torch.Tensor:
        return self._feature_map(batch.images).mean(dim=(2, 3))

    def box_features(self, batch: Batch, params: dict[str, torch.Tensor] | None = None):
        if params is None:
            feats = self._feature_map(batch.images)
        else:
            feats = torch.func.functional_call(self, params, (batch.images,), strict=False)[2]
        _, _, h, w = feats.shape
        rows, labels = [], []
        for i, (boxes, labs) in enumerate(zip(batch.boxes, batch.labels)):
            for (x1, y1, x2, y2), lab in zip(boxes.tolist(), labs.tolist()):
                gx = min(int((x1 + x2) / 2 // STRIDE), w - 1)
                gy = min(int((y1 + y2) / 2 // STRIDE), h - 1)
                rows.append(feats[i, :, gy, gx])
                labels.append(int(lab))
        if not rows:
            return feats.new_zeros(0, feats.shape[1]), torch.zeros(0, dtype=torch.long, device=feats.device)
        return torch.stack(rows), torch.tensor(labels, dtype=torch.long, device=feats.device)

    def set_prototypes(self, prototypes: torch.Tensor | None, temperature: float = 10.0) -> None:
        self._prototypes = None if prototypes is None else prototypes.detach()
        self._temperature = float(temperature)

    def get_prototypes(self):
        return None if self._prototypes is None else (self._prototypes.clone(), self._temperature)

    def set_num_classes(self, num_classes: int) -> None:
        ref = self.head["cls"].weight
        self.head["cls"] = nn.Conv2d(self.dim, num_classes, 1).to(device=ref.device, dtype=ref.dtype)
        self.num_classes = int(num_classes)
        self._prototypes = None


# --- the dataset ------------------------------------------------------------------------------------------

class BlobsOptions(DatasetOptions):
    tasks: list[str] = Field(default_factory=lambda: ["alpha", "beta", "gamma", "target"],
                             description="task names; each is one synthetic 'modality'")
    images_per_task: int = Field(24, ge=2, description="images in each task")
    classes: int = Field(2, ge=1, le=2, description="classes per task: 1 (squares) or 2 (squares, discs)")
    size: int = Field(64, ge=32, description="image side in pixels")


def blob_image(image_id: int, task_index: int, size: int, classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixels, boxes and labels of one synthetic image, all from the image id (deterministic)."""
    rng = np.random.default_rng(1000 * task_index + image_id)
    background = 20 + 15 * task_index
    img = rng.normal(background, 6.0, (size, size)).clip(0, 255)
    boxes, labels = [], []
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(int(rng.integers(1, 3))):
        side = int(rng.integers(size // 6, size // 3))
        x1, y1 = (int(v) for v in rng.integers(0, size - side, 2))
        label = int(rng.integers(0, classes))
        if label == 0:
            img[y1:y1 + side, x1:x1 + side] = 220
        else:
            r = side / 2
            img[(xx - x1 - r) ** 2 + (yy - y1 - r) ** 2 <= r * r] = 200
        boxes.append([x1, y1, x1 + side, y1 + side])
        labels.append(label)
    return img.astype(np.uint8), np.asarray(boxes, np.float32), np.asarray(labels, np.int64)


class BlobsDataset(DatasetPlugin):
    PLUGIN_NAME: ClassVar[str] = "blobs"
    Options: ClassVar[type[DatasetOptions]] = BlobsOptions

    def load(self) -> list[Task]:
        o = self.options
        cats = ["square", "disc"][: o.classes]
        tasks = []
        for t, name in enumerate(o.tasks):
            records = []
            for i in range(o.images_per_task):
                _, boxes, labels = blob_image(i, t, o.size, o.classes)
                records.append(ImageRecord(image_id=i, path=None, width=o.size, height=o.size, boxes=boxes,
                                           labels=labels, file_name=f"{name}/{i}.png"))

            def loader(record: ImageRecord, t=t) -> np.ndarray:
                return blob_image(record.image_id, t, o.size, o.classes)[0]

            tasks.append(Task(name=name, categories=list(cats), records=records, modality=f"blobs-{t}",
                              source=f"blobs:{name}", image_loader=loader))
        return tasks


@hookimpl
def megatron_register_detectors():
    return [TinyDetector]


@hookimpl
def megatron_register_datasets():
    return [BlobsDataset]
