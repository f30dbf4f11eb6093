"""``medsynth``: the built-in SYNTHETIC medical detection suite (six source modalities + an EIT-like target).

Generated offline and deterministically from a seed by :mod:`megatron_plugins.datasets.medsynth_scenes`,
written once per task as a COCO folder (PNG images + ``annotations.json``) under ``cache_dir`` and loaded back
through the core COCO reader, exactly as a user's own COCO data would be.

Machine-readable design facts for similarity tests (see the registry page for the reasons):

- :data:`MEDSYNTH_FAMILIES`: groups of tasks generated to look alike (shared anatomy generator, noise model,
  intensity histogram and lesion appearance).
- :data:`MEDSYNTH_TARGET_NEIGHBOURS`: for the target, the sources generated to resemble it, nearest first.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from pydantic import Field, field_validator

from megatron import hookimpl
from megatron.data.coco import ANNOTATION_FILE, IMAGE_FOLDER, read_coco_task, write_coco_task
from megatron.data.problems import raise_for_errors
from megatron.api.dataset import DatasetOptions, DatasetPlugin
from megatron.errors import DataError
from megatron.types import ImageRecord, Task
from megatron_plugins.datasets.medsynth_scenes import (GENERATOR_VERSION, LESION_SWAP_RULES, LESION_SWAP_TARGET,
                                                       TASK_SPECS, render)

log = logging.getLogger(__name__)

MEDSYNTH_TARGET = "eit"
MEDSYNTH_SOURCES: tuple[str, ...] = ("mammography", "chest_xray", "pneumonia_xray", "brain_mri", "breast_mri",
                                     "breast_ultrasound")
MEDSYNTH_TASKS: tuple[str, ...] = (*MEDSYNTH_SOURCES, MEDSYNTH_TARGET)
#: the lesion-swap family (the meta-learning positive control): loaded only when named in the option `tasks`
MEDSYNTH_SWAP_TASKS: tuple[str, ...] = tuple(LESION_SWAP_RULES)
#: tasks whose image count is the option `target_images`
MEDSYNTH_TARGETS: tuple[str, ...] = (MEDSYNTH_TARGET, LESION_SWAP_TARGET)
#: tasks generated to be alike; a similarity metric should rank a task's family member nearest among sources
MEDSYNTH_FAMILIES: dict[str, tuple[str, ...]] = {
    "xray": ("chest_xray", "pneumonia_xray"),
    "mri": ("brain_mri", "breast_mri"),
}
#: the sources generated to resemble the target most, nearest first (smooth, low-contrast blob-like lesions
#: on a mid-grey histogram)
MEDSYNTH_TARGET_NEIGHBOURS: dict[str, tuple[str, ...]] = {"eit": ("pneumonia_xray", "chest_xray")}

DEFAULT_CACHE = Path("~/.cache/megatron/medsynth")


class MedSynthDataset(DatasetPlugin):
    """The built-in synthetic suite: one detection task per modality, generated once and cached as COCO.

    Example (config; this is also the default when no dataset is configured)::

        data:
          datasets:
            - plugin: medsynth
              options: {seed: 0, images_per_task: 120, target_images: 100}
          target: eit
    """

    PLUGIN_NAME = "medsynth"
    FAMILIES = MEDSYNTH_FAMILIES
    TARGET_NEIGHBOURS = MEDSYNTH_TARGET_NEIGHBOURS

    class Options(DatasetOptions):
        seed: int = Field(0, description="generator seed: the same seed gives the same images, byte for byte")
        images_per_task: int = Field(120, ge=1, description="images per source task")
        target_images: int = Field(100, ge=1, description="images of the `eit` target task (K-shot pool + held-out split)")
        image_size: int = Field(256, ge=64, le=2048, description="native (square) image size in pixels")
        tasks: list[str] | None = Field(None, description=f"subset of tasks to load (default: the suite: {', '.join(MEDSYNTH_TASKS)}; "
                                        f"the lesion-swap family {', '.join(MEDSYNTH_SWAP_TASKS)} only when named here)")
        cache_dir: Path | None = Field(None, description="where generated COCO folders are cached "
                                       f"(default {DEFAULT_CACHE}; one sub-folder per task and option hash)")

        @field_validator("tasks")
        @classmethod
        def _known_tasks(cls, value: list[str] | None) -> list[str] | None:
            if value is not None:
                unknown = [t for t in value if t not in (*MEDSYNTH_TASKS, *MEDSYNTH_SWAP_TASKS)]
                if unknown:
                    raise ValueError(f"unknown task(s) {unknown}; choose from {[*MEDSYNTH_TASKS, *MEDSYNTH_SWAP_TASKS]}")
                if len(set(value)) != len(value) or not value:
                    raise ValueError("tasks must be a non-empty list without repeats")
            return value


    def task_names(self) -> list[str]:
        chosen = self.options.tasks
        if chosen is None:
            return list(MEDSYNTH_TASKS)
        return [t for t in (*MEDSYNTH_TASKS, *MEDSYNTH_SWAP_TASKS) if t in chosen]

    def n_images(self, task: str) -> int:
        return self.options.target_images if task in MEDSYNTH_TARGETS else self.options.images_per_task

    def cache_root(self) -> Path:
        return Path(self.options.cache_dir or DEFAULT_CACHE).expanduser()

    def task_folder(self, task: str) -> Path:
        """The cache folder of ``task``: keyed by the options that change its images and the generator version."""
        key = json.dumps({"task": task, "seed": self.options.seed, "images": self.n_images(task),
                          "size": self.options.image_size, "version": GENERATOR_VERSION}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return self.cache_root() / f"{task}-v{GENERATOR_VERSION}-{digest}"

    def ensure_generated(self, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Path]:
        """Generate every missing task folder (atomically); returns task -> folder."""
        folders = {}
        for task in self.task_names():
            folder = self.task_folder(task)
            if not (folder / ANNOTATION_FILE).is_file():
                generate_task_folder(task, folder, seed=self.options.seed, n_images=self.n_images(task),
                                     size=self.options.image_size, progress=progress)
            folders[task] = folder
        return folders

    def load(self) -> list[Task]:
        tasks = []
        progress_cb, finish_cb = _rich_progress()
        try:
            folders = self.ensure_generated(progress_cb)
        finally:
            finish_cb()
        for name, folder in folders.items():
            task, problems = read_coco_task(folder / ANNOTATION_FILE, folder / IMAGE_FOLDER, name=name,
                                            modality=TASK_SPECS[name].modality, source=f"medsynth:{folder}")
            raise_for_errors(problems, str(folder / ANNOTATION_FILE))
            if task.categories != TASK_SPECS[name].classes or len(task) != self.n_images(name):
                raise DataError(f"medsynth cache {folder} does not match the generator (categories/image count); "
                                "fix: delete that folder and load again")
            tasks.append(task)
        return tasks


def generate_task(task: str, seed: int, n_images: int, size: int,
                  progress: Callable[[str, int, int], None] | None = None) -> tuple[Task, dict[int, np.ndarray]]:
    """Render ``task`` in memory: the task (image_loader serves the arrays) and the arrays by image id."""
    spec = TASK_SPECS[task]
    arrays: dict[int, np.ndarray] = {}
    records = []
    for i in range(n_images):
        image, boxes, labels = render(task, seed, i, size)
        image_id = i + 1
        arrays[image_id] = image
        records.append(ImageRecord(image_id=image_id, path=None, width=size, height=size, boxes=boxes,
                                   labels=labels, file_name=f"{task}_{image_id:04d}.png"))
        if progress:
            progress(task, i + 1, n_images)
    result = Task(name=task, categories=list(spec.classes), records=records, modality=spec.modality,
                  source=f"medsynth:seed={seed}", image_loader=lambda r: arrays[r.image_id])
    return result, arrays


def generate_task_folder(task: str, folder: Path, seed: int, n_images: int, size: int,
                         progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Write ``task`` as a COCO folder at ``folder``: generated in a temp folder beside it and renamed into
    place, so an interrupted generation never leaves a half-written cache."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        t0 = time.perf_counter()
        generated, _ = generate_task(task, seed, n_images, size, progress)
        write_coco_task(generated, tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / ANNOTATION_FILE).is_file():  # not another process winning the race: a real error
                raise
        log.info("medsynth: generated %s (%d images) in %.1f s -> %s", task, n_images, time.perf_counter() - t0, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _rich_progress() -> tuple[Callable[[str, int, int], None], Callable[[], None]]:
    """A rich progress bar shown only while something is generated (first use of a cache)."""
    state: dict = {}

    def update(task: str, done: int, total: int) -> None:
        if "progress" not in state:
            from rich.console import Console
            from rich.errors import LiveError
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            # stderr: commands that print JSON on stdout may load the suite
            progress = Progress(TextColumn("medsynth {task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), transient=True, console=Console(stderr=True))
            try:
                progress.start()
            except LiveError:  # a caller's live display is already running: log progress instead
                progress = None
            state["progress"], state["ids"] = progress, {}
        p = state["progress"]
        if p is None:
            if done == total:
                log.info("medsynth: generated %s (%d images)", task, total)
            return
        if task not in state["ids"]:
            state["ids"][task] = p.add_task(task, total=total)
        p.update(state["ids"][task], completed=done)

    def finish() -> None:
        if state.get("progress") is not None:
            state["progress"].stop()

    return update, finish


@hookimpl
def megatron_register_datasets() -> list[type]:
    return [MedSynthDataset]
