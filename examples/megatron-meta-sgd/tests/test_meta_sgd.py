"""Meta-SGD pinned against its closed form on a quadratic model, its compute, resume and a whole megatron run."""
from __future__ import annotations

import copy

import pytest
import torch

from meta_sgd_doubles import GROUPS, QuadraticDetector, TestPlugins, make_batch, make_episode
from megatron.errors import ConfigError
from megatron.api.learner import LearnerContext
from megatron_meta_sgd import plugin
from megatron_meta_sgd.plugin import MetaSGD


def learner(alpha0=0.3, outer_lr=0.1, outer_optimizer="sgd", **options) -> MetaSGD:
    ctx = LearnerContext(inner_steps=1, inner_lr=alpha0, outer_lr=outer_lr, outer_optimizer=outer_optimizer,
                         grad_clip=None)
    return MetaSGD(QuadraticDetector(), MetaSGD.Options(**options), ctx)


def test_registered_by_name_with_documented_options(make_plugin_manager):
    pm = make_plugin_manager(plugin, builtins=False)
    assert pm.registers["learner"].get("meta-sgd") is MetaSGD
    assert "Li" in MetaSGD.PAPER and "1707.09835" in MetaSGD.PAPER
    assert all(f.description for f in MetaSGD.Options.model_fields.values())
    with pytest.raises(Exception):
        MetaSGD.Options(firs_order=True)


@pytest.mark.parametrize("first_order", [False, True])
def test_one_meta_step_matches_the_closed_form(first_order):
    """θ' = θ − α(θ − c_s); L_q = ½‖θ' − c_q‖². ∂L_q/∂α = −(θ' − c_q)(θ − c_s);
    ∂L_q/∂θ = (θ' − c_q)(1 − α), or (θ' − c_q) first order. SGD's first step moves by lr · gradient."""
    lrn = learner(first_order=first_order)
    ep = make_episode("t", [51.0, 102.0], [204.0])
    c_s, c_q = QuadraticDetector.target(ep.support), QuadraticDetector.target(ep.query)
    theta = {g: lrn.detector.get_parameter(f"{g}.w").detach().clone() for g in GROUPS}
    alpha = 0.3
    stats = lrn.meta_step([ep])
    for g in GROUPS:
        adapted = theta[g] - alpha * (theta[g] - c_s)
        grad_theta = (adapted - c_q) * (1.0 if first_order else (1 - alpha))
        grad_alpha = -(adapted - c_q) * (theta[g] - c_s)
        torch.testing.assert_close(lrn.detector.get_parameter(f"{g}.w").detach(), theta[g] - 0.1 * grad_theta)
        torch.testing.assert_close(lrn.alpha[f"{g}.w"].detach(), alpha - 0.1 * grad_alpha)
    expected_query = sum(0.5 * float(((theta[g] - alpha * (theta[g] - c_s) - c_q) ** 2).sum()) for g in GROUPS)
    assert stats["loss"] == pytest.approx(expected_query)
    assert stats["support_loss"] == pytest.approx(sum(0.5 * float(((theta[g] - c_s) ** 2).sum()) for g in GROUPS))


@pytest.mark.parametrize("first_order, backward", [(False, 2 * (2 * 2 + 1 + 2 * 2)), (True, 2 * (2 * 2 + 1))])
def test_compute_is_charged_like_maml(first_order, backward):
    lrn = learner(first_order=first_order)
    lrn.ctx.inner_steps = 2
    lrn.meta_step([make_episode("a", [10.0, 20.0], [30.0]), make_episode("b", [40.0, 50.0], [60.0])])
    assert lrn.ctx.compute.images_forward == 2 * (2 * 2 + 1)  # k·S + Q per episode
    assert lrn.ctx.compute.images_backward == backward  # k·S + Q (+ k·S second order)


def test_inner_groups_limit_the_learned_rates_and_unknown_groups_are_config_errors():
    lrn = learner(inner_groups=["head"])
    assert list(lrn.alpha) == ["head.w"]
    with pytest.raises(ConfigError, match="inner_groups.*'neckk'"):
        learner(inner_groups=["neckk"])


def test_resume_from_state_dict_continues_exactly():
    episodes = [make_episode("a", [10.0, 90.0], [30.0]), make_episode("b", [200.0], [120.0, 60.0])]
    full = learner(outer_lr=0.05, outer_optimizer="adam")  # Adam: moments that must carry over
    for _ in range(3):
        full.meta_step(episodes)
    first = learner(outer_lr=0.05, outer_optimizer="adam")
    first.meta_step(episodes)
    state = copy.deepcopy(first.state_dict())
    resumed = learner(outer_lr=0.05, outer_optimizer="adam")
    resumed.detector.load_state_dict(first.detector.state_dict())
    resumed.load_state_dict(state)
    for _ in range(2):
        resumed.meta_step(episodes)
    for name, p in full.detector.named_parameters():
        torch.testing.assert_close(p, resumed.detector.get_parameter(name), rtol=0, atol=0)
    for name, a in full.alpha.items():
        torch.testing.assert_close(a, resumed.alpha[name], rtol=0, atol=0)


def test_adapt_takes_sgd_steps_with_the_learned_rates_on_a_copy():
    lrn = learner()
    with torch.no_grad():
        lrn.alpha["head.w"].copy_(torch.tensor([0.5, 0.1], dtype=torch.float64))
    before = {n: p.detach().clone() for n, p in lrn.detector.named_parameters()}
    batch = make_batch([100.0, 150.0])
    c = QuadraticDetector.target(batch)
    adapted = lrn.adapt([batch], freeze="backbone")
    head = before["head.w"]
    torch.testing.assert_close(adapted.get_parameter("head.w").detach(), head - torch.tensor([0.5, 0.1]).double() * (head - c))
    torch.testing.assert_close(adapted.get_parameter("backbone.w").detach(), before["backbone.w"])  # frozen
    for n, p in lrn.detector.named_parameters():  # the meta-model is untouched
        assert torch.equal(p, before[n])
    assert lrn.ctx.compute.images_forward == lrn.ctx.compute.images_backward == 2


def test_a_whole_megatron_run_with_meta_sgd(tmp_path, make_plugin_manager):
    from megatron.config import load_config
    from megatron.training.runner import run_experiment

    pm = make_plugin_manager(plugin, TestPlugins())
    cfg = load_config(None, {
        "data.datasets": [{"plugin": "constant-tasks"}], "data.target": "target", "data.shots": 4,
        "data.eval_images": 4, "data.input_size": 32, "data.augment": False, "detector.name": "quadratic",
        "learner.name": "meta-sgd", "learner.options": {"first_order": True}, "training.meta_epochs": 2,
        "training.steps_per_epoch": 2, "training.finetune_epochs": 1, "training.pretrain_epochs": 0,
        "output.dir": str(tmp_path), "output.plots": False, "output.save_models": False,
    })
    record = run_experiment(cfg, run_dir=tmp_path / "run", pm=pm, progress=False)
    assert record["status"] == "complete"
    mine, baseline = record["learners"]["meta-sgd"], record["learners"]["finetune"]
    assert mine["steps_done"] == 4 and len(mine["epochs"]) == 2
    assert baseline["compute"]["spent"] <= mine["compute"]["spent"]  # equal compute: the baseline gets no more


def test_the_options_page_is_up_to_date(monkeypatch):
    from pathlib import Path

    from megatron.cli import main

    monkeypatch.setenv("MEGATRON_PLUGINS", "megatron_meta_sgd.plugin")  # whether or not entry points autoload
    docs = Path(__file__).resolve().parent.parent / "docs"
    assert main(["docs", "meta-sgd", "--check", "--out", str(docs)]) == 0, "run `megatron docs meta-sgd --out docs`"
