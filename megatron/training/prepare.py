"""Stage "prepare": the task set and the target split, with the exact image ids on record.

The target is split three ways (:func:`split_target_three`): the K-image training **pool**, a **validation**
split the reported ``-best`` model is chosen on (``data.validation_images``; 0 = none, null = a quarter of the
evaluation images, at most 20) and the **held-out** test split that no training or selection step ever sees.
Every part is made of whole patients (the records' groups: :mod:`megatron.data.split` says how the pool of K
images is filled from them). The evaluation images are drawn first and do not depend on K (see
:func:`megatron.data.split.split_target`);
the validation split is carved out of them, seeded, so every K of one seed is validated and tested on the same
images, and the pool is never touched. In a real few-shot setting the validation images are labelled images
too: count them in what the study needed (the built-in suite's images are free).

``data.split_from: RUN_DIR/run.json`` reuses another run's split exactly, by image id, and refuses with the
missing ids when the data no longer holds them, with the ids when an image changed file or patient, and with
the ids (and patients) a split holds in two parts.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron.config import ExperimentConfig
from megatron.errors import DataError
from megatron.experiment import build_taskset, load_tasks
from megatron.pluginmanager import PluginManager
from megatron.runtime import distributed as mdist
from megatron.types import Task
from megatron.data.groups import describe_grouping
from megatron.data.split import carve_validation, refuse_overlaps, split_target
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

    def split_manifest(self) -> dict[str, Any]:
        """``{"pool": [{"id", "file_name", "group"}, ...], "validation": [...], "heldout": [...], "grouping": how,
        "patients": {part: count}}``: the exact images, each with its group (patient; ``image:<id>`` when the
        image is its own), and how the target's images were grouped."""
        def ids(task: Task | None) -> list[dict[str, Any]]:
            return [] if task is None else [{"id": r.image_id, "file_name": r.file_name, "group": r.group_id}
                                            for r in task.records]

        parts = {"pool": self.pool, "validation": self.validation, "heldout": self.heldout}
        return {**{k: ids(t) for k, t in parts.items()}, "grouping": describe_grouping(self.target),
                "patients": {k: len({r.group_id for r in t.records}) if t else 0 for k, t in parts.items()}}


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
    evaluation images, then about ``validation_images`` of those (whole patients, stratified by findings, seeded:
    :func:`~megatron.data.split.carve_validation`) set apart as the validation split. The evaluation images do not depend on K, and neither does this carving, so for one seed
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
    validation, heldout = carve_validation(held, n_val, seed)
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
    refuse_overlaps(manifest, f"data.split_from: {path}")
    index = {r.image_id: i for i, r in enumerate(target.records)}
    missing, renamed, regrouped = [], [], []
    for part in SPLITS:
        for entry in manifest[part]:
            i = index.get(entry.get("id"))
            if i is None:
                missing.append(entry.get("id"))
                continue
            record = target.records[i]
            if entry.get("file_name") not in (None, record.file_name):
                renamed.append(f"{entry['id']} ({entry['file_name']} then, {record.file_name} now)")
            if entry.get("group") not in (None, record.group_id):
                regrouped.append(f"{entry['id']} (patient {entry['group']} then, {record.group_id} now)")
    if missing or renamed or regrouped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} image id(s) are not in the target {target.name!r} any more: "
                         f"{', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''}")
        if renamed:
            parts.append(f"{len(renamed)} image(s) changed file: {'; '.join(renamed[:5])}")
        if regrouped:
            parts.append(f"{len(regrouped)} image(s) changed patient: {'; '.join(regrouped[:5])}")
        raise DataError(f"data.split_from: {path}: the split cannot be reused: {'; '.join(parts)}. Point data at the "
                        "dataset that run used, or drop --split-from to draw a new split")
    # a record written before groups existed: the patients the data names now must not straddle its parts
    refuse_overlaps({part: [{"id": e["id"], "group": target.records[index[e["id"]]].group_id} for e in manifest[part]]
                     for part in SPLITS}, f"data.split_from: {path} (with the target's patients)")

    def subset(part: str) -> Task | None:
        return target.subset([index[e["id"]] for e in manifest[part]]) if manifest[part] else None

    pool, heldout = subset("pool"), subset("heldout")
    if pool is None or heldout is None:
        raise DataError(f"data.split_from: {path}: its pool or held-out split is empty")
    return pool, subset("validation"), heldout
