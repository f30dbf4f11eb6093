"""Distributed meta-training on CPU: time per outer step for 1 and 2 processes, and the communication share.

For each detector (the tests' tiny detector; YOLOX-tiny at a small input unless --quick) and learner (Reptile,
first-order MAML, the finetune baseline), one global meta-batch of M episodes (support 2 + query 2 images)
per outer step, split over W = 1 and 2 processes (gloo on loopback, launched like ``torchrun`` would, one
torch thread per process so W processes use W cores). Per outer step and rank it measures:

- **data**: drawing the global meta-batch (every rank draws all of it, to stay in step with one seed) and
  decoding + preprocessing *this rank's share* of it (``EpisodeSampler.meta_batch(..., shard=env)``), with the
  decoded-image cache off so every step really decodes: it should halve from 1 to 2 processes;
- **step**: the learner's ``meta_step`` on the rank's share, including the cross-rank averaging;
- **comm**: the time inside the all-reduce(s) (``LearnerContext.all_reduce_mean`` plus the BatchNorm buffers),
  including waiting for the slower rank;

and reports the slowest rank's time per outer step, the speed-up over W = 1 and comm / total. The bare reference,
measured in the same run, is one all-reduce of the P parameters alone (barrier-aligned): the floor of the
communication a step cannot avoid; ``comm - bare`` is waiting for the slower rank (load imbalance).

    python benchmarks/bench_distributed.py            # tiny detector + YOLOX-tiny @ 128 px, 8 steps
    python benchmarks/bench_distributed.py --quick    # tiny detector only, 3 steps

Prints a table and writes benchmarks/out/bench_distributed.json. On a machine busy with other work the
absolute numbers move; the ratios (speed-up, comm share) are the point.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny detector and the process launcher live with the tests

import dist_workers as dw  # noqa: E402
from megatron.runtime import distributed as mdist  # noqa: E402
from megatron.data.episodes import EpisodeSampler  # noqa: E402
from megatron.data.preprocess import Preprocessor  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"

LEARNERS = [("reptile", "reptile", {}), ("fomaml", "maml", {"first_order": True}), ("finetune", "finetune", {})]


def detector_factory(model: str, input_size: int):
    if model == "tiny":
        return dw.tiny_detector_factory(input_size, width=16)
    from megatron_plugins.detectors.yolox import YOLOX

    return lambda: YOLOX(2, input_size, YOLOX.Options(size="tiny"))


def bare_all_reduce_s(numel: int, env: mdist.DistEnv, repeats: int = 10) -> float:
    """Median seconds of one barrier-aligned all-reduce of ``numel`` float32 values (0 for one process)."""
    if not env.enabled:
        return 0.0
    buf = torch.ones(numel)
    times = []
    for _ in range(repeats + 2):
        mdist.barrier(env)
        t0 = time.perf_counter()
        mdist.all_reduce_mean([buf], env)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def bench_rank(env: mdist.DistEnv, out_dir: str, model: str, input_size: int, steps: int, warmup: int,
               meta_batch: int, learners: list) -> None:
    torch.set_num_threads(1)
    tasks = dw.blobs_tasks(images_per_task=24)
    results = {}
    for key, name, options in learners:
        stats = mdist.CommStats()
        learner = dw.build_learner(name, options, env, detector_factory(model, input_size), stats, inner_steps=1)
        params = sum(p.numel() for p in learner.detector.parameters() if p.requires_grad)
        buffers = sum(b.numel() for b in learner.detector.buffers() if b.is_floating_point())
        # cache off: each step decodes its images, so "data" measures decoding, not cache hits
        sampler = EpisodeSampler(2, 2, Preprocessor(input_size, cache_size=0), seed=0)
        # its twin loads the whole meta-batch (what every rank decoded before sharding), timed side by side
        twin = EpisodeSampler(2, 2, Preprocessor(input_size, cache_size=0), seed=0)
        rows = []
        for i in range(warmup + steps):
            mdist.barrier(env)
            if i % 2:  # the twin's whole meta-batch, before or after (alternating) this rank's share
                w0 = time.process_time()
                twin.meta_batch(tasks, meta_batch)
                whole_cpu = time.process_time() - w0
            mdist.barrier(env)
            t0, d0 = time.perf_counter(), time.process_time()
            episodes = sampler.meta_batch(tasks, meta_batch, shard=env)  # this rank's share, decoded
            t1, data_cpu = time.perf_counter(), time.process_time() - d0
            if not i % 2:
                w0 = time.process_time()
                twin.meta_batch(tasks, meta_batch)
                whole_cpu = time.process_time() - w0
            mdist.barrier(env)
            ts = time.perf_counter()
            comm0, calls0, cpu0 = stats.seconds, stats.calls, time.process_time()
            learner.meta_step(episodes)
            tb = time.perf_counter()
            mdist.all_reduce_buffers_mean(learner.detector, env)
            t2, cpu = time.perf_counter(), time.process_time() - cpu0
            if i >= warmup:
                rows.append({"data_s": t1 - t0, "data_cpu_s": data_cpu, "whole_cpu_s": whole_cpu, "images": sum(len(e.support) + len(e.query) for e in episodes),
                             "step_s": t2 - ts, "comm_s": stats.seconds - comm0 + (t2 - tb), "cpu_s": cpu,
                             "calls": stats.calls - calls0})
        mdist.check_in_sync(learner.detector, env, key)
        results[key] = {"rows": rows, "params": params, "buffers": buffers,
                        "bare_all_reduce_s": bare_all_reduce_s(params, env), "all_reduce_calls": stats.calls}
    everyone = mdist.gather_objects(results, env)
    if env.is_main:
        Path(out_dir, "result.json").write_text(json.dumps(everyone))


def summarise(per_rank: list[dict], world: int, steps: int) -> dict:
    out = {}
    for key in per_rank[0]:
        # an outer step lasts as long as its slowest rank
        totals = [max(r[key]["rows"][i]["data_s"] + r[key]["rows"][i]["step_s"] for r in per_rank) for i in range(steps)]
        comm = [max(r[key]["rows"][i]["comm_s"] for r in per_rank) for i in range(steps)]
        data = [max(r[key]["rows"][i]["data_s"] for r in per_rank) for i in range(steps)]
        # CPU seconds one rank spends in meta_step: the work division, independent of other load on the machine
        cpu = [max(r[key]["rows"][i]["cpu_s"] for r in per_rank) for i in range(steps)]
        total = statistics.median(totals)
        images = [max(r[key]["rows"][i]["images"] for r in per_rank) for i in range(steps)]
        data_cpu = [max(r[key]["rows"][i]["data_cpu_s"] for r in per_rank) for i in range(steps)]
        # per rank and step: decoding the whole meta-batch / decoding the rank's share, measured back to back
        share_ratio = [row["whole_cpu_s"] / row["data_cpu_s"] for r in per_rank for row in r[key]["rows"] if row["data_cpu_s"]]
        out[key] = {"world": world, "step_total_s": total, "data_s": statistics.median(data),
                    "images_decoded_per_rank": statistics.median(images), "data_cpu_s": statistics.median(data_cpu),
                    "data_whole_over_share": statistics.median(share_ratio), "rank_cpu_s": statistics.median(cpu),
                    "comm_s": statistics.median(comm), "comm_share": statistics.median(comm) / total if total else 0.0,
                    "bare_all_reduce_s": max(r[key]["bare_all_reduce_s"] for r in per_rank),
                    "params": per_rank[0][key]["params"], "buffers": per_rank[0][key]["buffers"],
                    "all_reduce_calls_per_step": statistics.median(row["calls"] for row in per_rank[0][key]["rows"])}
    return out


def run_world(world: int, **kwargs) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        dw.spawn_ranks(bench_rank, world, {"out_dir": tmp, **kwargs}, timeout_s=1800, error_dir=tmp)
        per_rank = json.loads(Path(tmp, "result.json").read_text())
    return summarise(per_rank, world, kwargs["steps"])


def main(argv=None) -> int:
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny detector only, 3 timed steps")
    ap.add_argument("--steps", type=int, help="timed outer steps per configuration (default 8, --quick 3)")
    ap.add_argument("--meta-batch", type=int, default=4, help="global meta-batch (episodes per outer step), default 4")
    args = ap.parse_args(argv)
    steps = args.steps or (3 if args.quick else 8)
    models = [("tiny", 64)] if args.quick else [("tiny", 64), ("yolox", 128)]
    os.environ.setdefault("MEGATRON_DISABLE_PLUGIN_AUTOLOAD", "1")

    results = []
    for model, size in models:
        by_world = {w: run_world(w, model=model, input_size=size, steps=steps, warmup=1, meta_batch=args.meta_batch,
                                 learners=LEARNERS) for w in (1, 2)}
        for key, _, _ in LEARNERS:
            one = by_world[1][key]
            for w, res in by_world.items():
                r = res[key]
                results.append({"model": f"{model}@{size}", "learner": key, **r,
                                "speedup": one["step_total_s"] / r["step_total_s"] if r["step_total_s"] else 0.0,
                                "data_speedup": one["data_cpu_s"] / r["data_cpu_s"] if r["data_cpu_s"] else 0.0})

    table = Table(title=f"time per outer step, global meta-batch {args.meta_batch} (support 2 + query 2 images), CPU, "
                        "1 thread per process", caption="step = data + meta_step (incl. comm), slowest rank, wall time; data = draw the meta-batch + decode "
                                                       "this rank's share (cache off; wall, and CPU s of the slowest rank, "
                                                       "whose ratio is the data speed-up, aim 2x; whole/share: CPU time to decode the whole meta-batch, as every "
                                                       "rank did before, over the rank's share, measured back to back in each rank); rank cpu = CPU seconds "
                                                       "one rank spends in meta_step (the work division, whatever else "
                                                       "runs on the machine); comm = inside the all-reduce(s) incl. waiting; "
                                                       "bare = one all-reduce of the P parameters alone")
    for col in ("model", "learner", "P", "procs", "step s", "speed-up", "data s", "data cpu s", "data speed-up", "whole/share", "images/rank",
                "rank cpu s", "comm s", "comm %", "bare s", "reduces/step"):
        table.add_column(col, justify="left" if col in ("model", "learner") else "right")
    for r in results:
        table.add_row(r["model"], r["learner"], f"{r['params'] / 1e6:.2f} M", str(r["world"]), f"{r['step_total_s']:.3f}",
                      f"{r['speedup']:.2f}x", f"{r['data_s']:.3f}", f"{r['data_cpu_s']:.4f}", f"{r['data_speedup']:.2f}x",
                      f"{r['data_whole_over_share']:.2f}x",
                      f"{r['images_decoded_per_rank']:.0f}", f"{r['rank_cpu_s']:.3f}", f"{r['comm_s']:.4f}", f"{100 * r['comm_share']:.1f}%",
                      f"{r['bare_all_reduce_s']:.4f}", f"{r['all_reduce_calls_per_step']:.0f}")
    Console(width=200).print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / "bench_distributed.json"
    out.write_text(json.dumps({"quick": args.quick, "steps": steps, "meta_batch": args.meta_batch,
                               "torch": torch.__version__, "platform": platform.platform(), "cpus": os.cpu_count(),
                               "load_avg": os.getloadavg(), "results": results}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
