"""CPU cost of one training step of every verified mmdet family at 128 px (the table of
``registry_docs/plugins/detectors/mmdet.md``).

For each family (its CPU-sized config, ``megatron_plugins.detectors.mmdet.SMALL_CONFIGS``) a fresh process builds
the detector for 3 classes, runs ``--warmup`` plain training steps (loss, backward, SGD) on a batch of ``--batch``
random 128 px images with boxes, then times ``--steps`` more and reports the median step time, the number of
parameters and the process's peak resident memory (``ru_maxrss``, so one process per family). Single thread
(``torch.set_num_threads(1)``) unless ``--threads``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_detectors.py            # every verified family
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_detectors.py --family rtmdet --steps 5
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch

from megatron.types import Batch
from megatron_plugins.detectors.mmdet import SMALL_CONFIGS, MMDet

SIZE = 128


def random_batch(n_images: int, size: int = SIZE, seed: int = 0) -> Batch:
    """Random images with two boxes each (classes 0..2)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n_images, 3, size, size, generator=g) * 255
    boxes = [torch.tensor([[8.0, 10.0, 60.0, 70.0], [64.0, 40.0, 120.0, 110.0]]) * size / 128 for _ in range(n_images)]
    labels = [torch.tensor([i % 3, (i + 1) % 3]) for i in range(n_images)]
    meta = [dict(image_id=i, orig_size=(size, size), scale=1.0, pad=(0, 0)) for i in range(n_images)]
    return Batch(images=images, boxes=boxes, labels=labels, meta=meta)


def measure(family: str, steps: int, warmup: int, batch_size: int) -> dict:
    """One family in this process: build, warm up, time ``steps`` training steps."""
    config, cfg_options = SMALL_CONFIGS[family]
    torch.manual_seed(0)
    det = MMDet(3, SIZE, MMDet.Options(config=config, cfg_options=cfg_options)).train()
    optimiser = torch.optim.SGD(det.parameters(), lr=1e-4)
    batch = random_batch(batch_size)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        optimiser.zero_grad()
        det.loss(batch)["loss"].backward()
        optimiser.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return {"family": family, "config": config, "cfg_options": cfg_options,
            "parameters_M": round(sum(p.numel() for p in det.parameters()) / 1e6, 2),
            "step_s": round(statistics.median(times), 3), "peak_rss_MiB": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
            "batch": batch_size, "size": SIZE, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", action="append", choices=sorted(SMALL_CONFIGS), help="default: every family")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # the per-family worker
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    families = args.family or list(SMALL_CONFIGS)
    if args.in_process:
        warnings.filterwarnings("ignore")
        print(json.dumps(measure(families[0], args.steps, args.warmup, args.batch)))
        return
    print("| family | parameters (M) | step s (median) | peak RSS MiB |")
    print("| --- | ---: | ---: | ---: |")
    for family in families:
        cmd = [sys.executable, __file__, "--in-process", "--family", family, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch", str(args.batch), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        row = json.loads(out)
        print(f"| {family} | {row['parameters_M']} | {row['step_s']} | {row['peak_rss_MiB']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
