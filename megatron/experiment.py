"""From a validated config to live objects: tasks, detector, learner. Used by every command."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from megatron.config import ExperimentConfig, validate_plugin_options
from megatron.errors import ConfigError, DataError, PluginError
from megatron.pluginmanager import PluginManager
from megatron.types import Task, TaskSet
from megatron.training.weights import CheckpointError, LoadReport, load_weights


@dataclass
class ValidatedOptions:
    datasets: list[BaseModel]
    detector: BaseModel
    learner: BaseModel
    similarity: dict[str, BaseModel]


def validate_experiment_plugins(cfg: ExperimentConfig, pm: PluginManager) -> ValidatedOptions:
    """Check every plugin name exists and every plugin's options are valid; errors name the key path."""
    regs = pm.registers
    datasets = []
    for i, spec in enumerate(cfg.data.datasets):
        cls = _get(regs["dataset"], spec.plugin, f"data.datasets.{i}.plugin")
        datasets.append(validate_plugin_options(cls, spec.options, f"data.datasets.{i}.options"))
    det_cls = _get(regs["detector"], cfg.detector.name, "detector.name")
    detector = validate_plugin_options(det_cls, cfg.detector.options, "detector.options")
    learner_cls = _get(regs["learner"], cfg.learner.name, "learner.name")
    learner = validate_plugin_options(learner_cls, cfg.learner.options, "learner.options")
    similarity = {}
    for name in {*cfg.similarity.metrics, cfg.similarity.metric} if cfg.similarity.select_sources else set(cfg.similarity.options):
        cls = _get(regs["similarity"], name, "similarity.metric")
        opts = dict(cfg.similarity.options.get(name, {}))
        if "sample_size" in cls.Options.model_fields:
            opts.setdefault("sample_size", cfg.similarity.sample_size)
        similarity[name] = validate_plugin_options(cls, opts, f"similarity.options.{name}")
    return ValidatedOptions(datasets, detector, learner, similarity)


def check_learners_fit_detector(cfg: ExperimentConfig, pm: PluginManager, names: list[str]) -> None:
    """Refuse, before anything is built, a learner that needs what the configured detector cannot do
    (``MetaLearner.required_capabilities`` against ``Detector.unsupported``); the message says why and which
    learners work with this detector."""
    det_cls = _get(pm.registers["detector"], cfg.detector.name, "detector.name")
    det_options = validate_plugin_options(det_cls, cfg.detector.options, "detector.options")
    unsupported = getattr(det_cls, "unsupported", None)  # a detector not derived from Detector: nothing declared
    lacking = unsupported(det_options) if unsupported is not None else {}
    if not lacking:
        return
    learners = pm.registers["learner"]

    def missing(name: str, options: dict[str, Any]) -> list[str]:
        cls = learners.get(name)
        opts = validate_plugin_options(cls, options, f"learner {name!r} options")
        required = getattr(cls, "required_capabilities", None)
        return sorted((required(opts) if required is not None else set()) & set(lacking))

    def works(name: str, options: dict[str, Any]) -> bool:
        try:
            return not missing(name, options)
        except ConfigError:  # a learner whose options have no defaults: not offered as an alternative
            return False

    for name in names:
        gaps = missing(name, cfg.learner.options if name == cfg.learner.name else {})
        if gaps:
            working = [n for n in learners.names() if works(n, {})]
            first_order = [n for n in learners.names() if "first_order" in learners.get(n).Options.model_fields
                           and works(n, {"first_order": True})]
            reasons = "; ".join(lacking[g] for g in gaps)
            variants = "".join(f", {n} (first_order: true)" for n in first_order)
            raise ConfigError(f"learner {name!r} cannot train detector {cfg.detector.name!r}: {reasons}. Learners "
                              f"that work with it: {', '.join(working)}{variants}.")


def _get(register, name: str, where: str):
    try:
        return register.get(name)
    except KeyError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_tasks(cfg: ExperimentConfig, pm: PluginManager) -> list[Task]:
    """Every task of every configured dataset plugin, names unique."""
    tasks: list[Task] = []
    for i, spec in enumerate(cfg.data.datasets):
        cls = _get(pm.registers["dataset"], spec.plugin, f"data.datasets.{i}.plugin")
        opts = validate_plugin_options(cls, _with_cache_dir(cls, spec.options, cfg), f"data.datasets.{i}.options")
        try:
            loaded = cls(opts).load()
        except (DataError, ConfigError):
            raise
        except Exception as exc:
            raise PluginError(f"dataset plugin {spec.plugin!r} failed to load: {type(exc).__name__}: {exc}") from exc
        tasks.extend(loaded)
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"data.datasets: task names must be unique, these repeat: {', '.join(dupes)} "
                          "(give each dataset a distinct `name` option)")
    return tasks


def _with_cache_dir(cls: type, options: dict[str, Any], cfg: ExperimentConfig) -> dict[str, Any]:
    if cfg.data.cache_dir is not None and "cache_dir" in cls.Options.model_fields and "cache_dir" not in options:
        return {**options, "cache_dir": str(cfg.data.cache_dir)}
    return options


def build_taskset(cfg: ExperimentConfig, tasks: list[Task]) -> TaskSet:
    by_name = {t.name: t for t in tasks}
    if cfg.data.target not in by_name:
        raise ConfigError(f"data.target: no task named {cfg.data.target!r}; tasks loaded: {', '.join(by_name)}")
    source_names = cfg.data.sources if cfg.data.sources is not None else [n for n in by_name if n != cfg.data.target]
    unknown = [n for n in source_names if n not in by_name]
    if unknown:
        raise ConfigError(f"data.sources: unknown task(s) {', '.join(unknown)}; tasks loaded: {', '.join(by_name)}")
    if cfg.data.target in source_names:
        raise ConfigError(f"data.sources: the target {cfg.data.target!r} cannot also be a source task")
    for n in [*source_names, cfg.data.target]:
        if len(by_name[n]) == 0:
            raise DataError(f"task {n!r} ({by_name[n].source}) holds no images; check its annotation file and image folder")
        if not any(len(r.boxes) for r in by_name[n].records):
            role = "target" if n == cfg.data.target else "source"
            raise DataError(f"task {n!r} ({by_name[n].source}), a {role} task, has no annotated boxes: `run` trains and "
                            "evaluates a detector, which needs boxes on every source and on the target; fix: give "
                            "the dataset annotations (e.g. the `dicom` plugin's annotation_file, or a COCO/YOLO "
                            "dataset), or leave it out of the run (unannotated folders serve `megatron similarity`)")
    return TaskSet(sources=[by_name[n] for n in source_names], target=by_name[cfg.data.target])


def build_detector(cfg: ExperimentConfig, pm: PluginManager, num_classes: int, checkpoint: Any = None,
                   options: BaseModel | None = None, report: dict[str, Any] | None = None):
    """The configured detector plugin with ``num_classes`` classes at ``data.input_size``, its options validated
    (or the already validated ``options``), with ``checkpoint``'s weights loaded when one is given (megatron
    pretrain, mmdet or torchvision weights; see :func:`megatron.training.weights.load_weights`). The one
    place a detector is built from a config: the runner, pre-training and similarity features use it.
    ``report``: a dict that receives the load report (:func:`load_report_record`), e.g. the run record's.
    Under half of the file's weights fitting (another architecture) is refused unless ``detector.force_checkpoint``."""
    import logging

    det_cls = _get(pm.registers["detector"], cfg.detector.name, "detector.name")
    if options is None:
        options = validate_plugin_options(det_cls, cfg.detector.options, "detector.options")
    try:
        detector = det_cls(num_classes, cfg.data.input_size, options)
    except (ConfigError, DataError):
        raise
    except Exception as exc:
        raise PluginError(f"detector plugin {cfg.detector.name!r} failed to build: {type(exc).__name__}: {exc}") from exc
    if checkpoint is not None:
        loaded = load_weights(detector, checkpoint)
        check_checkpoint_fits(loaded, cfg.detector.force_checkpoint)
        logging.getLogger(__name__).info("%s", loaded)
        if report is not None:
            report.update(load_report_record(loaded, detector))
    return detector


#: the fraction of a checkpoint's weights that must fit the detector (by name and shape) unless forced
MIN_CHECKPOINT_FIT = 0.5


def check_checkpoint_fits(report: LoadReport, force: bool) -> None:
    """Refuse a checkpoint most of whose weights do not fit (another architecture), with the mismatch table."""
    in_file = len(report.loaded) + len(report.mismatched) + len(report.unexpected)
    fit = len(report.loaded) / in_file if in_file else 1.0
    if fit >= MIN_CHECKPOINT_FIT or force:
        return
    raise CheckpointError(
        f"checkpoint {report.path}: only {len(report.loaded)} of its {in_file} weights ({fit:.0%}) fit this detector "
        f"(under {MIN_CHECKPOINT_FIT:.0%}): is it a checkpoint of another architecture?\n{report}\nSet "
        "detector.force_checkpoint: true to load the weights that fit anyway."
    )


def load_report_record(report: LoadReport, detector: Any) -> dict[str, Any]:
    """The load report as plain values for run.json: counts, the first keys of each kind, the classifier."""
    cls_names = set(getattr(detector, "parameter_groups", dict)().get("head_cls", []))
    reinitialised = sorted({k for k, _, _ in report.mismatched if k in cls_names} | (
        cls_names if report.reinitialised_classifier else set()))
    return {"load_report": {
        "path": str(report.path), "format": report.format, "loaded": len(report.loaded),
        "missing": len(report.missing), "unexpected": len(report.unexpected), "mismatched": len(report.mismatched),
        "mismatched_keys": [[k, list(a), list(b)] for k, a, b in report.mismatched[:20]],
        "missing_keys": report.missing[:20], "unexpected_keys": report.unexpected[:20],
        "classifier_reinitialised": reinitialised, "summary": report.summary(),
    }}


def head_classes_for(cfg: ExperimentConfig, sources: list[Task]) -> int:
    """The meta-model's head size: ``episodes.n_way`` for N-way episodes (labels remapped to 0..N-1), else
    the largest class count among the source tasks (episode labels are task-local 0..C-1)."""
    if cfg.episodes.n_way is not None:
        return cfg.episodes.n_way
    return max(len(t.categories) for t in sources)
