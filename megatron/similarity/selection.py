"""Stage "select" of a run: rank the source tasks by closeness to the target and keep the K closest, with
the configured metric; and the detector feature extractor that ``megatron run --select-sources`` and
``megatron similarity`` share, so both rank sources the same way.

Source choice never sees the test split: the target a run's similarity reads (:func:`selection_target`) holds
only the K-image pool and the validation split (and any unlabelled images of the target passed as ``extra``) —
never a held-out image, labelled or not, so the held-out numbers stay an honest test (no transductive use of
the test images). The run record's ``selection.target_images`` lists which target images the metric read.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from megatron.errors import DataError
from megatron.types import Batch, Task
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
    offered: dict[str, list]  # part ("pool", "validation", "extra") -> image ids
    read: list = field(default_factory=list)  # (part, image id) in the order the metric loaded them

    def record(self) -> dict[str, Any]:
        """For the run record: which target images similarity was offered and which it read, by part."""
        parts = {part: sorted({i for p, i in self.read if p == part}, key=str) for part in self.offered}
        return {"parts": sorted(k for k, v in self.offered.items() if v),
                "offered": {k: len(v) for k, v in self.offered.items()}, "read": parts}


def selection_target(pool: Task, validation: Task | None, heldout: Task, extra: Sequence[Task] = ()) -> SelectionTarget:
    """The target for source selection: the pool's and the validation split's records (and ``extra`` tasks'
    unlabelled images of the target), under the target's name, with a loader that logs every image read and
    refuses any held-out image (a :class:`DataError`: a split that overlaps is a bug, not a choice)."""
    heldout_ids = {r.image_id for r in heldout.records}
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
    view = SelectionTarget(task=pool, offered={p: [r.image_id for t in ts for r in t.records] for p, ts in parts.items()})

    def load(record):
        part, task = owner[id(record)]
        view.read.append((part, record.image_id))
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
