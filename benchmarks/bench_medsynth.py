"""How long does the built-in ``medsynth`` suite take to generate, and to load once cached?

Measures, in one process on ``--threads`` CPU threads (default 1):

- **render**: milliseconds per image for each task's generator (pixels + boxes, in memory);
- **png**: milliseconds to encode one 256-px 8-bit PNG — the bare reference every generated image pays
  anyway, so ``render / png`` says how much the scene generators cost over just writing the images;
- **suite**: wall and CPU seconds for the whole default suite (6 x 120 source + 100 target images,
  256 px: render + write the COCO folders + read them back), and for loading it again from the cache.

    python benchmarks/bench_medsynth.py [--quick]

Prints a table and writes benchmarks/out/bench_medsynth.json. Aim: the default suite in < 30 s on one core.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from megatron_plugins.datasets.medsynth import MedSynthDataset
from megatron_plugins.datasets.medsynth_scenes import GENERATOR_VERSION, TASK_SPECS, render


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer images (a smoke run)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for OpenCV/torch (default 1)")
    args = ap.parse_args()
    cv2.setNumThreads(args.threads)
    torch.set_num_threads(args.threads)
    per_task = 6 if args.quick else 30
    size = 256

    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(8)]
    rows = []
    for name in TASK_SPECS:
        t = time.perf_counter()
        images = [render(name, 0, i, size)[0] for i in range(per_task)]
        render_ms = (time.perf_counter() - t) / per_task * 1e3
        t = time.perf_counter()
        for img in images:
            cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        png_ms = (time.perf_counter() - t) / per_task * 1e3
        rows.append({"task": name, "render_ms": round(render_ms, 2), "png_ms": round(png_ms, 2),
                     "ratio": round(render_ms / png_ms, 1)})
    t = time.perf_counter()
    for img in noise:
        cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    noise_png_ms = (time.perf_counter() - t) / len(noise) * 1e3

    opts = dict(images_per_task=20, target_images=20) if args.quick else {}
    with tempfile.TemporaryDirectory() as cache:
        plugin = MedSynthDataset(MedSynthDataset.Options(cache_dir=Path(cache), **opts))
        t, c = time.perf_counter(), time.process_time()
        tasks = plugin.load()
        gen_wall, gen_cpu = time.perf_counter() - t, time.process_time() - c
        t = time.perf_counter()
        plugin.load()
        cached_s = time.perf_counter() - t
    n_images = sum(len(x) for x in tasks)

    table = Table(title=f"medsynth generation ({args.threads} thread(s), {size} px)")
    for col in ("task", "render ms/img", "png ms/img (reference)", "render / png"):
        table.add_column(col, justify="right" if col != "task" else "left")
    for r in rows:
        table.add_row(r["task"], f"{r['render_ms']:.1f}", f"{r['png_ms']:.1f}", f"{r['ratio']:.1f}")
    console = Console()
    console.print(table)
    console.print(f"suite: {n_images} images generated + written + read in {gen_wall:.1f} s wall "
                  f"({gen_cpu:.1f} s CPU); cached load {cached_s:.2f} s; noise-PNG reference {noise_png_ms:.1f} ms/img")
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    (out / "bench_medsynth.json").write_text(json.dumps({
        "quick": args.quick, "threads": args.threads, "image_size": size, "generator_version": GENERATOR_VERSION,
        "per_task": rows, "noise_png_ms": round(noise_png_ms, 2), "suite_images": n_images,
        "suite_generate_wall_s": round(gen_wall, 2), "suite_generate_cpu_s": round(gen_cpu, 2),
        "suite_cached_load_s": round(cached_s, 3), "machine": platform.platform(), "cpu": platform.processor(),
    }, indent=2))


if __name__ == "__main__":
    main()
