"""Reptile (Nichol, Achiam & Schulman, 2018, "On First-Order Meta-Learning Algorithms", arXiv:1803.02999).

Per episode (task), starting from the meta-parameters ``theta``, take k = ``training.inner_steps`` optimiser
steps on the task's images (each step on the union of the support and the query batch) at
``training.inner_lr`` — plain SGD (default), or Adam with ``beta1 = 0`` as in the paper (``inner_optimizer``),
its state fresh for every task — giving ``phi_task``. The outer update moves ``theta`` towards the adapted weights::

    theta <- theta + eps * mean_tasks(phi_task - theta)

``eps`` (the outer step size) is annealed linearly from ``eps_start`` to ``eps_end`` over the run: the runner
reports how far the run is with :meth:`Reptile.set_progress` (fraction 0..1); without it and with a compute
budget the fraction spent of the budget is used; otherwise ``eps = eps_start``.

BatchNorm running statistics are treated like weights: the inner steps run on the detector itself (in train
mode, so its running mean/var move), and the floating-point buffers are interpolated with the same rule
``b <- b + eps * mean(b_task - b)``; integer buffers (``num_batches_tracked``) take the mean task count
rounded. The training.outer_optimizer / outer_lr settings are not used: the interpolation is the outer step.

Example::

    from megatron.api.learner import LearnerContext
    from megatron_plugins.learners.reptile import Reptile

    learner = Reptile(detector, Reptile.Options(eps_start=1.0, eps_end=0.0), LearnerContext(inner_steps=5, inner_lr=1e-3))
    for step in range(total_steps):
        learner.set_progress(step / total_steps)
        learner.meta_step(sampler.meta_batch(tasks, 4))
    adapted = learner.adapt(target_pool_batches)

Compute accounting per episode (S support + Q query images, k inner steps): forward ``k*(S+Q)``, backward
``k*(S+Q)``; the interpolation itself costs no image pass.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from megatron import hookimpl
from megatron.api.detector import Detector
from megatron.api.learner import LearnerContext, LearnerOptions, MetaLearner, optimizer_step
from megatron.types import Episode

from megatron_plugins.learners._functional import check_episode_labels, concat_batches


class ReptileOptions(LearnerOptions):
    eps_start: float = Field(1.0, gt=0, le=1, description="outer step size eps at the start of the run")
    eps_end: float = Field(0.0, ge=0, le=1, description="outer step size eps at the end (linear annealing by run progress)")
    inner_optimizer: Literal["adam", "sgd"] = Field(
        "sgd", description="inner-loop optimiser, fresh state per task: plain SGD (default: from a pre-trained detector a "
        "fresh Adam moves every weight by about the learning rate at its first step) or Adam with beta1=0 (the paper's)"
    )


class Reptile(MetaLearner):
    """Reptile: k optimiser steps per task, then ``theta <- theta + eps * mean(phi - theta)``
    (Nichol, Achiam & Schulman 2018)."""

    PLUGIN_NAME = "reptile"
    PAPER = "Nichol, Achiam & Schulman (2018), On First-Order Meta-Learning Algorithms, arXiv:1803.02999"
    Options: ClassVar[type[LearnerOptions]] = ReptileOptions

    def __init__(self, detector: Detector, options: LearnerOptions | None, ctx: LearnerContext):
        super().__init__(detector, options, ctx)
        self.progress: float | None = None
        self.steps_done = 0

    # --- the schedule -------------------------------------------------------------------------------
    def set_progress(self, fraction_done: float) -> None:
        """How far the run is (0 at the start, 1 at the end); drives the eps annealing."""
        self.progress = min(1.0, max(0.0, float(fraction_done)))

    def current_eps(self) -> float:
        progress = self.progress
        if progress is None:
            budget = self.ctx.compute.budget
            progress = min(1.0, self.ctx.compute.spent / budget) if budget else 0.0
        o = self.options
        return o.eps_start + (o.eps_end - o.eps_start) * progress

    # --- one outer update -----------------------------------------------------------------------------
    def _inner_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        if self.options.inner_optimizer == "adam":
            return torch.optim.Adam(params, lr=self.ctx.inner_lr, betas=(0.0, 0.999))
        return torch.optim.SGD(params, lr=self.ctx.inner_lr)

    def _inner_step(self, optimizer: torch.optim.Optimizer, batch) -> float:
        """One optimiser step on ``batch``; no cross-rank averaging (each rank adapts to its own tasks)."""
        ctx = self.ctx
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.detector, batch)
        optimizer_step(loss, optimizer, scaler=ctx.scaler, grad_clip=ctx.grad_clip, after_backward=ctx.compute.backward)
        return float(loss.detach())

    @torch.no_grad()
    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().clone() for n, t in self.detector.state_dict(keep_vars=True).items()}

    @torch.no_grad()
    def _restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        live = self.detector.state_dict(keep_vars=True)
        for name, value in snapshot.items():
            live[name].copy_(value)

    def meta_step(self, episodes: list[Episode]) -> dict[str, float]:
        if not episodes:
            raise ValueError("reptile: meta_step needs at least one episode")
        self.detector.train()
        theta = self._snapshot()
        delta = {n: torch.zeros_like(t, dtype=torch.float64 if not t.is_floating_point() else t.dtype)
                 for n, t in theta.items()}
        params = [p for p in self.detector.parameters() if p.requires_grad]
        losses = []
        for i, episode in enumerate(episodes):
            check_episode_labels(episode, self.detector)
            if i:
                self._restore(theta)
            batch = concat_batches([episode.support, episode.query])
            optimizer = self._inner_optimizer(params)
            for _ in range(self.ctx.inner_steps):
                losses.append(self._inner_step(optimizer, batch))
            with torch.no_grad():
                for name, value in self.detector.state_dict(keep_vars=True).items():
                    delta[name] += value.detach().to(delta[name].dtype) - theta[name].to(delta[name].dtype)
        eps = self.current_eps()
        with torch.no_grad():
            for d in delta.values():
                d /= len(episodes)
            # the single place where the tasks of different ranks are combined; integer counters are left out
            # (every rank advances them by the same k steps, and they would force a float64 buffer)
            if self.ctx.all_reduce_mean is not None:
                self.ctx.all_reduce_mean([d for n, d in delta.items() if theta[n].is_floating_point()])
            live = self.detector.state_dict(keep_vars=True)
            for name, value in live.items():
                if value.is_floating_point():
                    value.copy_(theta[name] + eps * delta[name])
                else:  # counters such as num_batches_tracked: one task's worth, as a weight would be
                    value.copy_(theta[name] + torch.round(delta[name]).to(value.dtype))
        self.steps_done += 1
        return {"loss": sum(losses) / len(losses), "eps": eps}

    def state_dict(self) -> dict:
        return {"progress": self.progress, "steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.progress = state.get("progress")
        self.steps_done = int(state.get("steps_done", 0))


@hookimpl
def megatron_register_learners() -> list[type]:
    return [Reptile]
