"""Dataset similarity: the metric plugin contract (:mod:`.base`), ranking and selection of source tasks
(:mod:`.ranking`) and the pictures (:mod:`.plots`). Plugins import the contract from here."""
from megatron.similarity.base import (
    SimilarityContext, SimilarityMetric, SimilarityOptions, load_image_checked, sample_indices, to_gray_uint8,
)
from megatron.similarity.ranking import (
    SourceSelection, build_metric, metric_name, pairwise_distances, rank_sources, select_sources, summarize_cached,
)

__all__ = [
    "SimilarityContext", "SimilarityMetric", "SimilarityOptions", "SourceSelection", "build_metric",
    "load_image_checked", "metric_name", "pairwise_distances", "rank_sources", "sample_indices", "select_sources",
    "summarize_cached", "to_gray_uint8",
]
