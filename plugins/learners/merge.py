"""Model merging: one fine-tuned copy of the pre-trained detector per source task, merged by averaging the task
deltas — the merging baseline for "does meta-learning beat transfer?" (Wortsman et al., 2022, "Model soups:
averaging weights of multiple fine-tuned models improves accuracy without increasing inference time", ICML;
Ilharco et al., 2023, "Editing models with task arithmetic", ICLR). Where Reptile meta-learns an initialisation,
merging trains task experts independently and combines them once more after every step, with no meta-gradient.

With ``theta_0`` the weights the learner starts from (the stage-1 checkpoint every learner of a run starts from),
``phi_t`` the copy fine-tuned on source task ``t`` and ``tau_t = phi_t - theta_0`` its *task vector*, the
detector is the merged model::

    theta = theta_0 + lambda * mean_t(tau_t)

over the tasks trained so far. ``lambda = 1`` is the uniform soup of the task models; task arithmetic's sum
``theta_0 + alpha * sum_t(tau_t)`` over ``T`` tasks is ``lambda = alpha * T``.

How this maps onto the runner's loop (meta-epochs of outer steps, each step a meta-batch of episodes drawn from
the source tasks, an adaptation to the target and an evaluation after every meta-epoch): ``meta_step`` takes, for
each episode, ``task_steps`` optimiser steps (each on the union of its support and query batch) on *that task's
copy*, continuing from where the copy was — a copy starts at ``theta_0`` the first time its task is drawn and is
never reset to the merged weights. Each task has its own optimiser (its moments are kept for the run), so every
copy is an ordinary fine-tuning of ``theta_0`` on its task, interleaved with the others. After the step's
episodes the detector is set to the merge of all copies; merging costs no image pass, so the target adaptation
and evaluation after every meta-epoch see the merge of the task models trained so far, and the run ends with the
merge of the fully trained ones. This is what makes it model merging rather than Reptile: Reptile restarts
every task from the current (moving) weights at every step and moves them a little towards the adapted ones;
here the task models train independently from one fixed starting point and only their deltas are combined.
After the very first step (fresh copies, one step each) the two coincide, with ``eps = lambda``.

BatchNorm running statistics travel with each copy (the steps run in train mode) and are merged by the same
rule; integer counters (``num_batches_tracked``) advance by the rounded mean of the copies' counts.

Options: ``scaling`` (lambda), ``task_steps`` (default ``training.inner_steps``), ``optimizer`` (default
``training.outer_optimizer``) and ``lr`` (default ``training.outer_lr``, the baseline's source-training rate).
``adapt`` is the default fine-tuning of the merged model on the target. Memory: one copy of the weights per
source task, plus its optimiser state. A distributed run is refused (each task's copy lives in one process).

Example::

    from megatron.api.learner import LearnerContext
    from megatron_plugins.learners.merge import Merge

    learner = Merge(detector, Merge.Options(scaling=1.0, task_steps=1, optimizer="adam"), LearnerContext(outer_lr=1e-3))
    for step in range(total_steps):
        learner.meta_step(sampler.meta_batch(tasks, 2))   # continues two tasks' copies, then merges
    adapted = learner.adapt(target_pool_batches)          # fine-tunes a copy of the merged detector

Compute accounting per episode (S support + Q query images, k = task_steps): forward ``k*(S+Q)``, backward
``k*(S+Q)`` — as Reptile and the ``finetune`` baseline with one step; the merge itself costs no image pass.
"""
from __future__ import annotations

import copy
from typing import ClassVar, Literal

import torch
from pydantic import Field

from megatron import hookimpl
from megatron.api.detector import Detector
from megatron.errors import ConfigError
from megatron.api.learner import LearnerContext, LearnerOptions, MetaLearner, make_optimizer, optimizer_step
from megatron.types import Episode

from megatron_plugins.learners._functional import check_episode_labels, concat_batches


class MergeOptions(LearnerOptions):
    scaling: float = Field(
        1.0, gt=0,
        description="lambda: merged = theta_0 + lambda * mean over tasks of (theta_task - theta_0); 1 is the uniform "
        "soup of the task models, alpha * (number of tasks) is task arithmetic's sum with coefficient alpha")
    task_steps: int | None = Field(
        None, ge=1, description="optimiser steps of a task's copy per episode of that task, each on support + query "
        "(default: training.inner_steps)")
    optimizer: Literal["adam", "adamw", "sgd"] | None = Field(
        None, description="the task copies' optimiser, one per task with its state kept for the run "
        "(default: training.outer_optimizer; sgd has momentum 0.9)")
    lr: float | None = Field(
        None, gt=0, description="the task copies' learning rate (default: training.outer_lr, the fine-tuning "
        "baseline's source-training rate)")


State = dict[str, torch.Tensor]


class Merge(MetaLearner):
    """Model merging: a fine-tuned copy per source task, ``theta = theta_0 + lambda * mean_t(phi_t - theta_0)``
    (Wortsman et al. 2022; Ilharco et al. 2023)."""

    PLUGIN_NAME = "merge"
    PAPER = ("Wortsman et al. (2022), Model soups, ICML; Ilharco et al. (2023), Editing models with task "
             "arithmetic, ICLR")
    Options: ClassVar[type[LearnerOptions]] = MergeOptions

    def __init__(self, detector: Detector, options: LearnerOptions | None, ctx: LearnerContext):
        super().__init__(detector, options, ctx)
        self.base: State | None = None  # theta_0, taken at the first meta_step
        self.tasks: dict[str, State] = {}  # phi_t per task name
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self._pending_opt_states: dict[str, dict] = {}
        self.steps_done = 0

    # --- settings -------------------------------------------------------------------------------------
    @property
    def task_steps(self) -> int:
        return self.options.task_steps or self.ctx.inner_steps

    @property
    def lr(self) -> float:
        return self.options.lr or self.ctx.outer_lr

    def _optimizer(self, task: str) -> torch.optim.Optimizer:
        """The task copy's optimiser over the detector's trainable tensors (the copy is loaded into them)."""
        opt = self._optimizers.get(task)
        if opt is None:
            name = self.options.optimizer or self.ctx.outer_optimizer
            opt = make_optimizer(name, self.detector.parameters(), self.lr, self.ctx.weight_decay)
            pending = self._pending_opt_states.pop(task, None)
            if pending is not None:
                opt.load_state_dict(pending)
            self._optimizers[task] = opt
        return opt

    # --- weights in and out of the detector -------------------------------------------------------------
    @torch.no_grad()
    def _snapshot(self) -> State:
        return {n: t.detach().clone() for n, t in self.detector.state_dict(keep_vars=True).items()}

    @torch.no_grad()
    def _load(self, state: State) -> None:
        live = self.detector.state_dict(keep_vars=True)
        for name, value in state.items():
            live[name].copy_(value)

    @torch.no_grad()
    def merged(self) -> State:
        """``theta_0 + lambda * mean_t(phi_t - theta_0)`` over the task copies (integer counters: the rounded mean)."""
        if self.base is None or not self.tasks:
            raise RuntimeError("merge: nothing to merge before the first meta_step")
        lam = self.options.scaling
        names = sorted(self.tasks)
        out: State = {}
        for key, base in self.base.items():
            if base.is_floating_point():
                delta = sum(self.tasks[t][key] - base for t in names) / len(names)
                out[key] = base + lam * delta
            else:
                delta = sum(self.tasks[t][key].double() - base.double() for t in names) / len(names)
                out[key] = base + torch.round(delta).to(base.dtype)
        return out

    # --- one outer step ----------------------------------------------------------------------------------
    def meta_step(self, episodes: list[Episode]) -> dict[str, float]:
        if not episodes:
            raise ValueError("merge: meta_step needs at least one episode")
        if self.ctx.world_size > 1:
            raise ConfigError("learner merge: distributed runs are not supported (each source task's fine-tuned copy "
                              "lives in one process); run it in a single process")
        for episode in episodes:
            check_episode_labels(episode, self.detector)
        self.detector.train()
        if self.base is None:
            self.base = self._snapshot()
        ctx = self.ctx
        losses = []
        for episode in episodes:
            task = episode.task_name
            self._load(self.tasks.get(task, self.base))
            optimizer = self._optimizer(task)
            batch = concat_batches([episode.support, episode.query])
            for _ in range(self.task_steps):
                optimizer.zero_grad(set_to_none=True)
                loss = self.loss(self.detector, batch)
                optimizer_step(loss, optimizer, scaler=ctx.scaler, grad_clip=ctx.grad_clip,
                               after_backward=ctx.compute.backward)
                losses.append(float(loss.detach()))
            self.tasks[task] = self._snapshot()
        self._load(self.merged())
        self.steps_done += 1
        return {"loss": sum(losses) / len(losses), "tasks_merged": float(len(self.tasks))}

    # --- resume -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        opt_states = {t: copy.deepcopy(o.state_dict()) for t, o in self._optimizers.items()}
        opt_states.update({t: copy.deepcopy(s) for t, s in self._pending_opt_states.items() if t not in opt_states})
        return {"base": self.base, "tasks": dict(self.tasks), "optimizers": opt_states, "steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        # checkpoints are read onto the CPU: the copies go where the detector is
        live = self.detector.state_dict(keep_vars=True)
        to_live = lambda s: {k: v.to(live[k].device) for k, v in s.items()}  # noqa: E731
        self.base = to_live(state["base"]) if state.get("base") is not None else None
        self.tasks = {t: to_live(s) for t, s in (state.get("tasks") or {}).items()}
        self._optimizers = {}
        self._pending_opt_states = dict(state.get("optimizers") or {})
        self.steps_done = int(state.get("steps_done", 0))


@hookimpl
def megatron_register_learners() -> list[type]:
    return [Merge]
