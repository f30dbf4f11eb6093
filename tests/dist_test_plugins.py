"""Test plugins for distributed `megatron run` subprocesses (loaded with ``MEGATRON_PLUGINS=dist_test_plugins``).

``faulty_reptile``: Reptile that kills its own process (``os._exit``, as a crash or a lost machine would) when
the environment says so — ``MEGATRON_TEST_DIE_RANK`` (the rank that dies) and ``MEGATRON_TEST_DIE_AT_STEP``
(the outer step, counted over the whole run, before which it dies). Fault injection lives in the environment,
not the config, so the resumed run has exactly the config of the run that died.
"""
from __future__ import annotations

import os

from megatron import hookimpl
from megatron_plugins.learners.reptile import Reptile


class FaultyReptile(Reptile):
    PLUGIN_NAME = "faulty_reptile"

    def meta_step(self, episodes):
        die_rank = os.environ.get("MEGATRON_TEST_DIE_RANK")
        if die_rank is not None and os.environ.get("RANK") == die_rank \
                and self.steps_done == int(os.environ.get("MEGATRON_TEST_DIE_AT_STEP", "0")):
            os._exit(17)
        return super().meta_step(episodes)


@hookimpl
def megatron_register_learners():
    return [FaultyReptile]
