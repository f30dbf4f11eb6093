"""Stage "select" of a run: rank the source tasks by closeness to the target and keep the K closest, with
the configured metric; and the detector feature extractor that ``megatron run --select-sources`` and
``megatron similarity`` share, so both rank sources the same way."""
from __future__ import annotations

import logging
from typing import Any

import torch

from megatron.types import Batch, Task
from megatron.experiment import build_detector
from megatron.runtime.environment import derive_seed
from megatron.training.meta_train import head_classes_for
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


def select_sources_for_run(cfg, pm, target: Task, sources: list[Task], device: torch.device) -> dict[str, Any]:
    """The ``similarity.select_sources`` closest sources under ``similarity.metric``, as the record's
    ``selection`` entry (chosen tasks, every distance, unit, reason)."""

    make, description = detector_feature_extractor(cfg, pm, sources, device)
    ctx = SimilarityContext(seed=cfg.seed, device=device, input_size=cfg.data.input_size,
                            make_feature_extractor=make, feature_extractor_desc=description)
    metric = build_metric(pm, cfg, cfg.similarity.metric, ctx)
    selection = select_sources(metric, target, sources, cfg.similarity.select_sources)
    log.info("%s", selection.reason)
    return selection.to_dict()
