"""What does the runner cost over the learner's own work?

The runner's source training (the outer steps of a meta-epoch: episode sampling and decoding, ``meta_step``,
the step's bookkeeping, lifecycle events, the episode-draw record) against a **bare** loop doing the same work
by hand: S times ``sampler.meta_batch`` + ``learner.meta_step`` with the same learner, detector, data and
seed. Both are timed in process CPU seconds (meaningful on a shared machine where wall time is not), the
runner's from its own ``megatron_stage_start`` events (``meta_epoch`` → ``adapt``), and repeated in
alternation so a noisy neighbour hits both; the reported ratio is the median of runner/bare over the pairs
(aim <= 1.10). Fine-tuning and evaluation are the learner's and the evaluator's own code in both cases and are
reported separately, as is a projection of the default main job from the measured per-step cost.

    python benchmarks/bench_runner.py [--quick] [--steps S] [--repeats R] [--threads N]

Prints a table and writes benchmarks/out/bench_runner.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from megatron import hookimpl

OUT = Path(__file__).resolve().parent / "out"


class StageClock:
    """CPU time of the runner's source training, from the lifecycle events a plugin receives."""

    def __init__(self):
        self.started = None
        self.source_cpu = []

    @hookimpl
    def megatron_stage_start(self, stage, info):
        if stage == "meta_epoch":
            self.started = time.process_time()
        elif stage == "adapt" and self.started is not None:
            self.source_cpu.append(time.process_time() - self.started)
            self.started = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 outer steps, 2 repeats (default 12 steps, 3 repeats)")
    ap.add_argument("--steps", type=int, default=None, help="outer steps per measurement (at least 8)")
    ap.add_argument("--repeats", type=int, default=None, help="runner/bare pairs")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args()
    steps = max(8, args.steps or (8 if args.quick else 12))
    repeats = args.repeats or (2 if args.quick else 3)
    torch.set_num_threads(args.threads)

    import megatron
    from megatron.config import load_config
    from megatron.data.episodes import EpisodeSampler
    from megatron.data.preprocess import Preprocessor
    from megatron.experiment import build_detector, build_taskset, load_tasks
    from megatron.api.learner import LearnerContext
    from megatron.runtime.environment import seed_everything, training_seed
    from megatron.training.meta_train import head_classes_for, steps_per_source_epoch
    from megatron.training.runner import run_experiment

    overrides = {"training.meta_epochs": 1, "training.steps_per_epoch": steps, "training.finetune_epochs": 1,
                 "training.pretrain_epochs": 0, "data.validation_images": 0, "output.compare_baseline": False,
                 "output.plots": False, "output.save_models": False, "training.num_threads": args.threads,
                 "training.device": "cpu"}
    default_cfg = load_config()
    cfg = load_config(None, overrides)
    pm = megatron.get_plugin_manager(autoload=False)
    taskset = build_taskset(cfg, load_tasks(cfg, pm))  # generates/caches the suite outside the timings
    sources = taskset.sources
    t = cfg.training

    def bare() -> float:
        """The same source training by hand: same seeds, detector, learner and sampler as the runner's."""
        seed_everything(training_seed(cfg, "init"))
        det = build_detector(cfg, pm, head_classes_for(cfg, sources))
        ctx = LearnerContext(inner_steps=t.inner_steps, inner_lr=t.inner_lr, outer_lr=t.outer_lr,
                             outer_optimizer=t.outer_optimizer, grad_clip=t.grad_clip)
        learner_cls = pm.registers["learner"].get(cfg.learner.name)
        learner = learner_cls(det, learner_cls.Options(), ctx)
        seed_everything(training_seed(cfg, "train"))
        pre = Preprocessor(cfg.data.input_size, clahe=cfg.data.clahe, augment=cfg.data.augment)
        sampler = EpisodeSampler(cfg.episodes.support_size, cfg.episodes.query_size, pre,
                                 seed=training_seed(cfg, "episodes"))
        started = time.process_time()
        for step in range(steps):
            learner.set_progress(step / steps)
            learner.meta_step(sampler.meta_batch(sources, t.meta_batch))
        return time.process_time() - started

    def runner() -> float:
        clock = StageClock()
        pm.register(clock, name="bench-clock")
        try:
            with tempfile.TemporaryDirectory() as tmp:
                run_experiment(cfg, run_dir=Path(tmp) / "run", pm=pm, progress=False)
        finally:
            pm.unregister(name="bench-clock")
        return clock.source_cpu[0]

    bare()  # warm-up: first-call initialisation (mmdet, caches) is not per-step cost
    pairs = []
    for _ in range(repeats):
        b = bare()
        r = runner()
        pairs.append((r, b))
    ratios = [r / b for r, b in pairs]
    per_step = statistics.median(b for _, b in pairs) / steps
    per_epoch_steps = steps_per_source_epoch(default_cfg, sources) * default_cfg.training.source_epochs
    result = {
        "detector": cfg.detector.name, "learner": cfg.learner.name, "input_size": cfg.data.input_size,
        "threads": args.threads, "outer_steps": steps, "repeats": repeats,
        "pairs_cpu_s": [{"runner": round(r, 3), "bare": round(b, 3)} for r, b in pairs],
        "ratio_median": round(statistics.median(ratios), 3), "ratios": [round(x, 3) for x in ratios],
        "cpu_s_per_outer_step": round(per_step, 3), "default_steps_per_meta_epoch": per_epoch_steps,
        "note": "CPU seconds of source training only (outer steps with episode sampling); runner timed from its "
                "meta_epoch -> adapt stage events, bare loop = sampler.meta_batch + learner.meta_step by hand",
    }
    table = Table(title=f"runner vs bare loop: {cfg.learner.name} on {cfg.detector.name} {cfg.data.input_size}px, "
                        f"{steps} outer steps x {repeats}, {args.threads} thread(s), CPU s")
    table.add_column("pair")
    table.add_column("runner", justify="right")
    table.add_column("bare", justify="right")
    table.add_column("ratio", justify="right")
    for i, (r, b) in enumerate(pairs):
        table.add_row(str(i + 1), f"{r:.2f}", f"{b:.2f}", f"{r / b:.3f}")
    table.add_row("median", "", "", f"{result['ratio_median']:.3f}", style="bold")
    Console().print(table)
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_runner.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
