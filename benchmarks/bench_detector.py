"""What does the Detector interface cost over calling the mmdet model directly?

For each detector, one training step (forward + loss + backward + SGD step) on the same batch, three ways:

- **bare**: the mmdet model's own ``loss(inputs, data_samples)`` on inputs normalised and data samples built
  once beforehand, losses summed with mmengine's ``parse_losses`` — no megatron code in the loop;
- **interface**: ``detector.loss(batch)`` (builds the data samples, normalises, sums the loss dict);
- **functional**: ``detector.loss(batch, params=...)`` through ``torch.func.functional_call`` with cloned buffers
  (the path MAML's inner loop takes).

Reported: median seconds per step over interleaved repeats, the overhead ratio against bare (aim <= 1.05), and
peak memory per step (CUDA: ``torch.cuda.max_memory_allocated``; CPU: peak resident-set growth during the step,
sampled every millisecond). Defaults: YOLOX-tiny at 256 px with batch 8, Faster R-CNN R50-FPN at 256 px with
batch 2 (``--quick``: fewer steps, Faster R-CNN on ResNet-18).

    python benchmarks/bench_detector.py [--quick] [--device cpu|cuda] [--threads N] [--detectors yolox,faster-rcnn]

Prints a table and writes benchmarks/out/bench_detector.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from megatron.types import Batch
from peak_memory import PeakMemory  # same folder

OUT = Path(__file__).resolve().parent / "out"
INPUT_SIZE = 256


def make_batch(n: int, size: int, num_classes: int, device: torch.device, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g) * 50
    boxes, labels = [], []
    for i in range(n):
        k = 1 + i % 3
        xy = torch.rand(k, 2, generator=g) * (size * 0.6)
        wh = 16 + torch.rand(k, 2, generator=g) * (size * 0.3)
        b = torch.cat([xy, xy + wh], 1).clamp(max=size - 1)
        for x1, y1, x2, y2 in b.long().tolist():
            images[i, :, y1:y2, x1:x2] += 150
        boxes.append(b)
        labels.append(torch.randint(0, num_classes, (k,), generator=g))
    meta = [dict(image_id=i, orig_size=(size, size), scale=1.0, pad=(0, 0)) for i in range(n)]
    return Batch(images=images, boxes=boxes, labels=labels, meta=meta).to(device)


def bench_model(name: str, det, batch: Batch, steps: int, repeats: int, device: torch.device) -> dict:
    det.to(device).train()
    model = det.model
    inputs = det.normalise(batch.images)
    samples = det.data_samples(batch)
    opt = torch.optim.SGD(det.parameters(), lr=1e-4)

    def bare() -> None:
        loss, _ = model.parse_losses(model.loss(inputs, samples))
        loss.backward()

    def interface() -> None:
        det.loss(batch)["loss"].backward()

    def functional() -> None:
        det.loss(batch, params=dict(det.named_parameters()))["loss"].backward()

    modes = {"bare": bare, "interface": interface, "functional": functional}

    def step(fn) -> float:
        torch.manual_seed(0)  # the same proposals/samples for every mode (two-stage samplers are random)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        fn()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    for fn in modes.values():  # warm-up (allocator, lazy imports, cudnn autotune)
        step(fn)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(repeats):  # interleaved, so machine-load drift hits every mode alike
        for m, fn in modes.items():
            times[m].extend(step(fn) for _ in range(steps))
    memory: dict[str, float] = {}
    for m, fn in modes.items():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            step(fn)
            memory[m] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        else:
            opt.zero_grad(set_to_none=True)
            with PeakMemory(interval_s=0.001, trim=True) as rss:
                step(fn)
            memory[m] = rss.peak / 2**20
    med = {m: statistics.median(v) for m, v in times.items()}
    return {
        "detector": name, "batch": len(batch), "input_size": int(batch.images.shape[-1]),
        "seconds_per_step": med,
        "overhead_interface": med["interface"] / med["bare"],
        "overhead_functional": med["functional"] / med["bare"],
        "peak_memory_mib": memory,
        "steps_timed": steps * repeats,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps; Faster R-CNN on ResNet-18")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--detectors", default="yolox,faster-rcnn", help="comma-separated subset to run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from megatron_plugins.detectors.faster_rcnn import FasterRCNN
    from megatron_plugins.detectors.yolox import YOLOX

    steps, repeats = (2, 3) if args.quick else (3, 5)
    torch.manual_seed(0)
    wanted = {d.strip() for d in args.detectors.split(",")}
    configs = []
    if "yolox" in wanted:
        configs.append(("yolox tiny", lambda: YOLOX(3, INPUT_SIZE), 8))
    if "faster-rcnn" in wanted:
        depth = 18 if args.quick else 50
        configs.append((f"faster-rcnn r{depth}", lambda: FasterRCNN(3, INPUT_SIZE, FasterRCNN.Options(depth=depth)), 2))
    results = []
    for name, build, bs in configs:
        det = build()
        batch = make_batch(bs, INPUT_SIZE, 3, device)
        results.append(bench_model(name, det, batch, steps, repeats, device))

    table = Table(title=f"detector training step: interface vs bare mmdet ({device}, {args.threads} thread(s))")
    for col in ("detector", "batch", "bare s/step", "interface", "functional", "overhead if/fn",
                "peak MiB bare/if/fn"):
        table.add_column(col, justify="right")
    for r in results:
        s, mem = r["seconds_per_step"], r["peak_memory_mib"]
        table.add_row(r["detector"], str(r["batch"]), f"{s['bare']:.3f}", f"{s['interface']:.3f}",
                      f"{s['functional']:.3f}", f"{r['overhead_interface']:.3f} / {r['overhead_functional']:.3f}",
                      f"{mem['bare']:.0f} / {mem['interface']:.0f} / {mem['functional']:.0f}")
    Console(width=140).print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    record = {"device": str(device), "threads": args.threads, "quick": args.quick, "torch": torch.__version__,
              "platform": platform.platform(), "results": results}
    (OUT / "bench_detector.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
