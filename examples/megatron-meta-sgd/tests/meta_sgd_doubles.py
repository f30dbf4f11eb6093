"""Test doubles a learner plugin needs: a detector whose loss has a closed form, episodes built by hand, and a
small in-memory dataset plugin so the learner can go through a whole `megatron run`."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from megatron import hookimpl
from megatron.api.dataset import DatasetPlugin
from megatron.api.detector import Detector
from megatron.types import Batch, Detections, Episode, ImageRecord, Task

GROUPS = ("backbone", "neck", "head")


class QuadraticDetector(Detector):
    """``L = 0.5 * sum_g ||w_g - c||^2`` with ``c = (s_0, s_1)``, ``s`` the batch's mean channel intensities / 255:
    every gradient step has a closed form. One 2-vector ``w`` per group backbone, neck, head."""

    PLUGIN_NAME = "quadratic"

    def __init__(self, num_classes: int = 2, input_size: int = 8, options=None):
        super().__init__(num_classes, input_size, options)
        for i, group in enumerate(GROUPS):
            holder = nn.Module()
            holder.w = nn.Parameter(torch.tensor([0.5 * i - 0.25, 1.0 - 0.5 * i], dtype=torch.float64))
            setattr(self, group, holder)

    @staticmethod
    def target(batch: Batch) -> torch.Tensor:
        return batch.images.double().mean(dim=(0, 2, 3))[:2] / 255.0

    def loss(self, batch, params=None):
        c = self.target(batch)
        total = 0.0
        for group in GROUPS:
            name = f"{group}.w"
            w = params[name] if params is not None and name in params else self.get_parameter(name)
            total = total + 0.5 * ((w - c) ** 2).sum()
        return {"loss": total}

    def predict(self, batch):
        return [Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                           m.get("image_id", -1)) for m in batch.meta]

    def parameter_groups(self):
        return {g: [f"{g}.w"] for g in GROUPS} | {"head_cls": ["head.w"]}

    def features(self, batch):
        return batch.images.double().mean(dim=(2, 3))

    def set_num_classes(self, num_classes):
        self.num_classes = int(num_classes)


def make_batch(values: list[float], first_id: int = 0, size: int = 8) -> Batch:
    """One image per value: channel 0 = value, channel 1 = 255 - value, channel 2 = 0."""
    n = len(values)
    images = torch.zeros(n, 3, size, size)
    for i, v in enumerate(values):
        images[i, 0], images[i, 1] = v, 255 - v
    return Batch(images=images, boxes=[torch.tensor([[1.0, 1.0, 5.0, 5.0]]) for _ in values],
                 labels=[torch.zeros(1, dtype=torch.long) for _ in values],
                 meta=[{"image_id": first_id + i, "orig_size": (size, size), "scale": 1.0, "pad": (0, 0)} for i in range(n)])


def make_episode(name: str, support: list[float], query: list[float]) -> Episode:
    return Episode(name, make_batch(support), make_batch(query, first_id=100), ["lesion"])


class ConstantTasks(DatasetPlugin):
    """Four tasks of 12 constant-intensity 16x16 images with one box each (nothing on disk)."""

    PLUGIN_NAME = "constant-tasks"

    def load(self):
        tasks = []
        for t, name in enumerate(("a", "b", "c", "target")):
            records = [ImageRecord(i, None, 16, 16, np.array([[2.0, 2.0, 10.0, 10.0]]), np.array([0]))
                       for i in range(1, 13)]
            tasks.append(Task(name, ["lesion"], records, modality="test", image_loader=_Constant(40 + 50 * t)))
        return tasks


class _Constant:
    def __init__(self, value: int):
        self.value = value

    def __call__(self, record: ImageRecord) -> np.ndarray:
        return np.full((16, 16), self.value + record.image_id, np.uint8)


class TestPlugins:
    """The detector and the dataset above, as one plugin object."""

    @hookimpl
    def megatron_register_detectors(self):
        return [QuadraticDetector]

    @hookimpl
    def megatron_register_datasets(self):
        return [ConstantTasks]
