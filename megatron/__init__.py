"""megatron: few-shot meta-learning for object detection on medical images.

Plugin authors import the contract from here or from :mod:`megatron.api` (``from megatron import hookimpl,
MetaLearner``). The API names are loaded on first use, so ``import megatron`` (and the CLI's start-up) stays
light.
"""
import importlib
import importlib.abc
import importlib.util
import sys
import warnings

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("megatron")


def get_plugin_manager(**kwargs):
    """A fresh :class:`megatron.pluginmanager.PluginManager` (see there for the arguments)."""
    from megatron.pluginmanager import get_plugin_manager as _get  # lazy: keeps `import megatron` light

    return _get(**kwargs)


# the names of megatron.api, importable from the package root
_API_NAMES = frozenset({
    "BASELINE_LEARNER", "DatasetOptions", "DatasetPlugin", "Detector", "DetectorOptions", "LearnerContext",
    "LearnerOptions", "Logger", "LoggerOptions", "MetaLearner", "SimilarityContext", "SimilarityMetric",
    "SimilarityOptions", "check_finite", "iterate_forever", "load_image_checked", "make_optimizer",
    "optimizer_step", "sample_indices", "tasks_or_raise", "to_gray_uint8",
})


def __getattr__(name):
    if name in _API_NAMES:
        return getattr(importlib.import_module("megatron.api"), name)
    raise AttributeError(f"module 'megatron' has no attribute {name!r}")


# modules that moved in 0.1 (the interfaces into megatron.api): a third-party plugin written against the old
# paths keeps working, with a DeprecationWarning naming the new one
MOVED_MODULES = {
    "megatron.learner": "megatron.api.learner",
    "megatron.detector": "megatron.api.detector",
    "megatron.datasets": "megatron.api.dataset",
    "megatron.loggers": "megatron.api.logger",
    "megatron.similarity.base": "megatron.api.similarity",
    "megatron.checkpoint": "megatron.atomic_io",
    "megatron.training.distributed": "megatron.runtime.distributed",
    "megatron.training.environment": "megatron.runtime.environment",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return None  # a placeholder: exec_module puts the moved module in its place

    def exec_module(self, module):
        new = MOVED_MODULES[module.__name__]
        warnings.warn(f"{module.__name__} moved to {new}; import it from there (or from megatron.api)",
                      DeprecationWarning, stacklevel=2)
        # the import system returns what sys.modules holds after exec_module: the moved module itself
        sys.modules[module.__name__] = importlib.import_module(new)


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())

__all__ = ["hookimpl", "get_plugin_manager", "__version__", *sorted(_API_NAMES)]
