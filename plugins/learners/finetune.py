"""Transfer learning, the baseline every meta-learner is compared with: joint training on the source tasks,
then fine-tuning on the target pool (the classic pre-train / fine-tune recipe, e.g. Yosinski et al. 2014,
"How transferable are features in deep neural networks?"; for few-shot detection the "fine-tuning baseline" of
Wang et al. 2020, "Frustratingly Simple Few-Shot Object Detection").

``meta_step`` is plain supervised training on every image of the meta-batch: for each episode in order, one
optimiser step on its support batch, then one on its query batch (the outer optimiser,
``training.outer_optimizer`` at ``training.outer_lr``, kept across steps). Support and query are just two
mini-batches of the same source task here, so the baseline sees exactly the images the meta-learners see, and
its compute is directly comparable: per episode forward ``S + Q`` and backward ``S + Q`` images (as Reptile
with one inner step; MAML pays more per episode).

``adapt`` is the default fine-tuning of :class:`megatron.learner.MetaLearner`: a copy, the runner's freeze
policy (``detector.freeze``), Adam at ``training.finetune_lr``, one step per target batch.

Example::

    from megatron.learner import LearnerContext
    from megatron_plugins.learners.finetune import Finetune

    learner = Finetune(detector, None, LearnerContext(outer_lr=1e-3, outer_optimizer="adam"))
    learner.meta_step(episodes)                  # 2 * len(episodes) optimiser steps
    adapted = learner.adapt(target_pool_batches, freeze="backbone")
"""
from __future__ import annotations

from typing import ClassVar

from megatron import hookimpl
from megatron.learner import LearnerOptions, MetaLearner
from megatron.types import Episode

from megatron_plugins.learners._functional import OuterOptimizerMixin, check_episode_labels


class Finetune(OuterOptimizerMixin, MetaLearner):
    """The transfer-learning baseline: joint training on the source tasks' images, then fine-tuning."""

    PLUGIN_NAME = "finetune"
    PAPER = "Transfer learning baseline (pre-train on the sources, fine-tune on the target); cf. Wang et al. (2020), Frustratingly Simple Few-Shot Object Detection, ICML"
    Options: ClassVar[type[LearnerOptions]] = LearnerOptions

    def meta_step(self, episodes: list[Episode]) -> dict[str, float]:
        if not episodes:
            raise ValueError(f"{self.PLUGIN_NAME}: meta_step needs at least one episode")
        self.detector.train()
        optimizer = self.outer_optimizer()
        losses = []
        for episode in episodes:
            check_episode_labels(episode, self.detector)
            for batch in (episode.support, episode.query):
                losses.append(self.train_step(self.detector, optimizer, batch))
        return {"loss": sum(losses) / len(losses)}


@hookimpl
def megatron_register_learners() -> list[type]:
    return [Finetune]
