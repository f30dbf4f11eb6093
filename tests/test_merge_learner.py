"""The `merge` learner (model soups / task arithmetic), pinned on the tiny detectors of tests/learner_models.py."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

from megatron.errors import ConfigError
from megatron_plugins.learners._functional import concat_batches
from megatron_plugins.learners.merge import Merge
from megatron_plugins.learners.reptile import Reptile

from learner_models import GROUP_WEIGHTS, CoupledDetector, QuadraticDetector, batch_stats, make_batch, make_episode
from learner_models import ctx, quad_episodes
from tiny_run import KillAt



def coupled_episodes():
    s1 = make_batch([[40, 120, 200], [90, 30, 60]], boxes=[[[1, 1, 5, 6], [2, 0, 7, 3]], [[0, 2, 4, 8]]], labels=[[0, 1], [1]])
    q1 = make_batch([[200, 100, 20]], boxes=[[[3, 3, 7, 7], [0, 0, 2, 5]]], labels=[[1, 0]], first_id=5)
    s2 = make_batch([[10, 250, 130]], boxes=[[[1, 2, 3, 4], [4, 4, 8, 8]]], labels=[[0, 1]], first_id=10)
    q2 = make_batch([[60, 60, 60], [180, 20, 240]], boxes=[[[2, 2, 6, 5]], [[1, 0, 8, 2]]], labels=[[0], [1]], first_id=15)
    return [make_episode("t1", s1, q1), make_episode("t2", s2, q2)]


def stats_of(ep):
    """(a, c) of the quadratic loss on the episode's support + query: L = 0.5 a sum_g m_g ||w_g - c||^2."""
    s = batch_stats(concat_batches([ep.support, ep.query]))
    return 1 + s[2], s[:2]


def test_registered_with_its_papers_options_and_example(megatron_pm):
    assert megatron_pm.registers["learner"].get("merge") is Merge
    assert "Wortsman" in Merge.PAPER and "Ilharco" in Merge.PAPER
    doc = inspect.getmodule(Merge).__doc__
    assert "Model soups" in doc and "task arithmetic" in doc and "Example" in doc
    assert Merge.Options.model_config.get("extra") == "forbid"
    assert all(f.description for f in Merge.Options.model_fields.values())
    with pytest.raises(Exception):
        Merge.Options(scale=2.0)
    with pytest.raises(Exception):
        Merge.Options(scaling=0.0)


def test_two_steps_match_the_hand_computation():
    """Step 1 trains fresh copies of t1 and t2 from theta_0; step 2 continues t1's copy only (with its momentum);
    the detector is theta_0 + lambda * mean(phi_t - theta_0) after each, never a function of the previous merge."""
    det = QuadraticDetector()
    lam, lr = 0.8, 0.05
    learner = Merge(det, Merge.Options(scaling=lam, task_steps=1, optimizer="sgd", lr=lr), ctx())
    t1, t2 = quad_episodes()
    (a1, c1), (a2, c2) = stats_of(t1), stats_of(t2)
    theta0 = {n: p.detach().clone() for n, p in det.named_parameters()}

    learner.meta_step([t1, t2])
    phi1, phi2, expected1 = {}, {}, {}
    for g, m in GROUP_WEIGHTS.items():
        w = theta0[f"{g}.w"]
        phi1[g] = w - lr * a1 * m * (w - c1)  # SGD, momentum buffer = the first gradient
        phi2[g] = w - lr * a2 * m * (w - c2)
        expected1[g] = w + lam * ((phi1[g] - w) + (phi2[g] - w)) / 2
    for g in GROUP_WEIGHTS:
        torch.testing.assert_close(det.get_parameter(f"{g}.w").detach(), expected1[g], rtol=1e-12, atol=1e-14)
    # the BatchNorm-like buffer: each copy moved once from 0 (0.1 a), merged by the same rule; the counter by 1
    torch.testing.assert_close(det.backbone.running, lam * (0.1 * a1 + 0.1 * a2) / 2, rtol=1e-12, atol=1e-14)
    assert int(det.backbone.num_batches_tracked) == 1

    learner.meta_step([t1])
    for g, m in GROUP_WEIGHTS.items():
        w = theta0[f"{g}.w"]
        buf = 0.9 * (a1 * m * (w - c1)) + a1 * m * (phi1[g] - c1)  # t1's own momentum carried over
        phi1_2 = phi1[g] - lr * buf
        expected2 = w + lam * ((phi1_2 - w) + (phi2[g] - w)) / 2  # t2's copy as it was; theta_0 fixed
        torch.testing.assert_close(det.get_parameter(f"{g}.w").detach(), expected2, rtol=1e-12, atol=1e-14)
    running1 = 0.9 * (0.1 * a1) + 0.1 * a1
    torch.testing.assert_close(det.backbone.running, lam * (running1 + 0.1 * a2) / 2, rtol=1e-12, atol=1e-14)
    assert int(det.backbone.num_batches_tracked) == 2  # counts 2 and 1: mean 1.5, rounded
    assert learner.steps_done == 2 and sorted(learner.tasks) == ["t1", "t2"]


def test_first_step_equals_reptile_with_eps_lambda_then_they_part():
    lam = 0.6
    merge = Merge(QuadraticDetector(), Merge.Options(scaling=lam, optimizer="sgd", lr=0.05), ctx(inner_steps=1))
    reptile = Reptile(QuadraticDetector(), Reptile.Options(eps_start=lam, eps_end=lam, inner_optimizer="sgd"),
                      ctx(inner_steps=1, inner_lr=0.05))
    for learner in (merge, reptile):
        learner.meta_step(quad_episodes())
    for p, q in zip(merge.detector.parameters(), reptile.detector.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    for learner in (merge, reptile):
        learner.meta_step(quad_episodes())
    assert any(not torch.allclose(p, q) for p, q in zip(merge.detector.parameters(), reptile.detector.parameters()))


def test_scaling_one_with_one_task_is_that_task_s_fine_tuned_copy():
    det = QuadraticDetector()
    learner = Merge(det, Merge.Options(scaling=1.0, task_steps=3, optimizer="adam", lr=0.1), ctx())
    reference = copy.deepcopy(det)
    opt = torch.optim.Adam(reference.parameters(), lr=0.1)
    ep = quad_episodes()[0]
    batch = concat_batches([ep.support, ep.query])
    for _ in range(2):  # two meta-steps of three steps each: one uninterrupted six-step fine-tuning
        learner.meta_step([ep])
    for _ in range(6):
        opt.zero_grad()
        reference.loss(batch)["loss"].backward()
        opt.step()
    for p, q in zip(det.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_defaults_come_from_the_training_settings():
    learner = Merge(QuadraticDetector(), None, ctx(inner_steps=4, outer_lr=0.02, outer_optimizer="sgd"))
    assert learner.task_steps == 4 and learner.lr == 0.02
    learner.meta_step(quad_episodes()[:1])
    opt = learner._optimizers["t1"]
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.02
    assert learner.ctx.compute.images_forward == 4 * 3  # four steps on 2 + 1 images


def test_compute_accounting_per_meta_step():
    k, s, q = 2, 3, 3  # coupled_episodes: support 2 + 1, query 1 + 2 images
    learner = Merge(CoupledDetector(), None, ctx(inner_steps=k))
    learner.meta_step(coupled_episodes())
    acc = learner.ctx.compute
    assert (acc.images_forward, acc.images_backward) == (k * (s + q), k * (s + q)) and acc._pending == 0


def test_state_dict_gives_an_exact_resume():
    def episodes(i):
        eps = coupled_episodes()
        return eps if i % 2 == 0 else eps[:1]

    straight = Merge(CoupledDetector(seed=7), None, ctx(inner_steps=1))
    for i in range(3):
        straight.meta_step(episodes(i))
    first = Merge(CoupledDetector(seed=7), None, ctx(inner_steps=1))
    for i in range(2):
        first.meta_step(episodes(i))
    saved_det = copy.deepcopy(first.detector.state_dict())
    saved = copy.deepcopy(first.state_dict())
    resumed = Merge(CoupledDetector(seed=99), None, ctx(inner_steps=1))
    resumed.detector.load_state_dict(saved_det)
    resumed.load_state_dict(saved)
    resumed.meta_step(episodes(2))
    for (n, p), q in zip(straight.detector.named_parameters(), resumed.detector.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    assert resumed.steps_done == 3
    # the optimiser state matters: a resume without it ends elsewhere
    lost = Merge(CoupledDetector(seed=99), None, ctx(inner_steps=1))
    lost.detector.load_state_dict(saved_det)
    lost.load_state_dict({**saved, "optimizers": {}})
    lost.meta_step(episodes(2))
    assert any(not torch.equal(p, q) for p, q in zip(straight.detector.parameters(), lost.detector.parameters()))


def test_adapt_fine_tunes_a_copy_of_the_merged_model():
    det = CoupledDetector(seed=6)
    learner = Merge(det, None, ctx(finetune_lr=0.05))
    learner.meta_step(coupled_episodes())
    merged = {n: p.detach().clone() for n, p in det.named_parameters()}
    adapted = learner.adapt([coupled_episodes()[1].support], freeze="none")
    assert adapted is not det
    assert all(torch.equal(p.detach(), merged[n]) for n, p in det.named_parameters())
    assert any(not torch.equal(p.detach(), merged[n]) for n, p in adapted.named_parameters())


def test_errors_name_the_problem():
    learner = Merge(CoupledDetector(num_classes=2), None, ctx())
    bad = make_batch([[1, 2, 3]], boxes=[[[0, 0, 4, 4]]], labels=[[2]], first_id=42)
    with pytest.raises(ConfigError, match="xray.*image 42.*label 2.*2 classes"):
        learner.meta_step([make_episode("xray", bad, coupled_episodes()[0].query)])
    with pytest.raises(ConfigError, match="distributed"):
        Merge(CoupledDetector(), None, ctx(world_size=2)).meta_step(coupled_episodes())
    with pytest.raises(ValueError, match="at least one episode"):
        learner.meta_step([])


# --- through the runner ------------------------------------------------------------------------------------
def test_a_run_through_the_runner_resumes_exactly(tmp_path):
    import megatron
    import tiny_detector
    from megatron.config import load_config
    from megatron.training.runner import run_experiment

    cfg = load_config(None, {
        "data.datasets": [{"plugin": "blobs", "options": {"images_per_task": 16}}], "data.target": "target",
        "data.shots": 8, "data.eval_images": 8, "data.input_size": 64, "detector.name": "tiny",
        "learner.name": "merge", "training.meta_epochs": 3, "training.finetune_epochs": 1,
        "training.steps_per_epoch": 2, "training.outer_lr": 0.01, "output.dir": str(tmp_path / "runs"),
        "output.compare_baseline": False, "output.plots": False, "training.pretrain_epochs": 0,
        "data.cache_dir": str(tmp_path / "cache")})

    def pm(*plugins):
        extra = [("tiny_detector", tiny_detector)] + [(type(p).__name__, p) for p in plugins]
        return megatron.get_plugin_manager(autoload=False, extra=extra)

    full = run_experiment(cfg, run_dir=tmp_path / "full", pm=pm(), progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, run_dir=tmp_path / "killed", pm=pm(KillAt(2, 2)), progress=False)
    resumed = run_experiment(cfg, run_dir=tmp_path / "killed", pm=pm(), resume=True, progress=False)
    epochs = lambda rec: [(e["meta_epoch"], e["train_loss"], e["metrics"]["mAP50"])  # noqa: E731
                          for e in rec["learners"]["merge"]["epochs"]]
    assert full["status"] == resumed["status"] == "complete"
    assert epochs(resumed) == epochs(full) and len(epochs(full)) == 3
    assert full["learners"]["merge"]["compute"]["spent"] > 0
