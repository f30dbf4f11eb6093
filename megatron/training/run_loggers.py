"""The run's loggers: the ``loggers:`` config entries validated, instantiated, registered with the plugin manager
for the run's duration and closed afterwards (the :class:`megatron.api.logger.Logger` contract is in the API)."""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import pluggy
from pydantic import ValidationError

from megatron import hookspecs
from megatron.api.logger import Logger, LoggerOptions
from megatron.config import ExperimentConfig, format_validation_error, validate_plugin_options
from megatron.errors import ConfigError, MegatronError, PluginError
from megatron.pluginmanager import PluginManager

log = logging.getLogger(__name__)


# --- config ------------------------------------------------------------------------------------------------

def logger_specs(cfg: Any) -> list[tuple[str, dict[str, Any]]]:
    """``[(name, options), ...]`` of the config's ``loggers:`` list (empty when the config has none)."""
    return [(spec.name, dict(spec.options)) for spec in (getattr(cfg, "loggers", None) or [])]


def with_cli_loggers(cfg: ExperimentConfig, names: Iterable[str] | None) -> ExperimentConfig:
    """``cfg`` with a ``{name: NAME}`` entry appended to ``loggers:`` for every ``--logger NAME`` that the
    config does not switch on already (a configured entry keeps its options)."""
    names = [n for n in (names or []) if n]
    if not names:
        return cfg
    data = cfg.model_dump()
    present = {entry["name"] for entry in data.get("loggers", [])}
    for name in names:
        if name not in present:
            data.setdefault("loggers", []).append({"name": name, "options": {}})
            present.add(name)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:  # pragma: no cover - the names are plain strings
        raise ConfigError(format_validation_error(exc, "--logger")) from None


def validate_loggers(cfg: Any, pm: PluginManager) -> list[tuple[type[Logger], LoggerOptions]]:
    """Every configured logger's class and validated options. An unknown name lists the known loggers (and any
    plugin that failed to load); a bad option names its key path (``loggers.0.options.flush_secs``)."""
    out = []
    register = pm.registers["logger"]
    for i, (name, options) in enumerate(logger_specs(cfg)):
        try:
            cls = register.get(name)
        except KeyError as exc:
            raise ConfigError(f"loggers.{i}.name: {exc}") from None
        out.append((cls, validate_plugin_options(cls, options, f"loggers.{i}.options")))
    return out


# --- the run's loggers -------------------------------------------------------------------------------------

def _describe(pm: PluginManager, cls: type) -> str:
    register = pm.registers["logger"]
    owner = register.owner(cls.PLUGIN_NAME) if cls.PLUGIN_NAME in register else "?"
    info = pm.info.get(owner)
    package = info.package if info else "?"
    return f"logger {cls.PLUGIN_NAME!r} (plugin {owner!r}, package {package})"


@contextlib.contextmanager
def active_loggers(cfg: Any, pm: PluginManager, run_dir: Path, *, enabled: bool = True) -> Iterator[list[Logger]]:
    """Switch on the config's loggers for the body: validate, instantiate with ``run_dir``, register each
    instance with ``pm`` (so the lifecycle hooks reach it), and on exit unregister and :meth:`Logger.close`
    them (in reverse order), also when the body raised.

    ``enabled=False`` (the other ranks of a distributed run) validates the options but starts nothing, so a
    bad option fails on every rank alike. Yields the instances (e.g. for :meth:`Logger.log_scalars`)."""
    specs = validate_loggers(cfg, pm)
    if not enabled or not specs:
        yield []
        return
    started: list[tuple[str, Logger]] = []
    try:
        for i, (cls, options) in enumerate(specs):
            who = _describe(pm, cls)
            try:
                instance = cls(options, Path(run_dir))
            except MegatronError:
                raise
            except Exception as exc:
                raise PluginError(f"loggers.{i}: {who} failed to start: {type(exc).__name__}: {exc}") from exc
            name = f"loggers.{i}.{cls.PLUGIN_NAME}"
            try:
                pm.register(instance, name=name)
            except pluggy.PluginValidationError as exc:
                raise PluginError(f"loggers.{i}: {who} has an invalid hook implementation: "
                                  f"{' '.join(str(exc).split())}; its signatures are on registry_docs/hooks/") from None
            started.append((name, instance))
            try:
                pm.check_pending()
            except pluggy.PluginValidationError:
                unknown = sorted(n for n in dir(instance)
                                 if pm.parse_hookimpl_opts(instance, n) is not None and not hasattr(hookspecs, n))
                raise PluginError(f"loggers.{i}: {who} implements hook(s) megatron does not have: "
                                  f"{', '.join(unknown) or '?'} (misspelt? registry_docs/README.md lists the hooks)") from None
        yield [instance for _, instance in started]
    finally:
        errors = []
        for name, instance in reversed(started):
            if pm.get_plugin(name) is not None:
                pm.unregister(name=name)
            try:
                instance.close()
            except Exception as exc:  # noqa: BLE001 - every logger gets closed; the first error is reported
                log.warning("%s: close failed: %s", type(instance).__name__, exc)
                errors.append(f"{_describe(pm, type(instance))} failed to close: {type(exc).__name__}: {exc}")
        if errors and not _raising():
            raise PluginError("; ".join(errors))


def _raising() -> bool:
    return sys.exc_info()[0] is not None


def log_scalars(loggers: Iterable[Logger], section: str, step: int, scalars: Mapping[str, float]) -> None:
    """:meth:`Logger.log_scalars` on every logger; one that raises is a PluginError naming it."""
    for logger in loggers:
        try:
            logger.log_scalars(section, step, scalars)
        except MegatronError:
            raise
        except Exception as exc:
            raise PluginError(f"logger {logger.PLUGIN_NAME!r} failed in log_scalars: {type(exc).__name__}: {exc}") from exc


def call_logger_hook(pm: PluginManager, loggers: Iterable[Logger], name: str, **kwargs: Any) -> None:
    """Call the lifecycle hook ``name`` on the given logger instances only (not on every plugin): for commands
    that are not a run (``megatron pretrain``) but still report to the loggers the user switched on."""
    wanted = {id(logger) for logger in loggers}
    for impl in reversed(getattr(pm.hook, name).get_hookimpls()):
        if id(impl.plugin) not in wanted:
            continue
        try:
            impl.function(*[kwargs[a] for a in impl.argnames])
        except MegatronError:
            raise
        except Exception as exc:
            raise PluginError(f"logger {impl.plugin.PLUGIN_NAME!r} failed in hook {name}: {type(exc).__name__}: {exc}") from exc
