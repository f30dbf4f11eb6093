"""The fine-tuning recipe every learner's ``adapt`` uses (the transfer-learning baseline's, and the target
fine-tuning after meta-training), with its optimiser, schedule and BatchNorm helpers.

The recipe (:func:`finetune_with_recipe`): Adam(W), linear warm-up then cosine decay, optional weight EMA, and
BatchNorm ``train``, ``frozen`` or ``precise`` (statistics recomputed on the pool). Learners and the runner
read its settings from :class:`megatron.api.learner.LearnerContext` (``training.finetune_*`` in the config).
"""
from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch

from megatron.compute import ComputeAccount
from megatron.types import Batch

if TYPE_CHECKING:  # annotations only: megatron.api.learner imports this module (the default ``adapt``)
    from megatron.api.detector import Detector
    from megatron.api.learner import MetaLearner


def make_optimizer(name: str, params: Iterable[torch.Tensor], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose adam, adamw or sgd")


def schedule_factor(step: int, total: int | None, warmup_fraction: float, schedule: str) -> float:
    """The learning-rate multiplier of fine-tuning step ``step`` (0-based) of ``total``: a linear warm-up over
    ``warmup_fraction`` of the steps, then constant or cosine decay to 5 % (cosine needs ``total``)."""
    warmup = int(round(warmup_fraction * total)) if total else 0
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine" and total:
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` over floating-point state; other buffers are copied."""
    with torch.no_grad():
        for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
            else:
                e.copy_(p)


def freeze_batchnorm(detector: Detector) -> None:
    """Keep every BatchNorm layer of ``detector`` as it is (running statistics in eval mode, affine parameters
    not trained), also in train mode: the "frozen BN" of detection fine-tuning, for batches too small to
    estimate statistics from."""
    bns = [m for m in detector.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
    known = list(getattr(detector, "_frozen_bn_modules", []))
    detector._frozen_bn_modules = known + [m for m in bns if all(m is not k for k in known)]
    detector.train(detector.training)


def recompute_batchnorm(detector: Detector, batches: Iterable[Batch], account: ComputeAccount | None = None,
                        modules: list[torch.nn.Module] | None = None) -> None:
    """Re-estimate every BatchNorm layer's running statistics for the detector's current weights ("precise BN",
    Wu & Johnson 2021, *Rethinking "Batch" in BatchNorm*; detectron2's PreciseBN): forward passes in train mode,
    without gradient, averaging the batch statistics exactly (``momentum=None``) instead of the exponential
    average that lags behind fast-changing weights. After a short fine-tuning with a high learning rate the
    lagging statistics can turn a model whose training loss is low into one that detects nothing in eval mode;
    this is measured in the README's recipe notes. Forward passes are charged to ``account``.

    ``modules``: re-estimate these BatchNorm layers only, frozen ones included (default: every layer that is not
    frozen) — :func:`finetune_with_recipe` uses it for the layers of a frozen backbone (AdaBN)."""
    if modules is None:
        bns = [m for m in detector.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               and all(m is not f for f in getattr(detector, "_frozen_bn_modules", []))]
    else:
        bns = [m for m in modules if m.track_running_stats]
    if not bns:
        return
    was_training = detector.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    detector.train()
    for m in bns:  # a frozen layer stays in eval mode under detector.train(): these must see batch statistics
        m.train()
    seen = 0
    with torch.no_grad():
        for batch in batches:
            detector.loss(batch.to(next(detector.parameters()).device))
            seen += len(batch)
    if account is not None:
        account.forward(seen)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    detector.train(was_training)


class _FirstEpoch:
    """The first ``n`` batches of a fresh iteration of ``batches`` (one pass over the pool)."""

    def __init__(self, batches: Iterable[Batch], n: int):
        self.batches, self.n = batches, n

    def __iter__(self) -> Iterator[Batch]:
        for i, batch in enumerate(self.batches):
            if i >= self.n:
                return
            yield batch


def one_pass(batches: Iterable[Batch]) -> Iterable[Batch]:
    """One pass over the pool: the first epoch when the batches say how many make one, else all of them."""
    per_epoch = getattr(batches, "batches_per_epoch", None)
    return _FirstEpoch(batches, per_epoch) if per_epoch else batches


def finetune_with_recipe(learner: "MetaLearner", detector: Detector, batches: Iterable[Batch]) -> Detector:
    """Fine-tune ``detector`` in place on ``batches`` with the context's recipe and return the model to use:
    Adam(W) at ``finetune_lr``, a linear warm-up over ``finetune_warmup`` of the steps, then constant or cosine
    decay (to 5 % of the rate) when the number of batches is known (``len(batches)``), BatchNorm ``train`` or
    ``frozen``, and — with ``finetune_ema`` — an exponential moving average of the weights (the YOLOX recipe:
    the decay ramps up as ``ema * (1 - exp(-step / 20))``, so a short fine-tuning is not dominated by the
    start), which is what is returned. With ``finetune_bn: precise`` the returned model's BatchNorm statistics
    are then recomputed on one pass over the batches (:func:`recompute_batchnorm`), and the BatchNorm layers of a
    frozen part (``detector.freeze``, ANIL's head-only adaptation) are first re-estimated on one pass over the
    pool, weights untouched (AdaBN). Every step is charged through
    :meth:`MetaLearner.train_step` (and the recomputation's forward passes to the compute account)."""
    ctx = learner.ctx
    frozen_by_policy = list(getattr(detector, "_frozen_bn_modules", []))
    if ctx.finetune_bn == "frozen":
        freeze_batchnorm(detector)
    elif ctx.finetune_bn == "precise" and frozen_by_policy:
        # a frozen backbone keeps its weights, not the source images' statistics: its BatchNorm layers are
        # re-estimated on the target pool first (AdaBN, Li et al. 2016), so the head is trained on, and later
        # sees, the target's features; with the source statistics a frozen body gave ~0 mAP50 on the target
        recompute_batchnorm(detector, one_pass(batches), ctx.compute, modules=frozen_by_policy)
    optimizer = make_optimizer("adamw" if ctx.weight_decay else "adam", detector.parameters(), ctx.finetune_lr,
                               ctx.weight_decay)
    total = len(batches) if hasattr(batches, "__len__") else None

    ema = copy.deepcopy(detector) if ctx.finetune_ema else None
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = ctx.finetune_lr * schedule_factor(step, total, ctx.finetune_warmup, ctx.finetune_schedule)
        learner.train_step(detector, optimizer, batch)
        if ema is not None:
            update_ema(ema, detector, ctx.finetune_ema * (1 - math.exp(-(step + 1) / 20)))
    model = ema if ema is not None else detector
    if ctx.finetune_bn == "precise":
        recompute_batchnorm(model, one_pass(batches), ctx.compute)
    return model


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, *, scaler: "torch.amp.GradScaler | None" = None,
                   grad_clip: float | None = None, after_backward: Callable[[], None] | None = None) -> None:
    """Backward, optional ``after_backward()`` (accounting, all-reduce), gradient clipping over the optimiser's
    parameters, step — with the fp16 gradient scaler when one is given (unscaled before clipping)."""
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if after_backward is not None:
        after_backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
