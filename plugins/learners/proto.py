"""Prototype heads: Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017, "Prototypical Networks for
Few-shot Learning") in a detector, with the cosine-similarity classifier used for few-shot detection by
Wang et al. (ICML 2020, "Frustratingly Simple Few-Shot Object Detection", the TFA cosine head).

A class prototype is the mean of the L2-normalised features of the support set's annotated boxes of that class
(``detector.box_features``: the features the detector's classifier sees). The detector's classifier is
replaced by ``logits_c = temperature * cos(f, p_c)`` (``detector.set_prototypes``), so a new target class
needs no trained classifier weights: a handful of annotated boxes define it.

Meta-training, per episode: prototypes from the support batch, then the detection loss on the query batch
with those prototypes as the classifier; the loss is backpropagated into the body through the query features
and (when the detector keeps the prototypes' graph) through the support features too; the gradient is averaged
over the meta-batch and the outer optimiser (``training.outer_optimizer`` at ``outer_lr``) takes one step.
Classes of the head that have no box in the support batch get a zero prototype (cosine 0).

Adaptation (``adapt``): on a copy, prototypes from the whole target pool; with ``finetune: true`` the copy is
then fine-tuned on the pool with the prototype classifier in place (the shared recipe of
:func:`megatron.training.finetune_recipe.finetune_with_recipe`: ``training.finetune_*``, the runner's freeze policy), and the prototypes are recomputed from the pool with the fine-tuned weights. Pool
prototypes are computed in eval mode (BatchNorm running statistics), as predictions are.

Example::

    from megatron.api.learner import LearnerContext
    from megatron_plugins.learners.proto import Proto, class_prototypes, cosine_logits

    learner = Proto(detector, Proto.Options(temperature=10.0), LearnerContext())
    learner.meta_step(episodes)
    adapted = learner.adapt(target_pool_batches)        # classifier = cosine against pool prototypes

Compute accounting per episode (S support, Q query images): forward ``S + Q``, backward ``S + Q``. ``adapt``:
the fine-tuning steps as usual plus one forward of each distinct pool image per prototype computation.
"""
from __future__ import annotations

import copy
from typing import ClassVar, Iterable

import torch
import torch.nn.functional as F
from pydantic import Field

from megatron import hookimpl
from megatron.api.detector import Detector
from megatron.api.learner import LearnerOptions, MetaLearner
from megatron.training.finetune_recipe import finetune_with_recipe
from megatron.types import Batch, Episode

from megatron_plugins.learners._functional import (
    OuterOptimizerMixin,
    check_episode_labels,
    finish_outer_step,
    scaled_backward,
)


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(num_classes, D)``: per class, the mean of the L2-normalised ``features`` ``(N, D)`` whose label is
    that class; a class without any feature gets a zero row. Differentiable in ``features``."""
    if features.dim() != 2 or labels.dim() != 1 or len(features) != len(labels):
        raise ValueError(f"features must be (N, D) and labels (N,), got {tuple(features.shape)} and {tuple(labels.shape)}")
    # at least float32 (autocast may hand over half-precision features), float64 kept
    normed = F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=1)
    onehot = F.one_hot(labels.long(), num_classes).to(normed.dtype)  # (N, C)
    counts = onehot.sum(dim=0).clamp_min(1.0)  # (C,)
    return (onehot.t() @ normed) / counts[:, None]


def cosine_logits(features: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(N, C)``: ``temperature * cos(features_n, prototypes_c)`` (a zero prototype scores 0)."""
    return temperature * F.normalize(features, dim=-1) @ F.normalize(prototypes, dim=-1).t()


class ProtoOptions(LearnerOptions):
    temperature: float = Field(10.0, gt=0, description="scale of the cosine similarities (the classifier's logits)")
    finetune: bool = Field(
        True, description="adapt(): fine-tune the copy on the target pool (prototype classifier in place) before "
        "computing the final prototypes; false: prototypes only, no gradient step on the target"
    )


class Proto(OuterOptimizerMixin, MetaLearner):
    """Prototype heads: episodic training of a cosine classifier against support-set prototypes
    (Snell et al. 2017; cosine head after Wang et al. 2020)."""

    PLUGIN_NAME = "proto"
    PAPER = ("Snell, Swersky & Zemel (2017), Prototypical Networks for Few-shot Learning, NeurIPS; "
             "Wang et al. (2020), Frustratingly Simple Few-Shot Object Detection, ICML")
    Options: ClassVar[type[LearnerOptions]] = ProtoOptions

    @classmethod
    def required_capabilities(cls, options: LearnerOptions) -> set[str]:
        return {"prototypes"}  # detector.box_features + set_prototypes

    def prototypes(self, detector: Detector, batch: Batch) -> torch.Tensor:
        """Prototypes ``(detector.num_classes, D)`` from the annotated boxes of ``batch`` (with gradient);
        charges ``len(batch)`` images forward."""
        batch = batch.to(self.ctx.device)
        with self.ctx.autocast():
            feats, labels = detector.box_features(batch)
        self.ctx.compute.forward(len(batch))
        return class_prototypes(feats, labels, detector.num_classes)

    def meta_step(self, episodes: list[Episode]) -> dict[str, float]:
        if not episodes:
            raise ValueError("proto: meta_step needs at least one episode")
        detector = self.detector
        detector.train()
        optimizer = self.outer_optimizer()  # over the learned classifier's parameters too: create it first
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for episode in episodes:
            check_episode_labels(episode, detector)
            protos = self.prototypes(detector, episode.support)
            detector.set_prototypes(protos, self.options.temperature)
            try:
                loss = self.loss(detector, episode.query)
                scaled_backward(self, loss / len(episodes))
                self.ctx.compute.backward()  # support (prototypes) and query images
            finally:
                detector.set_prototypes(None)
            losses.append(float(loss.detach()))
        finish_outer_step(self, optimizer)
        return {"loss": sum(losses) / len(losses)}

    @torch.no_grad()
    def set_pool_prototypes(self, detector: Detector, batches: list[Batch]) -> torch.Tensor:
        """Prototypes from every distinct image of ``batches`` (eval mode), installed on ``detector``."""
        seen: set = set()
        unique: list[Batch] = []
        for batch in batches:
            keep = []
            for i, meta in enumerate(batch.meta):
                key = meta.get("image_id", None) if isinstance(meta, dict) else None
                if key is None or key == -1 or key not in seen:
                    keep.append(i)
                    seen.add(key)
            if keep:
                unique.append(batch if len(keep) == len(batch) else Batch(
                    images=batch.images[keep], boxes=[batch.boxes[i] for i in keep],
                    labels=[batch.labels[i] for i in keep], meta=[batch.meta[i] for i in keep]))
        if not unique:
            raise ValueError("proto: adapt() needs at least one target batch to compute prototypes from")
        detector.set_prototypes(None)
        was_training = detector.training
        detector.eval()
        try:
            feats, labels = [], []
            for batch in unique:
                batch = batch.to(self.ctx.device)
                with self.ctx.autocast():
                    f, lab = detector.box_features(batch)
                self.ctx.compute.forward(len(batch))
                feats.append(f.to(torch.promote_types(f.dtype, torch.float32)))
                labels.append(lab)
            self.ctx.compute.discard()
        finally:
            detector.train(was_training)
        protos = class_prototypes(torch.cat(feats), torch.cat(labels), detector.num_classes)
        detector.set_prototypes(protos, self.options.temperature)
        return protos

    def adapt(self, batches: Iterable[Batch], freeze: str = "none") -> Detector:
        batches = batches if hasattr(batches, "__len__") else list(batches)  # iterated more than once
        adapted = copy.deepcopy(self.detector)
        adapted.freeze(freeze)
        adapted.train()
        self.set_pool_prototypes(adapted, batches)
        if self.options.finetune:
            # the shared fine-tuning recipe (schedule, BatchNorm policy) with the prototype classifier in place
            adapted = finetune_with_recipe(self, adapted, batches)
            self.set_pool_prototypes(adapted, batches)
        return adapted


@hookimpl
def megatron_register_learners() -> list[type]:
    return [Proto]
