"""A test plugin for `megatron run` subprocesses (``MEGATRON_PLUGINS=reliability_plugins``): with
``MEGATRON_TEST_START_DELAY_S`` set, ``megatron_run_start`` sleeps that long — the run then holds its run
directory a known while, so a second run started at the same moment surely finds it in use."""
from __future__ import annotations

import os
import time

from megatron import hookimpl


@hookimpl
def megatron_run_start(config, run_dir):
    delay = float(os.environ.get("MEGATRON_TEST_START_DELAY_S", "0") or 0)
    if delay > 0:
        time.sleep(delay)
