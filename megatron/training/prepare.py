"""Stage "prepare": the task set and the target split, with the exact image ids on record.

The target is split three ways (:func:`split_target_three`): the K-image training **pool**, a **validation**
split the reported ``-best`` model is chosen on (``data.validation_images``; 0 = none) and the **held-out**
test split that no training or selection step ever sees. The held-out split is drawn first and does not
depend on K (see :func:`megatron.data.episodes.split_target`); validation is carved out of the images left
outside it, so adding a validation split never changes the pool or the held-out images.

``data.split_from: RUN_DIR/run.json`` reuses another run's split exactly, by image id, and refuses with the
missing ids when the data no longer holds them.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron.config import ExperimentConfig
from megatron.errors import DataError
from megatron.experiment import build_taskset, load_tasks
from megatron.pluginmanager import PluginManager
from megatron.training import distributed as mdist
from megatron.types import Task

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


def split_target_three(target: Task, shots: int, eval_images: int | None, validation_images: int,
                       seed: int) -> tuple[Task, Task | None, Task]:
    """``(pool, validation or None, heldout)``: :func:`~megatron.data.episodes.split_target` for the pool and
    the held-out split, then ``validation_images`` drawn (stratified by findings, seeded) from the images that
    are in neither."""
    from megatron.data.episodes import split_target

    pool, heldout = split_target(target, shots, eval_images, seed)
    if not validation_images:
        return pool, None, heldout
    used = {r.image_id for r in pool.records} | {r.image_id for r in heldout.records}
    free = [i for i, r in enumerate(target.records) if r.image_id not in used]
    if eval_images is None and len(free) < validation_images:
        # the default held-out split takes every image outside the K-reserve: validation comes out of it instead
        pool, heldout = split_target(target, shots, max(1, len(heldout) - validation_images), seed)
        used = {r.image_id for r in pool.records} | {r.image_id for r in heldout.records}
        free = [i for i, r in enumerate(target.records) if r.image_id not in used]
    if len(free) < validation_images:
        fixes = ([f"lower data.validation_images to at most {len(free)}"] if free else []) + (
            ["lower data.eval_images"] if eval_images is not None else []) + [
            "set data.validation_images: 0 (the final model is then reported, without selection)",
            f"add {validation_images - len(free)} image(s) to the target"]
        raise DataError(
            f"target task {target.name!r} has {len(target)} images: the pool (K={shots}, data.shots) and the held-out "
            f"split ({len(heldout)}, data.eval_images) leave {len(free)} for a validation split of {validation_images} "
            f"(data.validation_images); fix: {', or '.join(fixes)}"
        )
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x7A11D])
    with_f = [i for i in free if len(target.records[i].boxes)]
    without = [i for i in free if not len(target.records[i].boxes)]
    n_with = min(len(with_f), max(validation_images - len(without), round(validation_images * len(with_f) / len(free))))
    chosen = list(rng.permutation(with_f)[:n_with]) + list(rng.permutation(without)[:validation_images - n_with])
    validation = target.subset(sorted(int(i) for i in chosen))
    log.info("target %r: validation split of %d images (%d with findings)", target.name, len(validation), n_with)
    return pool, validation, heldout


def read_split_manifest(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The ``split`` section of a run record (``run.json`` or its run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "run.json"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"data.split_from: {path} does not exist; give the run.json of the run whose split to reuse") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"data.split_from: {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
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
