"""Equal compute for every learner (issue 25): a learner whose meta-epochs would end short of its budget keeps
taking outer steps until the budget is spent; one that still ends short (its epoch cap came first) is marked
unequal in its record, with the reason."""
from __future__ import annotations

from pathlib import Path

import pytest
from tiny_run import make_pm, tiny_config

from megatron.training.meta_train import EQUAL_COMPUTE_TOLERANCE, compute_equality
from megatron.training.runner import run_experiment


@pytest.mark.slow  # several tiny runs: about a minute on the shared 2-core machine
def test_a_learner_whose_meta_epochs_end_short_of_the_budget_keeps_going_until_it_is_spent(tmp_path):
    # three fine-tuning epochs: a fine-tuning costs more than an outer step, so a meta-epoch's remainder matters
    cheap = {"training.finetune_epochs": 3}
    one_epoch = tiny_config(tmp_path, **cheap, **{"training.meta_epochs": 1})
    probe = run_experiment(one_epoch, run_dir=tmp_path / "probe", pm=make_pm(), progress=False,
                           learners=["joint_test"])["learners"]["joint_test"]["epochs"][0]
    steps, epoch_cost = probe["steps"], probe["compute"]["spent"]
    # a meta-epoch costs steps * s + f: one with a single step gives s and f apart
    one_step = tiny_config(tmp_path, **cheap, **{"training.meta_epochs": 1, "training.steps_per_epoch": 1})
    single = run_experiment(one_step, run_dir=tmp_path / "one_step", pm=make_pm(), progress=False,
                            learners=["joint_test"])["learners"]["joint_test"]["epochs"][0]["compute"]["spent"]
    step_cost = (epoch_cost - single) // (steps - 1)
    finetune_cost = epoch_cost - steps * step_cost
    assert finetune_cost > step_cost  # else stopping short would cost less than a step: nothing to test
    # two full meta-epochs, then a remainder just too small for a third (one step and a fine-tuning)
    budget = 2 * epoch_cost + finetune_cost + step_cost - 1
    record = run_experiment(tiny_config(tmp_path, **cheap, **{"training.compute_budget": budget, "training.meta_epochs": 2}),
                            run_dir=tmp_path / "b", pm=make_pm(), progress=False, learners=["joint_test"])
    lrec = record["learners"]["joint_test"]
    assert lrec["stopped_by"] == "budget"
    assert [e["steps"] for e in lrec["epochs"]][0] == steps
    # the second meta-epoch went on past its planned steps instead of leaving the remainder unspent
    assert lrec["epochs"][-1]["steps"] > steps and len(lrec["epochs"]) == 2
    spent = lrec["compute"]["spent"]
    assert budget - step_cost < spent <= budget
    assert budget - 2 * epoch_cost > step_cost  # without continuing it would have stopped more than a step short
    assert lrec["equal_compute"]["spent"] == spent and lrec["equal_compute"]["budget"] == budget


@pytest.mark.slow  # several tiny runs: about a minute on the shared 2-core machine
def test_a_learner_stopped_by_its_epoch_cap_is_marked_unequal_with_the_reason(tmp_path):
    cfg = tiny_config(tmp_path, **{"training.compute_budget": 10**6, "training.max_meta_epochs": 1})
    lrec = run_experiment(cfg, run_dir=tmp_path / "cap", pm=make_pm(), progress=False,
                          learners=["joint_test"])["learners"]["joint_test"]
    assert lrec["stopped_by"] == "epoch_cap"
    assert lrec["equal_compute"]["equal"] is False
    assert "epoch cap" in lrec["equal_compute"]["reason"] and "max_meta_epochs" in lrec["equal_compute"]["reason"]


def test_compute_equality_within_the_tolerance_is_equal_and_without_a_budget_is_not_judged():
    assert compute_equality(990, 1000, "budget")["equal"] is True
    short = compute_equality(int(1000 * (1 - 2 * EQUAL_COMPUTE_TOLERANCE)), 1000, "budget")
    assert short["equal"] is False and "could not pay" in short["reason"]
    assert compute_equality(500, None, "epochs") is None
