"""ANIL — Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, ICLR 2020, "Rapid Learning or Feature Reuse?
Towards Understanding the Effectiveness of MAML").

MAML with the inner loop restricted to the detection head (``detector.parameter_groups()["head"]``): per
episode, ``training.inner_steps`` SGD steps at ``training.inner_lr`` adapt the head on the support batch
(functionally; the backbone and neck are not touched), then the query loss at the adapted head is
backpropagated to *every* parameter: to the head through the inner loop (second order by default,
``first_order: true`` for the first-order variant) and to the body (backbone + neck) directly, since the body
feeds both the support and the query loss. The meta-gradient is averaged over the meta-batch and applied by
the outer optimiser. The paper's finding is that MAML's inner loop mostly re-uses features, so adapting the
head alone loses little accuracy and is cheaper (its paper reports ~1.7x faster training iterations).

The body is computed once per episode: since the inner loop changes only the head, the support batch's body
features (``detector.body_features``) are the same at every inner step, so each step runs the head alone on them
(``detector.head_loss``); the outer backward still reaches the body through those features (second order) and
through the query's. Same meta-gradient as calling ``detector.loss(support, params=head)`` at every step, without
``k - 1`` body forwards. A detector that does not split its loss (``supports_head_loss()`` False) gets exactly that
fallback.

At test time (``adapt``) ANIL also adapts the head only by default (``head_only_adapt``): the body's weights stay
as meta-learned, whatever freeze policy the runner passes. Its BatchNorm statistics do not: with the recipe's
``finetune_bn: precise`` they are re-estimated on the target pool before the head is trained (AdaBN). Measured
on the CPU benchmark's target: `finetune` with backbone and neck frozen gave 0.5 mAP50 with the source
statistics and 9.2 with AdaBN (12.5 unfrozen) after one meta-epoch; ANIL's cells over four meta-epochs went from
0.4–0.9 to 3.8, still far below the learners that fine-tune the whole detector there; with
``head_only_adapt: false`` the same meta-training was on par with them (benchmarks/results/few_shot, `anil-full`).

Example::

    from megatron.api.learner import LearnerContext
    from megatron_plugins.learners.anil import ANIL

    learner = ANIL(detector, ANIL.Options(), LearnerContext(inner_steps=5, inner_lr=0.01))
    stats = learner.meta_step(episodes)
    adapted = learner.adapt(target_pool_batches)   # head fine-tuned, body as meta-learned

Compute accounting: as MAML (forward ``k*S + Q`` per episode; backward ``k*S`` inner + ``Q + k*S`` outer,
or ``Q`` first order) — images are charged the same even though the body runs once on the support batch and
the inner backward stops at the head, so the saving shows in wall time, not in the image count.
"""
from __future__ import annotations

from typing import ClassVar, Iterable

from pydantic import Field

from megatron import hookimpl
from megatron.api.detector import Detector
from megatron.api.learner import LearnerOptions
from megatron.types import Batch

from megatron_plugins.learners._functional import names_in_groups
from megatron_plugins.learners.maml import MAML


class ANILOptions(LearnerOptions):
    first_order: bool = Field(False, description="first-order ANIL: ignore second derivatives through the head-only inner loop")
    head_only_adapt: bool = Field(
        True,
        description="adapt() fine-tunes the head only (backbone and neck frozen, as in the paper's test-time "
        "adaptation); false: the runner's freeze policy applies",
    )


class ANIL(MAML):
    """ANIL: MAML whose inner loop adapts the head only; the outer loop updates everything
    (Raghu et al. 2020)."""

    PLUGIN_NAME = "anil"
    PAPER = "Raghu, Raghu, Bengio & Vinyals (2020), Rapid Learning or Feature Reuse? Towards Understanding the Effectiveness of MAML, ICLR"
    Options: ClassVar[type[LearnerOptions]] = ANILOptions

    def inner_parameter_names(self) -> list[str]:
        return names_in_groups(self.detector, ["head"])

    def adapt(self, batches: Iterable[Batch], freeze: str = "none") -> Detector:
        if self.options.head_only_adapt:
            freeze = "backbone+neck"
        return super().adapt(batches, freeze)


@hookimpl
def megatron_register_learners() -> list[type]:
    return [ANIL]
