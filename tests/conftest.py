import os

import pytest

# tests must not pick up plugins installed in the developer's environment unless they ask for them
os.environ.setdefault("MEGATRON_DISABLE_PLUGIN_AUTOLOAD", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _torch_threads():
    """One torch thread for every test (restored after): the models are small, and a second thread only
    contends with the other core's work when CI shares cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_plugins(monkeypatch):
    """Built-ins plus the tiny detector and the blobs dataset (``tests/tiny_detector.py``) in every plugin manager
    the code under test makes — the CLI builds its own, so ``megatron.get_plugin_manager`` is wrapped. Wide
    terminal, so rich does not wrap the tables the tests read."""
    import megatron
    import tiny_detector

    real = megatron.get_plugin_manager

    def with_tiny(**kwargs):
        kwargs.setdefault("autoload", False)
        return real(extra=[("tiny_detector", tiny_detector)], **{k: v for k, v in kwargs.items() if k != "extra"})

    monkeypatch.setattr(megatron, "get_plugin_manager", with_tiny)
    monkeypatch.setenv("COLUMNS", "160")

