"""The learner plugins, pinned on tiny detectors whose answers can be computed by hand (tests/learner_models.py)."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

from megatron.errors import ConfigError
from megatron.api.learner import LearnerContext, MetaLearner, make_optimizer
from megatron_plugins.learners._functional import inner_loop
from megatron_plugins.learners.anil import ANIL
from megatron_plugins.learners.finetune import Finetune
from megatron_plugins.learners.incremental import Incremental, phase_tasks
from megatron_plugins.learners.maml import MAML
from megatron_plugins.learners.proto import Proto, class_prototypes, cosine_logits
from megatron_plugins.learners.reptile import Reptile
from megatron.types import Task

from learner_models import GROUP_WEIGHTS, CoupledDetector, QuadraticDetector, batch_stats, make_batch, make_episode, ctx, quad_episodes



LEARNERS = {"maml": MAML, "anil": ANIL, "reptile": Reptile, "proto": Proto, "finetune": Finetune,
            "incremental": Incremental}


def coupled_episodes():
    s1 = make_batch([[40, 120, 200], [90, 30, 60]], boxes=[[[1, 1, 5, 6], [2, 0, 7, 3]], [[0, 2, 4, 8]]], labels=[[0, 1], [1]])
    q1 = make_batch([[200, 100, 20]], boxes=[[[3, 3, 7, 7], [0, 0, 2, 5]]], labels=[[1, 0]], first_id=5)
    s2 = make_batch([[10, 250, 130]], boxes=[[[1, 2, 3, 4], [4, 4, 8, 8]]], labels=[[0, 1]], first_id=10)
    q2 = make_batch([[60, 60, 60], [180, 20, 240]], boxes=[[[2, 2, 6, 5]], [[1, 0, 8, 2]]], labels=[[0], [1]], first_id=15)
    return [make_episode("t1", s1, q1), make_episode("t2", s2, q2)]


def params_of(det) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in det.named_parameters()}


# --- registration and documentation ------------------------------------------------------------------
def test_every_learner_is_registered_with_paper_options_and_example(megatron_pm):
    reg = megatron_pm.registers["learner"]
    for name, cls in LEARNERS.items():
        assert reg.get(name) is cls
        assert cls.PAPER
        module_doc = inspect.getmodule(cls).__doc__
        assert "Example" in module_doc and ">>>" not in module_doc
        assert cls.Options.model_config.get("extra") == "forbid"
        for field_name, field in cls.Options.model_fields.items():
            assert field.description, f"{name}.{field_name} has no description"
    assert "Finn" in MAML.PAPER and "Nichol" in Reptile.PAPER and "Raghu" in ANIL.PAPER and "Snell" in Proto.PAPER
    with pytest.raises(Exception):
        MAML.Options(first_ordr=True)


# --- MAML -----------------------------------------------------------------------------------------------
def maml_expected_grad(det: QuadraticDetector, episodes, alpha: float, k: int, first_order: bool, groups=GROUP_WEIGHTS):
    """The closed form: per group, w_k = c_s + r^k (w - c_s) with r = 1 - alpha a_s m; d/dw of
    0.5 a_q m ||w_k - c_q||^2 is r^k a_q m (w_k - c_q) (first order: without r^k)."""
    grads = {f"{g}.w": torch.zeros(2, dtype=torch.float64) for g in GROUP_WEIGHTS}
    for ep in episodes:
        ss, sq = batch_stats(ep.support), batch_stats(ep.query)
        a_s, c_s, a_q, c_q = 1 + ss[2], ss[:2], 1 + sq[2], sq[:2]
        for g, m in GROUP_WEIGHTS.items():
            w = det.get_parameter(f"{g}.w").detach()
            if g in groups:
                r = 1 - alpha * a_s * m
                w_k = c_s + r ** k * (w - c_s)
                factor = 1.0 if first_order else r ** k
            else:
                w_k, factor = w, 1.0
            grads[f"{g}.w"] += factor * a_q * m * (w_k - c_q) / len(episodes)
    return grads


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("first_order", [False, True])
def test_maml_meta_gradient_matches_closed_form(first_order, checkpoint):
    det = QuadraticDetector()
    learner = MAML(det, MAML.Options(first_order=first_order, checkpoint_inner_steps=checkpoint),
                   ctx(inner_steps=3, inner_lr=0.1))
    episodes = quad_episodes()
    expected = maml_expected_grad(det, episodes, 0.1, 3, first_order)
    before = params_of(det)
    learner.accumulate_meta_gradient(episodes)
    for name, p in det.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12)
        assert torch.equal(p.detach(), before[name])  # the inner loop is functional: theta untouched
    # second and first order really differ on this problem
    other = maml_expected_grad(det, episodes, 0.1, 3, not first_order)
    assert not torch.allclose(expected["head.w"], other["head.w"])


def test_maml_meta_step_is_one_outer_optimizer_step_on_the_meta_gradient():
    det = QuadraticDetector()
    learner = MAML(det, None, ctx(inner_steps=2, inner_lr=0.05, outer_optimizer="sgd", outer_lr=0.5))
    episodes = quad_episodes()
    expected = maml_expected_grad(det, episodes, 0.05, 2, first_order=False)
    before = params_of(det)
    stats = learner.meta_step(episodes)
    for name, p in det.named_parameters():  # SGD's first step (momentum buffer = grad): theta - lr * g
        torch.testing.assert_close(p.detach(), before[name] - 0.5 * expected[name], rtol=1e-9, atol=1e-12)
    assert stats["loss"] > 0 and "support_loss" in stats


def meta_objective(det, episodes, alpha: float, k: int, inner_names) -> torch.Tensor:
    """Mean over episodes of L_query(theta - alpha grad L_support ...), computed directly (float64)."""
    total = 0.0
    for ep in episodes:
        params = {n: det.get_parameter(n) for n in inner_names}
        for _ in range(k):
            loss = det.loss(ep.support, params=params)["loss"]
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            params = {n: p - alpha * g for (n, p), g in zip(params.items(), grads)}
        total = total + det.loss(ep.query, params=params)["loss"]
    return total / len(episodes)


def finite_difference_grad(det, fn, h: float = 1e-6) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in det.named_parameters():
        g = torch.zeros_like(p)
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + h
            up = float(fn())
            flat[i] = old - h
            down = float(fn())
            flat[i] = old
            g.view(-1)[i] = (up - down) / (2 * h)
        out[name] = g
    return out


@pytest.mark.parametrize("learner_cls", [MAML, ANIL])
def test_second_order_meta_gradient_matches_finite_differences(learner_cls):
    det = CoupledDetector(seed=3)
    learner = learner_cls(det, None, ctx(inner_steps=2, inner_lr=0.3))
    episodes = coupled_episodes()
    inner = learner.inner_parameter_names()
    fd = finite_difference_grad(det, lambda: meta_objective(det, episodes, 0.3, 2, inner).detach())
    learner.accumulate_meta_gradient(episodes)
    for name, p in det.named_parameters():
        torch.testing.assert_close(p.grad, fd[name], rtol=1e-5, atol=1e-7)
        assert p.grad.abs().sum() > 0


def test_first_order_meta_gradient_is_the_query_gradient_at_the_adapted_parameters():
    det = CoupledDetector(seed=1)
    learner = MAML(det, MAML.Options(first_order=True), ctx(inner_steps=2, inner_lr=0.3))
    episodes = coupled_episodes()
    expected = {n: torch.zeros_like(p) for n, p in det.named_parameters()}
    for ep in episodes:
        params = {n: p.detach().clone() for n, p in det.named_parameters()}
        for _ in range(2):
            params = {n: t.requires_grad_() for n, t in params.items()}
            grads = torch.autograd.grad(det.loss(ep.support, params=params)["loss"], list(params.values()))
            params = {n: (t - 0.3 * g).detach() for (n, t), g in zip(params.items(), grads)}
        params = {n: t.requires_grad_() for n, t in params.items()}
        grads = torch.autograd.grad(det.loss(ep.query, params=params)["loss"], list(params.values()))
        for n, g in zip(params, grads):
            expected[n] += g / len(episodes)
    learner.accumulate_meta_gradient(episodes)
    second = MAML(copy.deepcopy(det), None, ctx(inner_steps=2, inner_lr=0.3))
    second.detector.zero_grad(set_to_none=True)
    second.accumulate_meta_gradient(episodes)
    for name, p in det.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(det.backbone.weight.grad, second.detector.backbone.weight.grad)


def test_maml_inner_groups_restricts_the_inner_loop():
    det = QuadraticDetector()
    learner = MAML(det, MAML.Options(inner_groups=["neck", "head"]), ctx(inner_steps=2, inner_lr=0.1))
    episodes = quad_episodes()
    expected = maml_expected_grad(det, episodes, 0.1, 2, False, groups=("neck", "head"))
    learner.accumulate_meta_gradient(episodes)
    for name, p in det.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12)
    with pytest.raises(ConfigError, match="unknown parameter group"):
        MAML(det, MAML.Options(inner_groups=["hed"]), ctx()).meta_step(episodes)


# --- ANIL -------------------------------------------------------------------------------------------
def test_anil_inner_loop_adapts_the_head_only_and_the_outer_step_updates_the_body():
    det = CoupledDetector(seed=2)
    learner = ANIL(det, None, ctx(inner_steps=3, inner_lr=0.2, outer_lr=0.01))
    episode = coupled_episodes()[0]
    body = {n: p.detach().clone() for n, p in det.named_parameters() if det.group_of(n) in ("backbone", "neck")}
    adapted, _ = learner.adapt_episode(episode)
    assert set(adapted) == {"head.reg", "head.cls.weight"}
    for n, p in det.named_parameters():
        if n in body:
            assert torch.equal(p.detach(), body[n])  # bit-identical after the inner loop
    assert not torch.equal(adapted["head.reg"].detach(), det.head.reg.detach())
    learner.meta_step(coupled_episodes())
    for n, p in det.named_parameters():
        if n in body:
            assert not torch.equal(p.detach(), body[n]), f"{n} did not change in the outer step"


def test_anil_adapt_fine_tunes_the_head_only_by_default():
    det = CoupledDetector()
    learner = ANIL(det, None, ctx(finetune_lr=0.05))
    pool = [coupled_episodes()[0].support, coupled_episodes()[0].query]
    adapted = learner.adapt(pool, freeze="none")
    assert torch.equal(adapted.backbone.weight, det.backbone.weight)
    assert not torch.equal(adapted.head.reg, det.head.reg)
    adapted2 = ANIL(det, ANIL.Options(head_only_adapt=False), ctx(finetune_lr=0.05)).adapt(pool, freeze="none")
    assert not torch.equal(adapted2.backbone.weight, det.backbone.weight)


# --- Reptile ----------------------------------------------------------------------------------------
def test_reptile_update_matches_hand_computation():
    det = QuadraticDetector()
    alpha, k = 0.05, 3
    learner = Reptile(det, Reptile.Options(eps_start=0.6, eps_end=0.2, inner_optimizer="sgd"),
                      ctx(inner_steps=k, inner_lr=alpha))
    learner.set_progress(0.5)
    eps = 0.4
    episodes = quad_episodes()
    theta = params_of(det)
    expected = {}
    running = torch.zeros((), dtype=torch.float64)
    for g, m in GROUP_WEIGHTS.items():
        deltas = []
        for ep in episodes:
            s = batch_stats(make_union(ep))
            a, c = 1 + s[2], s[:2]
            w = theta[f"{g}.w"]
            phi = c + (1 - alpha * a * m) ** k * (w - c)  # k SGD steps on 0.5 a m ||w - c||^2
            deltas.append(phi - w)
        expected[f"{g}.w"] = theta[f"{g}.w"] + eps * sum(deltas) / len(deltas)
    run_deltas = []
    for ep in episodes:  # the BatchNorm-like buffer, interpolated like a weight
        a = 1 + batch_stats(make_union(ep))[2]
        run_deltas.append((1 - 0.9 ** k) * (a - running))
    stats = learner.meta_step(episodes)
    for name, p in det.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(det.backbone.running, running + eps * sum(run_deltas) / 2, rtol=1e-9, atol=1e-12)
    assert int(det.backbone.num_batches_tracked) == k
    assert stats["eps"] == pytest.approx(eps)


def make_union(ep):
    from megatron_plugins.learners._functional import concat_batches

    return concat_batches([ep.support, ep.query])


def test_reptile_eps_schedule_and_resume_state():
    learner = Reptile(QuadraticDetector(), Reptile.Options(eps_start=1.0, eps_end=0.2), ctx())
    assert learner.current_eps() == pytest.approx(1.0)
    learner.set_progress(0.25)
    assert learner.current_eps() == pytest.approx(0.8)
    learner.set_progress(2.0)
    assert learner.current_eps() == pytest.approx(0.2)
    # without progress reports, a compute budget drives the schedule
    budgeted = Reptile(QuadraticDetector(), Reptile.Options(eps_start=1.0, eps_end=0.0), ctx())
    budgeted.ctx.compute.budget = 100
    budgeted.ctx.compute.forward(30)
    budgeted.ctx.compute.backward()
    assert budgeted.current_eps() == pytest.approx(0.4)
    clone = Reptile(QuadraticDetector(), Reptile.Options(eps_start=1.0, eps_end=0.2), ctx())
    clone.load_state_dict(learner.state_dict())
    assert clone.current_eps() == pytest.approx(0.2)


def test_reptile_adam_inner_loop_matches_hand_computation():
    """Adam with beta1 = 0 (the paper's inner optimiser): m = g, v = beta2 v + (1 - beta2) g^2, bias-corrected."""
    det = QuadraticDetector()
    lr, k, eps_adam, beta2 = 0.1, 2, 1e-8, 0.999
    learner = Reptile(det, Reptile.Options(eps_start=1.0, eps_end=1.0, inner_optimizer="adam"), ctx(inner_steps=k, inner_lr=lr))
    ep = quad_episodes()[0]
    s = batch_stats(make_union(ep))
    a, c = 1 + s[2], s[:2]
    expected = {}
    for g, m in GROUP_WEIGHTS.items():
        w = det.get_parameter(f"{g}.w").detach().clone()
        v = torch.zeros_like(w)
        for t in range(1, k + 1):
            grad = a * m * (w - c)
            v = beta2 * v + (1 - beta2) * grad ** 2
            w = w - lr * grad / ((v / (1 - beta2 ** t)).sqrt() + eps_adam)
        expected[f"{g}.w"] = w  # eps = 1: theta <- phi
    learner.meta_step([ep])
    for name, p in det.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-9, atol=1e-12)


# --- prototype heads --------------------------------------------------------------------------------
def test_prototype_logits_on_a_hand_case():
    feats = torch.tensor([[3.0, 4.0], [6.0, 8.0], [0.0, 2.0], [1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 0])
    protos = class_prototypes(feats, labels, 3)
    # class 0: mean of (0.6, 0.8), (0.6, 0.8), (1, 0) = (2.2/3, 1.6/3); class 1: (0, 1); class 2: none -> 0
    torch.testing.assert_close(protos, torch.tensor([[2.2 / 3, 1.6 / 3], [0.0, 1.0], [0.0, 0.0]]))
    query = torch.tensor([[1.0, 1.0]])
    logits = cosine_logits(query, protos, temperature=10.0)
    n0 = (2.2 ** 2 + 1.6 ** 2) ** 0.5
    expected = torch.tensor([[10 * (2.2 + 1.6) / (2 ** 0.5 * n0), 10 / 2 ** 0.5, 0.0]])
    torch.testing.assert_close(logits, expected)


def test_proto_adapt_sets_pool_prototypes_and_leaves_the_meta_model_alone():
    det = CoupledDetector(num_classes=2)
    with torch.no_grad():  # features = box / S exactly (tanh(0) = 0, neck = 1)
        det.backbone.weight.zero_()
        det.neck.weight.fill_(1.0)
    learner = Proto(det, Proto.Options(finetune=False, temperature=5.0), ctx())
    pool = make_batch([[10, 20, 30], [40, 50, 60]], boxes=[[[0, 0, 4, 0], [0, 0, 0, 8]], [[0, 0, 8, 0]]],
                      labels=[[0, 1], [0]])
    adapted = learner.adapt([pool, pool])  # the second pass over the pool must not count twice
    torch.testing.assert_close(adapted.prototypes, torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64))
    q = make_batch([[0, 0, 0]], boxes=[[[0, 0, 3, 4]]], labels=[[1]])
    feats, _ = adapted.box_features(q)
    torch.testing.assert_close(adapted.logits(feats), torch.tensor([[5 * 0.6, 5 * 0.8]], dtype=torch.float64))
    assert det.prototypes is None


def test_proto_meta_gradient_flows_through_support_and_query_features():
    det = CoupledDetector(seed=4)
    learner = Proto(det, Proto.Options(temperature=7.0), ctx(outer_optimizer="sgd", outer_lr=0.1))
    episodes = coupled_episodes()
    expected = {n: torch.zeros_like(p) for n, p in det.named_parameters()}
    for ep in episodes:
        feats, labels = det.box_features(ep.support)
        det.set_prototypes(class_prototypes(feats, labels, det.num_classes), 7.0)
        loss = det.loss(ep.query)["loss"] / len(episodes)
        names = [n for n, _ in det.named_parameters()]
        grads = torch.autograd.grad(loss, [det.get_parameter(n) for n in names], allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                expected[n] += g
        det.set_prototypes(None)
    # the support path matters: detaching the prototypes gives a different body gradient
    feats, labels = det.box_features(episodes[0].support)
    det.set_prototypes(class_prototypes(feats, labels, det.num_classes).detach(), 7.0)
    detached = torch.autograd.grad(det.loss(episodes[0].query)["loss"], [det.backbone.weight])[0]
    det.set_prototypes(None)
    before = params_of(det)
    learner.meta_step(episodes)
    assert det.prototypes is None
    for n, p in det.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * expected[n], rtol=1e-9, atol=1e-12)
    assert torch.equal(det.head.cls.weight, before["head.cls.weight"])  # classifier unused by prototype heads
    assert not torch.allclose(detached, 2 * expected["backbone.weight"])


# --- baselines --------------------------------------------------------------------------------------
def test_finetune_step_equals_manual_optimizer_steps():
    det = CoupledDetector(seed=5)
    reference = copy.deepcopy(det)
    learner = Finetune(det, None, ctx(outer_optimizer="adam", outer_lr=0.01, grad_clip=1.0))
    episodes = coupled_episodes()
    opt = make_optimizer("adam", reference.parameters(), 0.01)
    for ep in episodes:
        for batch in (ep.support, ep.query):
            opt.zero_grad()
            loss = reference.loss(batch)["loss"].float()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 1.0)
            opt.step()
    learner.meta_step(episodes)
    for (n, p), q in zip(det.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_incremental_schedule_splits_the_run_into_equal_phases():
    tasks = [Task(name=f"t{i}", categories=["a"], records=[]) for i in range(3)]
    names = [[t.name for t in phase_tasks(e, 6, tasks)] for e in range(8)]
    assert names == [["t0"], ["t0"], ["t1"], ["t1"], ["t2"], ["t2"], ["t2"], ["t2"]]  # past the plan: last task
    assert [[t.name for t in phase_tasks(e, 3, tasks)] for e in range(3)] == [["t0"], ["t1"], ["t2"]]
    four = tasks + [Task(name="t3", categories=["a"], records=[])]
    assert [[t.name for t in phase_tasks(e, 2, four)] for e in range(2)] == [["t0", "t1"], ["t2", "t3"]]
    assert [[t.name for t in phase_tasks(e, 3, four)] for e in range(3)] == [["t0"], ["t1"], ["t2", "t3"]]


def test_incremental_resets_the_optimizer_per_phase_and_freezes_for_the_target():
    det = CoupledDetector()
    learner = Incremental(det, Incremental.Options(freeze="backbone"), ctx())
    tasks = [Task(name=f"t{i}", categories=["a", "b"], records=[]) for i in range(2)]
    assert [t.name for t in learner.source_tasks(0, 2, tasks)] == ["t0"]
    learner.meta_step(coupled_episodes()[:1])
    first = learner.outer_optimizer()
    learner.source_tasks(0, 2, tasks)
    assert learner.outer_optimizer() is first  # same phase: the optimiser is kept
    state = learner.state_dict()
    assert [t.name for t in learner.source_tasks(1, 2, tasks)] == ["t1"]
    assert learner.outer_optimizer() is not first
    resumed = Incremental(copy.deepcopy(det), Incremental.Options(freeze="backbone"), ctx())
    resumed.load_state_dict(state)
    resumed.source_tasks(0, 2, tasks)
    assert resumed.outer_optimizer().state_dict()["state"]  # the phase's moments survive a resume
    adapted = learner.adapt([coupled_episodes()[0].support], freeze="none")
    assert not adapted.backbone.weight.requires_grad
    assert torch.equal(adapted.backbone.weight, det.backbone.weight)
    assert not torch.equal(adapted.neck.weight, det.neck.weight)


# --- every learner --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LEARNERS))
def test_adapt_returns_a_fine_tuned_copy_and_leaves_the_meta_parameters_alone(name):
    det = CoupledDetector(seed=6)
    learner = LEARNERS[name](det, None, ctx(finetune_lr=0.05))
    learner.meta_step(coupled_episodes())
    meta = params_of(det)
    adapted = learner.adapt([coupled_episodes()[1].support, coupled_episodes()[1].query], freeze="none")
    assert adapted is not det
    for n, p in det.named_parameters():
        assert torch.equal(p.detach(), meta[n])
    assert any(not torch.equal(p.detach(), meta[n]) for n, p in adapted.named_parameters())


# compute per meta_step on coupled_episodes(): S = (2, 1), Q = (1, 2), k = 2 inner steps, 2 episodes
K = 2
S, Q = 3, 3
EXPECTED_COMPUTE = {
    "maml": (K * S + Q, K * S + Q + K * S),  # second order: the outer backward pays for the inner steps again
    "maml-fo": (K * S + Q, K * S + Q),
    "anil": (K * S + Q, K * S + Q + K * S),
    "reptile": (K * (S + Q), K * (S + Q)),
    "proto": (S + Q, S + Q),
    "finetune": (S + Q, S + Q),
    "incremental": (S + Q, S + Q),
}


@pytest.mark.parametrize("name", list(EXPECTED_COMPUTE))
def test_compute_accounting_per_meta_step(name):
    options = MAML.Options(first_order=True) if name == "maml-fo" else None
    cls = MAML if name == "maml-fo" else LEARNERS[name]
    learner = cls(CoupledDetector(), options, ctx(inner_steps=K))
    learner.meta_step(coupled_episodes())
    acc = learner.ctx.compute
    assert (acc.images_forward, acc.images_backward) == EXPECTED_COMPUTE[name]
    assert acc._pending == 0


@pytest.mark.parametrize("name", ["maml", "anil", "proto", "finetune", "incremental", "reptile"])
def test_state_dict_gives_an_exact_resume(name):
    cls = LEARNERS[name]
    straight = cls(CoupledDetector(seed=7), None, ctx(inner_steps=1))
    for _ in range(3):
        straight.meta_step(coupled_episodes())
    first = cls(CoupledDetector(seed=7), None, ctx(inner_steps=1))
    for _ in range(2):
        first.meta_step(coupled_episodes())
    saved_det = copy.deepcopy(first.detector.state_dict())
    saved = copy.deepcopy(first.state_dict())
    resumed = cls(CoupledDetector(seed=99), None, ctx(inner_steps=1))
    resumed.detector.load_state_dict(saved_det)
    resumed.load_state_dict(saved)
    resumed.meta_step(coupled_episodes())
    for (n, p), q in zip(straight.detector.named_parameters(), resumed.detector.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("name", ["maml", "anil", "proto", "reptile", "finetune"])
def test_task_contributions_are_combined_through_all_reduce_mean(name):
    calls = []

    def all_reduce_mean(tensors):
        calls.append(len(tensors))

    det = QuadraticDetector() if name == "reptile" else CoupledDetector()  # the quadratic one has buffers
    learner = LEARNERS[name](det, None, ctx(all_reduce_mean=all_reduce_mean))
    learner.meta_step(coupled_episodes())
    n_params = len(list(learner.detector.parameters()))
    if name == "finetune":  # plain gradients: one reduction per optimiser step
        assert calls == [n_params] * 4
    elif name == "reptile":  # the averaged weight deltas, once
        assert calls == [3 + 1]  # three weights and the float running statistic, not the integer counter
    else:  # the meta-gradient, once, for every parameter
        assert calls == [n_params]


@pytest.mark.parametrize("name", list(LEARNERS))
def test_a_label_outside_the_head_is_a_clear_error(name):
    learner = LEARNERS[name](CoupledDetector(num_classes=2), None, ctx())
    bad = make_batch([[1, 2, 3]], boxes=[[[0, 0, 4, 4]]], labels=[[2]], first_id=42)
    episode = make_episode("xray", bad, coupled_episodes()[0].query)
    with pytest.raises(ConfigError, match="xray.*image 42.*label 2.*2 classes"):
        learner.meta_step([episode])


def test_inner_loop_scales_gradients_under_a_grad_scaler():
    class FakeScaler:  # what torch.amp.GradScaler exposes to the inner loop
        def get_scale(self):
            return 1024.0

        def is_enabled(self):
            return True

    det = QuadraticDetector()
    learner = MAML(det, None, ctx(inner_lr=0.1))
    batch = quad_episodes()[0].support
    plain, _ = inner_loop(learner, det, batch, ["head.w"], 1, 0.1, first_order=True)
    learner.ctx.scaler = FakeScaler()
    scaled, _ = inner_loop(learner, det, batch, ["head.w"], 1, 0.1, first_order=True)
    torch.testing.assert_close(plain["head.w"], scaled["head.w"], rtol=1e-12, atol=1e-12)


def test_meta_learner_has_a_progress_hook():
    assert hasattr(MetaLearner, "set_progress")
    MetaLearner.set_progress(Finetune(CoupledDetector(), None, ctx()), 0.5)


# --- the real detector ------------------------------------------------------------------------------
def yolox_batch(n: int, seed: int, size: int = 64, first_id: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g) * 255
    boxes, labels = [], []
    for i in range(n):
        x, y = 8 + 4 * i, 10 + 3 * i
        boxes.append(torch.tensor([[x, y, x + 24.0, y + 20.0], [4.0, 36.0, 20.0, 60.0]]))
        labels.append(torch.tensor([i % 2, (i + 1) % 3]))
    from megatron.types import Batch

    return Batch(images=images, boxes=boxes, labels=labels,
                 meta=[{"image_id": first_id + i, "orig_size": (size, size), "scale": 1.0, "pad": (0, 0)} for i in range(n)])


@pytest.fixture(scope="module")
def yolox_tiny():
    pytest.importorskip("mmdet")
    from megatron_plugins.detectors.yolox import YOLOX

    torch.manual_seed(0)
    return YOLOX(3, 64)


# ~3-5 s per learner on one thread (plus ~10 s to build the model once); MAML's second order takes longer
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "maml" else n for n in LEARNERS])
def test_meta_step_and_adapt_on_yolox_tiny(name, yolox_tiny):
    det = copy.deepcopy(yolox_tiny)
    learner = LEARNERS[name](det, None, ctx(inner_steps=1, inner_lr=1e-3, outer_lr=1e-3, finetune_lr=1e-3, grad_clip=10.0))
    episodes = [make_episode("a", yolox_batch(2, 1), yolox_batch(2, 2, first_id=2), ("x", "y", "z")),
                make_episode("b", yolox_batch(2, 3, first_id=4), yolox_batch(2, 4, first_id=6), ("x", "y", "z"))]
    before = params_of(det)
    stats = learner.meta_step(episodes)
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert any(not torch.equal(p.detach(), before[n]) for n, p in det.named_parameters())
    assert learner.ctx.compute.images_forward > 0 and learner.ctx.compute.images_backward > 0
    meta = params_of(det)
    target = copy.deepcopy(det)
    target.set_num_classes(2)
    learner.detector, original = target, det  # the runner lends the target-sized copy the same way
    try:
        pool = yolox_batch(2, 5, first_id=100)
        pool.labels = [lab % 2 for lab in pool.labels]
        adapted = learner.adapt([pool], freeze="backbone")
    finally:
        learner.detector = original
    assert all(torch.equal(p.detach(), meta[n]) for n, p in det.named_parameters())
    preds = adapted.predict(yolox_batch(1, 6, first_id=200))
    assert len(preds) == 1 and preds[0].boxes.shape[1] == 4
    if name == "proto":
        assert type(adapted.model.bbox_head.multi_level_conv_cls[0]).__name__ == "CosineClassifier"


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("name", ["anil", "maml-head"])
def test_head_only_inner_loop_computes_the_body_once_with_the_same_meta_gradient(name, first_order, yolox_tiny):
    """ANIL (and MAML with inner_groups [head]) on YOLOX: the support's body features once per episode, the head
    alone at each inner step; pinned against the per-step detector.loss path (what ran before the split)."""
    episodes = [make_episode("a", yolox_batch(2, 1), yolox_batch(2, 2, first_id=2), ("x", "y", "z")),
                make_episode("b", yolox_batch(2, 3, first_id=4), yolox_batch(2, 4, first_id=6), ("x", "y", "z"))]
    k = 3
    found = {}
    for split in (True, False):
        det = copy.deepcopy(yolox_tiny).train()
        if not split:  # the fallback every detector without body_features/head_loss gets
            det.supports_head_loss = lambda: False
        if name == "anil":
            learner = ANIL(det, ANIL.Options(first_order=first_order), ctx(inner_steps=k, inner_lr=0.01))
        else:
            learner = MAML(det, MAML.Options(first_order=first_order, inner_groups=["head"]), ctx(inner_steps=k, inner_lr=0.01))
        body_runs = []
        hook = det.model.backbone.register_forward_pre_hook(lambda *_: body_runs.append(1))
        try:
            stats = learner.accumulate_meta_gradient(episodes)
        finally:
            hook.remove()
        found[split] = (stats, {n: p.grad.clone() for n, p in det.named_parameters() if p.grad is not None},
                        {n: b.clone() for n, b in det.named_buffers()}, len(body_runs), learner.ctx.compute.spent)
    (s_split, g_split, b_split, runs_split, spent_split), (s_ref, g_ref, b_ref, runs_ref, spent_ref) = found[True], found[False]
    assert runs_split == 2 * len(episodes) and runs_ref == (k + 1) * len(episodes)  # support once + query, per episode
    assert s_split == pytest.approx(s_ref, rel=1e-6) and spent_split == spent_ref  # same losses, same images charged
    assert set(g_split) == set(g_ref) and any(n.startswith("model.backbone.") for n in g_split)
    for n in g_ref:  # float rounding only (the k steps' feature gradients are summed before the body's backward)
        assert float((g_split[n] - g_ref[n]).norm()) <= 1e-4 * float(g_ref[n].norm()) + 1e-12, n
    assert all(torch.equal(b_split[n], b_ref[n]) for n in b_ref)  # BatchNorm statistics: same policy


def test_checkpointed_inner_steps_give_the_same_meta_gradient_and_charge_with_less_saved_for_backward(yolox_tiny):
    """Second-order MAML with checkpoint_inner_steps: the same meta-gradient and compute account, while the inner
    loop leaves far fewer bytes saved for the outer backward (the steps' graphs are rebuilt there)."""
    episodes = [make_episode("a", yolox_batch(2, 1), yolox_batch(2, 2, first_id=2), ("x", "y", "z"))]
    found = {}
    for checkpoint in (False, True):
        det = copy.deepcopy(yolox_tiny).train()
        learner = MAML(det, MAML.Options(checkpoint_inner_steps=checkpoint), ctx(inner_steps=2, inner_lr=0.01))
        saved: dict[int, int] = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            learner.adapt_episode(episodes[0])
        inner_saved = sum(saved.values())
        det.zero_grad(set_to_none=True)
        learner.accumulate_meta_gradient(episodes)
        found[checkpoint] = (inner_saved, {n: p.grad.clone() for n, p in det.named_parameters() if p.grad is not None},
                             learner.ctx.compute.images_forward, learner.ctx.compute.images_backward)
    (plain_saved, plain_g, *plain_charged), (ckpt_saved, ckpt_g, *ckpt_charged) = found[False], found[True]
    param_bytes = sum(p.numel() * p.element_size() for p in yolox_tiny.parameters())
    # checkpointed, the inner loop keeps two parameter sets (theta and the first step's result) and no activation
    assert ckpt_saved <= 2 * param_bytes * 1.01 and plain_saved >= 1.5 * ckpt_saved
    assert set(plain_g) == set(ckpt_g)
    for n in plain_g:
        assert float((ckpt_g[n] - plain_g[n]).norm()) <= 1e-5 * float(plain_g[n].norm()) + 1e-12, n
    assert ckpt_charged == plain_charged  # the recomputation is not charged


def test_inner_loop_skips_a_step_whose_scaled_gradients_overflow():
    class HugeScaler:
        def get_scale(self):
            return 1e308

        def is_enabled(self):
            return True

    det = QuadraticDetector()
    learner = MAML(det, None, ctx(inner_lr=0.1, scaler=HugeScaler()))
    adapted, _ = inner_loop(learner, det, quad_episodes()[0].support, ["head.w"], 1, 0.1, first_order=True)
    assert torch.equal(adapted["head.w"].detach(), det.head.w.detach())


# --- through the runner -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LEARNERS))
def test_every_learner_runs_end_to_end_through_the_runner(name, tmp_path):
    import megatron
    import tiny_detector  # the runner tests' tiny detector and `blobs` dataset
    from megatron.config import load_config
    from megatron.training.runner import run_experiment

    cfg = load_config(None, {
        "data.datasets": [{"plugin": "blobs", "options": {"images_per_task": 16}}], "data.target": "target",
        "data.shots": 8, "data.eval_images": 8, "data.input_size": 64, "detector.name": "tiny",
        "learner.name": name, "training.meta_epochs": 2, "training.finetune_epochs": 1,
        "training.outer_lr": 0.01, "training.finetune_lr": 0.003, "output.dir": str(tmp_path / "runs"),
        "output.compare_baseline": False, "output.plots": False,
    })
    pm = megatron.get_plugin_manager(autoload=False, extra=[("tiny_detector", tiny_detector)])
    record = run_experiment(cfg, pm=pm, progress=False)
    lrec = record["learners"][name]
    assert len(lrec["epochs"]) == 2
    for epoch in lrec["epochs"]:
        assert 0 <= epoch["metrics"]["mAP50"] <= 1 and torch.isfinite(torch.tensor(epoch["train_loss"]))
    assert lrec["compute"]["images_forward"] > 0 and lrec["compute"]["images_backward"] > 0
