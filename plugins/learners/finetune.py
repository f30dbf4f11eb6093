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

Data parallelism (``episodes_per_step``): one optimiser step may average the gradients of several episodes'
batches (gradient accumulation: for each group of ``episodes_per_step`` consecutive episodes, one step on
their support batches, then one on their query batches). A distributed run of W processes splits every group
over the processes (each takes ``episodes_per_step / W`` of it, its share of the meta-batch) and averages the
gradients with one all-reduce per step, so it takes exactly the steps of a single-process run with the same
``episodes_per_step``. It therefore needs a multiple of W; the default (1) is raised to W with a log message,
which makes a W-process run equal to a one-process run with ``episodes_per_step: W``.

``adapt`` is the default fine-tuning of :class:`megatron.api.learner.MetaLearner`: a copy, the runner's freeze
policy (``detector.freeze``), Adam at ``training.finetune_lr``, one step per target batch.

Example::

    from megatron.api.learner import LearnerContext
    from megatron_plugins.learners.finetune import Finetune

    learner = Finetune(detector, None, LearnerContext(outer_lr=1e-3, outer_optimizer="adam"))
    learner.meta_step(episodes)                  # 2 * len(episodes) optimiser steps
    adapted = learner.adapt(target_pool_batches, freeze="backbone")
"""
from __future__ import annotations

import logging
from typing import ClassVar

from pydantic import Field

from megatron import hookimpl
from megatron.errors import ConfigError
from megatron.api.learner import LearnerOptions, MetaLearner
from megatron.types import Episode

from megatron_plugins.learners._functional import OuterOptimizerMixin, check_episode_labels, finish_outer_step, scaled_backward

log = logging.getLogger(__name__)


class FinetuneOptions(LearnerOptions):
    episodes_per_step: int = Field(
        1, ge=1,
        description="episodes whose support (then query) gradients one optimiser step averages; a distributed run "
        "splits each group over its processes (a multiple of their number; the default 1 becomes that number)",
    )


class Finetune(OuterOptimizerMixin, MetaLearner):
    """The transfer-learning baseline: joint training on the source tasks' images, then fine-tuning."""

    PLUGIN_NAME = "finetune"
    PAPER = "Transfer learning baseline (pre-train on the sources, fine-tune on the target); cf. Wang et al. (2020), Frustratingly Simple Few-Shot Object Detection, ICML"
    Options: ClassVar[type[LearnerOptions]] = FinetuneOptions

    _warned_world: int | None = None

    def local_episodes_per_step(self) -> int:
        """Episodes of this process's share that one optimiser step averages."""
        world = max(1, int(self.ctx.world_size))
        per_step = getattr(self.options, "episodes_per_step", 1)
        if world > 1 and per_step == 1:
            if self._warned_world != world:
                log.info("%s: data parallel over %d processes: each optimiser step averages %d episodes (one per "
                         "process), as a one-process run with episodes_per_step: %d", self.PLUGIN_NAME, world, world, world)
                self._warned_world = world
            per_step = world
        if per_step % world:
            raise ConfigError(
                f"learner.options.episodes_per_step = {per_step} cannot be split over {world} processes: use a multiple "
                f"of {world}"
            )
        return per_step // world

    def meta_step(self, episodes: list[Episode]) -> dict[str, float]:
        if not episodes:
            raise ValueError(f"{self.PLUGIN_NAME}: meta_step needs at least one episode")
        self.detector.train()
        optimizer = self.outer_optimizer()
        for episode in episodes:
            check_episode_labels(episode, self.detector)
        local = self.local_episodes_per_step()
        losses = []
        if local == 1 and self.ctx.world_size <= 1:  # one step per batch (gradient averaging in train_step)
            for episode in episodes:
                for batch in (episode.support, episode.query):
                    losses.append(self.train_step(self.detector, optimizer, batch))
            return {"loss": sum(losses) / len(losses)}
        for start in range(0, len(episodes), local):
            group = episodes[start:start + local]
            for which in ("support", "query"):
                optimizer.zero_grad(set_to_none=True)
                for episode in group:
                    batch = getattr(episode, which)
                    loss = self.loss(self.detector, batch)
                    scaled_backward(self, loss / len(group))
                    self.ctx.compute.backward(len(batch))
                    losses.append(float(loss.detach()))
                # averaged over the group's episodes here and over the processes in finish_outer_step
                finish_outer_step(self, optimizer)
        return {"loss": sum(losses) / len(losses)}


@hookimpl
def megatron_register_learners() -> list[type]:
    return [Finetune]
