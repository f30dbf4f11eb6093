"""Options shared by commands that read an experiment config."""
from __future__ import annotations

import argparse
from typing import Any

import yaml

from megatron.config import ExperimentConfig, load_config
from megatron.errors import ConfigError


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE", help="experiment YAML (default: the built-in suite and defaults)")
    p.add_argument("--learner", help="learner plugin name (learner.name)")
    p.add_argument("--detector", help="detector plugin name (detector.name)")
    p.add_argument("--checkpoint", help="local checkpoint to start the detector from (detector.checkpoint)")
    p.add_argument("--seed", type=int, help="random seed (seed)")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], help="mixed precision (training.amp)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (training.device)")
    p.add_argument("--out", help="parent folder of run directories (output.dir)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override any config key, e.g. --set training.meta_epochs=2 (value parsed as YAML); repeatable",
    )


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    o: dict[str, Any] = {
        "learner.name": getattr(args, "learner", None),
        "detector.name": getattr(args, "detector", None),
        "detector.checkpoint": getattr(args, "checkpoint", None),
        "seed": getattr(args, "seed", None),
        "training.amp": getattr(args, "amp", None),
        "training.device": getattr(args, "device", None),
        "output.dir": getattr(args, "out", None),
    }
    o.update(parse_set_options(getattr(args, "set", []) or []))
    return o


def parse_set_options(items: list[str]) -> dict[str, Any]:
    """``["a.b=3", "c=x"]`` -> ``{"a.b": 3, "c": "x"}`` (values parsed as YAML, else kept as text)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set training.meta_epochs=2")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def config_from_args(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> ExperimentConfig:
    overrides = overrides_from_args(args)
    overrides.update(extra or {})
    return load_config(getattr(args, "config", None), overrides)
