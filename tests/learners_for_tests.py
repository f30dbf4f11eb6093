"""Small learners for runner tests: real training steps, nothing clever.

``joint_test``: one Adam step per outer step on the mean support+query loss of the meta-batch (joint
training), its optimiser state saved for exact resume. ``joint_test_half``: the same on support only, so
it spends about half the compute per step (to test budget matching).
"""
from __future__ import annotations

from typing import ClassVar

import torch

from megatron import hookimpl
from megatron.api.learner import MetaLearner, make_optimizer
from megatron.types import Episode


class JointTestLearner(MetaLearner):
    PLUGIN_NAME: ClassVar[str] = "joint_test"
    PAPER = "(test learner)"
    use_query = True
    progress_seen: list[float] = []  # what the runner reported through set_progress, for tests

    def set_progress(self, fraction_done: float) -> None:
        self.progress_seen.append(fraction_done)

    def __init__(self, detector, options, ctx):
        super().__init__(detector, options, ctx)
        self.optimizer = make_optimizer("adam", detector.parameters(), ctx.outer_lr)

    def meta_step(self, episodes: list[Episode]) -> dict[str, float]:
        self.detector.train()
        self.optimizer.zero_grad(set_to_none=True)
        batches = [b for ep in episodes for b in ((ep.support, ep.query) if self.use_query else (ep.support,))]
        loss = sum(self.loss(self.detector, b) for b in batches) / len(batches)
        self.backward_and_step(loss, self.optimizer, self.detector.parameters())
        return {"loss": float(loss.detach())}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


class JointTestHalfLearner(JointTestLearner):
    PLUGIN_NAME: ClassVar[str] = "joint_test_half"
    use_query = False


@hookimpl
def megatron_register_learners():
    return [JointTestLearner, JointTestHalfLearner]
