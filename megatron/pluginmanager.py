"""The plugin manager: built-ins and third-party plugins through one door.

Built-in plugins (the modules listed in :data:`BUILTIN_PLUGINS`) are registered with the same
``pm.register(module, name)`` call as third-party ones, which come from the entry-point group ``megatron``.

Environment:
- ``MEGATRON_DISABLE_PLUGIN_AUTOLOAD=1`` skips the entry-point group (built-ins are still registered).
- ``MEGATRON_BLOCK_PLUGINS=name1,name2`` blocks plugins by name (built-in or third-party).
- ``MEGATRON_PLUGINS=module1,module2`` imports these modules and registers each as a plugin named by the
  module's last component (pytest's ``-p`` analogue): plugins that are not installed packages — a module
  on ``PYTHONPATH``, test plugins — reach every process of a distributed run this way. A module that
  cannot be imported is a :class:`PluginError` (it was asked for by name).

A plugin that fails to import, fails hook validation (a hook implementation with an argument its hookspec
does not have) or whose registration hook raises is recorded in :attr:`PluginManager.failures` (name, package,
what failed, one-line reason). :func:`get_plugin_manager` then raises a :class:`PluginError` listing every
failure with its fix (``strict=True``, the default: every command that uses plugins stops before any work);
``megatron plugins`` asks for ``strict=False`` and lists the failures instead.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable

import pluggy

from megatron import hookspecs
from megatron.api.dataset import DatasetPlugin
from megatron.api.detector import Detector
from megatron.errors import DuplicateNameError, PluginError, UnknownNameError
from megatron.api.learner import MetaLearner
from megatron.api.logger import Logger
from megatron.registry import MissingMethodError, Register
from megatron.api.similarity import SimilarityMetric
from megatron import __version__

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "megatron"
ENV_DISABLE_AUTOLOAD = "MEGATRON_DISABLE_PLUGIN_AUTOLOAD"
ENV_BLOCK = "MEGATRON_BLOCK_PLUGINS"
ENV_PLUGINS = "MEGATRON_PLUGINS"

BUILTIN_PLUGINS: tuple[str, ...] = (
    "megatron_plugins.datasets.coco",
    "megatron_plugins.datasets.yolo",
    "megatron_plugins.datasets.medsynth",
    "megatron_plugins.datasets.dicom", "megatron_plugins.datasets.folder",
    "megatron_plugins.datasets.volume", "megatron_plugins.datasets.masks",
    "megatron_plugins.detectors.yolox",
    "megatron_plugins.detectors.faster_rcnn",
    "megatron_plugins.detectors.retinanet",
    "megatron_plugins.detectors.mmdet",
    "megatron_plugins.learners.maml",
    "megatron_plugins.learners.reptile",
    "megatron_plugins.learners.anil",
    "megatron_plugins.learners.proto",
    "megatron_plugins.learners.finetune",
    "megatron_plugins.learners.incremental",
    "megatron_plugins.learners.merge",
    "megatron_plugins.similarity.wasserstein",
    "megatron_plugins.similarity.embedding",
    "megatron_plugins.similarity.label_aware",
    "megatron_plugins.loggers.tensorboard",
    "megatron_plugins.loggers.csv",
    "megatron_plugins.loggers.mlflow",  # imports mlflow only when a run switches it on (megatron[mlflow])
)

# kind -> (registration hook, base class)
KINDS: dict[str, tuple[str, type]] = {
    "dataset": ("megatron_register_datasets", DatasetPlugin),
    "detector": ("megatron_register_detectors", Detector),
    "learner": ("megatron_register_learners", MetaLearner),
    "similarity": ("megatron_register_similarity_metrics", SimilarityMetric),
    "logger": ("megatron_register_loggers", Logger),
}

#: kind -> the methods every plugin class of that kind must define (checked when it registers: a misspelt
#: ``meta_stpe`` fails at start-up naming plugin, package and method, not after data loading and stage 1)
REQUIRED_METHODS: dict[str, tuple[str, ...]] = {
    "dataset": ("load",), "detector": ("loss", "predict"), "learner": ("meta_step",),
    "similarity": ("summarize", "distance"), "logger": (),
}

#: kind -> the folder its built-ins live in, under ``plugins/`` and under ``registry_docs/plugins/``
KIND_FOLDERS: dict[str, str] = {"dataset": "datasets", "detector": "detectors", "learner": "learners",
                                "similarity": "similarity", "logger": "loggers"}

#: what a failure happened in, as the messages say it
_STAGES = {"import": "failed to import", "hooks": "has an invalid hook implementation",
           "registration": "failed in its registration hook", "contract": "registers a class that breaks its contract"}


@dataclass(frozen=True)
class PluginFailure:
    plugin: str
    package: str
    reason: str  # one line
    stage: str = "import"  # import | hooks | registration
    hook: str | None = None  # the hook involved (hook validation, registration)

    def __str__(self) -> str:
        what = _STAGES.get(self.stage, "failed")
        hook = f" ({self.hook})" if self.hook and self.hook not in self.reason else ""
        return f"plugin {self.plugin!r} (package {self.package}) {what}{hook}: {self.reason}"

    @property
    def fix(self) -> str:
        how = {
            "import": "fix or reinstall the package",
            "hooks": "correct the hook implementation (" + (
                f"its signature is on registry_docs/hooks/{self.hook}.md" if self.hook and hasattr(hookspecs, self.hook)
                else "registry_docs/README.md lists every hook") + ")",
            "registration": "fix the plugin's registration hook",
            "contract": "define the missing method(s) in that class (spelt as the contract page says)",
        }.get(self.stage, "fix the plugin")
        uninstall = f", or `pip uninstall {self.package}`" if self.package not in ("?", "megatron") else ""
        return (f"{how}, or run without the plugin: MEGATRON_BLOCK_PLUGINS={self.plugin} "
                f"(like pytest's -p no:{self.plugin}){uninstall}")


@dataclass(frozen=True)
class PluginInfo:
    name: str
    package: str
    version: str
    builtin: bool


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, PluginError) else text


def _validation_reason(pm: pluggy.PluginManager, plugin: Any, exc: pluggy.PluginValidationError) -> tuple[str, str | None]:
    """A one-line reason for a hook implementation pluggy rejected, naming the hook and the arguments."""
    import inspect

    for attr in dir(plugin):
        if not attr.startswith("megatron_"):
            continue
        spec = getattr(hookspecs, attr, None)
        impl = getattr(plugin, attr, None)
        if spec is None or not callable(impl):
            continue
        try:
            wanted = list(inspect.signature(spec).parameters)
            given = [a for a in inspect.signature(impl).parameters if a not in ("self", "cls")]
        except (TypeError, ValueError):
            continue
        extra = [a for a in given if a not in wanted]
        if extra:
            args = ", ".join(repr(a) for a in extra)
            return (f"hook {attr}: argument(s) {args} not in the hook's signature "
                    f"{attr}({', '.join(wanted)}); misspelt?", attr)
    return _one_line(exc), None


def _megatron_version() -> str:
    return __version__


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus megatron's typed registers and failure reporting."""

    def __init__(self) -> None:
        super().__init__("megatron")
        self.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self.info: dict[str, PluginInfo] = {}
        self._registers: dict[str, Register] | None = None

    # --- loading -------------------------------------------------------------------------------
    def register_plugin(self, plugin: Any, name: str, package: str, version: str, builtin: bool = False) -> bool:
        """Register ``plugin`` under ``name``; a validation error is recorded as a failure, not raised."""
        if self.is_blocked(name):
            return False
        try:
            self.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            reason, hook = _validation_reason(self, plugin, exc)
            self._record(PluginFailure(name, package, reason, "hooks", hook))
            return False
        except ValueError as exc:  # a name or object registered twice
            self._fail(name, package, exc, "registration")
            return False
        self.info[name] = PluginInfo(name, package, version, builtin)
        self._registers = None
        return True

    def load_builtins(self, modules: Iterable[str] = BUILTIN_PLUGINS) -> None:
        version = _megatron_version()
        for modname in modules:
            name = modname.rsplit(".", 1)[-1]
            if self.is_blocked(name):
                continue
            try:
                module = importlib.import_module(modname)
            except Exception as exc:  # a broken built-in must not take the others down
                self._fail(name, "megatron", exc)
                continue
            self.register_plugin(module, name, "megatron", version, builtin=True)

    def load_entrypoints(self, group: str = ENTRY_POINT_GROUP) -> None:
        for dist in md.distributions():
            for ep in dist.entry_points:
                if ep.group != group or self.is_blocked(ep.name) or self.has_plugin(ep.name):
                    continue
                package = dist.metadata["name"] or "?"
                try:
                    plugin = ep.load()
                except Exception as exc:
                    self._fail(ep.name, package, exc)
                    continue
                self.register_plugin(plugin, ep.name, package, dist.version)

    def check(self) -> None:
        """``check_pending()``: a hook implementation whose name no hookspec has (a misspelt hook) is recorded as
        a failure of its plugin, and the plugin is unregistered (so none of its hooks half-work)."""
        while True:
            try:
                self.check_pending()
                return
            except pluggy.PluginValidationError as exc:
                plugin_name = self.get_name(exc.plugin) or "?"
                package = self.info.get(plugin_name, PluginInfo(plugin_name, "?", "?", False)).package
                unknown = sorted(
                    name for name in dir(exc.plugin)
                    if self.parse_hookimpl_opts(exc.plugin, name) is not None and not hasattr(hookspecs, name)
                )
                reason = (f"implements hook(s) megatron does not have: {', '.join(unknown)} (misspelt? the hooks are "
                          "listed in registry_docs/README.md)") if unknown else _one_line(exc)
                self._record(PluginFailure(plugin_name, package, reason, "hooks", unknown[0] if unknown else None))
                self.unregister(exc.plugin)
                self.info.pop(plugin_name, None)
                self._registers = None

    def is_blocked(self, name: str) -> bool:
        blocked = {n.strip() for n in os.environ.get(ENV_BLOCK, "").split(",") if n.strip()}
        return name in blocked or super().is_blocked(name)

    def _fail(self, name: str, package: str, exc: BaseException, stage: str = "import", hook: str | None = None) -> None:
        self._record(PluginFailure(name, package, _one_line(exc), stage, hook))

    def _record(self, failure: PluginFailure) -> None:
        if failure in self.failures:  # registers are collected again after a late registration: report once
            return
        self.failures.append(failure)
        log.debug("%s", failure)  # the CLI prints failures (once); library code only logs

    def raise_on_failures(self) -> None:
        """Collect the registers (registration hooks run now) and raise one :class:`PluginError` listing every
        plugin that failed to load, with its package, what failed and the fix. Nothing when all loaded."""
        self.registers  # noqa: B018 - registration hooks run here; their failures are recorded
        if not self.failures:
            return
        lines = [f"{len(self.failures)} plugin(s) failed to load; megatron stops before doing any work:"]
        for f in self.failures:
            lines.append(f"  - {f}")
            lines.append(f"    fix: {f.fix}")
        raise PluginError("\n".join(lines))

    def failure_note(self) -> str:
        """``"; plugins that failed to load: 'a' (package p): reason"`` or ``""``: for unknown-name errors."""
        if not self.failures:
            return ""
        return "; plugins that failed to load: " + "; ".join(str(f) for f in self.failures)

    # --- registers ----------------------------------------------------------------------------
    @property
    def registers(self) -> dict[str, Register]:
        if self._registers is None:
            self._registers = self._collect()
        return self._registers

    def register_of(self, kind: str) -> Register:
        return self.registers[kind]

    def _collect(self) -> dict[str, Register]:
        registers: dict[str, Register] = {}
        for kind, (hook_name, base) in KINDS.items():
            reg: Register = _Register(kind, base, self, REQUIRED_METHODS.get(kind, ()))
            # call each implementation on its own so one plugin's exception does not hide the others'
            for impl in reversed(getattr(self.hook, hook_name).get_hookimpls()):
                try:
                    classes = impl.function() or []
                    for cls in classes:
                        reg.add(cls, owner=impl.plugin_name)
                except DuplicateNameError:
                    raise
                except MissingMethodError as exc:
                    package = self.info.get(impl.plugin_name, PluginInfo(impl.plugin_name, "?", "?", False)).package
                    self._fail(impl.plugin_name, package, exc, "contract", hook_name)
                except Exception as exc:
                    package = self.info.get(impl.plugin_name, PluginInfo(impl.plugin_name, "?", "?", False)).package
                    self._fail(impl.plugin_name, package, exc, "registration", hook_name)
            registers[kind] = reg
        return registers

    def plugins_table(self) -> list[dict[str, Any]]:
        """One row per registered plugin class: kind, name, plugin, package, version, hooks."""
        rows = []
        hooks_of: dict[str, list[str]] = {}
        for plugin_name, plugin in self.list_name_plugin():
            hooks_of[plugin_name] = sorted(h.name for h in self.get_hookcallers(plugin) or [])
        for kind, reg in self.registers.items():
            for name in reg.names():
                owner = reg.owner(name)
                info = self.info.get(owner, PluginInfo(owner, "?", "?", False))
                rows.append(
                    dict(kind=kind, name=name, plugin=owner, package=info.package, version=info.version,
                         builtin=info.builtin, hooks=hooks_of.get(owner, []))
                )
        # plugins that register no class (loggers, callbacks) still deserve a row
        listed = {r["plugin"] for r in rows}
        for plugin_name, info in self.info.items():
            if plugin_name not in listed and self.has_plugin(plugin_name):
                rows.append(dict(kind="hooks", name=plugin_name, plugin=plugin_name, package=info.package,
                                 version=info.version, builtin=info.builtin, hooks=hooks_of.get(plugin_name, [])))
        return rows


class _Register(Register):
    """A register whose unknown-name error also names the plugins that failed to load (one of them may be the
    plugin that should have provided the name)."""

    def __init__(self, kind: str, base: type, pm: PluginManager, required: tuple[str, ...] = ()):
        super().__init__(kind, base, required)
        self._pm = pm

    def get(self, name: str):
        try:
            return super().get(name)
        except UnknownNameError as exc:
            note = self._pm.failure_note()
            if not note:
                raise
            raise UnknownNameError(f"{exc}{note}") from None


def get_plugin_manager(*, builtins: bool = True, autoload: bool | None = None, extra: Iterable[tuple[str, Any]] = (),
                       strict: bool = True) -> PluginManager:
    """A fresh plugin manager with built-ins, entry-point plugins (unless disabled) and ``extra`` plugins
    (``(name, module_or_object)`` pairs, for tests).

    ``strict`` (default): a plugin that failed to import, failed hook validation or raised in a registration
    hook is a :class:`PluginError` raised here, listing every failure with its fix, so a command stops before
    it starts any work. ``strict=False`` keeps the failures in :attr:`PluginManager.failures` (what
    ``megatron plugins`` shows)."""
    pm = PluginManager()
    if builtins:
        pm.load_builtins()
    if autoload is None:
        autoload = not os.environ.get(ENV_DISABLE_AUTOLOAD)
    if autoload:
        pm.load_entrypoints()
    for name, plugin in extra:
        pm.register_plugin(plugin, name, getattr(plugin, "__package__", None) or "?", "?")
    load_env_plugins(pm)
    pm.check()
    if strict:
        pm.raise_on_failures()
    return pm


def load_env_plugins(pm: PluginManager) -> None:
    """Import and register the modules named in ``MEGATRON_PLUGINS`` (comma-separated) not registered yet."""
    for modname in (m.strip() for m in os.environ.get(ENV_PLUGINS, "").split(",")):
        if not modname:
            continue
        name = modname.rsplit(".", 1)[-1]
        if pm.get_plugin(name) is not None or pm.is_blocked(name):
            continue
        try:
            module = importlib.import_module(modname)
        except Exception as exc:
            raise PluginError(
                f"{ENV_PLUGINS}={os.environ[ENV_PLUGINS]!r}: cannot import {modname!r} ({type(exc).__name__}: {exc}). "
                "Give importable module names; add their folder to PYTHONPATH if they are not installed."
            ) from exc
        if pm.is_registered(module):  # already loaded, e.g. through its package's entry point
            continue
        pm.register_plugin(module, name, modname, "?")
