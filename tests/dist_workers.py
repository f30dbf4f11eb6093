"""Process launching and the per-rank work of the distributed tests and benchmark (CPU, gloo, loopback only).

``spawn_ranks`` starts ``world`` processes with ``torch.multiprocessing`` (spawn), gives each the environment
``torchrun`` would (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR=127.0.0.1``, a free
``MASTER_PORT``) and joins the process group through :func:`megatron.runtime.distributed.init_from_env`, exactly as a
``torchrun``-launched run does. A hung or failed rank fails the caller within ``timeout_s``.

``train_learners`` is the learner-level training loop of a distributed run (the runner's, minus evaluation):
every rank draws the same global meta-batch from one seeded :class:`EpisodeSampler`, loads its
:func:`shard` only (``meta_batch(..., shard=env)``), runs ``meta_step`` with the context's ``all_reduce_mean`` bound to the process group, then
averages floating buffers. With ``DistEnv()`` it is the single-process reference.
"""
from __future__ import annotations

import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from megatron.runtime import distributed as mdist
from megatron.data.episodes import EpisodeSampler
from megatron.data.preprocess import Preprocessor
from megatron.api.learner import LearnerContext

#: (key, learner plugin name, options) trained by the equivalence tests
LEARNER_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("reptile", "reptile", {"eps_start": 0.5, "eps_end": 0.5}),
    ("fomaml", "maml", {"first_order": True}),
    ("maml", "maml", {"first_order": False}),
    ("anil", "anil", {"first_order": False}),
    ("proto", "proto", {}),
    ("finetune", "finetune", {"episodes_per_step": 2}),
    # the default (1) becomes the number of processes: 2 processes = 1 process with episodes_per_step 2
    ("finetune_auto", "finetune", {}),
]
#: the single-process case a 2-process case must match, where it is another one
REFERENCE_CASE = {"finetune_auto": "finetune"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, fn: Callable, kwargs: dict, error_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    try:
        env = mdist.init_from_env("cpu", timeout_s=kwargs.pop("dist_timeout_s", 60.0))
        try:
            fn(env, **kwargs)
        finally:
            mdist.shutdown()
    except BaseException:
        Path(error_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def spawn_ranks(fn: Callable, world: int, kwargs: dict, timeout_s: float = 120.0, error_dir: str | Path = ".") -> None:
    """Run ``fn(env, **kwargs)`` on ``world`` spawned ranks; raise with the ranks' tracebacks if any fails."""
    import torch.multiprocessing as mp

    port = free_port()
    ctx = mp.start_processes(_entry, args=(world, port, fn, dict(kwargs), str(error_dir)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks did not finish within {timeout_s:.0f} s")
    except Exception as exc:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        errors = "\n".join(f.read_text() for f in sorted(Path(error_dir).glob("rank*.err")))
        raise RuntimeError(f"distributed ranks failed: {exc}\n{errors}") from exc


# --- the work ----------------------------------------------------------------------------------------------

def blobs_tasks(images_per_task: int = 12):
    from tiny_detector import BlobsDataset, BlobsOptions

    return BlobsDataset(BlobsOptions(tasks=["alpha", "beta", "gamma"], images_per_task=images_per_task)).load()


def build_learner(name: str, options: dict, env: mdist.DistEnv, detector_factory: Callable[[], torch.nn.Module],
                  stats: mdist.CommStats | None = None, **ctx_kw):
    import importlib

    # the built-in learner module directly: a full plugin manager would import every detector (mmdet) too
    module = importlib.import_module(f"megatron_plugins.learners.{name}")
    cls = next(v for v in vars(module).values() if getattr(v, "PLUGIN_NAME", None) == name)
    torch.manual_seed(1234)
    detector = detector_factory()
    mdist.broadcast_module(detector, env)
    ctx_kw.setdefault("inner_steps", 2)
    ctx_kw.setdefault("inner_lr", 0.01)
    ctx = LearnerContext(all_reduce_mean=mdist.make_all_reduce_mean(env, stats), world_size=env.world_size, **ctx_kw)
    return cls(detector, cls.Options(**options), ctx)


def tiny_detector_factory(input_size: int = 64, width: int = 8) -> Callable[[], torch.nn.Module]:
    from tiny_detector import TinyDetector, TinyDetectorOptions

    return lambda: TinyDetector(2, input_size, TinyDetectorOptions(width=width))


def outer_steps(learner, env: mdist.DistEnv, sampler: EpisodeSampler, tasks, meta_batch: int, steps: int,
                shard_env: mdist.DistEnv | None = None) -> list[float]:
    """``steps`` outer steps; ``shard_env`` (testing aid) shards as that rank would without any all-reduce."""
    losses = []
    for _ in range(steps):
        # every rank draws the same global meta-batch and decodes only its share (= mdist.shard of it)
        episodes = sampler.meta_batch(tasks, meta_batch, shard=shard_env or env)
        stats = learner.meta_step(episodes)
        mdist.all_reduce_buffers_mean(learner.detector, env)
        losses.append(float(stats["loss"]))
    return losses


def train_learners(env: mdist.DistEnv, out_dir: str, steps: int = 3, meta_batch: int = 4,
                   cases: list | None = None, take_shard_of: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Train each case from the same initial weights on the same meta-batches; save and return the final
    parameters and buffers (``out_dir/rank<r>.pt``). ``take_shard_of=W`` (single process only, a control):
    train on rank 0's shard of W processes with nothing to average with."""
    shard_env = mdist.DistEnv(0, take_shard_of) if take_shard_of else None
    tasks = blobs_tasks()
    results: dict[str, Any] = {}
    for key, name, options in cases or LEARNER_CASES:
        learner = build_learner(name, options, env, tiny_detector_factory())
        sampler = EpisodeSampler(2, 2, Preprocessor(64), seed=7)
        losses = outer_steps(learner, env, sampler, tasks, meta_batch, steps, shard_env)
        results[key] = {"state": {k: v.detach().clone() for k, v in learner.detector.state_dict().items()},
                        "losses": losses}
        mdist.check_in_sync(learner.detector, env, key)
    torch.save(results, Path(out_dir, f"rank{env.rank}.pt"))
    return results


def collectives(env: mdist.DistEnv, out_dir: str) -> None:
    """The helpers of megatron.runtime.distributed on a real process group; findings saved to ``out_dir/coll<r>.pt``."""
    from megatron.errors import ConfigError, TrainingError

    found: dict[str, Any] = {}
    # all_reduce_mean: one call averages tensors of several shapes and dtypes in place
    a = torch.full((2, 3), float(env.rank + 1))
    b = torch.tensor([10.0 * (env.rank + 1)], dtype=torch.float64)
    c = torch.full((4,), float(env.rank), dtype=torch.bfloat16)
    mdist.all_reduce_mean([a, b, c], env)
    found["mean"] = (a.clone(), b.clone(), c.clone())
    found["gather"] = mdist.gather_objects({"rank": env.rank}, env)
    found["broadcast"] = mdist.broadcast_object(f"from rank {env.rank}", env)
    found["sum_ints"] = mdist.all_reduce_sum_ints([env.rank + 1, 7], env)
    found["shard"] = mdist.shard(list(range(6)), env)
    found["shard_uneven"] = mdist.shard(list(range(5)), env, even=False)
    try:
        mdist.shard(list(range(5)), env)
        found["uneven_error"] = None
    except ConfigError as exc:
        found["uneven_error"] = str(exc)
    # check_in_sync: quiet when identical, a TrainingError naming the parameter when one rank drifts
    torch.manual_seed(env.rank)  # different initial weights on purpose
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        module[1].running_mean.fill_(float(env.rank))
    try:
        mdist.check_in_sync(module, env)
        found["diverged_error"] = None
    except TrainingError as exc:
        found["diverged_error"] = str(exc)
    mdist.broadcast_module(module, env)
    found["after_broadcast"] = {k: v.clone() for k, v in module.state_dict().items()}
    mdist.check_in_sync(module, env)  # must not raise now
    with torch.no_grad():
        module[1].running_mean.fill_(float(env.rank))
    found["buffers_averaged"] = mdist.all_reduce_buffers_mean(module, env)
    found["running_mean"] = module[1].running_mean.clone()
    # on_main: rank 0 computes, everyone gets the result -- or rank 0's exception
    found["on_main"] = mdist.on_main(lambda: f"computed by rank {env.rank}", env)
    try:
        mdist.on_main(lambda: (_ for _ in ()).throw(ConfigError(f"bad run directory seen by rank {env.rank}")), env)
        found["on_main_error"] = None
    except ConfigError as exc:
        found["on_main_error"] = str(exc)
    found["sync_step"] = mdist.sync_step([0.5 * (env.rank + 1), 8, 2**40 + env.rank], env)
    stats = mdist.CommStats()
    reduce = mdist.make_all_reduce_mean(env, stats)
    reduce([torch.ones(5), torch.ones(3)])
    found["stats"] = stats.as_dict()
    mdist.barrier(env)
    torch.save(found, Path(out_dir, f"coll{env.rank}.pt"))


def session(env: mdist.DistEnv, out_dir: str, steps: int = 3, meta_batch: int = 4) -> None:
    """Everything the fast tests need from one 2-process start (process start-up dominates their time)."""
    collectives(env, out_dir)
    train_learners(env, out_dir, steps=steps, meta_batch=meta_batch)


def session_cases(env: mdist.DistEnv, out_dir: str, cases: list) -> None:
    collectives(env, out_dir)
    train_learners(env, out_dir, cases=cases)
