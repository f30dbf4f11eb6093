"""Is the data path ever the bottleneck? Episodes per second vs. the rate a model step consumes them.

Measures, in one process:

1. **data**: episodes (support 4 + query 4 images: decoded from PNG files, intensity-normalised, augmented,
   letterboxed to 256 px, collated) per second, with a cold cache (decoded-image cache off: every image is
   read and decoded from disk) and a warm cache (every image decoded once beforehand, as from the second
   epoch on).
2. **model**: YOLOX-tiny train steps per second (forward + backward + SGD step) at 256 px on a batch of 8,
   built with mmdet directly (the bare reference: no megatron code in the loop).

An episode feeds at least one such step (MAML/Reptile run more than one per episode), so
``ratio = episodes/s ÷ steps/s`` is how many times faster the data path is than the model consuming it
(aim: >= 10). Tasks: the built-in ``medsynth`` suite when its plugin is installed, otherwise synthetic
512x512 16-bit PNGs with lesion-like blobs (``--source`` chooses). Data and model run on the same
``--threads`` CPU threads (default 1) so the comparison is like for like.

    python benchmarks/bench_data.py [--quick] [--source auto|medsynth|synthetic] [--device cpu|cuda]

Prints a table and writes benchmarks/out/bench_data.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from megatron.data.episodes import EpisodeSampler
from megatron.data.preprocess import Preprocessor
from megatron.types import ImageRecord, Task

OUT = Path(__file__).resolve().parent / "out"
INPUT_SIZE = 256
SUPPORT = QUERY = 4


def synthetic_task(folder: Path, n_images: int, size: int = 512, seed: int = 0) -> Task:
    """16-bit PNGs (12-bit values, like a detector's raw output) with 1-3 bright blobs each, 1 in 8 empty."""
    from megatron.data.io import read_image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    records = []
    for i in range(n_images):
        img = 1200 + 300 * cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 6)
        boxes, labels = [], []
        for _ in range(0 if i % 8 == 0 else int(rng.integers(1, 4))):
            r = float(rng.uniform(8, 40))
            cx, cy = rng.uniform(r, size - r, 2)
            img += 1500 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (r / 2) ** 2))
            boxes.append([cx - r, cy - r, cx + r, cy + r])
            labels.append(int(rng.integers(0, 2)))
        path = folder / f"img{i:04d}.png"
        cv2.imwrite(str(path), np.clip(img, 0, 4095).astype(np.uint16))
        records.append(ImageRecord(i, path, size, size, np.array(boxes).reshape(-1, 4), labels, path.name))
    return Task("synthetic", ["mass", "calcification"], records, modality="synthetic", source=str(folder),
                image_loader=lambda r: read_image(r.path))


def medsynth_tasks(cache_dir: Path) -> list[Task] | None:
    """The built-in suite's tasks (read from its on-disk COCO cache), or None when the plugin is not available."""
    try:
        from megatron import get_plugin_manager

        pm = get_plugin_manager(autoload=False)
        cls = pm.registers["dataset"].get("medsynth")
    except Exception:  # noqa: BLE001 - plugin not written/installed yet: fall back
        return None
    options = {"cache_dir": str(cache_dir)} if "cache_dir" in cls.Options.model_fields else {}
    return cls(cls.Options(**options)).load()


def time_episodes(tasks: list[Task], pre: Preprocessor, n: int, seed: int = 0) -> float:
    sampler = EpisodeSampler(SUPPORT, QUERY, pre, seed=seed)
    start = time.perf_counter()
    for i in range(n):
        ep = sampler.episode(tasks[i % len(tasks)])
        assert ep.support.images.shape == (SUPPORT, 3, INPUT_SIZE, INPUT_SIZE)
    return n / (time.perf_counter() - start)


def time_model_steps(n: int, device: str, batch_size: int = SUPPORT + QUERY) -> tuple[float, dict]:
    import mmdet
    from mmdet.structures import DetDataSample
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.structures import InstanceData
    from mmdet.registry import MODELS

    cfg = Config.fromfile(str(Path(mmdet.__file__).parent / ".mim/configs/yolox/yolox_tiny_8xb8-300e_coco.py"))
    cfg.model.bbox_head.num_classes = 2
    init_default_scope("mmdet")
    model = MODELS.build(cfg.model).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.rand(batch_size, 3, INPUT_SIZE, INPUT_SIZE, generator=gen) * 255).to(device)
    samples = []
    for _ in range(batch_size):
        s = DetDataSample(metainfo=dict(img_shape=(INPUT_SIZE, INPUT_SIZE), pad_shape=(INPUT_SIZE, INPUT_SIZE),
                                        batch_input_shape=(INPUT_SIZE, INPUT_SIZE)))
        xy = torch.rand(3, 2, generator=gen) * (INPUT_SIZE - 60)
        wh = 10 + torch.rand(3, 2, generator=gen) * 50
        s.gt_instances = InstanceData(bboxes=torch.cat([xy, xy + wh], 1).to(device),
                                      labels=torch.randint(0, 2, (3,), generator=gen).to(device))
        samples.append(s)

    def step() -> None:
        losses = model.loss(inputs, samples)
        total = sum(v if v.dim() == 0 else v.sum() for k, v in losses.items() if "loss" in k)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    for _ in range(2):  # warm-up (allocator, cudnn autotune, lazy init)
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    n_params = sum(p.numel() for p in model.parameters())
    return n / (time.perf_counter() - start), {"parameters": n_params}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--source", choices=["auto", "medsynth", "synthetic"], default="auto")
    parser.add_argument("--device", default="cpu", help="device of the model step (the data path is CPU)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for both data path and model")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    console = Console()
    n_episodes = 20 if args.quick else 100
    n_steps = 2 if args.quick else 8

    with tempfile.TemporaryDirectory() as tmp:
        tasks = None
        source = args.source
        if source in ("auto", "medsynth"):
            # generated once into benchmarks/out (ignored by git), so reruns time the data path, not generation
            tasks = medsynth_tasks(OUT / "medsynth_cache")
            if tasks is None and source == "medsynth":
                sys.exit("the medsynth dataset plugin is not available; use --source synthetic")
            source = "medsynth" if tasks is not None else "synthetic"
        if tasks is None:
            tasks = [synthetic_task(Path(tmp), 32 if args.quick else 64)]
        n_images = sum(len(t) for t in tasks)
        cold = Preprocessor(INPUT_SIZE, augment=args.augment, cache_size=0)
        cold_rate = time_episodes(tasks, cold, n_episodes)
        warm = Preprocessor(INPUT_SIZE, augment=args.augment, cache_size=n_images)
        for t in tasks:  # one pass decodes every image into the cache
            for r in t.records:
                warm.decode(t, r)
        warm_rate = time_episodes(tasks, warm, n_episodes)
    step_rate, model_info = time_model_steps(n_steps, args.device)

    result = {
        "source": source, "tasks": [t.name for t in tasks], "images": n_images, "input_size": INPUT_SIZE,
        "episode": {"support": SUPPORT, "query": QUERY}, "augment": args.augment, "threads": args.threads,
        "device_model": args.device, "episodes_timed": n_episodes, "model_steps_timed": n_steps,
        "episodes_per_s_cold": cold_rate, "episodes_per_s_warm": warm_rate,
        "model_steps_per_s": step_rate, "model": "yolox_tiny (mmdet), batch 8, forward+backward+SGD",
        "model_parameters": model_info["parameters"],
        "ratio_cold": cold_rate / step_rate, "ratio_warm": warm_rate / step_rate,
        "torch": torch.__version__, "opencv": cv2.__version__, "python": platform.python_version(),
        "machine": platform.machine(),
        # other processes on the machine slow both sides; the ratio is what to compare between runs
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    table = Table(title=f"data path vs YOLOX-tiny step ({source}, {INPUT_SIZE} px, {args.threads} thread(s))")
    table.add_column("what")
    table.add_column("per second", justify="right")
    table.add_column("x model step", justify="right")
    table.add_row("episodes, cold cache (decode every image)", f"{cold_rate:.1f}", f"{cold_rate / step_rate:.1f}")
    table.add_row("episodes, warm cache", f"{warm_rate:.1f}", f"{warm_rate / step_rate:.1f}")
    table.add_row(f"YOLOX-tiny train steps, batch 8 ({args.device})", f"{step_rate:.2f}", "1.0")
    console.print(table)
    verdict = "OK" if min(result["ratio_cold"], result["ratio_warm"]) >= 10 else "BELOW the 10x aim"
    console.print(f"data path / model step: cold {result['ratio_cold']:.1f}x, warm {result['ratio_warm']:.1f}x ({verdict})")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_data.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
