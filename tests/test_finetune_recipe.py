"""The fine-tuning recipe every learner's ``adapt`` shares: warm-up and cosine decay, precise BatchNorm
statistics, weight EMA, frozen BatchNorm — checked against hand computations on tiny models."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from megatron.compute import ComputeAccount
from megatron.api.detector import Detector
from megatron.api.learner import LearnerContext, MetaLearner
from megatron.training.finetune_recipe import finetune_with_recipe, freeze_batchnorm, recompute_batchnorm
from megatron.types import Batch


class BNDetector(Detector):
    """conv -> BN -> mean: a 'detector' whose loss is the mean output, enough to exercise the recipe."""

    PLUGIN_NAME = "bn-test"

    def __init__(self):
        super().__init__(1, 8)
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(2, momentum=0.1)

    def loss(self, batch, params=None):
        out = self.bn(self.conv(batch.images))
        return {"loss": (out - 1.0).pow(2).mean()}

    def parameter_groups(self):
        return {"backbone": ["conv.weight"], "neck": [], "head": ["bn.weight", "bn.bias"]}


class Plain(MetaLearner):
    PLUGIN_NAME = "plain-test"


class Sized(list):
    batches_per_epoch = 2


def batches(n: int, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [Batch(images=torch.randn(4, 1, 8, 8, generator=g) * (i + 1) + i, boxes=[], labels=[], meta=[{}] * 4)
            for i in range(n)]


def test_recompute_batchnorm_gives_the_exact_statistics_of_the_batches():
    torch.manual_seed(0)
    det = BNDetector()
    det.bn.running_mean.fill_(5.0)  # stale statistics, as after a fast fine-tuning
    det.bn.running_var.fill_(9.0)
    data = batches(3)
    account = ComputeAccount()
    recompute_batchnorm(det, data, account)
    with torch.no_grad():
        feats = [det.conv(b.images) for b in data]
    # momentum=None averages the per-batch statistics with equal weight (equal batch sizes): their exact mean
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(det.bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(det.bn.running_var, var, atol=1e-4)
    assert det.bn.momentum == 0.1 and account.images_forward == 12  # restored; forward passes charged


def test_cosine_schedule_with_warmup_sets_the_hand_computed_rates(monkeypatch):
    torch.manual_seed(0)
    det = BNDetector()
    ctx = LearnerContext(finetune_lr=0.1, finetune_schedule="cosine", finetune_warmup=0.25)
    learner = Plain(det, None, ctx)
    seen = []
    monkeypatch.setattr(Plain, "train_step", lambda self, d, opt, b: seen.append(opt.param_groups[0]["lr"]) or 0.0)
    finetune_with_recipe(learner, det, Sized(batches(8)))
    total, warmup = 8, 2
    expected = [0.1 * (s + 1) / warmup if s < warmup else
                0.1 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
                for s in range(total)]
    assert seen == pytest.approx(expected)
    assert seen[1] == pytest.approx(0.1) and seen[-1] < 0.02  # full rate after the warm-up, near 5% at the end


def test_precise_bn_is_applied_to_the_returned_model_over_one_pass():
    torch.manual_seed(0)
    det = BNDetector()
    ctx = LearnerContext(finetune_lr=0.01, finetune_bn="precise")
    data = Sized(batches(4))  # two epochs of two batches
    out = finetune_with_recipe(Plain(det, None, ctx), det, data)
    with torch.no_grad():
        feats = [out.conv(b.images) for b in data[:2]]
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    assert torch.allclose(out.bn.running_mean, mean, atol=1e-5)
    assert ctx.compute.images_forward == 4 * 4 + 2 * 4  # four training steps, then one pass of two batches


def test_ema_returns_the_average_and_frozen_bn_keeps_statistics():
    torch.manual_seed(0)
    det = BNDetector()
    start = {k: v.clone() for k, v in det.state_dict().items()}
    ctx = LearnerContext(finetune_lr=0.05, finetune_ema=0.9)
    out = finetune_with_recipe(Plain(det, None, ctx), det, batches(3))
    assert out is not det
    # hand computation of the EMA of the conv weight over the trajectory is the average the detector followed:
    # it lies strictly between the start and the final weights
    w0, w1, we = start["conv.weight"], det.conv.weight.detach(), out.conv.weight.detach()
    assert not torch.equal(we, w1) and not torch.equal(we, w0)
    assert ((we - w0).norm() < (w1 - w0).norm())

    frozen = BNDetector()
    stats = (frozen.bn.running_mean.clone(), frozen.bn.running_var.clone())
    freeze_batchnorm(frozen)
    finetune_with_recipe(Plain(frozen, None, LearnerContext(finetune_lr=0.05, finetune_bn="frozen")), frozen, batches(2))
    assert torch.equal(frozen.bn.running_mean, stats[0]) and torch.equal(frozen.bn.running_var, stats[1])
    assert not frozen.bn.weight.requires_grad and frozen.bn.training is False


class BodyBNDetector(Detector):
    """conv -> BN (the backbone) -> conv (the head): a frozen backbone whose BatchNorm sits in the frozen part."""

    PLUGIN_NAME = "body-bn-test"

    def __init__(self):
        super().__init__(1, 8)
        self.body = nn.Conv2d(1, 2, 1, bias=False)
        self.body_bn = nn.BatchNorm2d(2)
        self.head = nn.Conv2d(2, 1, 1)

    def loss(self, batch, params=None):
        return {"loss": (self.head(self.body_bn(self.body(batch.images))) - 1.0).pow(2).mean()}

    def parameter_groups(self):
        return {"backbone": ["body.weight", "body_bn.weight", "body_bn.bias"], "neck": [],
                "head": ["head.weight", "head.bias"]}


def test_a_frozen_backbone_gets_the_target_statistics_before_the_head_is_trained():
    torch.manual_seed(0)
    det = BodyBNDetector()
    det.body_bn.running_mean.fill_(5.0)  # the source images' statistics, far from the target's
    det.body_bn.running_var.fill_(9.0)
    det.freeze("backbone")
    body = det.body.weight.detach().clone()
    head = det.head.weight.detach().clone()
    seen_means = []
    data = Sized(batches(4))  # two epochs of two batches

    class Watching(Plain):
        def train_step(self, detector, optimizer, batch):  # what the head is trained on
            seen_means.append(detector.body_bn.running_mean.clone())
            return super().train_step(detector, optimizer, batch)

    ctx = LearnerContext(finetune_lr=0.05, finetune_bn="precise")
    out = finetune_with_recipe(Watching(det, None, ctx), det, data)
    with torch.no_grad():
        feats = [det.body(b.images) for b in data[:2]]
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats]).mean(0)
    # re-estimated on one pass over the pool before the first step, then left alone (eval mode, frozen weights)
    assert torch.allclose(seen_means[0], mean, atol=1e-5) and all(torch.equal(m, seen_means[0]) for m in seen_means)
    assert torch.allclose(out.body_bn.running_var, var, atol=1e-4)
    assert torch.equal(out.body.weight, body) and not torch.equal(out.head.weight, head)
    assert out.body_bn.training is False and out.body_bn.momentum == 0.1
    assert ctx.compute.images_forward == 2 * 4 + 4 * 4  # the statistics pass, then four training steps

    # BatchNorm `train` (or `frozen`) keeps the old behaviour: a frozen backbone keeps its statistics
    det2 = BodyBNDetector()
    det2.body_bn.running_mean.fill_(5.0)
    det2.freeze("backbone")
    finetune_with_recipe(Plain(det2, None, LearnerContext(finetune_lr=0.05, finetune_bn="train")), det2, data)
    assert torch.equal(det2.body_bn.running_mean, torch.full((2,), 5.0))
