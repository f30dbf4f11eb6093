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
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from megatron.config import ExperimentConfig
from megatron.errors import ConfigError, TrainingError
from megatron.runtime.precision import autocast, grad_scaler
from megatron.training.finetune_recipe import optimizer_step
from megatron.types import Batch, Task
from megatron.data.episodes import BatchJob, check_not_empty, load_planned_batch, plan_batches
from megatron.data.loader import Loader
from megatron.data.preprocess import Preprocessor
from megatron.experiment import build_detector, build_taskset, load_tasks
from megatron.runtime.environment import resolve_amp, resolve_device, seed_everything
from megatron.training.progress import progress_bars
from megatron.training.weights import save_detector_checkpoint
from megatron import __version__
from megatron.config import validate_plugin_options
from megatron.atomic_io import (atomic_write_text, checksum_path, remove_stale_tmp_files, sha256_of, storage_errors,
                                write_checksum, writer_gone, writer_token)

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


def plan_interleaved(tasks: list[Task], batch_size: int, rng: np.random.Generator, augment: bool) -> list[BatchJob]:
    """One epoch's batches, all drawn now from ``rng``: every image of every task once, in single-task batches
    (each task's order and per-batch augmentation seeds), tasks interleaved at random in proportion to their
    remaining batches."""
    for task in tasks:
        check_not_empty(task, "pre-training")
    plans = [plan_batches(len(t), batch_size, rng, True, augment, task=i) for i, t in enumerate(tasks)]
    taken = [0] * len(plans)
    jobs: list[BatchJob] = []
    while len(jobs) < sum(len(plan) for plan in plans):
        live = [i for i, plan in enumerate(plans) if taken[i] < len(plan)]
        weights = np.array([len(plans[i]) - taken[i] for i in live], dtype=float)
        i = live[int(rng.choice(len(live), p=weights / weights.sum()))]
        jobs.append(plans[i][taken[i]])
        taken[i] += 1
    return jobs


def interleaved_batches(tasks: list[Task], batch_size: int, pre, rng: np.random.Generator,
                        loader: Loader | None = None) -> Iterator[tuple[Task, Batch]]:
    """One epoch of :func:`plan_interleaved`'s batches, loaded ahead by ``loader``'s workers (default: in this
    thread; the same batches for any number of workers)."""
    jobs = plan_interleaved(tasks, batch_size, rng, pre.augment)
    batches = (loader or Loader()).map(load_planned_batch, (tasks, pre), jobs)
    for job, batch in zip(jobs, batches):
        yield tasks[job.task], batch


@dataclass
class _Training:
    """What one pre-training updates: the detector and its optimiser, schedule and loss scaler."""

    detector: torch.nn.Module
    optimiser: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    device: torch.device
    amp: str
    total_steps: int


def pretrain(cfg: ExperimentConfig, pm, out: str | Path, settings: PretrainSettings | None = None,
             progress: Any = True, on_step: Callable[[int, float], None] | None = None,
             checksum: bool = True) -> PretrainResult:
    """Train ``cfg.detector`` on ``cfg``'s source tasks (merged label space) and write a checkpoint to ``out``
    after every epoch (with its sha256 beside it unless ``checksum`` is false: stage 1 records its own).

    Uses ``cfg.data`` (datasets, target, sources, input size, CLAHE, augmentation), ``cfg.detector`` (name,
    options, an optional starting ``checkpoint``), ``cfg.training`` (device, amp, num_threads) and ``cfg.seed``.
    The target task is never trained on.
    """
    s = settings or PretrainSettings()
    if s.epochs < 1:
        raise ConfigError(f"pretrain: epochs must be >= 1, got {s.epochs}")
    out = Path(out)
    sources = _pretrain_sources(cfg, pm)
    categories, offsets = merged_categories(sources)
    training = _set_up_training(cfg, pm, s, sources, len(categories))
    pre = Preprocessor(cfg.data.input_size, clahe=cfg.data.clahe, augment=cfg.data.augment,
                       cache_bytes=cfg.data.cache_bytes)
    loader = Loader.from_config(cfg.data, training.device)
    rng = np.random.default_rng(cfg.seed)

    result = PretrainResult(path=out, categories=categories, tasks=[t.name for t in sources], epochs=0, steps=0)
    start = time.perf_counter()
    # ``progress``: show bars, or an open rich Progress to add a row to (the run's own bars)
    with (progress_bars(progress) if isinstance(progress, bool) else contextlib.nullcontext(progress)) as bar:
        job = bar.add_task("pretrain", total=training.total_steps) if bar is not None else None

        def step_done(loss: float, epoch: int) -> None:
            if on_step is not None:
                on_step(result.steps, loss)
            if bar is not None:
                bar.update(job, advance=1, description=f"pretrain epoch {epoch + 1}/{s.epochs} loss {loss:.3f}")

        for epoch in range(s.epochs):
            batches = interleaved_batches(sources, s.batch_size, pre, rng, loader)
            epoch_losses = _train_epoch(training, batches, offsets, s, result, lambda loss: step_done(loss, epoch))
            result.epochs = epoch + 1
            result.losses.append(float(np.mean(epoch_losses)) if epoch_losses else float("nan"))
            log.info("pretrain epoch %d/%d: mean loss %.4f", epoch + 1, s.epochs, result.losses[-1])
            # after every epoch: an interrupted run keeps its work
            save_detector_checkpoint(training.detector, out, _meta(cfg, result, s), checksum=checksum)
            if s.max_steps is not None and result.steps >= s.max_steps:
                break
        if bar is not None:
            bar.remove_task(job)
    result.seconds = time.perf_counter() - start
    return result


def _pretrain_sources(cfg: ExperimentConfig, pm) -> list[Task]:
    sources = build_taskset(cfg, load_tasks(cfg, pm)).sources
    if not sources:
        raise ConfigError("pretrain: no source tasks (data.sources is empty, or the target is the only task)")
    return sources


def _set_up_training(cfg: ExperimentConfig, pm, s: PretrainSettings, sources: list[Task], n_classes: int) -> _Training:
    """The detector (from ``detector.checkpoint`` when set) on its device, AdamW, a one-cycle schedule over the
    whole run (warm-up: 50 steps at most) and the AMP loss scaler."""
    device = resolve_device(cfg.training.device)
    amp = resolve_amp(cfg.training.amp, device)
    seed_everything(cfg.seed)
    detector = build_detector(cfg, pm, n_classes, checkpoint=cfg.detector.checkpoint)
    detector.to(device).train()
    params = [p for p in detector.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    steps_per_epoch = sum(math.ceil(len(t) / s.batch_size) for t in sources)
    total = steps_per_epoch * s.epochs if s.max_steps is None else min(s.max_steps, steps_per_epoch * s.epochs)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=s.lr, total_steps=max(total, 1),
                                                    pct_start=min(0.3, 50 / max(total, 1)))
    return _Training(detector, optimiser, scheduler, grad_scaler(amp), device, amp, total)


def _train_epoch(t: _Training, batches: Iterator[tuple[Task, Batch]], offsets: dict[str, int], s: PretrainSettings,
                 result: PretrainResult, step_done: Callable[[float], None]) -> list[float]:
    """One epoch of optimiser steps (fewer when ``s.max_steps`` is reached); the loss of each step."""
    losses: list[float] = []
    for task, batch in batches:
        batch = shift_labels(batch, offsets[task.name]).to(t.device)
        t.optimiser.zero_grad(set_to_none=True)
        with autocast(t.amp, t.device):
            loss = t.detector.loss(batch)["loss"]
        if not torch.isfinite(loss):
            raise TrainingError(
                f"pretrain: the loss became {float(loss)} at step {result.steps} (task {task.name!r}); "
                f"lower the learning rate (now {s.lr}) or check that task's boxes"
            )
        optimizer_step(loss, t.optimiser, scaler=t.scaler, grad_clip=s.grad_clip)
        t.scheduler.step()
        result.steps += 1
        losses.append(float(loss.detach()))
        step_done(losses[-1])
        if s.max_steps is not None and result.steps >= s.max_steps:
            break
    return losses


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
#
# The cache (``<data.cache_dir or ~/.cache/megatron>/pretrain/``) holds ``<detector>-<key16>.pth``, its
# ``.pth.sha256`` and ``.json`` (key, inputs, sha256, epochs, losses). The key covers exactly what determines
# stage 1: the source tasks (records, and each image file's size and modification time, or its content when the
# sources are small), the options of the dataset plugins the sources came from, the detector, the pre-processing
# and the stage-1 settings; never the target (a target-only change reuses the checkpoint). A cached file is
# served only when its sha256 matches: a corrupt, swapped or unreadable entry is reported, moved aside
# (``*.corrupt-<time>``) and trained again. ``.partial-<pid>.pth`` files of processes that are gone are removed.

PRETRAIN_CACHE_VERSION = 2
#: the reader a task gets when its plugin names none (``record.path`` from disk)
_DEFAULT_TASK_LOADER = Task.__dataclass_fields__["image_loader"].default
#: below this many bytes of source image files, the key hashes their content (cheap); above, size + mtime
CONTENT_HASH_LIMIT = 256 * 1024 * 1024
#: the name of a stage-1 checkpoint being trained by process ``pid`` (renamed under its key when complete)
PARTIAL_PATTERN = re.compile(r"^(?P<stem>.+)\.partial-(?:(?P<host>[0-9a-f]{8})-)?(?P<pid>[0-9]+)\.pth$")
#: an incomplete cache entry younger than this is taken for another process finishing its write (the rename
#: comes before the checksum and the description), not for a corrupt one to move aside
IN_PROGRESS_S = 600  # (a process that finds a finished entry after training keeps it instead of replacing it)


def _source_fingerprint(tasks: list[Task]) -> str:
    """A hash of what the source tasks hold: names, categories, where they came from (only the plugin's name when
    every file is content-hashed), every image's record (id, file, size, boxes, labels) and its file: content when
    all files together are under :data:`CONTENT_HASH_LIMIT`, else size and modification time (so a file replaced
    under the same name counts)."""
    files = sorted({Path(r.path) for t in tasks for r in t.records if r.path is not None})
    stats = {}
    for f in files:
        try:
            st = f.stat()
            stats[f] = (st.st_size, st.st_mtime_ns)
        except OSError:
            stats[f] = (-1, -1)  # unreadable now: loading will say so; the key still differs from a readable one
    by_content = sum(size for size, _ in stats.values() if size > 0) <= CONTENT_HASH_LIMIT
    h = hashlib.sha256()
    h.update(b"content" if by_content else b"stat")
    for task in tasks:
        # where the files sit is no part of what they hold: with every file content-hashed, the origin's plugin
        # name stands for it, so a dataset mounted elsewhere (another node of a cluster) or a moved cache reuses
        # the cached stage 1
        hashed = by_content and all(r.path is not None for r in task.records)
        origin = task.source.split(":", 1)[0] if hashed else task.source
        h.update(repr((task.name, list(task.categories), task.modality, origin, loader_identity(task),
                       len(task))).encode())
        for r in task.records:
            h.update(repr((r.image_id, r.file_name, r.width, r.height, r.frame)).encode())
            h.update(np.ascontiguousarray(r.boxes, dtype=np.float32).tobytes())
            h.update(np.ascontiguousarray(r.labels, dtype=np.int64).tobytes())
            if r.path is not None:
                stat = stats[Path(r.path)]
                h.update(repr(stat[0]).encode())
                h.update((_file_digest(Path(r.path)) if by_content and stat[0] >= 0 else repr(stat[1])).encode())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    try:
        return sha256_of(path)
    except OSError:
        return "unreadable"


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


def loader_identity(task: Task) -> str | None:
    """What reads a task's pixels, when it can be told from outside: ``"file"`` for the default reader, the
    ``repr`` of a loader object that defines one (``DicomImageLoader(DicomDisplay(...))``: its settings);
    ``None`` for an opaque function (a closure over plugin options)."""
    loader = task.image_loader
    if loader is _DEFAULT_TASK_LOADER:
        return "file"
    if inspect.isroutine(loader) or isinstance(loader, functools.partial) or type(loader).__repr__ is object.__repr__:
        return None
    text = repr(loader)
    return None if " at 0x" in text else f"{type(loader).__module__}.{type(loader).__qualname__}:{text}"


def _source_dataset_specs(cfg: ExperimentConfig, sources: list[Task]) -> list[Any]:
    """The dataset specs whose options may change the source pixels beyond what the records, the files and the
    loaders say: those of the plugins (a task's ``source`` starts with its plugin's name) whose source tasks are
    read by an opaque loader (in-memory, generated). A spec that gave only the target is never in it; when such
    a task's origin cannot be told, every spec counts (a key that changes too often costs time, never results)."""
    opaque = [t for t in sources if loader_identity(t) is None]
    plugins = {spec.plugin for spec in cfg.data.datasets}
    origins = {t.source.split(":", 1)[0] if ":" in t.source else None for t in opaque}
    if not origins <= plugins:
        return list(cfg.data.datasets)
    return [spec for spec in cfg.data.datasets if spec.plugin in origins]


def stage1_cache_key(cfg: ExperimentConfig, sources: list[Task], pm=None) -> tuple[str, dict[str, Any]]:
    """The content hash of everything that determines the stage-1 checkpoint, and what went into it (plugin
    options with their defaults filled in when the plugin manager ``pm`` is given). The target is not in it."""

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    def options(kind: str, name: str, given: dict[str, Any]) -> dict[str, Any]:
        return _validated_options(pm, kind, name, given) if pm is not None else given

    s = stage1_settings(cfg)
    inputs = {
        "cache_version": PRETRAIN_CACHE_VERSION,
        "source_datasets": [{"plugin": spec.plugin, "options": options("dataset", spec.plugin, spec.options)}
                            for spec in _source_dataset_specs(cfg, sources)],
        "sources": [t.name for t in sources],
        "source_content": _source_fingerprint(sources),
        "input_size": cfg.data.input_size, "clahe": cfg.data.clahe, "augment": cfg.data.augment,
        "detector": {"name": cfg.detector.name, "options": options("detector", cfg.detector.name, cfg.detector.options)},
        # stage 1 started from a model-zoo checkpoint: its content, not its path, decides the result
        "start_checkpoint": sha256_of(Path(cfg.detector.checkpoint)) if cfg.detector.checkpoint is not None else None,
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
    sources (verified by its sha256), trained now (atomically, into the cache) when there is none or the entry
    is corrupt. ``cache_key``: what :func:`stage1_cache_key` returned, when the caller has it already. Returns the
    record's ``pretrain`` entry: ``checkpoint``, ``cache_key``, ``sha256``, ``reused``, ``epochs``, ``wall_s``
    (and ``replaced``: why a cached entry was set aside, when one was)."""
    key, inputs = cache_key if cache_key is not None else stage1_cache_key(cfg, sources, pm)
    folder = stage1_cache_dir(cfg)
    path = folder / f"{cfg.detector.name}-{key[:16]}.pth"
    info_path = path.with_suffix(".json")
    with storage_errors(folder, "write the stage-1 cache in"):
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(folder)
        remove_stale_tmp_files(folder, recursive=False)
    info, problem = _verified_entry(path, info_path, key)
    if info is not None:
        log.info("stage 1: reusing the cached pre-trained checkpoint %s (sha256 %s... verified)", path,
                 info["sha256"][:12])
        return {"checkpoint": str(path), "cache_key": key, "sha256": info["sha256"], "reused": True,
                "epochs": info.get("epochs"), "wall_s": 0.0, "trained_wall_s": info.get("wall_s"),
                "losses": info.get("losses")}
    replaced = None
    if problem is not None and not info_path.exists() and _recently_written(path):
        # another run (a benchmark worker, an array job on another node) is between its rename and its description
        log.info("stage 1: the cache entry %s is being written by another process (%s); training a copy", path,
                 problem)
    elif problem is not None:
        moved = _move_aside(path, info_path)
        replaced = f"{problem}; moved aside to {', '.join(str(m) for m in moved)}"
        log.warning("stage 1: the cached checkpoint %s is not usable: %s; training stage 1 again", path, replaced)
    entry = _train_into_cache(cfg, pm, sources, progress, path, info_path, key, inputs)
    return {**entry, "replaced": replaced} if replaced else entry


def _train_into_cache(cfg: ExperimentConfig, pm, sources: list[Task], progress: Any, path: Path, info_path: Path,
                      key: str, inputs: dict[str, Any]) -> dict[str, Any]:
    # per process: two runs that need the same checkpoint at once (benchmark workers) each train their own copy and
    # the first rename wins; a reader only ever sees a complete file under the key
    partial = path.with_name(f"{path.stem}.partial-{writer_token()}.pth")
    started = time.perf_counter()
    # the sources this run uses (after selection), and stage 1's own seed
    sub_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"sources": [t.name for t in sources]}),
                                     "seed": cfg.training.pretrain_seed})
    try:
        result = pretrain(sub_cfg, pm, partial, stage1_settings(cfg), progress=progress, checksum=False)
        wall = round(time.perf_counter() - started, 3)
        finished, _ = _verified_entry(path, info_path, key)
        if finished is not None:  # another process finished the same entry meanwhile: keep its file, drop ours
            log.info("stage 1: another process cached %s while this one trained; using that checkpoint", path)
            return {"checkpoint": str(path), "cache_key": key, "sha256": finished["sha256"], "reused": True,
                    "epochs": finished.get("epochs"), "wall_s": wall, "losses": finished.get("losses")}
        with storage_errors(path, "write the stage-1 checkpoint"):
            partial.replace(path)  # the finished checkpoint appears under its key only when complete
            digest = write_checksum(path)
            info = {"cache_key": key, "complete": True, "sha256": digest, "epochs": result.epochs,
                    "steps": result.steps, "losses": [round(x, 5) for x in result.losses], "wall_s": wall,
                    "inputs": inputs}
            atomic_write_text(info_path, json.dumps(info, indent=2, default=str) + "\n")
    finally:
        with contextlib.suppress(OSError):
            partial.unlink()  # a failed or interrupted stage 1 leaves nothing in the cache
    log.info("stage 1: pre-trained %d epochs in %.0f s -> %s", result.epochs, wall, path)
    return {"checkpoint": str(path), "cache_key": key, "sha256": digest, "reused": False, "epochs": result.epochs,
            "wall_s": wall, "losses": info["losses"]}


def _verified_entry(path: Path, info_path: Path, key: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(info, None)`` for a cache entry that may be served; ``(None, why)`` for one that exists but may not
    (to be moved aside); ``(None, None)`` when there is none."""
    if not path.exists() and not info_path.exists():
        return None, None
    try:
        info = json.loads(info_path.read_text())
    except FileNotFoundError:
        return None, f"{info_path.name} is missing (an interrupted write?)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{info_path.name} cannot be read ({exc})"
    if not isinstance(info, dict) or info.get("cache_key") != key or not info.get("complete"):
        return None, f"{info_path.name} does not describe a complete entry for this key"
    if not isinstance(info.get("sha256"), str):
        return None, f"{info_path.name} records no checksum (written by an older megatron)"
    if not path.is_file():
        return None, f"{path.name} is missing"
    try:
        actual = sha256_of(path)
    except OSError as exc:
        return None, f"{path.name} cannot be read ({exc.strerror or exc})"
    if actual != info["sha256"]:
        return None, (f"{path.name} does not match its recorded checksum (sha256 {actual[:12]}..., recorded "
                      f"{info['sha256'][:12]}...): corrupted or replaced")
    return info, None


def _recently_written(*paths: Path) -> bool:
    """Whether any of ``paths`` was modified within the last :data:`IN_PROGRESS_S` seconds."""
    now = time.time()
    for p in paths:
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime < IN_PROGRESS_S:
                return True
    return False


def _move_aside(*paths: Path) -> list[Path]:
    """Rename each existing file to ``<name>.corrupt-<time>`` (kept for inspection, never served again)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    moved = []
    for p in (*paths, *(checksum_path(p) for p in paths)):
        if p.exists():
            aside = p.with_name(f"{p.name}.corrupt-{stamp}")
            os.replace(p, aside)
            moved.append(aside)
    return moved


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete the ``.partial-<host>-<pid>.pth`` checkpoints (and their temp files) of stage-1 trainings whose
    process is gone (killed; another machine's only when untouched for a week, see
    :func:`megatron.atomic_io.writer_gone`); a live process's partial is left alone. Returns what was removed."""
    removed = []
    for p in folder.glob("*.partial-*.pth*"):
        base = p.name[:p.name.index(".pth") + len(".pth")]
        match = PARTIAL_PATTERN.match(base)
        if match is None or not p.is_file() or not writer_gone(match["host"], int(match["pid"]), p):
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    if removed:
        log.info("stage-1 cache %s: removed %d file(s) left by a stage 1 that was killed", folder, len(removed))
    return removed
