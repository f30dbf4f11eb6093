"""What does the runner cost over the learner's own work, and how long does the default main job take?

One short ``run_experiment`` (reptile, no baseline, S outer steps, F fine-tuning epochs, one evaluation) with
the configured detector (default YOLOX-tiny at 256 px on the built-in suite), against a **bare** loop doing
the same work by hand: S ``learner.meta_step`` calls on pre-drawn episodes, one ``adapt`` on the same pool
batches and ``predict`` + ``evaluate`` on the held-out split. Both are timed in process CPU seconds, which stay
meaningful on a shared machine where wall time does not. Reported: the ratio runner/bare (framework overhead
of sampling, checkpoints, record, hooks; aim <= 1.10), and from the measured per-step cost a projection of the
default ``megatron run --learner reptile --detector yolox`` (reptile, then finetune at equal compute).

    python benchmarks/bench_runner.py [--quick] [--threads N]

Prints a table and writes benchmarks/out/bench_runner.json.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

OUT = Path(__file__).resolve().parent / "out"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 outer steps instead of 6")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import megatron
    from megatron.config import load_config
    from megatron.data.episodes import EpisodeSampler, iterate_batches, split_target
    from megatron.data.preprocess import Preprocessor
    from megatron.evaluation.coco import evaluate
    from megatron.experiment import build_taskset, load_tasks, validate_experiment_plugins
    from megatron.learner import LearnerContext
    from megatron.training.runner import run_experiment, steps_per_source_epoch

    steps = 2 if args.quick else 6
    overrides = {"training.meta_epochs": 1, "training.steps_per_epoch": steps, "training.finetune_epochs": 1,
                 "output.compare_baseline": False, "output.plots": False, "training.num_threads": args.threads,
                 "training.device": "cpu"}
    default_cfg = load_config()
    cfg = load_config(None, overrides)
    pm = megatron.get_plugin_manager(autoload=False)
    opts = validate_experiment_plugins(cfg, pm)
    taskset = build_taskset(cfg, load_tasks(cfg, pm))  # generates/caches the suite outside the timings

    # bare: the same work without the runner
    pre = Preprocessor(cfg.data.input_size, augment=cfg.data.augment)
    det_cls, learner_cls = pm.registers["detector"].get(cfg.detector.name), pm.registers["learner"].get("reptile")
    torch.manual_seed(0)
    n_cls = max(len(t.categories) for t in taskset.sources)
    learner = learner_cls(det_cls(n_cls, cfg.data.input_size, opts.detector), learner_cls.Options(), LearnerContext())
    sampler = EpisodeSampler(cfg.episodes.support_size, cfg.episodes.query_size, pre, seed=0)
    pool, held_out = split_target(taskset.target, cfg.data.shots, cfg.data.eval_images, cfg.seed)
    episodes = [sampler.meta_batch(taskset.sources, cfg.training.meta_batch) for _ in range(steps + 1)]
    learner.meta_step(episodes.pop())  # warm-up: first-call initialisation is not per-step cost
    pool_batches = list(iterate_batches(pool, cfg.training.batch_size, pre, None))
    eval_batches = list(iterate_batches(held_out, cfg.training.batch_size, pre.without_augment()))
    t0 = time.process_time()
    for eps in episodes:
        learner.meta_step(eps)
    t_steps = time.process_time() - t0
    t1 = time.process_time()
    adapted = learner.adapt(pool_batches)
    t_adapt = time.process_time() - t1
    t2 = time.process_time()
    adapted.eval()
    with torch.no_grad():
        dets = [d for b in eval_batches for d in adapted.predict(b)]
    evaluate(dets, held_out.records, held_out.categories)
    t_eval = time.process_time() - t2
    bare = t_steps + t_adapt + t_eval

    with tempfile.TemporaryDirectory() as tmp:
        t3 = time.process_time()
        run_experiment(cfg, run_dir=Path(tmp) / "run", pm=pm, progress=False, learners=["reptile"])
        runner = time.process_time() - t3

    per_step = t_steps / steps
    per_epoch_steps = steps_per_source_epoch(default_cfg, taskset.sources) * default_cfg.training.source_epochs
    per_meta_epoch = per_step * per_epoch_steps + t_adapt * default_cfg.training.finetune_epochs + t_eval
    projected = 2 * default_cfg.training.meta_epochs * per_meta_epoch  # reptile + finetune at equal compute
    result = {
        "detector": cfg.detector.name, "threads": args.threads, "outer_steps": steps,
        "bare_cpu_s": round(bare, 2), "runner_cpu_s": round(runner, 2), "ratio": round(runner / bare, 3),
        "cpu_s_per_outer_step": round(per_step, 3), "cpu_s_finetune_epoch": round(t_adapt, 3),
        "cpu_s_evaluation": round(t_eval, 3), "default_steps_per_meta_epoch": per_epoch_steps,
        "projected_default_main_job_cpu_s": round(projected, 1),
        "note": "runner time includes building the detector, sampling/decoding episodes, checkpoint and record; "
                "bare time excludes episode sampling (pre-drawn). Projection: 2 learners x meta_epochs x "
                "(steps x per-step + F x fine-tuning epoch + evaluation), CPU seconds on the given threads.",
    }
    table = Table(title=f"runner vs bare loop ({cfg.detector.name}, {steps} outer steps, {args.threads} thread(s), CPU s)")
    for k in ("bare_cpu_s", "runner_cpu_s", "ratio", "cpu_s_per_outer_step", "cpu_s_finetune_epoch",
              "cpu_s_evaluation", "projected_default_main_job_cpu_s"):
        table.add_row(k, str(result[k]))
    Console().print(table)
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_runner.json").write_text(json.dumps(result, indent=2) + "\n")
    if not math.isfinite(result["ratio"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
