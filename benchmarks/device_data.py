"""The data part of the device check (``device_check.py data``): does the loader keep the device busy?

Measured on the device machine itself, with its own cores:

- **model**: train steps per second (forward + backward + Adam step, batch 8) of YOLOX-tiny and YOLOX-s, and
  Reptile meta-steps per second (YOLOX-tiny, meta-batch 2, support 4 + query 4) — the rates the loader must feed;
- **loader**: images per second of augmented episodes from 512-px 16-bit DICOM files (``bench_data.py``'s),
  with the decoding in the training process and with ``data.workers: null``'s workers for this machine
  (:func:`megatron.data.loader.auto_workers`), cold (every image decoded) and warm (cached);
- **waiting share**: Reptile meta-training and a fine-tuning loop (YOLOX-tiny, batch 8) fed by the loader as the
  runner feeds them (``EpisodeSampler.meta_batches``, ``TargetPoolBatches``), the cache cold at the start: the
  share of the loop's wall time spent waiting for the next meta-batch or batch, with 0 workers and with the
  automatic workers. Goal: under :data:`WAIT_GOAL` with the automatic workers.

``--cpu-only`` runs the same code at 64 px on a few images (YOLOX-tiny only): a test of the script, not numbers.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

import bench_data
from bench_detector import make_batch
from megatron.api.learner import LearnerContext
from megatron.data.episodes import EpisodeSampler
from megatron.data.loader import Loader, auto_workers, usable_cores
from megatron.data.preprocess import Preprocessor
from megatron.training.meta_train import TargetPoolBatches
from megatron.types import Episode

#: the share of a training loop's wall time spent waiting for data that the loader should stay under
WAIT_GOAL = 0.05
BATCH = 8
#: epochs of the fine-tuning loop (the runner's TargetPoolBatches), from a cold cache
FINETUNE_EPOCHS = 3
NUM_CLASSES = 2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def yolox(family: str, size: int, device: torch.device):
    from megatron_plugins.detectors.yolox import YOLOX  # the built-in plugin (benchmarks import it directly)

    torch.manual_seed(0)
    return YOLOX(NUM_CLASSES, size, YOLOX.Options(size=family)).to(device).train()


def reptile(det, device: torch.device):
    from megatron_plugins.learners.reptile import Reptile

    learner = Reptile(det, Reptile.Options(), LearnerContext(device=device, inner_steps=1, inner_lr=0.01))
    learner.set_progress(0.0)
    return learner


def train_step_rate(family: str, size: int, steps: int, device: torch.device) -> float:
    """Train steps per second of YOLOX-``family`` on one synthetic batch of 8 (after 2 warm-up steps)."""
    det = yolox(family, size, device)
    batch = make_batch(BATCH, size, NUM_CLASSES, device)
    opt = torch.optim.Adam(det.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        det.loss(batch)["loss"].backward()
        opt.step()

    for _ in range(2):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps / (time.perf_counter() - start)


def meta_step_rate(size: int, steps: int, device: torch.device) -> float:
    learner = reptile(yolox("tiny", size, device), device)
    episodes = [Episode(f"t{i}", make_batch(4, size, NUM_CLASSES, device, seed=2 * i),
                        make_batch(4, size, NUM_CLASSES, device, seed=2 * i + 1), ["a", "b"]) for i in range(2)]
    learner.meta_step(episodes)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        learner.meta_step(episodes)
    sync(device)
    return steps / (time.perf_counter() - start)


def waiting_share(stream, consume) -> dict:
    """Run ``consume(item)`` on every item of ``stream``; the share of wall time spent in ``next(stream)``."""
    waited = 0.0
    start = time.perf_counter()
    items = iter(stream)
    while True:
        t = time.perf_counter()
        try:
            item = next(items)
        except StopIteration:
            break
        waited += time.perf_counter() - t
        consume(item)
    total = time.perf_counter() - start
    return {"wait_share": waited / total, "seconds": total}


def loop_shares(task, size: int, loader: Loader, meta_steps: int, device: torch.device) -> dict:
    """Meta-training and fine-tuning loops fed by ``loader`` from a cold cache: their waiting shares."""
    pre = Preprocessor(size, augment=True)
    learner = reptile(yolox("tiny", size, device), device)
    sampler = EpisodeSampler(4, 4, pre, seed=0)
    meta = waiting_share(sampler.meta_batches([task], 2, meta_steps, loader=loader),
                         lambda drawn: learner.meta_step(drawn.episodes))
    det = learner.detector
    opt = torch.optim.Adam(det.parameters(), lr=1e-4)

    def train(batch) -> None:
        opt.zero_grad(set_to_none=True)
        loss = det.loss(batch.to(device))["loss"]
        loss.backward()
        opt.step()
        float(loss.detach())  # the runner reads every step's loss, which waits for the device: so does this loop

    pre_ft = Preprocessor(size, augment=True)  # cold again: fine-tuning on images not seen yet
    finetune = waiting_share(TargetPoolBatches(task, FINETUNE_EPOCHS, BATCH, pre_ft, seed=0, loader=loader), train)
    return {"meta_train": meta, "finetune": finetune}


def part_data(device: torch.device, cpu_only: bool) -> dict:
    """Every measurement of the module docstring; ``failures`` holds errors (a missed goal is not one)."""
    size = 64 if cpu_only else 256
    families = ["tiny"] if cpu_only else ["tiny", "s"]
    steps = 2 if cpu_only else 20
    n_images, meta_steps = (8, 2) if cpu_only else (64, 24)
    workers = auto_workers(device) if not cpu_only else min(2, max(1, usable_cores() - 1))
    rule = "a test worker (--cpu-only)" if cpu_only else "data.workers: null on this machine"
    rec: dict = {"cores": usable_cores(), "workers": workers, "workers_rule": rule, "input_size": size, "goal_wait_share": WAIT_GOAL,
                 "skipped": ["YOLOX-s (CPU: tiny only)"] if cpu_only else [], "failures": []}
    rec["train_steps_per_s"] = {f"yolox-{f}": train_step_rate(f, size, steps, device) for f in families}
    rec["meta_steps_per_s"] = meta_step_rate(size, steps, device)
    with tempfile.TemporaryDirectory() as tmp:
        task = bench_data.dicom_task(Path(tmp), n_images)
        rec["loader_images_per_s"] = {
            f"{state}, {f'{w} workers' if w else 'in-process'}": bench_data.loader_rate([task], Loader(w),
                                                                                state == "warm", meta_steps, True)
            for w in sorted({0, workers}) for state in ("cold", "warm")}
        rec["loops"] = {f"{w} workers": loop_shares(task, size, Loader(w), meta_steps, device)
                        for w in sorted({0, workers})}
    auto = rec["loops"][f"{workers} workers"]
    rec["goal_met"] = all(auto[k]["wait_share"] < WAIT_GOAL for k in ("meta_train", "finetune"))
    rec["ok"] = True
    return rec


def summary_lines(rec: dict) -> list[str]:
    """The data part's lines of summary.md."""
    lines = ["", f"data path ({rec['cores']} cores, {rec['workers']} workers: {rec['workers_rule']}, "
             f"{rec['input_size']} px): goal, under {rec['goal_wait_share']:.0%} of a loop's time waiting for data: "
             f"**{'met' if rec['goal_met'] else 'NOT met'}**", "",
             "| what | rate |", "|---|---|"]
    for name, rate in rec["train_steps_per_s"].items():
        lines.append(f"| {name} train steps/s (batch {BATCH}) | {rate:.2f} ({rate * BATCH:.0f} images/s) |")
    lines.append(f"| reptile meta-steps/s (YOLOX-tiny, 2 x (4 + 4) images) | {rec['meta_steps_per_s']:.2f} |")
    for name, rate in rec["loader_images_per_s"].items():
        lines.append(f"| loader images/s, 512-px DICOM, {name} | {rate:.1f} |")
    lines += ["", "| workers | meta-training: waiting share | fine-tuning: waiting share |", "|---|---|---|"]
    for name, loops in rec["loops"].items():
        lines.append(f"| {name} | {loops['meta_train']['wait_share']:.1%} | {loops['finetune']['wait_share']:.1%} |")
    return lines
