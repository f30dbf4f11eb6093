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
