"""Distributed meta-training (megatron.runtime.distributed) on CPU: gloo, 2 processes on loopback, the tiny detector.

One 2-process session (module fixture; process start-up dominates the cost) trains every case of
``dist_workers.LEARNER_CASES`` for a few outer steps on the same global meta-batches a single process sees,
and exercises the collective helpers. The tests then check that the ranks hold bit-identical weights and that
2 processes end where 1 process ends (within float tolerance: the sum over episodes is ordered differently).
"""
from __future__ import annotations

import pytest
import torch

import dist_workers
from megatron.runtime import distributed as mdist
from megatron.runtime.distributed import DistEnv
from megatron.errors import ConfigError

STEPS = 3
META_BATCH = 4


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist2")
    dist_workers.spawn_ranks(dist_workers.session, 2, {"out_dir": str(out), "steps": STEPS, "meta_batch": META_BATCH},
                             timeout_s=300, error_dir=out)
    return {
        "train": [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)],
        "coll": [torch.load(out / f"coll{r}.pt", weights_only=False) for r in range(2)],
    }


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return dist_workers.train_learners(DistEnv(), str(out), steps=STEPS, meta_batch=META_BATCH)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def initial_state():
    torch.manual_seed(1234)
    return {k: v.clone() for k, v in dist_workers.tiny_detector_factory()().state_dict().items()}


CASES = [key for key, _, _ in dist_workers.LEARNER_CASES]


# --- pure helpers (no process group) ---------------------------------------------------------------------
def test_shard_is_round_robin_and_covers_the_meta_batch_once():
    items = list("abcdef")
    shards = [mdist.shard(items, DistEnv(rank=r, world_size=3)) for r in range(3)]
    assert shards == [["a", "d"], ["b", "e"], ["c", "f"]]
    assert sorted(x for s in shards for x in s) == items
    assert mdist.shard(items, DistEnv()) == items


def test_shard_rejects_a_meta_batch_that_does_not_divide_evenly():
    with pytest.raises(ConfigError, match=r"training.meta_batch to a multiple of 2"):
        mdist.shard([1, 2, 3], DistEnv(rank=0, world_size=2))
    assert mdist.shard([1, 2, 3], DistEnv(rank=1, world_size=2), even=False) == [2]
    assert mdist.shard([1], DistEnv(rank=1, world_size=2), even=False) == []


def test_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    env = mdist.init_from_env("cpu")
    assert env == DistEnv() and env.is_main and not env.enabled
    assert mdist.make_all_reduce_mean(env) is None
    t = torch.ones(3)
    mdist.all_reduce_mean([t], env)  # a no-op, not an error
    assert torch.equal(t, torch.ones(3))
    assert mdist.gather_objects("x", env) == ["x"] and mdist.broadcast_object(5, env) == 5
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert not mdist.launched_by_torchrun()


def test_timeout_from_the_environment_is_validated(monkeypatch):
    monkeypatch.setenv(mdist.TIMEOUT_ENV, "soon")
    with pytest.raises(ConfigError, match=mdist.TIMEOUT_ENV):
        mdist._timeout_s(None)
    monkeypatch.setenv(mdist.TIMEOUT_ENV, "90")
    assert mdist._timeout_s(None) == 90.0
    assert mdist._timeout_s(5) == 5.0


# --- collectives on a real 2-process gloo group --------------------------------------------------------------
def test_all_reduce_mean_averages_mixed_shapes_and_dtypes_in_place(two_ranks):
    for found in two_ranks["coll"]:
        a, b, c = found["mean"]
        assert torch.equal(a, torch.full((2, 3), 1.5))
        assert b.dtype == torch.float64 and torch.equal(b, torch.tensor([15.0], dtype=torch.float64))
        assert c.dtype == torch.bfloat16 and torch.equal(c, torch.full((4,), 0.5, dtype=torch.bfloat16))
        assert found["stats"]["calls"] == 1 and found["stats"]["elements"] == 8 and found["stats"]["seconds"] > 0


def test_gather_broadcast_and_integer_sums(two_ranks):
    r0, r1 = two_ranks["coll"]
    assert r0["gather"] == r1["gather"] == [{"rank": 0}, {"rank": 1}]
    assert r0["broadcast"] == r1["broadcast"] == "from rank 0"
    assert r0["sum_ints"] == r1["sum_ints"] == [3, 14]
    assert r0["shard"] == [0, 2, 4] and r1["shard"] == [1, 3, 5]
    assert r0["shard_uneven"] == [0, 2, 4] and r1["shard_uneven"] == [1, 3]
    assert "multiple of 2" in r0["uneven_error"]


def test_on_main_sends_rank0s_result_or_its_exception_to_every_rank(two_ranks):
    for found in two_ranks["coll"]:
        assert found["on_main"] == "computed by rank 0"
        assert found["on_main_error"] == "bad run directory seen by rank 0"
        # loss and image counts summed exactly (float64 keeps integers up to 2**53)
        assert found["sync_step"] == [1.5, 16.0, float(2**41 + 1)]


def test_check_in_sync_names_diverged_parameters_and_broadcast_repairs_them(two_ranks):
    r0, r1 = two_ranks["coll"]
    for found in (r0, r1):
        assert "no longer hold identical weights" in found["diverged_error"]
        assert "0.weight" in found["diverged_error"]
    for name, value in r0["after_broadcast"].items():
        assert torch.equal(value, r1["after_broadcast"][name]), name
    # floating buffers (BatchNorm running statistics) averaged: ranks had 0 and 1
    assert r0["buffers_averaged"] == 2
    assert torch.equal(r0["running_mean"], torch.full((2,), 0.5)) and torch.equal(r1["running_mean"], r0["running_mean"])


# --- learners --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_ranks_hold_bit_identical_weights_after_outer_steps(two_ranks, initial_state, case):
    s0, s1 = (two_ranks["train"][r][case]["state"] for r in range(2))
    assert s0.keys() == s1.keys()
    for name in s0:
        assert torch.equal(s0[name], s1[name]), f"{case}: {name} differs between ranks"
    moved = max(float((s0[n].float() - initial_state[n].float()).abs().max()) for n in s0)
    assert moved > 1e-4, f"{case}: the outer steps did not change the weights"


@pytest.mark.parametrize("case", CASES)
def test_two_processes_end_where_one_process_ends(two_ranks, one_rank, initial_state, case):
    """Same global meta-batches and seed: the only difference is the order of summation over episodes."""
    two, one = two_ranks["train"][0][case]["state"], one_rank[dist_workers.REFERENCE_CASE.get(case, case)]["state"]
    for name in one:
        moved = float((one[name].float() - initial_state[name].float()).abs().max())
        diff = float((two[name].float() - one[name].float()).abs().max())
        assert diff <= 1e-6 + 1e-4 * moved, f"{case}: {name} differs by {diff:g} (moved {moved:g})"
    # the losses seen by rank 0 are its shard's; the 1-process run averages every episode
    assert len(two_ranks["train"][0][case]["losses"]) == STEPS == len(one_rank[case]["losses"])


def test_the_check_can_fail_ranks_that_skip_the_all_reduce_diverge(tmp_path):
    """Control: without LearnerContext.all_reduce_mean each rank follows its own shard and the weights differ."""
    one = dist_workers.train_learners(DistEnv(), str(tmp_path), steps=1, meta_batch=2,
                                      cases=[("fomaml", "maml", {"first_order": True})])
    shard_only = dist_workers.train_learners(DistEnv(), str(tmp_path), steps=1, meta_batch=2,
                                             cases=[("fomaml", "maml", {"first_order": True})], take_shard_of=2)
    diff = max(float((one["fomaml"]["state"][n] - shard_only["fomaml"]["state"][n]).abs().max())
               for n in one["fomaml"]["state"])
    assert diff > 1e-6


# --- launcher helpers (no processes) ---------------------------------------------------------------------
def test_local_context_switches_averaging_off_and_back():
    from megatron.api.learner import LearnerContext

    def reduce(tensors):
        raise AssertionError("must not be called")

    ctx = LearnerContext(all_reduce_mean=reduce, world_size=4)
    with mdist.local_context(ctx):
        assert ctx.all_reduce_mean is None and ctx.world_size == 1
    assert ctx.all_reduce_mean is reduce and ctx.world_size == 4


def test_strip_option_removes_nproc_in_both_spellings():
    argv = ["run", "--nproc", "2", "-c", "x.yaml", "--nproc=3", "--set", "a=1"]
    assert mdist.strip_option(argv, "--nproc") == ["run", "-c", "x.yaml", "--set", "a=1"]


def test_failure_message_names_the_rank_that_failed_first_not_the_ones_torchrun_stopped():
    from types import SimpleNamespace

    failures = {0: SimpleNamespace(exitcode=-15, timestamp=100), 1: SimpleNamespace(exitcode=17, timestamp=100)}
    message = mdist.describe_failure(failures)
    assert "rank 1 failed first (exit code 17)" in message and "stopped rank(s) 0" in message
    assert "--resume" in message
    killed = mdist.describe_failure({3: SimpleNamespace(exitcode=-9, timestamp=5)})
    assert "rank 3 failed first (killed by signal 9)" in killed
