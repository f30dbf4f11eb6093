"""The interface of similarity-metric plugins, and the ranking/selection of source tasks (core).

A metric turns a task into a summary once (:meth:`SimilarityMetric.summarize`: decoding images, computing
histograms or embeddings) and compares two summaries (:meth:`SimilarityMetric.distance`). Splitting the two
lets the core cache summaries and time decoding and distance separately.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from megatron.types import Task


class SimilarityOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sample_size: int = 50  # images sampled per dataset (the method's choice)


@dataclass
class SimilarityContext:
    """What the core lends a metric: the seed, the device and (for embedding metrics) a way to build a
    feature extractor from the configured detector."""

    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    input_size: int = 256
    # returns a module whose forward maps a (B, 3, S, S) [0, 255] float batch to (B, D) embeddings
    make_feature_extractor: Callable[[], Callable[[torch.Tensor], torch.Tensor]] | None = None


class SimilarityMetric:
    """Abstract similarity metric: smaller distance = more similar; ``distance(a, a) == 0``; symmetric."""

    PLUGIN_NAME: ClassVar[str]
    UNIT: ClassVar[str] = ""  # what a distance of 1 means, for tables and plots
    Options: ClassVar[type[SimilarityOptions]] = SimilarityOptions

    def __init__(self, options: SimilarityOptions | None = None, ctx: SimilarityContext | None = None):
        self.options = options if options is not None else self.Options()
        self.ctx = ctx if ctx is not None else SimilarityContext()

    def summarize(self, task: Task) -> Any:
        raise NotImplementedError

    def distance(self, a: Any, b: Any) -> float:
        raise NotImplementedError
