"""Shared machinery of the built-in learners: functional inner loops, the outer (meta) step, label checks.

Everything here talks to the detector only through :class:`megatron.detector.Detector`'s interface
(``loss(batch, params)``, ``parameter_groups()``, ``trainable_parameters()``) and to the runner only through
:class:`megatron.learner.LearnerContext`, so it works for any detector plugin.

Compute accounting (see :mod:`megatron.compute`): every forward goes through :meth:`MetaLearner.loss` (which
charges ``len(batch)`` images forward); every backward is charged explicitly with the number of images whose
graph it traverses. A second-order outer backward runs back through the inner steps, so it pays for their
support images again; a first-order one pays for the query images only.
"""
from __future__ import annotations

import copy
import logging
from typing import Iterable

import torch

from megatron.detector import Detector
from megatron.errors import ConfigError
from megatron.learner import MetaLearner, make_optimizer
from megatron.types import Batch, Episode

log = logging.getLogger(__name__)


# --- label spaces ---------------------------------------------------------------------------------
def check_episode_labels(episode: Episode, detector: Detector) -> None:
    """Every label of the episode must index into the detector's head (see the learners' label-space policy)."""
    for which, batch in (("support", episode.support), ("query", episode.query)):
        for i, labels in enumerate(batch.labels):
            if labels.numel() and (int(labels.max()) >= detector.num_classes or int(labels.min()) < 0):
                image_id = batch.meta[i].get("image_id", i) if i < len(batch.meta) else i
                raise ConfigError(
                    f"episode of task {episode.task_name!r}: {which} image {image_id} has label "
                    f"{int(labels.max())} but the detector head has {detector.num_classes} classes. The head must be "
                    "sized to the largest label space of the source tasks (or to episode.n_way for N-way episodes)."
                )


def concat_batches(batches: list[Batch]) -> Batch:
    """One batch holding the images of ``batches`` in order (same input size required)."""
    if len(batches) == 1:
        return batches[0]
    return Batch(
        images=torch.cat([b.images for b in batches], dim=0),
        boxes=[box for b in batches for box in b.boxes],
        labels=[lab for b in batches for lab in b.labels],
        meta=[m for b in batches for m in b.meta],
    )


# --- the outer optimiser ----------------------------------------------------------------------------
class OuterOptimizerMixin:
    """A lazily created outer optimiser over the detector's trainable parameters, kept across meta-steps;
    its state travels in :meth:`state_dict` for exact resume (a state loaded before the optimiser exists is
    applied when it is created)."""

    _outer_opt: torch.optim.Optimizer | None = None
    _pending_opt_state: dict | None = None

    def outer_optimizer(self) -> torch.optim.Optimizer:
        if self._outer_opt is None:
            ctx = self.ctx
            self._outer_opt = make_optimizer(ctx.outer_optimizer, self.detector.parameters(), ctx.outer_lr, ctx.weight_decay)
            if self._pending_opt_state is not None:
                self._outer_opt.load_state_dict(self._pending_opt_state)
                self._pending_opt_state = None
        return self._outer_opt

    def reset_outer_optimizer(self) -> None:
        self._outer_opt = None
        self._pending_opt_state = None

    def state_dict(self) -> dict:
        if self._outer_opt is not None:
            opt_state = self._outer_opt.state_dict()
        else:
            opt_state = self._pending_opt_state
        return {"outer_optimizer": copy.deepcopy(opt_state)}

    def load_state_dict(self, state: dict) -> None:
        opt_state = state.get("outer_optimizer")
        if self._outer_opt is not None and opt_state is not None:
            self._outer_opt.load_state_dict(opt_state)
        else:
            self._pending_opt_state = opt_state


def scaled_backward(learner: MetaLearner, loss: torch.Tensor) -> None:
    """``loss.backward()`` through the context's gradient scaler (fp16) when there is one."""
    scaler = learner.ctx.scaler
    (scaler.scale(loss) if scaler is not None else loss).backward()


def finish_outer_step(learner: MetaLearner, optimizer: torch.optim.Optimizer) -> None:
    """Apply the meta-gradient accumulated in ``.grad``: unscale (fp16), average over ranks, clip, step.

    This is the single place where task contributions of different ranks are combined. In a distributed
    run every parameter of the optimiser gets a gradient (zeros where no task touched it) so that all ranks
    reduce the same list; in a single process untouched parameters keep ``grad=None`` and are not stepped.
    """
    ctx = learner.ctx
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if ctx.all_reduce_mean is not None:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    if ctx.scaler is not None:
        ctx.scaler.unscale_(optimizer)
    if ctx.all_reduce_mean is not None:
        ctx.all_reduce_mean([p.grad for p in params])
    if ctx.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, ctx.grad_clip)
    if ctx.scaler is not None:
        ctx.scaler.step(optimizer)
        ctx.scaler.update()
    else:
        optimizer.step()


# --- functional inner loop (MAML, FOMAML, ANIL) -------------------------------------------------------
def inner_loop(
    learner: MetaLearner,
    detector: Detector,
    batch: Batch,
    names: Iterable[str],
    steps: int,
    lr: float,
    first_order: bool,
) -> tuple[dict[str, torch.Tensor], float]:
    """``steps`` plain SGD steps at ``lr`` on ``batch`` applied functionally to the parameters ``names``.

    Returns the adapted parameters (a dict for ``detector.loss(batch, params=...)``) and the loss before the
    first step. Second order (``first_order=False``): the adapted tensors are differentiable functions of the
    detector's parameters (``create_graph=True``), so a backward from a loss on them is the exact MAML
    meta-gradient. First order: the inner gradients are detached, ``d adapted / d theta = I`` (FOMAML).
    The detector's own tensors are never modified. Each step charges ``len(batch)`` images forward and
    ``len(batch)`` backward.
    """
    all_params = dict(detector.named_parameters())
    params = {n: all_params[n] for n in names}
    if not params:
        raise ConfigError(f"{learner.PLUGIN_NAME}: the inner loop has no trainable parameters to adapt")
    scaler = learner.ctx.scaler
    first_loss = float("nan")
    for step in range(steps):
        loss = learner.loss(detector, batch, params=params)
        if step == 0:
            first_loss = float(loss.detach())
        # fp16: scale the loss so that small inner gradients do not underflow, unscale them after
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        grads = torch.autograd.grad(
            loss * scale if scale != 1.0 else loss,
            list(params.values()),
            create_graph=not first_order,
            allow_unused=True,
        )
        learner.ctx.compute.backward(len(batch))
        if scale != 1.0 and not all(torch.isfinite(g).all() for g in grads if g is not None):
            # fp16 overflow: skip this inner step, as GradScaler skips an optimiser step
            log.warning("%s: inner-loop gradients overflowed at loss scale %g; step skipped", learner.PLUGIN_NAME, scale)
            continue
        new_params = {}
        for (name, p), g in zip(params.items(), grads):
            if g is None:
                new_params[name] = p
                continue
            if scale != 1.0:
                g = g / scale
            if first_order:
                g = g.detach()
            new_params[name] = p - lr * g
        params = new_params
    return params, first_loss


def names_in_groups(detector: Detector, groups: list[str] | None) -> list[str]:
    """Trainable parameter names of ``groups`` (``None``: every trainable parameter), in module order."""
    trainable = detector.trainable_parameters()
    if groups is None:
        return list(trainable)
    available = detector.parameter_groups()
    unknown = [g for g in groups if g not in available]
    if unknown:
        raise ConfigError(
            f"unknown parameter group(s) {unknown}; detector {getattr(detector, 'PLUGIN_NAME', type(detector).__name__)!r} "
            f"has {sorted(available)}"
        )
    wanted = {n for g in groups for n in available[g]}
    return [n for n in trainable if n in wanted]
