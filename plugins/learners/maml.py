"""MAML — Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017, "Model-Agnostic Meta-Learning for
Fast Adaptation of Deep Networks"), and its first-order approximation FOMAML (same paper, section 5.2) as the
``first_order`` flag.

Per episode (one task's support and query batch), the inner loop takes ``training.inner_steps`` plain SGD
steps at ``training.inner_lr`` on the support batch, *functionally* (a dict of adapted tensors passed to
``detector.loss(batch, params=...)``; the detector itself is not modified)::

    phi_0 = theta;  phi_{j+1} = phi_j - inner_lr * grad L_support(phi_j)

The outer loss is the query loss at the adapted parameters, ``L_query(phi_k)``; its gradient with respect to
``theta`` (through the inner steps: second order, ``create_graph=True``) is averaged over the meta-batch and
applied by the outer optimiser (``training.outer_optimizer`` at ``training.outer_lr``, created once and kept
across steps). With ``first_order: true`` the inner gradients are treated as constants, so the meta-gradient
is the query gradient at ``phi_k`` (FOMAML). Second order keeps the graphs of all ``k`` inner steps until the
outer backward; ``checkpoint_inner_steps: true`` keeps only the adapted tensors and recomputes each step's graph
when the outer backward reaches it (YOLOX-tiny, 256 px, 3 inner steps, CPU: peak memory -48% for 1.23x the time;
at 64 px, where the parameters dominate, -20% for 1.6x). When the inner loop adapts head parameters only
(``inner_groups: [head]``, or ANIL) and the detector splits its loss (``Detector.supports_head_loss``), the
support batch's body features are computed once per episode and each inner step runs the head alone.

Example (learn2learn style; the runner does this for you)::

    from megatron.api.learner import LearnerContext
    from megatron_plugins.learners.maml import MAML

    learner = MAML(detector, MAML.Options(first_order=False), LearnerContext(inner_steps=1, inner_lr=0.01))
    stats = learner.meta_step(episodes)          # one outer update from a meta-batch of episodes
    adapted = learner.adapt(target_pool_batches, freeze="none")   # a fine-tuned copy; learner.detector unchanged

Compute accounting per episode (S support images, Q query images, k inner steps): forward ``k*S + Q``;
backward ``k*S`` (inner) ``+ Q + k*S`` (outer, second order: it runs back through the inner steps) or
``+ Q`` (first order).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from megatron import hookimpl
from megatron.api.learner import LearnerOptions, MetaLearner
from megatron.types import Episode

from megatron_plugins.learners._functional import (
    OuterOptimizerMixin,
    check_episode_labels,
    finish_outer_step,
    inner_loop,
    names_in_groups,
    scaled_backward,
)


class MAMLOptions(LearnerOptions):
    first_order: bool = Field(False, description="first-order MAML (FOMAML): ignore second derivatives through the inner loop")
    inner_groups: list[str] | None = Field(
        None,
        description="parameter groups adapted in the inner loop (e.g. ['head'] or ['neck', 'head']); "
        "null: every trainable parameter",
    )
    checkpoint_inner_steps: bool = Field(
        False,
        description="second order: recompute each inner step during the outer backward (activation checkpointing) "
        "instead of keeping all their graphs: less peak memory for more time",
    )


class MAML(OuterOptimizerMixin, MetaLearner):
    """MAML / FOMAML on any detector: a functional inner loop on the support batch, the outer loss on the
    query batch, the meta-gradient averaged over the meta-batch (Finn, Abbeel & Levine 2017)."""

    PLUGIN_NAME = "maml"
    PAPER = "Finn, Abbeel & Levine (2017), Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks, ICML"
    Options: ClassVar[type[LearnerOptions]] = MAMLOptions

    def inner_parameter_names(self) -> list[str]:
        """Names of the parameters the inner loop adapts."""
        return names_in_groups(self.detector, self.options.inner_groups)

    def adapt_episode(self, episode: Episode) -> tuple[dict[str, torch.Tensor], float]:
        """The inner loop on ``episode.support``: the adapted parameters (as a dict) and the support loss
        before adaptation. The detector's own tensors are not modified."""
        return inner_loop(
            self, self.detector, episode.support, self.inner_parameter_names(),
            self.ctx.inner_steps, self.ctx.inner_lr, self.options.first_order,
            checkpoint=getattr(self.options, "checkpoint_inner_steps", False),
        )

    def accumulate_meta_gradient(self, episodes: list[Episode]) -> dict[str, float]:
        """Add the meta-gradient averaged over ``episodes`` to the parameters' ``.grad`` (no step).

        One backward per episode, so only one episode's (second-order) graph is alive at a time."""
        if not episodes:
            raise ValueError(f"{self.PLUGIN_NAME}: meta_step needs at least one episode")
        query_losses, support_losses = [], []
        k, second_order = self.ctx.inner_steps, not self.options.first_order
        for episode in episodes:
            check_episode_labels(episode, self.detector)
            adapted, support_loss = self.adapt_episode(episode)
            query_loss = self.loss(self.detector, episode.query, params=adapted)
            scaled_backward(self, query_loss / len(episodes))
            # the outer backward traverses the query graph and, second order, the k inner steps again
            self.ctx.compute.backward(len(episode.query) + (k * len(episode.support) if second_order else 0))
            query_losses.append(float(query_loss.detach()))
            support_losses.append(support_loss)
        return {
            "loss": sum(query_losses) / len(query_losses),
            "support_loss": sum(support_losses) / len(support_losses),
        }

    def meta_step(self, episodes: list[Episode]) -> dict[str, float]:
        self.detector.train()
        optimizer = self.outer_optimizer()
        optimizer.zero_grad(set_to_none=True)
        stats = self.accumulate_meta_gradient(episodes)
        finish_outer_step(self, optimizer)
        return stats


@hookimpl
def megatron_register_learners() -> list[type]:
    return [MAML]
