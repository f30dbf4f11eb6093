"""The interface every learner plugin implements (meta-learners and the transfer-learning baselines alike).

The runner owns the loops, devices, mixed precision, checkpoints and logging; a learner owns one outer
update (:meth:`MetaLearner.meta_step`) and fast adaptation (:meth:`MetaLearner.adapt`).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable, Iterator

import torch
from pydantic import BaseModel, ConfigDict

from megatron.api.detector import Detector
from megatron.compute import ComputeAccount
from megatron.errors import TrainingError
from megatron.runtime import precision
from megatron.training.finetune_recipe import finetune_with_recipe, make_optimizer, optimizer_step
from megatron.types import Batch, Episode, Task

__all__ = ["BASELINE_LEARNER", "LearnerContext", "LearnerOptions", "MetaLearner", "check_finite", "iterate_forever",
           "make_optimizer", "optimizer_step"]

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
    # the fine-tuning recipe of :meth:`MetaLearner.adapt` (see :func:`megatron.training.finetune_recipe.finetune_with_recipe`); these defaults are plain
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
        return precision.autocast(self.amp, self.device)


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

    @classmethod
    def required_capabilities(cls, options: LearnerOptions) -> set[str]:
        """What the learner, with ``options``, needs from the detector beyond ``loss``/``predict``
        (``megatron.api.detector.CAPABILITY_*``), checked against ``Detector.unsupported`` before a run starts.
        Default: second derivatives when the options have ``first_order: false`` (MAML, ANIL)."""
        return {"second_order"} if getattr(options, "first_order", True) is False else set()

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
        return finetune_with_recipe(self, adapted, batches)

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


def check_finite(loss: torch.Tensor, detector: Detector | None = None) -> None:
    if not torch.isfinite(loss):
        raise TrainingError(
            f"the training loss became {float(loss.detach())} (not finite). The run stops here; the last good "
            "checkpoint is kept. Lower the learning rates (training.inner_lr / outer_lr / finetune_lr), "
            "enable gradient clipping (training.grad_clip) or switch --amp off."
        )


def iterate_forever(batches: Iterable[Batch]) -> Iterator[Batch]:
    while True:
        yield from batches
