"""Stage "select" of a run: rank the source tasks by closeness to the target and keep the K closest, with
the configured metric; and the detector feature extractor that ``megatron run --select-sources`` and
``megatron similarity`` share, so both rank sources the same way.

Source choice never sees the test split: the target a run's similarity reads (:func:`selection_target`) holds
only the K-image pool and the validation split (and any unlabelled images of the target passed as ``extra``) —
never a held-out image, labelled or not, so the held-out numbers stay an honest test (no transductive use of
the test images). The run record's ``selection.target_images`` lists which target images the metric read.
"""
from __future__ import annotations

import filecmp
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from megatron.data.folder import read_image_folder
from megatron.data.problems import raise_for_errors
from megatron.errors import DataError
from megatron.types import Batch, ImageRecord, Task
from megatron.experiment import build_detector, head_classes_for
from megatron.runtime.environment import derive_seed
from megatron.similarity.ranking import build_metric, select_sources
from megatron.api.similarity import SimilarityContext

log = logging.getLogger(__name__)


def detector_feature_extractor(cfg, pm, sources: list[Task], device: torch.device):
    """``(make, description)``: ``make()`` builds the configured detector (checkpoint loaded, seeded) and
    returns a function mapping a ``(B, 3, S, S)`` batch to its ``features``."""

    def make():
        torch.manual_seed(derive_seed(cfg.seed, "similarity-features"))
        det = build_detector(cfg, pm, head_classes_for(cfg, sources), checkpoint=cfg.detector.checkpoint)
        det.to(device).eval()

        def embed(images: torch.Tensor) -> torch.Tensor:
            batch = Batch(images=images.to(device), boxes=[], labels=[], meta=[{} for _ in range(len(images))])
            with torch.no_grad():
                return det.features(batch)

        return embed

    weights = f"weights from {cfg.detector.checkpoint}" if cfg.detector.checkpoint else \
        "RANDOM initial weights (no detector.checkpoint): texture statistics only"
    return make, f"{cfg.detector.name} detector features, {weights}"


def similarity_context(cfg, pm, sources: list[Task], device: torch.device) -> SimilarityContext:
    """The context every metric of a run or of ``megatron similarity`` gets: the seed, the device, the input
    size and the configured detector as feature extractor (its head sized for ``sources``)."""
    make, description = detector_feature_extractor(cfg, pm, sources, device)
    return SimilarityContext(seed=cfg.seed, device=device, input_size=cfg.data.input_size,
                             make_feature_extractor=make, feature_extractor_desc=description)


@dataclass
class SelectionTarget:
    """The target as source selection may see it (:func:`selection_target`), and the ids of the images read."""

    task: Task
    offered: dict[str, list]  # part ("pool", "validation", "extra") -> image ids (an extra image: its file path)
    read: list = field(default_factory=list)  # (part, image id or path) in the order the metric loaded them

    def record(self) -> dict[str, Any]:
        """For the run record: which target images similarity was offered and which it read, by part."""
        parts = {part: sorted({i for p, i in self.read if p == part}, key=str) for part in self.offered}
        return {"parts": sorted(k for k, v in self.offered.items() if v),
                "offered": {k: len(v) for k, v in self.offered.items()}, "read": parts}


def unlabelled_target_tasks(folders: Sequence[Path], target_name: str) -> list[Task]:
    """``similarity.unlabelled_target``: each folder's images as a task without boxes (a missing or empty
    folder, or one with unreadable files, is an error naming the key)."""
    tasks = []
    for folder in folders:
        folder = Path(folder).expanduser()
        try:
            task, problems = read_image_folder(folder, f"{target_name} (unlabelled: {folder})",
                                               source=f"similarity.unlabelled_target: {folder}")
            raise_for_errors(problems, str(folder))
        except DataError as exc:
            raise DataError(f"similarity.unlabelled_target: {exc}") from None
        tasks.append(task)
    return tasks


def refuse_heldout_files(extra: Sequence[Task], heldout: Task) -> None:
    """Raise a DataError when an ``extra`` image is a file of the held-out split: the same path, or a copy (the
    same bytes; compared only against held-out files of the same size). Pointing ``similarity.unlabelled_target``
    at the target's own image folder is the mistake this catches."""
    held_paths = {Path(r.path).resolve(): r for r in heldout.records if r.path is not None}
    by_size: dict[int, list[tuple[Path, ImageRecord]]] = defaultdict(list)
    for path, record in held_paths.items():
        if path.is_file():
            by_size[path.stat().st_size].append((path, record))
    clashes = []
    for task in extra:
        for r in task.records:
            if r.path is None:
                continue
            path = Path(r.path).resolve()
            held = held_paths.get(path)
            if held is None and path.is_file():
                held = next((rec for p, rec in by_size.get(path.stat().st_size, ())
                             if filecmp.cmp(p, path, shallow=False)), None)
            if held is not None:
                clashes.append(f"{r.path} (held-out image {held.image_id}, {held.file_name or held.path})")
    if clashes:
        shown = "\n  ".join(clashes[:8]) + (f"\n  ... and {len(clashes) - 8} more" if len(clashes) > 8 else "")
        raise DataError(
            f"similarity.unlabelled_target: {len(clashes)} file(s) are held-out test images of the target "
            f"{heldout.name!r} (source selection never reads the test split, or the held-out numbers stop being a "
            f"test):\n  {shown}\nfix: point similarity.unlabelled_target at target images that are not part of "
            "the target dataset (not its image folder), or remove those files from the folder")


def selection_target(pool: Task, validation: Task | None, heldout: Task, extra: Sequence[Task] = ()) -> SelectionTarget:
    """The target for source selection: the pool's and the validation split's records (and ``extra`` tasks'
    unlabelled images of the target), under the target's name, with a loader that logs every image read and
    refuses any held-out image (a :class:`DataError`: a split that overlaps is a bug, not a choice)."""
    heldout_ids = {r.image_id for r in heldout.records}
    refuse_heldout_files(extra, heldout)
    parts = {"pool": [pool], "validation": [validation] if validation is not None else [], "extra": list(extra)}
    owner: dict[int, tuple[str, Task]] = {}
    records = []
    for part, tasks in parts.items():
        for task in tasks:
            for r in task.records:
                if part != "extra" and r.image_id in heldout_ids:
                    raise DataError(f"source selection: target image {r.image_id} is in the {part} split and the "
                                    "held-out split at once; the split is broken (re-run `megatron run` afresh)")
                owner[id(r)] = (part, task)
                records.append(r)
    def key(part: str, r: ImageRecord):  # an unlabelled image is named by its file: ids restart in each folder
        return str(r.path) if part == "extra" else r.image_id

    view = SelectionTarget(task=pool, offered={p: [key(p, r) for t in ts for r in t.records] for p, ts in parts.items()})

    def load(record):
        part, task = owner[id(record)]
        view.read.append((part, key(part, record)))
        return task.load_image(record)

    view.task = Task(name=pool.name, categories=list(pool.categories), records=records, modality=pool.modality,
                     source=f"{pool.source} (pool + validation: what source selection may read)", image_loader=load,
                     grouping=pool.grouping)
    return view


def select_sources_for_run(cfg, pm, target: SelectionTarget, sources: list[Task], device: torch.device) -> dict[str, Any]:
    """The ``similarity.select_sources`` closest sources under ``similarity.metric``, as the record's
    ``selection`` entry (chosen tasks, every distance, unit, reason, and ``target_images``: which target
    images the metric read — pool and validation only, see :func:`selection_target`)."""

    metric = build_metric(pm, cfg, cfg.similarity.metric, similarity_context(cfg, pm, sources, device))
    selection = select_sources(metric, target.task, sources, cfg.similarity.select_sources)
    log.info("%s", selection.reason)
    return {**selection.to_dict(), "target_images": target.record()}
