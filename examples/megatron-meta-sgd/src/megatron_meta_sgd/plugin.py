"""Meta-SGD — Li, Zhou, Chen & Li (2017), "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning",
arXiv:1707.09835 — as a megatron learner plugin.

Meta-SGD meta-learns, besides the initialisation θ, a learning rate for every parameter entry, α (a tensor
of θ's shape per adapted parameter). Per episode, the inner loop takes ``k = training.inner_steps`` steps on
the support batch, functionally::

    θ_0 = θ;   θ_{j+1} = θ_j − α ⊙ ∇L_support(θ_j)

and the outer loss ``L_query(θ_k)`` is backpropagated to θ and α (through the inner steps: second order; with
``first_order`` the inner gradients are constants, and α still learns since ∂θ_k/∂α = −Σ ∇L_support). The
meta-gradient is averaged over the meta-batch (one backward per episode) and applied by one outer optimiser
over θ and α (``training.outer_optimizer``; θ at ``training.outer_lr``, α at ``lr_lr``).

Target adaptation (``adapt``) uses the learned rates: SGD steps ``θ ← θ − α ⊙ ∇L(batch)`` on a copy, one per
target batch. A classifier the runner resized for the target's classes has no α of its shape: it gets the
mean of its old α (the rate the meta-training found for it).

Written from ``registry_docs/contracts/learner.md`` with megatron's public API only.

Example (the runner does this for you)::

    from megatron.api.learner import LearnerContext
    from megatron_meta_sgd.plugin import MetaSGD

    learner = MetaSGD(detector, MetaSGD.Options(first_order=True), LearnerContext(inner_steps=1, inner_lr=0.01))
    stats = learner.meta_step(episodes)      # {"loss", "support_loss", "lr_mean", "lr_abs_mean"}
    adapted = learner.adapt(target_batches)  # SGD with the learned per-parameter rates, on a copy
"""
from __future__ import annotations

import copy
from typing import ClassVar, Iterable, Literal

import torch
from pydantic import Field

from megatron import hookimpl
from megatron.api.detector import Detector
from megatron.errors import ConfigError
from megatron.api.learner import LearnerOptions, MetaLearner, make_optimizer
from megatron.types import Batch, Episode


class MetaSGDOptions(LearnerOptions):
    init_lr: float | None = Field(None, gt=0, description="initial value of every per-parameter learning rate α (default: training.inner_lr)")
    lr_lr: float | None = Field(None, gt=0, description="outer step size for α (default: training.outer_lr)")
    first_order: bool = Field(False, description="ignore second derivatives through the inner steps (α is still learned)")
    inner_groups: list[str] | None = Field(
        None, description="parameter groups adapted in the inner loop and given an α, e.g. ['head']; null: every trainable parameter")
    adapt_with: Literal["learned", "finetune"] = Field(
        "learned", description="target adaptation: SGD with the learned rates α (learned) or megatron's default fine-tuning (finetune)")


class MetaSGD(MetaLearner):
    """Meta-SGD: MAML's inner loop with a meta-learned learning rate per parameter entry (Li et al. 2017)."""

    PLUGIN_NAME: ClassVar[str] = "meta-sgd"
    PAPER: ClassVar[str] = ("Li, Zhou, Chen & Li (2017), Meta-SGD: Learning to Learn Quickly for Few-Shot Learning, "
                            "arXiv:1707.09835")
    Options: ClassVar[type[LearnerOptions]] = MetaSGDOptions

    def __init__(self, detector: Detector, options: MetaSGDOptions | None, ctx):
        super().__init__(detector, options, ctx)
        self.names = self._inner_names(detector)
        init = self.options.init_lr if self.options.init_lr is not None else ctx.inner_lr
        params = dict(detector.named_parameters())
        # α lives in the learner, not in the detector: the detector stays a plain detector (checkpoints, models)
        self.alpha: dict[str, torch.Tensor] = {
            name: torch.full_like(params[name], init, requires_grad=True) for name in self.names}
        theta = [p for p in detector.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(ctx.outer_optimizer, theta, ctx.outer_lr, ctx.weight_decay)
        self.optimizer.add_param_group({"params": list(self.alpha.values()), "weight_decay": 0.0,
                                        "lr": self.options.lr_lr if self.options.lr_lr is not None else ctx.outer_lr})

    def _inner_names(self, detector: Detector) -> list[str]:
        trainable = detector.trainable_parameters()
        groups = self.options.inner_groups
        if groups is None:
            names = list(trainable)
        else:
            available = detector.parameter_groups()
            unknown = [g for g in groups if g not in available]
            if unknown:
                raise ConfigError(f"learner.options.inner_groups: unknown group(s) {unknown}; this detector has "
                                  f"{sorted(available)}")
            wanted = {n for g in groups for n in available[g]}
            names = [n for n in trainable if n in wanted]
        if not names:
            raise ConfigError("meta-sgd: the inner loop has no trainable parameter to adapt; check "
                              "learner.options.inner_groups and detector.freeze")
        return names

    # --- one outer update ----------------------------------------------------------------------------------
    def inner_loop(self, batch: Batch, second_order: bool) -> tuple[dict[str, torch.Tensor], float]:
        """``training.inner_steps`` Meta-SGD steps on ``batch``: the adapted parameters and the first loss."""
        params = dict(self.detector.named_parameters())
        fast = {name: params[name] for name in self.names}
        first = float("nan")
        for j in range(self.ctx.inner_steps):
            loss = self.loss(self.detector, batch, params=fast)  # charges len(batch) forward
            if j == 0:
                first = float(loss.detach())
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=second_order, allow_unused=True)
            self.ctx.compute.backward(len(batch))  # the inner backward, charged by hand
            fast = {name: w if g is None else w - self.alpha[name] * (g if second_order else g.detach())
                    for (name, w), g in zip(fast.items(), grads)}
        return fast, first

    def meta_step(self, episodes: list[Episode]) -> dict[str, float]:
        if not episodes:
            raise ValueError("meta-sgd: meta_step needs at least one episode")
        self.detector.train()
        self.optimizer.zero_grad(set_to_none=True)
        second_order = not self.options.first_order
        scaler = self.ctx.scaler
        k = self.ctx.inner_steps
        query_losses, support_losses = [], []
        for episode in episodes:
            fast, support_loss = self.inner_loop(episode.support, second_order)
            query_loss = self.loss(self.detector, episode.query, params=fast)
            scaled = query_loss / len(episodes)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()  # into θ and α
            # the outer backward traverses the query graph and, second order, the k inner steps again
            self.ctx.compute.backward(len(episode.query) + (k * len(episode.support) if second_order else 0))
            query_losses.append(float(query_loss.detach()))
            support_losses.append(support_loss)
        self._outer_update()
        flat = torch.cat([a.detach().reshape(-1) for a in self.alpha.values()])
        return {"loss": sum(query_losses) / len(query_losses),
                "support_loss": sum(support_losses) / len(support_losses),
                "lr_mean": float(flat.mean()), "lr_abs_mean": float(flat.abs().mean())}

    def _outer_update(self) -> None:
        ctx = self.ctx
        tensors = [p for g in self.optimizer.param_groups for p in g["params"]]
        if ctx.all_reduce_mean is not None:  # every rank reduces the same list: untouched ones get zeros
            for p in tensors:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        if ctx.scaler is not None:
            ctx.scaler.unscale_(self.optimizer)
        if ctx.all_reduce_mean is not None:
            ctx.all_reduce_mean([p.grad for p in tensors])  # once per outer step: θ and α together
        if ctx.grad_clip:
            torch.nn.utils.clip_grad_norm_(tensors, ctx.grad_clip)
        if ctx.scaler is not None:
            ctx.scaler.step(self.optimizer)
            ctx.scaler.update()
        else:
            self.optimizer.step()

    # --- target adaptation with the learned rates -------------------------------------------------------------
    def adapt(self, batches: Iterable[Batch], freeze: str = "none") -> Detector:
        if self.options.adapt_with == "finetune":
            return super().adapt(batches, freeze)
        adapted = copy.deepcopy(self.detector)  # the runner lent us the target-sized copy: copy it again
        adapted.freeze(freeze)
        adapted.train()
        params = dict(adapted.named_parameters())
        rates = {}
        for name in self.names:
            p, a = params.get(name), self.alpha[name].detach()
            if p is None or not p.requires_grad:
                continue
            rates[name] = a if a.shape == p.shape else a.mean().expand_as(p)  # a resized classifier
        for batch in batches:
            loss = self.loss(adapted, batch)
            grads = torch.autograd.grad(loss, [params[n] for n in rates], allow_unused=True)
            self.ctx.compute.backward(len(batch))
            if self.ctx.grad_clip:
                grads = _clipped(grads, self.ctx.grad_clip)
            with torch.no_grad():
                for (name, rate), g in zip(rates.items(), grads):
                    if g is not None:
                        params[name].sub_(rate.to(g.dtype) * g)
        return adapted

    # --- resume ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"alpha": {n: a.detach().clone() for n, a in self.alpha.items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, value in state["alpha"].items():
                self.alpha[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])


def _clipped(grads: tuple, max_norm: float) -> list:
    present = [g for g in grads if g is not None]
    if not present:
        return list(grads)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in present]))
    factor = min(1.0, max_norm / (float(norm) + 1e-6))
    return [None if g is None else g * factor for g in grads]


@hookimpl
def megatron_register_learners() -> list[type]:
    return [MetaSGD]
