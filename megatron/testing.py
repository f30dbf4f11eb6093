"""Pytest fixtures for megatron and for plugin authors (loaded automatically through the ``pytest11``
entry point once megatron is installed).

- ``megatron_pm``: a fresh plugin manager with the built-ins and installed plugins.
- ``make_plugin_manager``: a factory ``make_plugin_manager(*plugins, builtins=True, autoload=False)`` taking
  extra plugin objects (modules or instances) to register, for testing your plugin in isolation.
"""
from __future__ import annotations

from typing import Any

import pytest

from megatron import get_plugin_manager  # light: the package root imports pluggy only


@pytest.fixture
def megatron_pm():
    return get_plugin_manager()


@pytest.fixture
def make_plugin_manager():
    def make(*plugins: Any, builtins: bool = True, autoload: bool = False):
        extra = [(getattr(p, "__name__", type(p).__name__), p) for p in plugins]
        return get_plugin_manager(builtins=builtins, autoload=autoload, extra=extra)

    return make
