"""``megatron config show|validate``."""
from __future__ import annotations

# lazy imports: start-up time (heavy modules are imported inside the command functions; see megatron/commands/__init__.py)

import argparse
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.syntax import Syntax

from megatron.commands.common import COMBINE_HELP, add_config_arguments, add_set_option, config_from_args
from megatron.config import dump_config
from megatron.runtime.console import output_console

VALIDATE_DESCRIPTION = """\
Validate FILE and report every error found in one pass, each with its key path: unknown or misspelt keys,
bad values, unknown plugin names (datasets, detector, learner, similarity metrics) and each plugin's own
options. A plugin name or option is checked even when another part of the file is wrong.

Without --data the datasets are not loaded, so data.target, data.sources, data.shots (K) and the held-out
split are not checked (a note says so). With --data the dataset plugins load their tasks (this can take as
long as a run's data loading; medsynth generates its suite on first use) and the target, the sources, K and
the held-out split are checked as `megatron run` would.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show the effective config or validate a config file",
                       description="Show the effective experiment config (defaults < YAML < CLI) or validate a YAML file.")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="print the effective config as YAML",
                           description="Print the effective config: defaults, overridden by --config FILE, overridden "
                           "by CLI options. " + COMBINE_HELP)
    add_config_arguments(show)
    show.set_defaults(func=_show)
    val = csub.add_parser("validate", help="check a config file and report every error with its key path",
                          description=VALIDATE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    val.add_argument("file")
    val.add_argument("--data", action="store_true",
                     help="also load the datasets and check data.target, data.sources, K and the held-out split")
    add_set_option(val)
    val.set_defaults(func=_validate)


def _show(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    output_console().print(Syntax(dump_config(cfg), "yaml", background_color="default"))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from megatron import get_plugin_manager
    from megatron.commands.common import overrides_from_args
    from megatron.errors import ConfigError

    overrides, origins = overrides_from_args(args)
    pm = get_plugin_manager()
    notes: list[str] = []
    cfg, errors = validate_config_file(args.file, pm, overrides, origins, data=args.data, notes=notes)
    if errors:
        n = len(errors)
        raise ConfigError(f"{args.file}: {n} problem{'s' if n > 1 else ''} found\n" + "\n".join(
            f"{i}. {e}" for i, e in enumerate(errors, 1)))
    console = output_console()
    if args.data:
        console.print(f"[green]{escape(args.file)}: valid[/] (plugins, options and data checked)", highlight=False)
        for note in notes:
            console.print(escape(note), highlight=False, soft_wrap=True)
    else:
        console.print(f"[green]{escape(args.file)}: valid[/] (plugins and options checked)", highlight=False)
        console.print("note: the datasets were not loaded, so data.target, data.sources, data.shots (K) and the "
                      "held-out split were not checked; add --data to check them", highlight=False)
    return 0


# --- collecting every error ---------------------------------------------------------------------------------

def _raw(data: Any, dotted: str, default: Any = None) -> Any:
    cur = data
    for k in dotted.split("."):
        if not isinstance(cur, dict) or k not in cur:
            return default
        cur = cur[k]
    return cur


def _default(model: type, field: str) -> Any:
    info = model.model_fields[field]
    return info.default_factory() if info.default_factory is not None else info.default


def validate_config_file(path: str | Path, pm, overrides: dict[str, Any] | None = None,
                         origins: dict[str, str] | None = None, data: bool = False,
                         notes: list[str] | None = None):
    """``(config or None, errors)``: every error found in the config at ``path`` (with ``overrides``), each a
    message naming its key path. The schema, every plugin name and every plugin's options are checked
    independently, so one error never hides another; with ``data`` (and no error so far) the datasets are
    loaded and the target, sources, K and the split are checked too, and the target's fingerprint (patients,
    box sizes at the input size) is appended to ``notes``."""
    from pydantic import ValidationError

    from megatron.config import ExperimentConfig, apply_overrides, format_validation_error, read_config_file

    raw = apply_overrides(read_config_file(path), overrides)
    labels = {key: f"override {key}" for key in (overrides or {})}
    labels.update(origins or {})
    check = _PluginChecks(pm)
    cfg = None
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        check.errors.append(format_validation_error(exc, str(path), labels))
    check.datasets(raw)
    check.detector_and_learner(raw)
    check.similarity(raw)
    check.loggers(raw)
    if data and cfg is not None and not check.errors:
        data_errors, data_notes = check_data(cfg, pm)
        check.errors.extend(data_errors)
        if notes is not None:
            notes.extend(data_notes)
    return cfg, check.errors


class _PluginChecks:
    """Every plugin name and plugin option block of a raw config, checked one by one; the errors collected."""

    def __init__(self, pm):
        self.regs = pm.registers
        self.errors: list[str] = []

    def plugin(self, kind: str, name: Any, where: str):
        if not isinstance(name, str):
            return None  # a wrong type is a schema error, reported above
        try:
            return self.regs[kind].get(name)
        except KeyError as exc:
            self.errors.append(f"{where}: {exc}")
            return None

    def options(self, cls, opts: Any, where: str, extra: dict[str, Any] | None = None) -> None:
        from megatron.config import validate_plugin_options
        from megatron.errors import MegatronError

        if cls is None or not isinstance(opts, dict):
            return
        try:
            validate_plugin_options(cls, {**(extra or {}), **opts}, where)
        except MegatronError as exc:
            self.errors.append(str(exc))

    def datasets(self, raw: dict) -> None:
        from megatron.config import DataConfig

        datasets = _raw(raw, "data.datasets", _default(DataConfig, "datasets"))
        for i, spec in enumerate(datasets if isinstance(datasets, list) else []):
            spec = spec.model_dump() if hasattr(spec, "model_dump") else spec
            if isinstance(spec, dict):
                self.options(self.plugin("dataset", spec.get("plugin"), f"data.datasets.{i}.plugin"),
                             spec.get("options", {}), f"data.datasets.{i}.options")

    def detector_and_learner(self, raw: dict) -> None:
        from megatron.config import DetectorConfig, LearnerConfig

        for section, model in (("detector", DetectorConfig), ("learner", LearnerConfig)):
            cls = self.plugin(section, _raw(raw, f"{section}.name", _default(model, "name")), f"{section}.name")
            self.options(cls, _raw(raw, f"{section}.options", {}), f"{section}.options")

    def similarity(self, raw: dict) -> None:
        from megatron.config import SimilarityConfig

        metrics = _raw(raw, "similarity.metrics", _default(SimilarityConfig, "metrics"))
        metric_options = _raw(raw, "similarity.options", {})
        names: list[tuple[Any, str]] = [(m, f"similarity.metrics.{i}") for i, m in enumerate(metrics)] \
            if isinstance(metrics, list) else []
        names.append((_raw(raw, "similarity.metric", _default(SimilarityConfig, "metric")), "similarity.metric"))
        if isinstance(metric_options, dict):
            names += [(m, f"similarity.options.{m}") for m in metric_options]
        seen: set[str] = set()
        sample_size = _raw(raw, "similarity.sample_size", _default(SimilarityConfig, "sample_size"))
        for name, where in names:
            if not isinstance(name, str) or name in seen:
                continue
            seen.add(name)
            cls = self.plugin("similarity", name, where)
            if cls is not None:
                extra = {"sample_size": sample_size} if "sample_size" in cls.Options.model_fields else {}
                opts = metric_options.get(name, {}) if isinstance(metric_options, dict) else {}
                self.options(cls, opts, f"similarity.options.{name}", extra)

    def loggers(self, raw: dict) -> None:
        loggers = _raw(raw, "loggers", [])
        for i, spec in enumerate(loggers if isinstance(loggers, list) and "logger" in self.regs else []):
            spec = {"name": spec} if isinstance(spec, str) else spec
            if isinstance(spec, dict):
                self.options(self.plugin("logger", spec.get("name"), f"loggers.{i}.name"), spec.get("options", {}),
                             f"loggers.{i}.options")


def check_data(cfg, pm) -> tuple[list[str], list[str]]:
    """Load every dataset of ``cfg`` (each on its own, so one failing dataset does not hide another) and check
    the target, the sources, K and the split as a run would; returns the error messages and the target's
    fingerprint lines (patients, box sizes at the input size, what K is drawn from)."""
    from megatron.errors import MegatronError
    from megatron.experiment import load_tasks

    errors: list[str] = []
    tasks = []
    for i, spec in enumerate(cfg.data.datasets):
        one = cfg.model_copy(update={"data": cfg.data.model_copy(update={"datasets": [spec]})})
        try:
            tasks.extend(load_tasks(one, pm))
        except MegatronError as exc:
            errors.append(f"data.datasets.{i} ({spec.plugin}): {exc}")
    by_name = {t.name: t for t in tasks}
    errors.extend(_task_set_errors(cfg, tasks, load_errors=len(errors)))
    target = by_name.get(cfg.data.target)
    if target is None:
        return errors, []
    errors.extend(_split_errors(cfg, target))
    return errors, _target_notes(cfg, pm, target)


def _task_set_errors(cfg, tasks: list, load_errors: int) -> list[str]:
    """Unique task names, a known target, known sources that exclude the target, and no empty source."""
    errors: list[str] = []
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        errors.append(f"data.datasets: task names must be unique, these repeat: {', '.join(dupes)} "
                      "(give each dataset a distinct `name` option)")
    by_name = {t.name: t for t in tasks}
    loaded = ", ".join(by_name) or "none"
    if cfg.data.target not in by_name:
        errors.append(f"data.target: no task named {cfg.data.target!r}; tasks loaded: {loaded}")
    sources = cfg.data.sources if cfg.data.sources is not None else [n for n in by_name if n != cfg.data.target]
    unknown = [n for n in sources if n not in by_name]
    if unknown:
        errors.append(f"data.sources: unknown task(s) {', '.join(unknown)}; tasks loaded: {loaded}")
    if cfg.data.target in sources:
        errors.append(f"data.sources: the target {cfg.data.target!r} cannot also be a source task")
    if not load_errors and not unknown and not [n for n in sources if n != cfg.data.target]:
        errors.append("data.sources: there are no source tasks to meta-train on; add a dataset or list its tasks")
    for n in sources:
        if n in by_name and len(by_name[n]) == 0:
            errors.append(f"task {n!r} ({by_name[n].source}) holds no images; check its annotation file and "
                          "image folder")
    return errors


def _split_errors(cfg, target) -> list[str]:
    """The pool, validation and held-out split as ``megatron run`` draws them (whole patients)."""
    from megatron.errors import MegatronError
    from megatron.training.prepare import split_target_three

    try:
        split_target_three(target, cfg.data.shots, cfg.data.eval_images, cfg.data.validation_images, cfg.seed)
    except MegatronError as exc:
        return [str(exc)]
    return []


def _target_notes(cfg, pm, target) -> list[str]:
    """The target's fingerprint at the configured input size, with any warning about small boxes."""
    from megatron.data.check import CheckReport, k_availability, patient_and_size_lines
    from megatron.data.check import detector_stride
    from megatron.data.fingerprint import fingerprint, fingerprint_problems
    from megatron.data.groups import describe_grouping, images_per_group

    report = CheckReport(path=f"target {target.name!r}", format="", task_name=target.name,
                         n_boxes=sum(len(r.boxes) for r in target.records))
    report.grouping = describe_grouping(target)
    report.patients = images_per_group(target.records) if target.records else {}
    if report.n_boxes:
        report.fingerprint = fingerprint(target, cfg.data.input_size, detector_stride(cfg, pm))
    report.for_k = k_availability(target, cfg.data.shots, cfg.data.eval_images, cfg.seed)
    lines = [f"target {target.name!r}: {line}" for line in patient_and_size_lines(report)]
    for problem in fingerprint_problems(report.fingerprint, f"target {target.name!r}") if report.fingerprint else []:
        lines.append(f"warning: {problem.message}; fix: {problem.fix}")
    return lines
