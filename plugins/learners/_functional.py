"""Shared machinery of the built-in learners: functional inner loops, the outer (meta) step, label checks.

Everything here talks to the detector only through :class:`megatron.api.detector.Detector`'s interface
(``loss(batch, params)``, ``parameter_groups()``, ``trainable_parameters()``) and to the runner only through
:class:`megatron.api.learner.LearnerContext`, so it works for any detector plugin.

Compute accounting (see :mod:`megatron.compute`): every forward goes through :meth:`MetaLearner.loss` (which
charges ``len(batch)`` images forward); every backward is charged explicitly with the number of images whose
graph it traverses. A second-order outer backward runs back through the inner steps, so it pays for their
support images again; a first-order one pays for the query images only.
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Iterable

import torch
import torch.utils.checkpoint

from megatron.api.detector import Detector
from megatron.errors import ConfigError
from megatron.api.learner import MetaLearner, check_finite, make_optimizer
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
    checkpoint: bool = False,
) -> tuple[dict[str, torch.Tensor], float]:
    """``steps`` plain SGD steps at ``lr`` on ``batch`` applied functionally to the parameters ``names``.

    Returns the adapted parameters (a dict for ``detector.loss(batch, params=...)``) and the loss before the
    first step. Second order (``first_order=False``): the adapted tensors are differentiable functions of the
    detector's parameters (``create_graph=True``), so a backward from a loss on them is the exact MAML
    meta-gradient. First order: the inner gradients are detached, ``d adapted / d theta = I`` (FOMAML).
    The detector's own tensors are never modified. Each step charges ``len(batch)`` images forward and
    ``len(batch)`` backward.

    When every adapted parameter is in the detector's ``head`` group and the detector splits its loss
    (:meth:`~megatron.api.detector.Detector.supports_head_loss`), the body's features of ``batch`` are computed
    once and each step runs the head alone on them (:func:`head_only_inner_loop`): the same adapted tensors and
    the same meta-gradient (the outer backward still reaches the body through those features, second order),
    without ``steps - 1`` body forwards. Otherwise every step calls ``detector.loss(batch, params)``.

    ``checkpoint`` (second order only): activation checkpointing of whole inner steps
    (``torch.utils.checkpoint``, non-reentrant). Only the adapted tensors between steps are kept; each step's
    forward and first-order backward are recomputed when the outer backward reaches them, so the second-order
    graph of one step at a time is alive instead of all ``steps``: much less peak memory for one more forward
    and backward per inner step. Same meta-gradient; the recomputation is not charged to the compute account.
    """
    all_params = dict(detector.named_parameters())
    params = {n: all_params[n] for n in names}
    if not params:
        raise ConfigError(f"{learner.PLUGIN_NAME}: the inner loop has no trainable parameters to adapt")
    support_loss = support_loss_function(learner, detector, batch, params, first_order)
    step = InnerStep(learner, support_loss, list(params), len(batch), lr, first_order)
    first_loss = float("nan")
    tensors = tuple(params.values())
    for index in range(steps):
        if checkpoint and not first_order:
            # keep only the adapted tensors; the step's graph is rebuilt when the outer backward reaches it
            out = torch.utils.checkpoint.checkpoint(step.fresh(), *tensors, use_reentrant=False)
        else:
            out = step.fresh()(*tensors)
        tensors, loss = tuple(out[:-1]), out[-1]
        if index == 0:
            first_loss = float(loss)
    return dict(zip(params, tensors)), first_loss


def support_loss_function(learner: MetaLearner, detector: Detector, batch: Batch, params: dict[str, torch.Tensor],
                          first_order: bool) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """The support loss as a function of the adapted parameters: the head alone on body features computed once
    (:func:`head_only_inner_loop`), else the whole ``detector.loss``."""
    if not head_only_inner_loop(detector, params):
        return lambda p: learner.loss(detector, batch, params=p)
    batch = batch.to(learner.ctx.device)
    # first order: nothing flows back through the support features, so they need no graph
    features = body_features(learner, detector, batch, graph=not first_order)
    return lambda p: head_loss(learner, detector, features, batch, p)


def inner_loss_scale(learner: MetaLearner) -> float:
    """fp16: the gradient scaler's current scale, so that small inner gradients do not underflow (unscaled after);
    the scale only changes at the outer step, so a step recomputed during the outer backward scales alike. 1.0
    without a scaler."""
    scaler = learner.ctx.scaler
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0


class InnerStep:
    """One functional SGD step of the inner loop: ``step(*tensors) -> (*adapted, loss before the step)``.

    :meth:`fresh` gives the callable for one step. Called a second time (activation checkpointing recomputes the
    step during the outer backward), it neither charges the compute account again nor repeats the overflow warning.
    """

    def __init__(self, learner: MetaLearner, support_loss: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                 keys: list[str], images: int, lr: float, first_order: bool):
        self.learner, self.support_loss, self.keys = learner, support_loss, keys
        self.images, self.lr, self.first_order = images, lr, first_order
        self.scale = inner_loss_scale(learner)

    def fresh(self) -> Callable[..., tuple[torch.Tensor, ...]]:
        ran = False

        def run(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            nonlocal ran
            recompute, ran = ran, True
            return self.run(tensors, recompute)

        return run

    def run(self, tensors: tuple[torch.Tensor, ...], recompute: bool) -> tuple[torch.Tensor, ...]:
        loss, grads = self.gradients(tensors, recompute)
        if self.scale != 1.0 and not all(torch.isfinite(g).all() for g in grads if g is not None):
            # fp16 overflow: skip this inner step, as GradScaler skips an optimiser step
            if not recompute:
                log.warning("%s: inner-loop gradients overflowed at loss scale %g; step skipped",
                            self.learner.PLUGIN_NAME, self.scale)
            return (*tensors, loss.detach())
        return (*self.sgd_update(tensors, grads), loss.detach())

    def gradients(self, tensors: tuple[torch.Tensor, ...], recompute: bool):
        """The support loss and its (scaled) gradients; charged ``images`` forward and backward, once."""
        compute = self.learner.ctx.compute
        saved = compute.state_dict() if recompute else None  # charged once, not again when recomputed
        try:
            loss = self.support_loss(dict(zip(self.keys, tensors)))
            scaled = loss * self.scale if self.scale != 1.0 else loss
            grads = torch.autograd.grad(scaled, tensors, create_graph=not self.first_order, allow_unused=True)
            compute.backward(self.images)
        finally:  # a recomputation may stop early (by an exception) once it has what the backward needs
            if saved is not None:
                compute.load_state_dict(saved)
        return loss, grads

    def sgd_update(self, tensors: tuple[torch.Tensor, ...], grads) -> list[torch.Tensor]:
        """``p - lr * g`` per tensor (unscaled; detached first order); a tensor without a gradient is kept."""
        new = []
        for p, g in zip(tensors, grads):
            if g is None:
                new.append(p)
                continue
            if self.scale != 1.0:
                g = g / self.scale
            if self.first_order:
                g = g.detach()
            new.append(p - self.lr * g)
        return new


def head_only_inner_loop(detector: Detector, names: Iterable[str]) -> bool:
    """True when ``names`` are all head parameters and the detector can run its head alone
    (``body_features`` + ``head_loss``), so an inner loop may compute the body once."""
    supports = getattr(detector, "supports_head_loss", None)
    if supports is None or not supports():
        return False
    names = set(names)
    return bool(names) and names <= set(detector.parameter_groups().get("head", ()))


def body_features(learner: MetaLearner, detector: Detector, batch: Batch, graph: bool = True):
    """``detector.body_features(batch)`` on the functional path (BatchNorm running statistics untouched, as
    ``loss(batch, params)``) under the context's autocast; ``graph=False``: without autograd graph. Not charged
    to the compute account: :func:`head_loss` charges each head step as an image forward, as before the split."""
    with torch.set_grad_enabled(graph and torch.is_grad_enabled()), learner.ctx.autocast():
        return detector.body_features(batch, params={})


def head_loss(learner: MetaLearner, detector: Detector, features, batch: Batch,
              params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head's total loss on precomputed ``features`` under the context's autocast (float32, checked
    finite), charged like :meth:`MetaLearner.loss`: ``len(batch)`` images forward."""
    with learner.ctx.autocast():
        out = detector.head_loss(features, batch, params=params)
    learner.ctx.compute.forward(len(batch))
    loss = out["loss"].float()
    check_finite(loss, detector)
    return loss


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
