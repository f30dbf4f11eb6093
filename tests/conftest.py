import os

import pytest

# tests must not pick up plugins installed in the developer's environment unless they ask for them
os.environ.setdefault("MEGATRON_DISABLE_PLUGIN_AUTOLOAD", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(1)  # tests are small; one thread avoids oversubscription when CI shares cores
    yield
