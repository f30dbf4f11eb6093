"""Stage "prepare": the task set and the target split, with the exact image ids on record.

The target is split three ways (:func:`split_target_three`): the K-image training **pool**, a **validation**
split the reported ``-best`` model is chosen on (``data.validation_images``; 0 = none, null = a quarter of the
evaluation images, at most 20) and the **held-out** test split that no training or selection step ever sees.
The evaluation images are drawn first and do not depend on K (see :func:`megatron.data.episodes.split_target`);
the validation split is carved out of them, seeded, so every K of one seed is validated and tested on the same
images, and the pool is never touched. In a real few-shot setting the validation images are labelled images
too: count them in what the study needed (the built-in suite's images are free).

``data.split_from: RUN_DIR/run.json`` reuses another run's split exactly, by image id, and refuses with the
missing ids when the data no longer holds them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron.config import ExperimentConfig
from megatron.errors import DataError
from megatron.experiment import build_taskset, load_tasks
from megatron.pluginmanager import PluginManager
from megatron.runtime import distributed as mdist
from megatron.types import Task
from megatron.data.episodes import split_target
from megatron.training.record import load_record

log = logging.getLogger(__name__)

SPLITS = ("pool", "validation", "heldout")


@dataclass
class PreparedData:
    target: Task
    sources: list[Task]
    pool: Task
    validation: Task | None
    heldout: Task

    def split_manifest(self) -> dict[str, list[dict[str, Any]]]:
        """``{"pool": [{"id", "file_name"}, ...], "validation": [...], "heldout": [...]}``: the exact images."""
        def ids(task: Task | None) -> list[dict[str, Any]]:
            return [] if task is None else [{"id": r.image_id, "file_name": r.file_name} for r in task.records]

        return {"pool": ids(self.pool), "validation": ids(self.validation), "heldout": ids(self.heldout)}


def prepare_data(cfg: ExperimentConfig, pm: PluginManager, env: mdist.DistEnv) -> PreparedData:
    """Load the tasks (rank 0 first, so a dataset plugin that builds a cache builds it once) and split the target."""
    if not env.is_main:
        mdist.barrier(env)
    tasks = load_tasks(cfg, pm)
    if env.is_main:
        mdist.barrier(env)
    taskset = build_taskset(cfg, tasks)
    target = taskset.target
    if cfg.data.split_from is not None:
        pool, validation, heldout = split_from_record(target, cfg.data.split_from)
    else:
        pool, validation, heldout = split_target_three(target, cfg.data.shots, cfg.data.eval_images,
                                                       cfg.data.validation_images, cfg.seed)
    return PreparedData(target, list(taskset.sources), pool, validation, heldout)


def auto_validation_images(heldout: int) -> int:
    """``data.validation_images: null``: a quarter of the held-out images, at most 20, none below 20 held out."""
    return min(20, heldout // 4) if heldout >= 20 else 0


def split_target_three(target: Task, shots: int, eval_images: int | None, validation_images: int | None,
                       seed: int) -> tuple[Task, Task | None, Task]:
    """``(pool, validation or None, heldout)``: :func:`~megatron.data.episodes.split_target` for the pool and the
    evaluation images, then ``validation_images`` of those (stratified by findings, seeded) set apart as the
    validation split. The evaluation images do not depend on K, and neither does this carving, so for one seed
    every K is validated and tested on the same images. ``validation_images=None``: see
    :func:`auto_validation_images`."""

    pool, held = split_target(target, shots, eval_images, seed)
    n_val = auto_validation_images(len(held)) if validation_images is None else validation_images
    if not n_val:
        return pool, None, held
    if len(held) - n_val < 1:
        fixes = ([f"lower data.validation_images to at most {len(held) - 1}"] if len(held) > 1 else []) + [
            "raise data.eval_images" if eval_images is not None else "add images to the target",
            "set data.validation_images: 0 (the final model is then reported, without selection)"]
        raise DataError(
            f"target task {target.name!r}: the evaluation images ({len(held)}, data.eval_images) must hold the "
            f"validation split ({n_val}, data.validation_images) and at least one held-out test image; "
            f"fix: {', or '.join(fixes)}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x7A11D])
    records = held.records
    with_f = [i for i, r in enumerate(records) if len(r.boxes)]
    without = [i for i, r in enumerate(records) if not len(r.boxes)]
    n_with = min(len(with_f), max(n_val - len(without), round(n_val * len(with_f) / len(records))))
    chosen = {int(i) for i in rng.permutation(with_f)[:n_with]} | {int(i) for i in rng.permutation(without)[:n_val - n_with]}
    validation = held.subset(sorted(chosen))
    heldout = held.subset([i for i in range(len(records)) if i not in chosen])
    log.info("target %r: validation split of %d images (%d with findings), %d held out", target.name,
             len(validation), n_with, len(heldout))
    return pool, validation, heldout


def read_split_manifest(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The ``split`` section of a run record (``run.json`` or its run directory)."""

    try:
        record = load_record(path)
    except DataError as exc:
        raise DataError(f"data.split_from: {exc}") from None
    split = record.get("split") if isinstance(record, dict) else None
    if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in ("pool", "heldout")):
        raise DataError(f"data.split_from: {path} holds no target split (no 'split' section with 'pool' and 'heldout'); "
                        "it was written by an older megatron or is not a run record")
    return {k: list(split.get(k) or []) for k in SPLITS}


def split_from_record(target: Task, path: str | Path) -> tuple[Task, Task | None, Task]:
    """Rebuild ``(pool, validation, heldout)`` from another run's manifest, by image id (file names checked)."""
    manifest = read_split_manifest(path)
    index = {r.image_id: i for i, r in enumerate(target.records)}
    missing, renamed = [], []
    for part in SPLITS:
        for entry in manifest[part]:
            i = index.get(entry.get("id"))
            if i is None:
                missing.append(entry.get("id"))
            elif entry.get("file_name") not in (None, target.records[i].file_name):
                renamed.append(f"{entry['id']} ({entry['file_name']} then, {target.records[i].file_name} now)")
    if missing or renamed:
        parts = []
        if missing:
            parts.append(f"{len(missing)} image id(s) are not in the target {target.name!r} any more: "
                         f"{', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''}")
        if renamed:
            parts.append(f"{len(renamed)} image(s) changed file: {'; '.join(renamed[:5])}")
        raise DataError(f"data.split_from: {path}: the split cannot be reused: {'; '.join(parts)}. Point data at the "
                        "dataset that run used, or drop --split-from to draw a new split")

    def subset(part: str) -> Task | None:
        return target.subset([index[e["id"]] for e in manifest[part]]) if manifest[part] else None

    pool, heldout = subset("pool"), subset("heldout")
    if pool is None or heldout is None:
        raise DataError(f"data.split_from: {path}: its pool or held-out split is empty")
    return pool, subset("validation"), heldout
