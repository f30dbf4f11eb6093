"""Where the fine-tuning baseline's spread comes from: a variance decomposition of one fine-tuning outcome.

The question: `make run` (`megatron run --learner reptile --detector yolox`, default config: built-in medsynth
suite, target ``eit``, K = 20 pool, 20 validation + 140 held-out images, YOLOX-tiny, one shared stage-1
checkpoint) gave the ``finetune`` baseline a final held-out mAP50 of 52.0, 53.1, 28.8, 23.7, 46.8 over seeds 0-4
(sd 13.7), and within one run the value after each meta-epoch swings by up to 20 points. Which part of one
fine-tuning outcome causes that?

Every measurement is one fine-tuning of the cached stage-1 checkpoint (the one every default run used) with the
baseline's recipe and F = ``training.finetune_epochs`` epochs, then an evaluation on the validation and held-out
splits -- through the library's own code path: :func:`megatron.training.meta_train.build_learner` (start weights),
:meth:`LearnerRun.adapt` (the target-sized copy, ``TargetPoolBatches``, ``learner.adapt`` ->
``finetune_with_recipe``) and :meth:`LearnerRun.evaluate`. Unlike the runner's meta-epochs there is no source
training before the fine-tuning (the decomposition holds the start weights fixed on purpose). Run seed
(``seed``) is 0 throughout, so the start weights and every training stream are seed 0's; what varies:

* ``stream`` -- the fine-tuning stream (batch order and augmentation): ``LearnerRun.adapt(e)`` draws it from
  ``training_seed(cfg, "finetune", e)``; e = 0..3 are exactly the streams seed 0's default run used in its four
  meta-epochs;
* ``split`` -- the target split (pool, validation, held-out) of default-run seed S, reused by image id through
  ``data.split_from: benchmarks/results/default_run/runs/seedS/run.json``;
* ``head`` -- the global RNG seed set right before ``adapt``. It was the only consumer of the 2-class
  classifier's re-initialisation (``set_num_classes``), which then drew from whatever state source training had
  left; this measurement found it moving held-out mAP50 as much as the stream, and since then the runner draws
  the new head from ``training_seed(cfg, "target_head", e)`` (the same for every learner), so under the current
  code this group no longer varies and ``stream`` (e) varies stream and head together;
* ``recipe`` -- config overrides (``training.finetune_*``) for the recipe variants.

Held-out evaluation noise: the held-out predictions of every model are bootstrapped over the 140 images
(``--bootstrap`` resamples; the core evaluator scores each resample, images renumbered so a repeated image
counts twice).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_finetune_noise.py [--groups base,repeat,stream,split,head]
        [--variants lr3e-4,ema0.99] [--streams 5] [--bootstrap 200] [--out benchmarks/out/finetune_noise] [--quick]

It needs the default runs' stage-1 checkpoint in ``/tmp/defcache`` (``--quick`` skips without it) and their
records in ``benchmarks/results/default_run/runs/seed*/run.json`` (the splits).

It writes ``<out>/results.json`` after every measurement (every single measurement, and a summary per condition:
mean and sd), skips measurements already there when re-run, and prints one flushed line per measurement.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHECKPOINT = Path("/tmp/defcache/pretrain/yolox-25c653b7b9b48596.pth")
CHECKPOINT_SHA256 = "fb146c6810e06f858960567d304f40a672c0a1c7d41997b592cfc5f6039c4908"  # default runs' record
DEFAULT_RUNS = ROOT / "benchmarks" / "results" / "default_run" / "runs"
BASE_OVERRIDES: dict[str, Any] = {
    "seed": 0, "learner.name": "finetune", "detector.name": "yolox", "output.compare_baseline": False,
    "output.save_models": False, "training.num_threads": 1, "data.cache_dir": "/tmp/defcache",
    "training.finetune_epochs": 10,  # the default when this was measured (now 20: results/finetune_epochs/)
}
#: recipe variants (name -> config overrides) that ``--variants`` may name
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "lr3e-4": {"training.finetune_lr": 3e-4},
    "ema0.99": {"training.finetune_ema": 0.99},
    "ema0.999": {"training.finetune_ema": 0.999},
    "ft20": {"training.finetune_epochs": 20},
    "ft30": {"training.finetune_epochs": 30},
    "lr3e-4_ft30": {"training.finetune_lr": 3e-4, "training.finetune_epochs": 30},
    "bn_train": {"training.finetune_bn": "train"},
    "bn_frozen": {"training.finetune_bn": "frozen"},
    "bn_clean": {},  # the default recipe, then the BatchNorm statistics re-estimated on the un-augmented pool
}
#: variants that change what happens after ``adapt``: "bn_clean" re-runs the library's precise-BN pass
#: (:func:`recompute_batchnorm`) over the pool as evaluation preprocesses it (no augmentation), replacing the
#: statistics the default recipe estimated on one augmented pass (the first fine-tuning epoch's batches)
CLEAN_BN_VARIANTS = {"bn_clean"}


def plan(groups: list[str], variants: list[str], n: int, variant_splits: bool = False) -> list[dict[str, Any]]:
    """The measurements, in order: ``{"id", "group", "split", "stream", "head", "variant"}``."""
    out = []

    def add(group: str, split: int = 0, stream: int = 0, head: int = 0, variant: str = "default", tag: str = "",
            bnpass: int | str | None = None) -> None:
        mid = f"{variant}/split{split}/stream{stream}/head{head}{tag}"
        out.append({"id": mid, "group": group, "split": split, "stream": stream, "head": head, "variant": variant,
                    "bnpass": bnpass})

    for g in groups:
        if g == "base":
            add("base")
        elif g == "repeat":  # the base measurement again: is one measurement reproducible?
            add("repeat", tag="/repeat")
        elif g == "stream":
            for s in range(n):
                add("stream", stream=s)
        elif g == "split":
            for s in range(n):
                add("split", split=s)
        elif g == "head":
            for h in range(n):
                add("head", head=h)
        elif g == "bnpass":  # stream 0's fine-tuned weights, BatchNorm statistics from other passes
            for k in [*range(n), "clean"]:
                add("bnpass", tag=f"/bnpass{k}", bnpass=k)
        else:
            raise SystemExit(f"unknown group {g!r}: base, repeat, stream, split, head, bnpass")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}: {', '.join(VARIANTS)}")
        for s in range(n):
            add(f"variant:{v}", stream=s, variant=v)
        if variant_splits:  # the variant on the other splits too (stream 0), as condition (b)
            for s in range(n):
                add(f"variant-split:{v}", split=s, variant=v)
    seen, unique = set(), []
    for m in out:  # a measurement shared by two conditions (stream 0 = split 0 = head 0) is made once
        if m["id"] not in seen:
            seen.add(m["id"])
            unique.append(m)
    return unique


def members(group: str, n: int) -> list[str]:
    """The measurement ids that make up a condition (the shared base measurement included)."""
    if group == "stream":
        return [f"default/split0/stream{s}/head0" for s in range(n)]
    if group == "split":
        return [f"default/split{s}/stream0/head0" for s in range(n)]
    if group == "head":
        return [f"default/split0/stream0/head{h}" for h in range(n)]
    if group == "bnpass":
        return [f"default/split0/stream0/head0/bnpass{k}" for k in range(n)]
    if group.startswith("variant-split:"):
        return [f"{group.split(':', 1)[1]}/split{s}/stream0/head0" for s in range(n)]
    if group.startswith("variant:"):
        return [f"{group.split(':', 1)[1]}/split0/stream{s}/head0" for s in range(n)]
    raise KeyError(group)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Bench:
    def __init__(self, bootstrap: int):
        from megatron import get_plugin_manager

        self.pm = get_plugin_manager()
        self.bootstrap = bootstrap
        self._data: dict[tuple, Any] = {}
        self._adapted: tuple | None = None  # (key, LearnerRun, adapted model) of the last fine-tuning

    def config(self, m: dict[str, Any]):
        from megatron.config import load_config

        overrides = {**BASE_OVERRIDES, **VARIANTS[m["variant"]],
                     "data.split_from": str(DEFAULT_RUNS / f"seed{m['split']}" / "run.json")}
        return load_config(None, overrides)

    def measure(self, m: dict[str, Any]) -> dict[str, Any]:
        import torch

        from megatron.data.episodes import iterate_batches
        from megatron.evaluation.predictions import predict_task
        from megatron.training.finetune_recipe import one_pass, recompute_batchnorm
        from megatron.training.meta_train import TargetPoolBatches
        from megatron.experiment import head_classes_for, validate_experiment_plugins
        from megatron.runtime import distributed as mdist
        from megatron.runtime.environment import derive_seed, deterministic, seed_everything, threads, training_seed
        from megatron.training.events import Events
        from megatron.training.meta_train import Budget, LearnerRun, RunState
        from megatron.training.prepare import prepare_data

        cfg = self.config(m)
        device = torch.device("cpu")
        env = mdist.DistEnv()
        options = validate_experiment_plugins(cfg, self.pm)
        key = (m["split"],)
        if key not in self._data:
            self._data[key] = prepare_data(cfg, self.pm, env)
        data = self._data[key]
        head_classes = head_classes_for(cfg, data.sources)
        started, started_cpu = time.perf_counter(), time.process_time()
        with threads(cfg.training.num_threads), deterministic(device):
            base_key = (m["variant"], m["split"], m["stream"], m["head"])
            # a repeat fine-tunes afresh (is one measurement reproducible?); the bnpass group reuses the weights
            if self._adapted is None or self._adapted[0] != base_key or m["group"] == "repeat":
                seed_everything(cfg.seed)
                record: dict[str, Any] = {"pretrain": {}}
                state = RunState(cfg, self.pm, Path(os.devnull), device, "off", data, data.sources, head_classes,
                                 options, Events(self.pm, enabled=False), record, CHECKPOINT, env)
                run = LearnerRun(state, "finetune", Budget(None, "bench_finetune_noise"), resume=False)
                # the global RNG right before adapt: it re-initialises the target's 2-class classifier
                seed_everything(derive_seed(0, "bench_finetune_noise", "head", m["head"]))
                adapted = run.adapt(m["stream"])
                if m["variant"] in CLEAN_BN_VARIANTS:
                    recompute_batchnorm(adapted, iterate_batches(data.pool, cfg.training.batch_size, run.pre_eval))
                self._adapted = (base_key, run, adapted)
            _, run, adapted = self._adapted
            bnpass = m.get("bnpass")
            if bnpass is not None:
                # the same fine-tuned weights; only the precise-BN pass differs: one augmented pass over the pool
                # drawn from another seed (as the default recipe's, which reuses the first epoch's batches), or
                # "clean": the pool as evaluation preprocesses it
                adapted = copy.deepcopy(adapted)
                if bnpass == "clean":
                    passes = iterate_batches(data.pool, cfg.training.batch_size, run.pre_eval)
                else:
                    passes = one_pass(TargetPoolBatches(data.pool, 1, cfg.training.batch_size, run.pre_train,
                                                        derive_seed(0, "bench_finetune_noise", "bnpass", bnpass)))
                recompute_batchnorm(adapted, passes)
            t_adapt = time.perf_counter()
            metrics = run.evaluate(adapted, m["stream"])
            t_eval = time.perf_counter()
            ho = metrics["heldout"]
            boot = None
            if self.bootstrap:
                dets = predict_task(adapted, data.heldout, run.pre_eval, cfg.training.batch_size, device)
                boot = bootstrap_map50(dets, data.heldout, cfg, self.bootstrap, seed=m["split"])
                # the predictions re-made here must give the number LearnerRun.evaluate reported
                boot["check_full_mAP50"] = round(100 * boot.pop("full"), 3)
        return {
            **m, "recipe": VARIANTS[m["variant"]],
            "stream_seed": training_seed(cfg, "finetune", m["stream"]),
            "finetune_batches": cfg.training.finetune_epochs * math.ceil(len(data.pool) / cfg.training.batch_size),
            "heldout_mAP50": round(100 * ho["mAP50"], 3), "heldout_mAP50_95": round(100 * ho["mAP50_95"], 3),
            "heldout_F1": round(100 * ho["F1"], 3), "heldout_recall": round(100 * ho["recall"], 3),
            "heldout_precision": round(100 * ho["precision"], 3), "heldout_n_det": ho["n_det"],
            "per_class_AP50": {k: round(100 * v, 3) for k, v in ho["per_class_AP50"].items()},
            "validation_mAP50": round(100 * metrics["validation"]["mAP50"], 3) if metrics.get("validation") else None,
            "bootstrap": boot,
            "images": {"pool": len(data.pool), "validation": len(data.validation) if data.validation else 0,
                       "heldout": len(data.heldout)},
            "finetune_wall_s": round(t_adapt - started, 1), "eval_wall_s": round(t_eval - t_adapt, 1),
            "cpu_s": round(time.process_time() - started_cpu, 1),
        }


def bootstrap_map50(dets, task, cfg, n: int, seed: int) -> dict[str, Any]:
    """mAP50 (points) of ``n`` resamples of the held-out images with replacement, each scored by the core
    evaluator (images renumbered 0..N-1 so a repeated image counts as many times as drawn)."""
    import numpy as np

    from megatron.evaluation.coco import evaluate

    ev = cfg.evaluation
    cats = list(task.categories)
    records = task.records
    by_id = {d.image_id: d for d in dets}

    def score(idx) -> float:
        recs, ds = [], []
        for k, i in enumerate(idx):
            r = records[i]
            recs.append(dataclasses.replace(r, image_id=k))
            d = by_id.get(r.image_id)
            if d is not None:
                ds.append(dataclasses.replace(d, image_id=k))
        return evaluate(ds, recs, cats, score_threshold=ev.score_threshold, iou_threshold=ev.iou_threshold,
                        max_detections=ev.max_detections)["mAP50"]

    rng = np.random.default_rng(seed)
    full = score(range(len(records)))
    values = [100 * score(rng.integers(0, len(records), len(records))) for _ in range(n)]
    return {"resamples": n, "mean": round(statistics.mean(values), 3), "sd": round(statistics.stdev(values), 3),
            "p2.5": round(float(np.percentile(values, 2.5)), 3), "p97.5": round(float(np.percentile(values, 97.5)), 3),
            "full": full}


def summarise(results: dict[str, Any], groups: list[str], n: int) -> dict[str, Any]:
    out = {}
    for g in groups:
        ids = members(g, max(n, 100))  # every member measured so far, whatever --streams this call had
        got = [results[i] for i in ids if i in results]
        if not got:
            continue
        vals = [r["heldout_mAP50"] for r in got]
        val = [r["validation_mAP50"] for r in got if r["validation_mAP50"] is not None]
        boot = [r["bootstrap"]["sd"] for r in got if r.get("bootstrap")]
        out[g] = {"n": len(vals), "heldout_mAP50": vals, "mean": round(statistics.mean(vals), 2),
                  "sd": round(statistics.stdev(vals), 2) if len(vals) > 1 else None,
                  "min": min(vals), "max": max(vals),
                  "validation_mAP50": val, "validation_sd": round(statistics.stdev(val), 2) if len(val) > 1 else None,
                  "mean_bootstrap_sd": round(statistics.mean(boot), 2) if boot else None}
    return out


def write(path: Path, results: dict[str, Any], n: int, digest: str) -> dict[str, Any]:
    """``results.json``: every measurement and the summary per condition, written atomically."""
    groups = (["stream", "split", "head", "bnpass"] + [f"variant:{v}" for v in VARIANTS]
              + [f"variant-split:{v}" for v in VARIANTS])
    doc = {"question": __doc__.split("\n\n")[1], "checkpoint": str(CHECKPOINT), "checkpoint_sha256": digest,
           "base_overrides": BASE_OVERRIDES, "variants": VARIANTS, "streams_per_condition": n,
           "summary": summarise(results, groups, n), "measurements": results}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return doc


#: the rows of the results README's table: (summary key, what it varies)
TABLE_ROWS = (
    ("stream", "(a) fine-tuning stream e = 0..4 only (split 0)"),
    ("split", "(b) target split of seeds 0..4 (stream 0)"),
    ("head", "new classifier's random start only (split 0, stream 0)"),
    ("bnpass", "precise-BN pass only (stream 0's weights)"),
    ("variant:lr3e-4", "`training.finetune_lr: 3e-4`, streams 0..4"),
    ("variant:ema0.99", "`training.finetune_ema: 0.99`, streams 0..4"),
    ("variant:ft20", "`training.finetune_epochs: 20`, streams 0..4"),
    ("variant-split:ft20", "`training.finetune_epochs: 20`, splits 0..3 (stream 0)"),
)


def readme_table(results: dict[str, Any]) -> str:
    """The results README's table, from ``results.json``'s summary (a test compares the two)."""
    lines = ["| condition | held-out mAP50 per measurement | mean | sd | bootstrap sd (mean) |", "|---|---|---|---|---|"]
    for key, what in TABLE_ROWS:
        row = results["summary"].get(key)
        if row is None:
            continue
        values = ", ".join(f"{v:.1f}" for v in row["heldout_mAP50"])
        boot = f"{row['mean_bootstrap_sd']:.1f}" if row.get("mean_bootstrap_sd") is not None else "–"
        sd = f"{row['sd']:.1f}" if row.get("sd") is not None else "–"
        lines.append(f"| {what} | {values} | {row['mean']:.1f} | {sd} | {boot} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", default="base,repeat,stream,split,head")
    ap.add_argument("--variants", default="", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--variant-splits", action="store_true", help="measure each variant on splits 0..N-1 too")
    ap.add_argument("--streams", type=int, default=5, help="measurements per condition")
    ap.add_argument("--bootstrap", type=int, default=200, help="held-out bootstrap resamples per model (0: none)")
    ap.add_argument("--out", default=None, help="default: benchmarks/out/finetune_noise (--quick: finetune_noise_quick)")
    ap.add_argument("--quick", action="store_true",
                    help="`make bench`: two streams of the default recipe, 10 bootstrap resamples, own output folder")
    args = ap.parse_args(argv)
    if args.quick:
        args.groups, args.variants, args.streams, args.bootstrap = "stream", "", 2, 10
    if args.out is None:
        args.out = str(ROOT / "benchmarks" / "out" / ("finetune_noise_quick" if args.quick else "finetune_noise"))

    if not CHECKPOINT.exists():
        if args.quick:  # a fresh machine has no default run to decompose: nothing to measure, not a failure
            print(f"skipped: {CHECKPOINT} (the default runs' stage-1 checkpoint) is not on this machine", flush=True)
            return 0
        raise SystemExit(f"{CHECKPOINT} is missing: it is the stage-1 checkpoint of the default runs")
    digest = sha256(CHECKPOINT)
    if digest != CHECKPOINT_SHA256:
        raise SystemExit(f"{CHECKPOINT}: sha256 {digest}, not the default runs' {CHECKPOINT_SHA256}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    results: dict[str, Any] = doc.get("measurements", {})
    groups = [g for g in args.groups.split(",") if g]
    variants = [v for v in args.variants.split(",") if v]
    todo = plan(groups, variants, args.streams, args.variant_splits)
    bench = None
    for i, m in enumerate(todo, 1):
        if m["id"] in results:
            r = results[m["id"]]
            print(f"[{i}/{len(todo)}] {m['id']}: held-out mAP50 {r['heldout_mAP50']:.1f} (recorded)", flush=True)
            continue
        bench = bench or Bench(args.bootstrap)
        r = bench.measure(m)
        results[m["id"]] = r
        b = r["bootstrap"]
        print(f"[{i}/{len(todo)}] {m['id']}: held-out mAP50 {r['heldout_mAP50']:.1f}  validation "
              f"{r['validation_mAP50']:.1f}" + (f"  bootstrap sd {b['sd']:.1f}" if b else "")
              + f"  ({r['finetune_wall_s']:.0f}+{r['eval_wall_s']:.0f} s, cpu {r['cpu_s']:.0f} s)", flush=True)
        write(path, results, args.streams, digest)
    if results:
        doc = write(path, results, args.streams, digest)
        for g, s in doc.get("summary", {}).items():
            print(f"{g}: n={s['n']} held-out mAP50 mean {s['mean']:.1f} sd {s['sd']} "
                  f"(values {s['heldout_mAP50']}); mean bootstrap sd {s['mean_bootstrap_sd']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
