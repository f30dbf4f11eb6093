"""megatron: few-shot meta-learning for object detection on medical images."""
import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("megatron")


def get_plugin_manager(**kwargs):
    """A fresh :class:`megatron.pluginmanager.PluginManager` (see there for the arguments)."""
    from megatron.pluginmanager import get_plugin_manager as _get

    return _get(**kwargs)


__all__ = ["hookimpl", "get_plugin_manager", "__version__"]
