"""Dataset similarity in the core: ranking and selection of source tasks (:mod:`.ranking`, :mod:`.selection`)
and the pictures (:mod:`.plots`). The metric plugin contract is :mod:`megatron.api.similarity`."""
import warnings

from megatron.similarity.ranking import (
    SourceSelection, build_metric, metric_name, pairwise_distances, rank_sources, select_sources, summarize_cached,
)

__all__ = [
    "SourceSelection", "build_metric", "metric_name", "pairwise_distances", "rank_sources", "select_sources",
    "summarize_cached",
]

# the contract's names were importable from here before megatron.api existed: keep third-party metrics working
_CONTRACT_NAMES = frozenset({"SimilarityContext", "SimilarityMetric", "SimilarityOptions", "load_image_checked",
                             "sample_indices", "to_gray_uint8"})


def __getattr__(name):
    if name in _CONTRACT_NAMES:
        warnings.warn(f"import {name} from megatron.api (megatron.similarity keeps ranking and selection)",
                      DeprecationWarning, stacklevel=2)
        from megatron import api  # lazy: only the deprecated path needs it

        return getattr(api.similarity, name)
    raise AttributeError(f"module 'megatron.similarity' has no attribute {name!r}")
