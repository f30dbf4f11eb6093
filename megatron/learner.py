"""The interface every learner plugin implements (meta-learners and the transfer-learning baselines alike).

The runner owns the loops, devices, mixed precision, checkpoints and logging; a learner owns one outer
update (:meth:`MetaLearner.meta_step`) and fast adaptation (:meth:`MetaLearner.adapt`).
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable, Iterator

import torch
from pydantic import BaseModel, ConfigDict

from megatron.compute import ComputeAccount
from megatron.detector import Detector
from megatron.types import Batch, Episode, Task

#: the transfer-learning baseline every learner is compared with (a learner plugin like the others)
BASELINE_LEARNER = "finetune"


class LearnerOptions(BaseModel):
    """Options every learner understands; a plugin subclasses this to add its own (``extra='forbid'``)."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class LearnerContext:
    """What the runner lends a learner: device, precision, the compute account and training settings."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: str = "off"  # off | bf16 | fp16
    compute: ComputeAccount = field(default_factory=ComputeAccount)
    inner_steps: int = 1
    inner_lr: float = 0.01
    outer_lr: float = 0.001
    outer_optimizer: str = "adam"  # adam | sgd | adamw
    weight_decay: float = 0.0
    finetune_lr: float = 0.001
    # the fine-tuning recipe of :meth:`MetaLearner.adapt` (see :func:`finetune`); these defaults are plain
    # constant-rate fine-tuning, the runner passes the config's (``training.finetune_*``)
    finetune_schedule: str = "constant"  # constant | cosine (after the warm-up)
    finetune_warmup: float = 0.0  # fraction of the fine-tuning steps with a linear warm-up
    finetune_ema: float = 0.0  # decay of an exponential moving average of the weights (0: off); the EMA is returned
    # BatchNorm while fine-tuning: train (plain), frozen (statistics and affine parameters kept from the start) or
    # precise (trained, then the statistics recomputed on the pool for the final weights; see recompute_batchnorm)
    finetune_bn: str = "train"
    grad_clip: float | None = 10.0
    # set by the runner for distributed runs: averages a list of tensors over ranks in place
    all_reduce_mean: Callable[[list[torch.Tensor]], None] | None = None
    # processes sharing each meta-batch (1: not distributed); data-parallel learners size their steps by it
    world_size: int = 1
    scaler: "torch.amp.GradScaler | None" = None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def make_optimizer(name: str, params: Iterable[torch.Tensor], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose adam, adamw or sgd")


class MetaLearner:
    """Abstract learner.

    Subclasses set ``PLUGIN_NAME``, ``Options`` and ``PAPER`` and implement :meth:`meta_step`. The default
    :meth:`adapt` is plain fine-tuning of a copy of the detector with the context's ``finetune_lr``;
    learners whose evaluation needs something else (prototypes, head-only adaptation) override it.
    """

    PLUGIN_NAME: ClassVar[str]
    PAPER: ClassVar[str] = ""
    Options: ClassVar[type[LearnerOptions]] = LearnerOptions

    def __init__(self, detector: Detector, options: LearnerOptions | None, ctx: LearnerContext):
        self.detector = detector
        self.options = options if options is not None else self.Options()
        self.ctx = ctx

    # --- the two operations ---------------------------------------------------------------------
    def meta_step(self, episodes: list[Episode]) -> dict[str, float]:
        """One outer update of ``self.detector`` from a meta-batch of episodes; returns scalar stats
        (at least ``"loss"``)."""
        raise NotImplementedError

    def adapt(self, batches: Iterable[Batch], freeze: str = "none") -> Detector:
        """A copy of the detector fine-tuned on ``batches`` (the target's few-shot pool); the meta-parameters
        are left untouched."""
        adapted = copy.deepcopy(self.detector)
        adapted.freeze(freeze)
        adapted.train()
        return finetune(self, adapted, batches)

    # --- what schedules the source tasks (incremental transfer overrides it) ----------------------
    def source_tasks(self, meta_epoch: int, meta_epochs: int, tasks: list[Task]) -> list[Task]:
        """The source tasks episodes are drawn from in ``meta_epoch`` (0-based). Default: all of them."""
        return tasks

    def set_progress(self, fraction_done: float) -> None:
        """How far the run is, 0 (start) .. 1 (end); the runner calls it before every outer step. Learners
        with a schedule (Reptile's annealed outer step size) override it; the default ignores it."""

    # --- helpers shared by learners ---------------------------------------------------------------
    def loss(self, detector: Detector, batch: Batch, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The detector's total loss under the context's autocast, charged to the compute account."""
        batch = batch.to(self.ctx.device)
        with self.ctx.autocast():
            out = detector.loss(batch, params=params)
        self.ctx.compute.forward(len(batch))
        loss = out["loss"].float()
        check_finite(loss, detector)
        return loss

    def train_step(self, detector: Detector, optimizer: torch.optim.Optimizer, batch: Batch) -> float:
        """One plain optimiser step (forward, backward, clip, step) — used by baselines and fine-tuning."""
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(detector, batch)
        self.backward_and_step(loss, optimizer, detector.parameters())
        return float(loss.detach())

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> None:
        """Backward (charged), gradients averaged over ranks in a distributed run, clip, step."""
        params = list(params)

        def after_backward() -> None:
            self.ctx.compute.backward()
            if self.ctx.all_reduce_mean is not None:
                self.ctx.all_reduce_mean([p.grad for p in params if p.grad is not None])

        optimizer_step(loss, optimizer, scaler=self.ctx.scaler, grad_clip=self.ctx.grad_clip, after_backward=after_backward)

    def state_dict(self) -> dict:
        """Learner state beyond the detector's weights (optimiser moments, schedules) for resume."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


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
    frozen) — :func:`finetune` uses it for the layers of a frozen backbone (AdaBN)."""
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


def _one_pass(batches: Iterable[Batch]) -> Iterable[Batch]:
    """One pass over the pool: the first epoch when the batches say how many make one, else all of them."""
    per_epoch = getattr(batches, "batches_per_epoch", None)
    return _FirstEpoch(batches, per_epoch) if per_epoch else batches


def finetune(learner: "MetaLearner", detector: Detector, batches: Iterable[Batch]) -> Detector:
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
        recompute_batchnorm(detector, _one_pass(batches), ctx.compute, modules=frozen_by_policy)
    optimizer = make_optimizer("adamw" if ctx.weight_decay else "adam", detector.parameters(), ctx.finetune_lr,
                               ctx.weight_decay)
    total = len(batches) if hasattr(batches, "__len__") else None
    warmup = int(round(ctx.finetune_warmup * total)) if total else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if ctx.finetune_schedule == "cosine" and total:
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    ema = copy.deepcopy(detector) if ctx.finetune_ema else None
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = ctx.finetune_lr * factor(step)
        learner.train_step(detector, optimizer, batch)
        if ema is not None:
            decay = ctx.finetune_ema * (1 - math.exp(-(step + 1) / 20))
            with torch.no_grad():
                for e, p in zip(ema.state_dict().values(), detector.state_dict().values()):
                    if e.dtype.is_floating_point:
                        e.mul_(decay).add_(p.detach(), alpha=1 - decay)
                    else:
                        e.copy_(p)
    model = ema if ema is not None else detector
    if ctx.finetune_bn == "precise":
        recompute_batchnorm(model, _one_pass(batches), ctx.compute)
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


def check_finite(loss: torch.Tensor, detector: Detector | None = None) -> None:
    if not torch.isfinite(loss):
        from megatron.errors import TrainingError

        raise TrainingError(
            f"the training loss became {float(loss.detach())} (not finite). The run stops here; the last good "
            "checkpoint is kept. Lower the learning rates (training.inner_lr / outer_lr / finetune_lr), "
            "enable gradient clipping (training.grad_clip) or switch --amp off."
        )


def iterate_forever(batches: Iterable[Batch]) -> Iterator[Batch]:
    while True:
        yield from batches
