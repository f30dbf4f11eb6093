"""The runner: ``megatron run`` as the method's stages, one loop for every learner.

:func:`run_experiment` reads like the method (each stage a small unit with one job, announced to plugins by
``megatron_stage_start`` / ``megatron_stage_end``):

1. **prepare** (:mod:`megatron.training.prepare`) — the task set from the dataset plugins; the target split
   into the K-image pool, a validation split and the held-out test split, exact image ids on record
   (``data.split_from`` reuses another run's);
2. **select** (:mod:`megatron.similarity.selection`, with ``similarity.select_sources``) — keep the K source
   tasks closest to the target;
3. **pretrain** (:func:`megatron.training.pretrain.stage1_checkpoint`) — stage 1 of the method: joint
   training on the sources, cached by content hash and reused; skipped with ``detector.checkpoint`` or
   ``training.pretrain_epochs: 0``. Every learner starts from this same checkpoint;
4. **meta-train, adapt and evaluate** (:mod:`megatron.training.meta_train`) — per learner
   (``learner.name``, then the ``finetune`` baseline at equal compute), meta-epochs of source training,
   fine-tuning a copy on the pool, evaluation on validation and held-out, the adapted model kept;
5. **record** — the run record, written by the built-in recorder plugin (:mod:`megatron.training.recorder`)
   on ``megatron_record_update``; summary and plots on ``megatron_run_end``.

Equal compute: without ``training.compute_budget`` the learner runs ``training.meta_epochs`` and the baseline
then trains until it has spent the same image passes; with it every learner trains until that budget.

Distributed (``torchrun`` or ``megatron run --nproc N``; :mod:`megatron.runtime.distributed`): every rank
runs every stage; lifecycle events — and with them every file written by the recorder and loggers — happen
on rank 0 only (:class:`~megatron.training.events.Events`), checkpoints are written by rank 0 after a weight
check across ranks, and stage 1 is trained by rank 0 while the others wait for its checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

import torch

from megatron import __version__, get_plugin_manager
from megatron.api.learner import BASELINE_LEARNER as BASELINE
from megatron.config import ExperimentConfig
from megatron.data.split import refuse_overlaps, split_differences
from megatron.errors import ConfigError, TrainingError
from megatron.experiment import check_learners_fit_detector, head_classes_for, validate_experiment_plugins
from megatron.pluginmanager import PluginManager
from megatron.runtime import distributed as mdist
from megatron.runtime.environment import deterministic, resolve_amp, resolve_device, seed_everything, threads
from megatron.similarity.selection import select_sources_for_run, selection_target, unlabelled_target_tasks
from megatron.training.events import Events
from megatron.training.meta_train import Budget, LearnerRun, RunState
from megatron.training.prepare import PreparedData, prepare_data
from megatron.training.pretrain import stage1_cache_key, stage1_checkpoint
from megatron.training.progress import DEFAULT_LOG_EVERY, PROGRESS_PLUGIN_NAME, run_progress
from megatron.training.record import CONFIG_FILE, collect_versions, load_record
from megatron.training.recorder import RECORDER_PLUGIN_NAME, RunRecorder
from megatron.training.run_loggers import active_loggers, validate_loggers
from megatron.training.rundir import claim_run_dir

log = logging.getLogger(__name__)


def run_experiment(cfg: ExperimentConfig, run_dir: Path | None = None, pm: PluginManager | None = None,
                   resume: bool = False, learners: list[str] | None = None, progress: bool = True,
                   log_every: int = DEFAULT_LOG_EVERY, force: bool = False) -> dict:
    """Run ``cfg.learner.name`` (and the ``finetune`` baseline at equal compute when
    ``cfg.output.compare_baseline`` and the learner is not ``finetune`` itself), or the given ``learners``
    in order (the first sets the compute the baseline gets). Returns the run record, also written
    atomically to ``run_dir/run.json``; see the module docstring for the stages. ``progress``: bars on a
    terminal, plain lines every ``log_every`` outer steps when stdout is a file or pipe
    (:mod:`megatron.training.progress`). ``force``: use ``run_dir`` even when it holds files that are not a
    megatron run's (:func:`megatron.training.rundir.claim_run_dir`)."""

    pm = pm if pm is not None else get_plugin_manager()
    options = validate_experiment_plugins(cfg, pm)
    validate_loggers(cfg, pm)  # an unknown logger or a bad option fails here, before the run directory exists
    names = learner_names(cfg, pm, learners)
    check_learners_fit_detector(cfg, pm, names)  # e.g. second-order MAML on a deformable-attention detector
    device = resolve_device(cfg.training.device)
    env = mdist.init_from_env(device.type)  # a single-process DistEnv unless launched by torchrun
    device = mdist.device_for(env, device)
    amp = resolve_amp(cfg.training.amp, device)
    claims: list[Any] = []  # rank 0's claim: the run directory's lock, held until the run returns

    def claim() -> tuple[Path, bool]:
        taken = claim_run_dir(run_dir, Path(cfg.output.dir) / default_run_name(cfg), resume, force=force)
        claims.append(taken)
        return taken.path, taken.resume  # only plain values cross ranks, never the lock

    run_dir, resume = mdist.on_main(claim, env)  # resume: False for a folder whose run failed before a checkpoint
    try:
        return _run_in(cfg, pm, options, names, run_dir, device, amp, env, resume, (progress, log_every))
    finally:
        for taken in claims:
            taken.release()


def _run_in(cfg, pm, options, names, run_dir: Path, device, amp, env, resume: bool, progress: tuple[bool, int]) -> dict:
    events = Events(pm, enabled=env.is_main)
    # loggers registered before the built-in recorder: hooks call the latest registration first, so run.json is
    # written before a logger sees the event
    with threads(cfg.training.num_threads), deterministic(device), \
            active_loggers(cfg, pm, run_dir, enabled=env.is_main), _run_plugins(pm, cfg, env, progress):
        seed_everything(cfg.seed)
        record = mdist.on_main(lambda: _start_record(cfg, run_dir, resume, device, pm, names), env)
        if env.enabled:
            record["distributed"] = {"world_size": env.world_size, "backend": env.backend}
        events.emit("megatron_run_start", config=cfg, run_dir=run_dir)

        try:
            return _run_stages(cfg, pm, options, names, run_dir, device, amp, env, events, record, resume)
        except BaseException as exc:
            # the record says the run failed and why (a set-up failure too), and keeps what was recorded
            if record.get("status") != "failed":
                record["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
                record["error"] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            with contextlib.suppress(Exception):
                events.emit("megatron_record_update", run_dir=run_dir, record=record)
            raise


def _run_stages(cfg, pm, options, names, run_dir, device, amp, env, events: Events, record: dict, resume: bool) -> dict:
    data = _stage_prepare(cfg, pm, env, events, record, resume)
    sources = _stage_select(cfg, pm, data, device, env, events, record)
    start_checkpoint = _stage_pretrain(cfg, pm, sources, env, events, record)
    state = RunState(cfg, pm, run_dir, device, amp, data, sources, record["head_classes"], options, events,
                     record, start_checkpoint, env)
    state.update_record()
    for i, name in enumerate(names):
        budget = _budget_for(cfg, name, i, names, record)
        try:
            record["learners"][name] = LearnerRun(state, name, budget, resume).run()
        except TrainingError as exc:
            record["status"] = "failed"
            record["error"] = f"{name}: {exc}"
            state.update_record()
            raise TrainingError(f"learner {name!r}: {exc} (run directory: {run_dir})") from exc
        if env.enabled:
            record["distributed"]["comm_s"] = round(state.comm.seconds, 3)
        state.update_record()
    if len(names) > 1:
        record["comparison"] = _comparison(cfg, names, record)
    record["status"] = "complete"
    state.update_record()
    events.emit("megatron_run_end", run_dir=run_dir, record=record)
    mdist.barrier(env)  # nobody leaves before the record is written
    return record


def learner_names(cfg: ExperimentConfig, pm: PluginManager, learners: list[str] | None) -> list[str]:
    """The learners of the run, in order: the given ones, else ``learner.name`` and the baseline."""
    names = list(learners) if learners else [cfg.learner.name]
    if not learners and cfg.output.compare_baseline and cfg.learner.name != BASELINE:
        names.append(BASELINE)
    for name in names:
        if name not in pm.registers["learner"]:
            raise ConfigError(f"unknown learner {name!r}; known learners: {', '.join(pm.registers['learner'].names())}")
    return names


# --- the stages -----------------------------------------------------------------------------------------

def _stage_prepare(cfg, pm, env, events: Events, record: dict, resume: bool) -> PreparedData:
    events.stage_start("prepare")
    data = prepare_data(cfg, pm, env)
    split = data.split_manifest()
    if resume and record.get("split"):
        refuse_overlaps(record["split"], "--resume: run.json",
                        fix="start a new run (another --run-dir) instead of resuming this one")
        changed = split_differences(record["split"], split)
        if changed:
            raise ConfigError(f"--resume: the target split ({', '.join(changed)}: image ids, files or patients) "
                              "differs from the one this run was started with (the target data changed); resume with "
                              "the same data, or pass --split-from RUN_DIR/run.json")
    record.update({
        "target": data.target.name, "sources": [t.name for t in data.sources], "shots": len(data.pool),
        "eval_images": len(data.heldout), "validation_images": len(data.validation) if data.validation else 0,
        "target_categories": list(data.target.categories), "split": split,
    })
    events.stage_end("prepare", target=data.target.name, sources=[t.name for t in data.sources], pool=len(data.pool),
                     validation=len(data.validation) if data.validation else 0, heldout=len(data.heldout))
    return data


def _stage_select(cfg, pm, data: PreparedData, device, env, events: Events, record: dict):
    sources = data.sources
    selection = None
    if cfg.similarity.select_sources:
        events.stage_start("select", metric=cfg.similarity.metric, k=cfg.similarity.select_sources)
        # similarity reads the pool and the validation split only, never the held-out test images
        extra = unlabelled_target_tasks(cfg.similarity.unlabelled_target, data.target.name)
        target = selection_target(data.pool, data.validation, data.heldout, extra)
        selection = mdist.on_main(lambda: select_sources_for_run(cfg, pm, target, sources, device), env)
        sources = [t for t in sources if t.name in selection["chosen"]]
        events.stage_end("select", chosen=list(selection["chosen"]), reason=selection["reason"])
    record.update({"sources": [t.name for t in sources], "selection": selection,
                   "head_classes": head_classes_for(cfg, sources)})
    return sources


def _stage_pretrain(cfg, pm, sources, env, events: Events, record: dict) -> Path | None:
    """Stage 1: the checkpoint every learner starts from (``detector.checkpoint``, the cached stage-1
    checkpoint, or none with ``training.pretrain_epochs: 0``)."""
    if cfg.detector.checkpoint is not None and (cfg.detector.checkpoint_role == "instead_of_stage1"
                                                or cfg.training.pretrain_epochs == 0):
        record["pretrain"] = {"checkpoint": str(cfg.detector.checkpoint), "cache_key": None, "reused": True,
                              "epochs": None, "wall_s": 0.0, "source": "detector.checkpoint"}
        return Path(cfg.detector.checkpoint)
    if cfg.training.pretrain_epochs == 0:
        log.warning("stage 1 skipped (training.pretrain_epochs = 0): every learner starts from random weights")
        record["pretrain"] = {"checkpoint": None, "cache_key": None, "reused": False, "epochs": 0, "wall_s": 0.0,
                              "source": "none: random initial weights (training.pretrain_epochs = 0)"}
        return None

    key = stage1_cache_key(cfg, sources, pm)  # once: it hashes every source record
    events.stage_start("pretrain", epochs=cfg.training.pretrain_epochs, cache_key=key[0])
    # rank 0 trains (or finds) the checkpoint; the others wait for it and read the same file
    bars = pm.get_plugin(PROGRESS_PLUGIN_NAME)
    shown = bars.bar if bars is not None else False  # a row in the run's own bars (one live display at a time)
    entry = mdist.on_main(lambda: stage1_checkpoint(cfg, pm, sources, progress=shown, cache_key=key), env)
    record["pretrain"] = {**entry, "source": "stage 1 (cached)" if entry["reused"] else "stage 1 (trained now)"}
    if cfg.detector.checkpoint is not None:  # checkpoint_role start_of_stage1: stage 1 started from these weights
        record["pretrain"]["started_from"] = {"checkpoint": str(cfg.detector.checkpoint),
                                              "sha256": key[1].get("start_checkpoint")}
    events.stage_end("pretrain", checkpoint=entry["checkpoint"], reused=entry["reused"], wall_s=entry["wall_s"])
    return Path(entry["checkpoint"])


# --- plugins that live for the run ---------------------------------------------------------------------------

@contextlib.contextmanager
def _run_plugins(pm: PluginManager, cfg: ExperimentConfig, env, progress: tuple[bool, int]) -> Iterator[None]:
    """The built-in recorder and the progress plugin (bars on a terminal, plain lines off one; ``progress``:
    (shown, log every N steps)) registered as lifecycle plugins for the run, on rank 0 only."""

    with contextlib.ExitStack() as stack:
        if env.is_main:
            pm.register(RunRecorder(plots=cfg.output.plots), name=RECORDER_PLUGIN_NAME)
            shown = stack.enter_context(run_progress(*progress))
            if shown is not None:
                pm.register(shown, name=PROGRESS_PLUGIN_NAME)
        try:
            yield
        finally:
            for name in (PROGRESS_PLUGIN_NAME, RECORDER_PLUGIN_NAME):
                if pm.has_plugin(name):
                    pm.unregister(name=name)


# --- the run directory and record ------------------------------------------------------------------------

def default_run_name(cfg: ExperimentConfig) -> str:
    return cfg.output.name or f"{cfg.learner.name}-{cfg.detector.name}-seed{cfg.seed}"


def _start_record(cfg: ExperimentConfig, run_dir: Path, resume: bool, device: torch.device, pm: PluginManager,
                  names: list[str]) -> dict[str, Any]:
    config_json = cfg.model_dump(mode="json")
    if resume:
        old = load_record(run_dir)
        diffs = _config_differences(old.get("config", {}), config_json)
        if diffs:
            raise ConfigError(f"--resume: the config differs from the one {run_dir} was started with "
                              f"({'; '.join(diffs[:8])}); resume with the same config (it is in {run_dir / CONFIG_FILE})")
    record = {
        "megatron_version": __version__,
        "status": "running",
        "config": config_json,
        "versions": collect_versions(device, cfg, pm, names),  # plugins: package and version of each used
        "seed": cfg.seed,
        "amp": cfg.training.amp,
        "run_dir": str(run_dir),
        "learners": {},
    }
    if resume:
        # the recorded history stays until a learner's checkpoint replaces its part
        record["learners"] = dict(old.get("learners") or {})
        for key in ("split", "pretrain", "selection"):
            if old.get(key) is not None:
                record[key] = old[key]
    return record


# keys a resumed run may change without changing its numbers (the data workers: tests/test_data_workers.py)
_RESUME_FREE = ("output", "training.num_threads", "training.device", "loggers", "data.workers", "data.prefetch",
                "data.cache_bytes")


def _config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        if any(path == f or path.startswith(f + ".") for f in _RESUME_FREE):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(_config_differences(a, b, path + "."))
        elif a != b:
            diffs.append(f"{path}: {a!r} then, {b!r} now")
    return diffs


def _budget_for(cfg: ExperimentConfig, name: str, index: int, names: list[str], record: dict) -> Budget:
    if cfg.training.compute_budget is not None:
        return Budget(cfg.training.compute_budget,
                      f"training.compute_budget: {cfg.training.compute_budget} image passes for every learner")
    if index > 0:
        first = names[0]
        spent = record["learners"][first]["compute"]["spent"]
        return Budget(spent, f"matched: {name} gets the {spent} image passes {first} spent")
    return Budget(None, f"training.meta_epochs = {cfg.training.meta_epochs} meta-epochs")


def _comparison(cfg: ExperimentConfig, names: list[str], record: dict) -> dict[str, Any]:
    spent = {n: record["learners"][n]["compute"]["spent"] for n in names}
    if cfg.training.compute_budget is not None:
        how = (f"every learner trained until it had spent training.compute_budget = {cfg.training.compute_budget} "
               "image passes (forward + backward), the last fine-tuning on the target included")
    else:
        how = (f"{names[0]} ran {cfg.training.meta_epochs} meta-epochs and spent {spent[names[0]]} image passes; "
               f"{', '.join(names[1:])} then trained under that budget, so no learner saw more image passes")
    return {"learners": names, "baseline": names[1] if len(names) > 1 else None, "how": how, "spent": spent}


