"""Conventional pre-training on the source tasks (step 1 of the method), producing a detector checkpoint.

Label space: the source tasks' classes are **merged** into one label space, each category name prefixed by its
task (``"chest_xray/nodule"``), so classes that share a name in two modalities stay distinct and no task's
annotations are read as another's background. The detector trains on batches of single tasks (the tasks are
interleaved at random, each image seen once per epoch) with its labels shifted into the merged space. The
checkpoint (:func:`megatron.training.weights.save_detector_checkpoint`) records the merged categories; ``megatron run
--checkpoint PATH`` loads everything and re-initialises only the classifier for the target's classes
(``Detector.set_num_classes``, done by :func:`megatron.training.weights.load_weights`).

Per-task heads were the alternative; they would make the checkpoint depend on the task list and give the
runner several classifiers to choose from, while a merged classifier is discarded anyway for a new target.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from megatron.config import ExperimentConfig
from megatron.errors import ConfigError, TrainingError
from megatron.runtime.precision import autocast, grad_scaler
from megatron.training.finetune_recipe import optimizer_step
from megatron.types import Batch, Task
from megatron.data.episodes import iterate_batches
from megatron.data.preprocess import Preprocessor
from megatron.experiment import build_detector, build_taskset, load_tasks
from megatron.runtime.environment import resolve_amp, resolve_device, seed_everything
from megatron.training.progress import progress_bars
from megatron.training.weights import save_detector_checkpoint
from megatron import __version__
from megatron.config import validate_plugin_options
from megatron.atomic_io import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class PretrainSettings:
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 8
    weight_decay: float = 1e-4
    grad_clip: float | None = 10.0
    max_steps: int | None = None  # stop early after this many optimiser steps (quick runs, tests)


@dataclass
class PretrainResult:
    path: Path
    categories: list[str]
    tasks: list[str]
    epochs: int
    steps: int
    losses: list[float] = field(default_factory=list)  # mean loss per epoch
    seconds: float = 0.0


def merged_categories(tasks: list[Task]) -> tuple[list[str], dict[str, int]]:
    """``["<task>/<category>", ...]`` over all tasks, and each task's label offset in that list."""
    categories: list[str] = []
    offsets: dict[str, int] = {}
    for task in tasks:
        offsets[task.name] = len(categories)
        categories.extend(f"{task.name}/{c}" for c in task.categories)
    return categories, offsets


def shift_labels(batch: Batch, offset: int) -> Batch:
    return Batch(images=batch.images, boxes=batch.boxes, labels=[lab + offset for lab in batch.labels], meta=batch.meta)


def interleaved_batches(tasks: list[Task], batch_size: int, pre, rng: np.random.Generator) -> Iterator[tuple[Task, Batch]]:
    """One epoch: every image of every task once, in single-task batches, tasks interleaved at random in
    proportion to their remaining batches."""

    iters = {t.name: iterate_batches(t, batch_size, pre, rng, shuffle=True) for t in tasks}
    remaining = {t.name: math.ceil(len(t) / batch_size) for t in tasks}
    by_name = {t.name: t for t in tasks}
    while any(remaining.values()):
        names = [n for n, r in remaining.items() if r > 0]
        weights = np.array([remaining[n] for n in names], dtype=float)
        name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        remaining[name] -= 1
        yield by_name[name], next(iters[name])


def pretrain(cfg: ExperimentConfig, pm, out: str | Path, settings: PretrainSettings | None = None,
             progress: Any = True, on_step: Callable[[int, float], None] | None = None) -> PretrainResult:
    """Train ``cfg.detector`` on ``cfg``'s source tasks (merged label space) and write a checkpoint to ``out``.

    Uses ``cfg.data`` (datasets, target, sources, input size, CLAHE, augmentation), ``cfg.detector`` (name,
    options, an optional starting ``checkpoint``), ``cfg.training`` (device, amp, num_threads) and ``cfg.seed``.
    The target task is never trained on.
    """

    s = settings or PretrainSettings()
    if s.epochs < 1:
        raise ConfigError(f"pretrain: epochs must be >= 1, got {s.epochs}")
    out = Path(out)
    taskset = build_taskset(cfg, load_tasks(cfg, pm))
    sources = taskset.sources
    if not sources:
        raise ConfigError("pretrain: no source tasks (data.sources is empty, or the target is the only task)")
    categories, offsets = merged_categories(sources)

    device = resolve_device(cfg.training.device)
    amp = resolve_amp(cfg.training.amp, device)
    seed_everything(cfg.seed)
    detector = build_detector(cfg, pm, len(categories), checkpoint=cfg.detector.checkpoint)
    detector.to(device).train()

    params = [p for p in detector.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    steps_per_epoch = sum(math.ceil(len(t) / s.batch_size) for t in sources)
    total = steps_per_epoch * s.epochs if s.max_steps is None else min(s.max_steps, steps_per_epoch * s.epochs)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=s.lr, total_steps=max(total, 1),
                                                    pct_start=min(0.3, 50 / max(total, 1)))  # warm-up: 50 steps at most
    scaler = grad_scaler(amp)
    pre = Preprocessor(cfg.data.input_size, clahe=cfg.data.clahe, augment=cfg.data.augment)
    rng = np.random.default_rng(cfg.seed)

    result = PretrainResult(path=out, categories=categories, tasks=[t.name for t in sources], epochs=0, steps=0)
    start = time.perf_counter()
    # ``progress``: show bars, or an open rich Progress to add a row to (the run's own bars)
    with (progress_bars(progress) if isinstance(progress, bool) else contextlib.nullcontext(progress)) as bar:
        job = bar.add_task("pretrain", total=total) if bar is not None else None
        for epoch in range(s.epochs):
            epoch_losses = []
            for task, batch in interleaved_batches(sources, s.batch_size, pre, rng):
                batch = shift_labels(batch, offsets[task.name]).to(device)
                optimiser.zero_grad(set_to_none=True)
                with autocast(amp, device):
                    loss = detector.loss(batch)["loss"]
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"pretrain: the loss became {float(loss)} at step {result.steps} (task {task.name!r}); "
                        f"lower the learning rate (now {s.lr}) or check that task's boxes"
                    )
                optimizer_step(loss, optimiser, scaler=scaler, grad_clip=s.grad_clip)
                scheduler.step()
                result.steps += 1
                epoch_losses.append(float(loss.detach()))
                if on_step is not None:
                    on_step(result.steps, epoch_losses[-1])
                if bar is not None:
                    bar.update(job, advance=1, description=f"pretrain epoch {epoch + 1}/{s.epochs} loss {epoch_losses[-1]:.3f}")
                if s.max_steps is not None and result.steps >= s.max_steps:
                    break
            result.epochs = epoch + 1
            result.losses.append(float(np.mean(epoch_losses)) if epoch_losses else float("nan"))
            log.info("pretrain epoch %d/%d: mean loss %.4f", epoch + 1, s.epochs, result.losses[-1])
            meta = _meta(cfg, result, s)
            save_detector_checkpoint(detector, out, meta)  # after every epoch: an interrupted run keeps its work
            if s.max_steps is not None and result.steps >= s.max_steps:
                break
        if bar is not None:
            bar.remove_task(job)
    result.seconds = time.perf_counter() - start
    return result


def _meta(cfg: ExperimentConfig, result: PretrainResult, s: PretrainSettings) -> dict[str, Any]:

    return {
        "kind": "pretrain",
        "megatron_version": __version__,
        "categories": list(result.categories),
        "tasks": list(result.tasks),
        "epochs": int(result.epochs),
        "steps": int(result.steps),
        "losses": [float(x) for x in result.losses],
        "seed": int(cfg.seed),
        "input_size": int(cfg.data.input_size),
        "lr": float(s.lr),
        "batch_size": int(s.batch_size),
    }




# --- stage 1 of `megatron run`: pre-training, cached by content ---------------------------------------------

PRETRAIN_CACHE_VERSION = 1


def _records_fingerprint(tasks: list[Task]) -> str:
    """A hash of what the source tasks hold: names, categories, every image's file, size and boxes."""
    import hashlib

    h = hashlib.sha256()
    for task in tasks:
        h.update(repr((task.name, list(task.categories), len(task))).encode())
        for r in task.records:
            h.update(repr((r.image_id, r.file_name, r.width, r.height, r.frame)).encode())
            h.update(np.ascontiguousarray(r.boxes, dtype=np.float32).tobytes())
            h.update(np.ascontiguousarray(r.labels, dtype=np.int64).tobytes())
            if r.path is not None:
                try:
                    h.update(str(Path(r.path).stat().st_size).encode())
                except OSError:
                    pass
    return h.hexdigest()


def stage1_settings(cfg: ExperimentConfig) -> PretrainSettings:
    return PretrainSettings(epochs=cfg.training.pretrain_epochs, lr=cfg.training.pretrain_lr,
                            batch_size=cfg.training.batch_size)


def _validated_options(pm, kind: str, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """A plugin's options with its defaults filled in, so ``{}`` and the same defaults written out hash alike."""

    try:
        cls = pm.registers[kind].get(name)
    except KeyError:
        return dict(options)
    return validate_plugin_options(cls, options, f"{kind} {name!r} options").model_dump(mode="json")


def stage1_cache_key(cfg: ExperimentConfig, sources: list[Task], pm=None) -> tuple[str, dict[str, Any]]:
    """The content hash of everything that determines the stage-1 checkpoint, and what went into it (plugin
    options with their defaults filled in when the plugin manager ``pm`` is given)."""
    import hashlib
    import json
    from importlib import metadata


    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    s = stage1_settings(cfg)
    inputs = {
        "cache_version": PRETRAIN_CACHE_VERSION,
        "datasets": [{"plugin": spec.plugin, "options": _validated_options(pm, "dataset", spec.plugin, spec.options)
                      if pm is not None else spec.options} for spec in cfg.data.datasets],
        "sources": [t.name for t in sources],
        "source_records": _records_fingerprint(sources),
        "input_size": cfg.data.input_size, "clahe": cfg.data.clahe, "augment": cfg.data.augment,
        "detector": {"name": cfg.detector.name, "options": _validated_options(pm, "detector", cfg.detector.name,
                                                                               cfg.detector.options)
                     if pm is not None else cfg.detector.options},
        "settings": {"epochs": s.epochs, "lr": s.lr, "batch_size": s.batch_size, "weight_decay": s.weight_decay,
                     "grad_clip": s.grad_clip},
        "seed": cfg.training.pretrain_seed, "amp": cfg.training.amp,
        "versions": {"megatron": __version__, **{p: version(p) for p in ("torch", "mmdet", "mmcv", "mmengine")}},
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    return key, inputs


def stage1_cache_dir(cfg: ExperimentConfig) -> Path:
    base = cfg.data.cache_dir if cfg.data.cache_dir is not None else Path("~/.cache/megatron")
    return Path(base).expanduser() / "pretrain"


def stage1_checkpoint(cfg: ExperimentConfig, pm, sources: list[Task], progress: Any = True,
                      cache_key: tuple[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Stage 1 of the method inside ``megatron run``: the cached pre-trained checkpoint for this config and these
    sources, trained now (atomically, into the cache) when there is none. ``cache_key``: what
    :func:`stage1_cache_key` returned, when the caller has it already (it hashes every source record). Returns
    the record's ``pretrain`` entry: ``checkpoint``, ``cache_key``, ``reused``, ``epochs``, ``wall_s``."""
    import json


    key, inputs = cache_key if cache_key is not None else stage1_cache_key(cfg, sources, pm)
    folder = stage1_cache_dir(cfg)
    path = folder / f"{cfg.detector.name}-{key[:16]}.pth"
    info_path = path.with_suffix(".json")
    if path.exists() and info_path.exists():
        try:
            info = json.loads(info_path.read_text())
        except (OSError, json.JSONDecodeError):
            info = None
        if info and info.get("cache_key") == key and info.get("complete"):
            log.info("stage 1: reusing the cached pre-trained checkpoint %s", path)
            return {"checkpoint": str(path), "cache_key": key, "reused": True, "epochs": info.get("epochs"),
                    "wall_s": 0.0, "trained_wall_s": info.get("wall_s"), "losses": info.get("losses")}
    folder.mkdir(parents=True, exist_ok=True)
    # per process: two runs that need the same checkpoint at once (benchmark workers) each train their own copy and
    # the first rename wins; a reader only ever sees a complete file under the key
    partial = path.with_name(f"{path.stem}.partial-{os.getpid()}.pth")
    started = time.perf_counter()
    # the sources this run uses (after selection), and stage 1's own seed
    sub_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"sources": [t.name for t in sources]}),
                                     "seed": cfg.training.pretrain_seed})
    result = pretrain(sub_cfg, pm, partial, stage1_settings(cfg), progress=progress)
    wall = round(time.perf_counter() - started, 3)
    partial.replace(path)  # the finished checkpoint appears under its key only when complete
    info = {"cache_key": key, "complete": True, "epochs": result.epochs, "steps": result.steps,
            "losses": [round(x, 5) for x in result.losses], "wall_s": wall, "inputs": inputs}
    atomic_write_text(info_path, json.dumps(info, indent=2, default=str) + "\n")
    log.info("stage 1: pre-trained %d epochs in %.0f s -> %s", result.epochs, wall, path)
    return {"checkpoint": str(path), "cache_key": key, "reused": False, "epochs": result.epochs, "wall_s": wall,
            "losses": info["losses"]}
