"""The plugin contract: the five interfaces a plugin implements, with their options and the helpers a plugin
author calls — nothing else. One module per kind:

=================  ==========================================  ====================================
kind               interface                                   contract page
=================  ==========================================  ====================================
learner            :class:`~megatron.api.learner.MetaLearner`  ``registry_docs/contracts/learner.md``
detector           :class:`~megatron.api.detector.Detector`    ``registry_docs/contracts/detector.md``
dataset            :class:`~megatron.api.dataset.DatasetPlugin`  ``registry_docs/contracts/dataset.md``
similarity metric  :class:`~megatron.api.similarity.SimilarityMetric`  ``registry_docs/contracts/similarity.md``
logger             :class:`~megatron.api.logger.Logger`        ``registry_docs/contracts/logger.md``
=================  ==========================================  ====================================

The data a plugin receives and returns (tasks, records, batches, episodes, detections) is in
:mod:`megatron.types`; the errors it raises in :mod:`megatron.errors`. Every name here is also importable from
``megatron`` itself (``from megatron import MetaLearner``).
"""
from megatron.api.dataset import DatasetOptions, DatasetPlugin, tasks_or_raise
from megatron.api.detector import Detector, DetectorOptions
from megatron.api.learner import (
    BASELINE_LEARNER, LearnerContext, LearnerOptions, MetaLearner, check_finite, iterate_forever, make_optimizer,
    optimizer_step,
)
from megatron.api.logger import Logger, LoggerOptions
from megatron.api.similarity import (
    SimilarityContext, SimilarityMetric, SimilarityOptions, load_image_checked, sample_indices, to_gray_uint8,
)

__all__ = [
    "BASELINE_LEARNER", "DatasetOptions", "DatasetPlugin", "Detector", "DetectorOptions", "LearnerContext",
    "LearnerOptions", "Logger", "LoggerOptions", "MetaLearner", "SimilarityContext", "SimilarityMetric",
    "SimilarityOptions", "check_finite", "iterate_forever", "load_image_checked", "make_optimizer",
    "optimizer_step", "sample_indices", "tasks_or_raise", "to_gray_uint8",
]
