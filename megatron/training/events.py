"""Lifecycle events: the runner emits them, plugins (the built-in recorder and progress bars among them) react.

In a distributed run only rank 0 emits (:class:`Events` built with ``enabled=False`` elsewhere), so every
writing side job — the record, checkpoints' announcements, loggers — happens once, without ``if is_main``
in the loop.
"""
from __future__ import annotations

from typing import Any

from megatron.errors import MegatronError, PluginError
from megatron.pluginmanager import PluginManager


def call_hook(pm: PluginManager, name: str, **kwargs: Any) -> None:
    """Call every implementation of the lifecycle hook ``name``; one that raises becomes a PluginError
    naming its plugin (KeyboardInterrupt and friends pass through untouched)."""
    caller = getattr(pm.hook, name)
    for impl in reversed(caller.get_hookimpls()):  # pluggy's order: last registered first
        if impl.hookwrapper or getattr(impl, "wrapper", False):
            continue
        try:
            impl.function(*[kwargs[a] for a in impl.argnames])
        except MegatronError as exc:
            raise PluginError(f"plugin {impl.plugin_name!r} failed in hook {name}: {exc}") from exc
        except Exception as exc:
            raise PluginError(
                f"plugin {impl.plugin_name!r} failed in hook {name}: {type(exc).__name__}: {exc}. "
                f"Fix the plugin or block it with MEGATRON_BLOCK_PLUGINS={impl.plugin_name}."
            ) from exc


class Events:
    """Emits lifecycle hooks to the plugin manager's plugins; does nothing when not ``enabled`` (ranks > 0)."""

    def __init__(self, pm: PluginManager, enabled: bool = True):
        self.pm = pm
        self.enabled = enabled

    def emit(self, name: str, **kwargs: Any) -> None:
        if self.enabled:
            call_hook(self.pm, name, **kwargs)

    def stage_start(self, stage: str, **info: Any) -> None:
        self.emit("megatron_stage_start", stage=stage, info=info)

    def stage_end(self, stage: str, **info: Any) -> None:
        self.emit("megatron_stage_end", stage=stage, info=info)
