"""Options shared by commands that read an experiment config.

Every command that reads an experiment config takes ``--set KEY=VALUE`` and some *dedicated* options that are
short for one config key (``--meta-epochs N`` is ``training.meta_epochs``). They are declared with
:func:`config_option`, which records the key on the option, and combined by :func:`overrides_from_args`:

- defaults < ``--config FILE`` < the command line: an option given on the command line always applies, one
  not given never does (its ``None`` default is "not given", not a value);
- ``--set KEY=null`` sets the key to null (``training.grad_clip=null``: clipping off), even when the YAML
  sets it;
- a dedicated option and ``--set`` for the same key given together is an error (exit 2) naming both, in
  whichever order they come: one value per key, never a silent choice between two;
- every value, from either, is validated by the config's pydantic models (bad value: exit 2, naming the key
  and the option it came from).
"""
from __future__ import annotations

# lazy imports: start-up time (heavy modules are imported inside the command functions; see megatron/commands/__init__.py)

import argparse
from typing import Any

import yaml

from megatron.config import ExperimentConfig, load_config
from megatron.errors import ConfigError

#: the help text's sentence on how the options combine (shown by every command that takes them)
COMBINE_HELP = ("An option given on the command line wins over --config FILE; a dedicated option and --set for "
                "the same key cannot be given together (exit 2); --set KEY=null sets a key to null.")


def config_option(p: argparse.ArgumentParser, *flags: str, key: str, value: Any = None, **kwargs: Any
                  ) -> argparse.Action:
    """Add a dedicated option for the config key ``key``; its help ends with ``(key)``.

    The option's default must mean "not given" (``None``, or ``False`` for ``store_true``). ``value``: for a
    ``store_true`` option, the config value it stands for (``--no-baseline``: ``False``); otherwise the
    parsed value is used.
    """
    if kwargs.get("action") == "store_true":
        kwargs.setdefault("default", False)
    else:
        kwargs.setdefault("default", None)
    help_text = kwargs.pop("help", "")
    action = p.add_argument(*flags, help=f"{help_text} ({key})" if help_text else f"({key})", **kwargs)
    action.config_key = key  # type: ignore[attr-defined]
    action.config_value = value  # type: ignore[attr-defined]
    p.set_defaults(config_parser=p)
    return action


def add_set_option(p: argparse.ArgumentParser, what: str = "any config key") -> None:
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help=f"override {what}, e.g. --set training.meta_epochs=2 (value parsed as YAML; null sets the key to "
             "null); repeatable, the later of two --set for one key wins; not together with the dedicated "
             "option for the same key",
    )


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE", help="experiment YAML (default: the built-in suite and defaults)")
    config_option(p, "--learner", key="learner.name", help="learner plugin name")
    config_option(p, "--detector", key="detector.name", help="detector plugin name")
    config_option(p, "--checkpoint", key="detector.checkpoint", help="local checkpoint to start the detector from")
    config_option(p, "--seed", key="seed", type=int, help="random seed")
    config_option(p, "--amp", key="training.amp", choices=["off", "bf16", "fp16"], help="mixed precision")
    config_option(p, "--device", key="training.device", help="auto | cpu | cuda | cuda:N")
    config_option(p, "--out", key="output.dir", help="parent folder of run directories")
    add_set_option(p)
    p.set_defaults(config_parser=p)


def dedicated_options(args: argparse.Namespace) -> list[tuple[str, str, Any]]:
    """``(flag, key, value)`` of every dedicated config option given on the command line of ``args``."""
    parser = getattr(args, "config_parser", None)
    given = []
    for action in (parser._actions if parser is not None else []):
        key = getattr(action, "config_key", None)
        if key is None or not action.option_strings:
            continue
        value = getattr(args, action.dest, None)
        if isinstance(action, argparse._StoreTrueAction):
            if value:
                given.append((action.option_strings[-1], key, action.config_value))
        elif value is not None:
            given.append((action.option_strings[-1], key, value))
    return given


def overrides_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """``(overrides, origins)``: the config keys the command line sets (``--set`` and dedicated options) and,
    per key, the option it came from (for error messages). A dedicated option and ``--set`` for one key is a
    ConfigError."""
    items = list(getattr(args, "set", None) or [])
    sets = parse_set_options(items)
    origins = {key: f"--set {_set_item(items, key)}" for key in sets}
    overrides: dict[str, Any] = dict(sets)
    for flag, key, value in dedicated_options(args):
        if key in sets:
            raise ConfigError(f"{flag} and --set {_set_item(items, key)} both set {key}; give only one of them")
        overrides[key] = value
        origins[key] = f"{flag} {value}" if not isinstance(value, bool) else flag
    return overrides, origins


def _set_item(items: list[str], key: str) -> str:
    """The last ``--set`` item for ``key`` as typed."""
    for item in reversed(items):
        if item.split("=", 1)[0].strip() == key:
            return item
    return key


def parse_set_options(items: list[str]) -> dict[str, Any]:
    """``["a.b=3", "c=x"]`` -> ``{"a.b": 3, "c": "x"}`` (values parsed as YAML, else kept as text; ``null`` is
    ``None``); the later of two items for one key wins."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")) or " " in key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, "
                              "e.g. --set training.meta_epochs=2")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        out.pop(key, None)  # keep the command line's order: the later item is applied last
        out[key] = parsed
    return out


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The effective config: defaults < ``--config FILE`` < the command line (see the module docstring)."""
    overrides, origins = overrides_from_args(args)
    return load_config(getattr(args, "config", None), overrides, origins=origins)
