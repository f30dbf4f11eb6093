"""Speed of dataset similarity: full pairwise matrix of the built-in suite (7 datasets) per metric.

For each metric it reports where the time goes: image decoding (PNG reads, timed inside the tasks' image
loaders), the rest of summarising (grayscale + histogram, CNN forward, box statistics) and the distance
computations (21 pairs). The bare reference, measured in the same run, is decoding the same sampled images
with nothing else: ``total / bare decode`` says how much each metric costs beyond reading its images.

    python benchmarks/bench_similarity.py            # 50 images/dataset, as the method
    python benchmarks/bench_similarity.py --quick    # 10 images/dataset, small suite

Prints a table and writes benchmarks/out/bench_similarity.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from megatron.api.similarity import SimilarityContext, sample_indices
from megatron.similarity import pairwise_distances
from megatron_plugins.datasets.medsynth import MedSynthDataset
from megatron_plugins.similarity.embedding import EmbeddingSimilarity
from megatron_plugins.similarity.label_aware import LabelAwareSimilarity
from megatron_plugins.similarity.wasserstein import WassersteinSimilarity

OUT = Path(__file__).parent / "out"


def timed_tasks(tasks):
    """Copies of ``tasks`` whose loaders add their wall time to a shared counter."""
    counter = {"decode_s": 0.0, "images": 0}

    def wrap(loader):
        def load(record):
            t0 = time.perf_counter()
            image = loader(record)
            counter["decode_s"] += time.perf_counter() - t0
            counter["images"] += 1
            return image
        return load

    return [replace(t, image_loader=wrap(t.image_loader)) for t in tasks], counter


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 images per dataset, 24 per task, 128 px")
    ap.add_argument("--cache-dir", default=None, help="medsynth cache (default: the plugin's)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sample = 10 if args.quick else 50
    ds_opts = dict(images_per_task=24, target_images=24, image_size=128) if args.quick else {}
    if args.cache_dir:
        ds_opts["cache_dir"] = args.cache_dir
    t0 = time.perf_counter()
    tasks = MedSynthDataset(MedSynthDataset.Options(**ds_opts)).load()
    load_s = time.perf_counter() - t0
    ctx = SimilarityContext(seed=0, input_size=128 if args.quick else 256)

    # bare reference: decode exactly the images the metrics sample (best of 2: file-cache warm, like the metrics)
    bare = []
    for _ in range(2):
        t0 = time.perf_counter()
        n_ref = 0
        for t in tasks:
            for i in sample_indices(t, sample, ctx.seed):
                t.load_image(t.records[i])
                n_ref += 1
        bare.append(time.perf_counter() - t0)
    bare_decode_s = min(bare)

    metrics = {
        "wasserstein": WassersteinSimilarity(WassersteinSimilarity.Options(sample_size=sample), ctx),
        "label_aware": LabelAwareSimilarity(LabelAwareSimilarity.Options(sample_size=sample), ctx),
        "embedding (ot)": EmbeddingSimilarity(EmbeddingSimilarity.Options(sample_size=sample, extractor="resnet18"), ctx),
    }
    metrics["embedding (ot)"].describe()  # build the CNN outside the timed region (a one-off)
    rows = []
    for name, metric in metrics.items():
        wrapped, counter = timed_tasks(tasks)
        t0 = time.perf_counter()
        _, matrix, timings = pairwise_distances(metric, wrapped)
        total = time.perf_counter() - t0
        decode = counter["decode_s"]
        rows.append({
            "metric": name, "datasets": len(tasks), "pairs": timings["n_pairs"], "images": counter["images"],
            "total_s": total, "decode_s": decode, "summarize_other_s": timings["summarize_s"] - decode,
            "distance_s": timings["distance_s"], "decode_share": decode / total,
            "summarize_share": timings["summarize_s"] / total, "distance_share": timings["distance_s"] / total,
            "total_over_bare_decode": total / bare_decode_s,
        })
    print(f"built-in suite: {len(tasks)} datasets, {sample} images each (dataset load/generation {load_s:.1f}s); "
          f"bare decode of the {n_ref} sampled images: {bare_decode_s:.3f}s; torch threads {args.threads}")
    head = f"{'metric':16s} {'total s':>8s} {'decode':>8s} {'summ.rest':>9s} {'distance':>9s} {'dist %':>7s} {'x bare':>7s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['metric']:16s} {r['total_s']:8.3f} {r['decode_s']:8.3f} {r['summarize_other_s']:9.3f} "
              f"{r['distance_s']:9.4f} {100 * r['distance_share']:6.1f}% {r['total_over_bare_decode']:7.2f}")
    hist = rows[0]
    ok = hist["distance_s"] < hist["decode_s"] + hist["summarize_other_s"]
    print(f"histogram metric: distance part {'does not dominate' if ok else 'DOMINATES'} "
          f"({100 * hist['distance_share']:.1f}% of its time)")
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / "bench_similarity.json"
    out.write_text(json.dumps({"quick": args.quick, "sample_size": sample, "bare_decode_s": bare_decode_s,
                               "bare_decode_images": n_ref, "threads": args.threads, "python": sys.version.split()[0],
                               "machine": platform.machine(), "cpus": os.cpu_count(), "rows": rows,
                               "histogram_distance_dominates": not ok}, indent=2))
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
