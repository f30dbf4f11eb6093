"""Experiment 5's closest-N source choice, recomputed the way `megatron run` now makes it (issue 25, item 4):
similarity reads the target's K-image pool and validation split only, never a held-out image. For every seed
and N of `examples/benchmarks/source_choice.yaml` it prints the chosen tasks, every distance and how many target
images were read (none of them held out), beside the choice recorded by the committed cells, which had sampled
the whole target.

    python benchmarks/selection_without_test_split.py \
        --out benchmarks/results/source_choice_without_test_split/selection.json

Cheap (grey-level histograms of 30 images per task): seconds per seed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from megatron import get_plugin_manager
from megatron.atomic_io import atomic_write_text
from megatron.config import load_config
from megatron.runtime import distributed as mdist
from megatron.similarity.selection import select_sources_for_run, selection_target
from megatron.training.prepare import prepare_data

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "examples" / "benchmarks" / "base" / "cpu_small.yaml"
COMMITTED = ROOT / "benchmarks" / "results" / "source_choice" / "cells"


def committed_choice(n: int, seed: int) -> dict | None:
    path = COMMITTED / f"reptile__n{n}__k20__closest__s{seed}" / "run.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())["selection"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--cache-dir", default=None, help="data.cache_dir (default: the config's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pm = get_plugin_manager()
    rows = []
    for n in (2, 3):
        for seed in range(5):
            overrides = {"seed": seed, "similarity.select_sources": n}
            if args.cache_dir:
                overrides["data.cache_dir"] = args.cache_dir
            cfg = load_config(BASE, overrides)
            data = prepare_data(cfg, pm, mdist.DistEnv())
            view = selection_target(data.pool, data.validation, data.heldout)
            sel = select_sources_for_run(cfg, pm, view, data.sources, torch.device("cpu"))
            read = {i for ids in sel["target_images"]["read"].values() for i in ids}
            before = committed_choice(n, seed)
            rows.append({"n": n, "seed": seed, "chosen": sel["chosen"], "distances": sel["distances"],
                         "target_images_read": len(read),
                         "held_out_images_read": len(read & {r.image_id for r in data.heldout.records}),
                         "committed_chosen": before["chosen"] if before else None,
                         "committed_distances": before["distances"] if before else None})
            print(f"N = {n}, seed {seed}: {', '.join(sel['chosen'])} (committed: "
                  f"{', '.join(before['chosen']) if before else 'n/a'}); {len(read)} target images read, "
                  f"{rows[-1]['held_out_images_read']} held out", flush=True)
    atomic_write_text(args.out, json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
