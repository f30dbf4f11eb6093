"""A tiny experiment for runner tests: the tiny detector on blobs, one config helper and one plugin manager."""
from __future__ import annotations

from pathlib import Path

import learners_for_tests
import tiny_detector

import megatron
from megatron import hookimpl
from megatron.config import load_config


def tiny_config(tmp_path: Path, **overrides):
    base = {
        "data.datasets": [{"plugin": "blobs", "options": {"images_per_task": 16}}], "data.target": "target",
        "data.shots": 8, "data.eval_images": 8,
        "data.input_size": 64, "detector.name": "tiny", "learner.name": "joint_test",
        "training.meta_epochs": 3, "training.finetune_epochs": 1, "training.outer_lr": 0.01,
        "training.finetune_lr": 0.003, "output.dir": str(tmp_path / "runs"), "output.compare_baseline": False,
        "output.plots": False, "training.pretrain_epochs": 0, "data.cache_dir": str(tmp_path / "cache"),
    }
    base.update(overrides)
    return load_config(None, base)


def make_pm(*plugins):
    extra = [("tiny_detector", tiny_detector), ("learners_for_tests", learners_for_tests)]
    extra += [(type(p).__name__, p) for p in plugins]
    return megatron.get_plugin_manager(autoload=False, extra=extra)


class KillAt:
    """Simulates a kill (Ctrl-C) at a given outer step."""

    def __init__(self, meta_epoch: int, step: int):
        self.at = (meta_epoch, step)

    @hookimpl
    def megatron_meta_step_end(self, learner, meta_epoch, step, stats):
        if (meta_epoch, step) == self.at:
            raise KeyboardInterrupt
