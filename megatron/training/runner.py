"""The runner: one loop for every learner — meta-learners and the transfer-learning baseline alike.

What one run does (:func:`run_experiment`):

1. Load the task set from the dataset plugins; optionally keep only the K source tasks closest to the
   target under a similarity metric (``similarity.select_sources``); split the target into its K-image
   training pool and a held-out evaluation split (:func:`megatron.data.episodes.split_target`) that no
   training step ever sees.
2. For each learner (``learner.name``, then the ``finetune`` baseline when ``output.compare_baseline``):
   build the detector from the same seed (so every learner starts from identical weights), then run
   **meta-epochs** as the method counts them:

   - M = ``training.source_epochs`` training epochs over the source tasks. An epoch is
     ``training.steps_per_epoch`` outer steps, or by default enough outer steps for the meta-batches
     (``training.meta_batch`` episodes of ``episodes.support_size + query_size`` images) to cover each
     source image about once. One outer step = ``learner.meta_step(sampler.meta_batch(...))``.
   - F = ``training.finetune_epochs`` fine-tuning epochs on the target pool: ``learner.adapt`` on a copy
     of the meta-model whose head is resized to the target's classes (``detector.set_num_classes``; only
     when the class count differs, so a meta-learned classifier initialisation is kept when it fits),
     with the freeze policy ``detector.freeze``. The meta-model itself is never trained on the target.
   - Evaluation of that adapted copy on the held-out split (:func:`megatron.evaluation.coco.evaluate`).

   One meta-epoch is worth M + F baseline epochs (the method: M = 10, F = 5, so 20 meta-epochs ≈ 300
   baseline epochs); the record states ``baseline_equivalent_epochs`` for every learner.
3. Compute: every image passed forward or backward is charged to the learner's
   :class:`~megatron.compute.ComputeAccount` (source training and target fine-tuning; evaluation is free).
   With ``training.compute_budget`` every learner trains until it has spent that many image passes (meta-
   epochs then only cap the run at ``training.max_meta_epochs``). Without it, the learner runs
   ``training.meta_epochs`` and the baseline gets a budget equal to what the learner spent, so neither sees
   more image passes. A budget is checked before every outer step, keeping back what the next fine-tuning
   will cost, so the final evaluation always follows a complete fine-tuning.
4. After every meta-epoch: an atomic checkpoint (``checkpoints/<learner>/last.pt``: detector weights,
   learner state, sampler state, every RNG state, the compute account and the record so far) and the run
   record (``run.json``). ``resume=True`` continues from the last checkpoints and ends with exactly the
   metrics an uninterrupted run gives.

Distributed (``torchrun --nproc_per_node N -m megatron run`` or ``megatron run --nproc N``; see
:mod:`megatron.training.distributed`): every rank draws the same global meta-batch and runs ``meta_step`` on its
:func:`~megatron.training.distributed.shard`; the learner combines the ranks' contributions through
``LearnerContext.all_reduce_mean``; the per-step loss and image counts are summed over ranks, so budgets,
schedules and the record see the whole run. Fine-tuning on the target pool is repeated by every rank (no
communication); evaluation is divided over the ranks and gathered on rank 0. Rank 0 alone writes the run
directory, checkpoints (after checking that every rank holds the same weights) and the record, calls the
lifecycle hooks and shows progress.

Lifecycle hooks (``megatron_run_start``, ``megatron_meta_step_end``, ``megatron_evaluation_end``,
``megatron_run_end``) fire for every registered plugin; one that raises stops the run with a
:class:`~megatron.errors.PluginError` naming the plugin.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from megatron import __version__
from megatron.training import distributed as mdist
from megatron.checkpoint import atomic_torch_save, atomic_write_text, safe_torch_load
from megatron.compute import ComputeAccount
from megatron.config import ExperimentConfig, dump_config
from megatron.errors import ConfigError, MegatronError, PluginError, TrainingError
from megatron.experiment import build_taskset, load_tasks, validate_experiment_plugins
from megatron.learner import BASELINE_LEARNER as BASELINE, LearnerContext, MetaLearner
from megatron.pluginmanager import PluginManager
from megatron.training.record import (
    CONFIG_FILE, CURVE_FILE, RECORD_FILE, SUMMARY_FILE, collect_versions, summary_markdown, write_record,
)
from megatron.types import Batch, Detections, Task

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "last.pt"
CHECKPOINT_FORMAT = 1
#: under a compute budget, a learner runs at most this many times ``training.meta_epochs`` meta-epochs
#: unless ``training.max_meta_epochs`` says otherwise (a guard against a budget that is never reached)
DEFAULT_EPOCH_CAP_FACTOR = 10


# --- seeds and environment ------------------------------------------------------------------------------

def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit seed derived from the run seed and a purpose (``derive_seed(0, "episodes")``): streams for
    different purposes are independent, and the same purpose gets the same stream for every learner."""
    digest = hashlib.sha256(repr((int(seed), *names)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_everything(seed: int) -> None:
    """One seed drives Python's ``random``, NumPy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG state, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; a CUDA device that is not there is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"training.device: {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"training.device: {name!r} asked for, but torch sees no CUDA GPU; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"training.device: {name!r} does not exist; this machine has "
                              f"{torch.cuda.device_count()} GPU(s)")
    return device


def resolve_amp(amp: str, device: torch.device) -> str:
    """The precision actually used: fp16 needs CUDA (on CPU it falls back to bf16 with a warning, since a
    gradient scaler for fp16 on CPU is neither fast nor well supported); bf16 on CPU needs torch support."""
    if amp == "fp16" and device.type != "cuda":
        warnings.warn("training.amp=fp16 needs a CUDA device; using bf16 autocast on the CPU instead", stacklevel=2)
        log.warning("amp fp16 requested on %s: falling back to bf16", device)
        amp = "bf16"
    if amp == "bf16" and device.type == "cpu" and not _cpu_bf16_autocast_works():
        raise ConfigError("training.amp=bf16: this torch build cannot autocast to bf16 on the CPU; use --amp off")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"training.amp=bf16: {torch.cuda.get_device_name(device)} does not support bf16; use --amp fp16")
    return amp


def _cpu_bf16_autocast_works() -> bool:
    try:
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            out = torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2))
        return out.dtype == torch.bfloat16
    except Exception:  # noqa: BLE001 - any failure means "not supported"
        return False


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels for the run (so resume and reruns give identical numbers), restored after."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
        torch.backends.cudnn.benchmark = benchmark


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- hooks ---------------------------------------------------------------------------------------------

def call_hook(pm: PluginManager, name: str, **kwargs: Any) -> None:
    """Call every implementation of the lifecycle hook ``name``; one that raises becomes a PluginError
    naming its plugin (KeyboardInterrupt and friends pass through untouched)."""
    caller = getattr(pm.hook, name)
    for impl in reversed(caller.get_hookimpls()):  # pluggy's order: last registered first
        if impl.hookwrapper or getattr(impl, "wrapper", False):
            continue
        try:
            impl.function(*[kwargs[a] for a in impl.argnames])
        except MegatronError as exc:
            raise PluginError(f"plugin {impl.plugin_name!r} failed in hook {name}: {exc}") from exc
        except Exception as exc:
            raise PluginError(
                f"plugin {impl.plugin_name!r} failed in hook {name}: {type(exc).__name__}: {exc}. "
                f"Fix the plugin or block it with MEGATRON_BLOCK_PLUGINS={impl.plugin_name}."
            ) from exc


# --- the run directory ---------------------------------------------------------------------------------

def default_run_name(cfg: ExperimentConfig) -> str:
    return cfg.output.name or f"{cfg.learner.name}-{cfg.detector.name}-seed{cfg.seed}"


def resolve_run_dir(cfg: ExperimentConfig, run_dir: Path | None, resume: bool) -> Path:
    """The run directory. A fresh run never overwrites a finished one: with the default name it takes the
    next free ``<name>-2``, ``-3`` …; an explicit directory that already holds a record is an error.
    ``resume`` picks the explicit directory, else the newest of ``<name>``, ``<name>-N``."""
    if run_dir is not None:
        run_dir = Path(run_dir)
        if resume and not (run_dir / RECORD_FILE).exists():
            raise ConfigError(f"--resume: {run_dir} holds no run to resume (no {RECORD_FILE})")
        if not resume and (run_dir / RECORD_FILE).exists():
            raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another "
                              "directory (--run-dir / --set output.name=...)")
        return run_dir
    base = Path(cfg.output.dir) / default_run_name(cfg)
    taken = [base] if (base / RECORD_FILE).exists() else []
    n = 2
    while (base.parent / f"{base.name}-{n}" / RECORD_FILE).exists():
        taken.append(base.parent / f"{base.name}-{n}")
        n += 1
    if resume:
        if not taken:
            raise ConfigError(f"--resume: no run to resume under {base} (run without --resume first)")
        return taken[-1]
    return base.parent / f"{base.name}-{n}" if taken else base


# --- small pieces ----------------------------------------------------------------------------------------

@dataclass
class Budget:
    """How a learner's compute is limited, for the account and the record."""

    limit: int | None
    how: str


@dataclass
class _Setup:
    cfg: ExperimentConfig
    pm: PluginManager
    run_dir: Path
    device: torch.device
    amp: str
    sources: list[Task]
    pool: Task
    held_out: Task
    head_classes: int
    options: Any  # ValidatedOptions
    progress: Any  # rich Progress or None
    record: dict[str, Any] = field(default_factory=dict)
    env: mdist.DistEnv = field(default_factory=mdist.DistEnv)
    comm: mdist.CommStats = field(default_factory=mdist.CommStats)


def _episode_images(cfg: ExperimentConfig) -> int:
    return cfg.training.meta_batch * (cfg.episodes.support_size + cfg.episodes.query_size)


def steps_per_source_epoch(cfg: ExperimentConfig, tasks: list[Task]) -> int:
    """``training.steps_per_epoch``, or enough outer steps for the meta-batches to cover each image of
    ``tasks`` about once."""
    if cfg.training.steps_per_epoch is not None:
        return cfg.training.steps_per_epoch
    return max(1, math.ceil(sum(len(t) for t in tasks) / _episode_images(cfg)))


def head_classes_for(cfg: ExperimentConfig, sources: list[Task]) -> int:
    """The meta-model's head size: ``episodes.n_way`` for N-way episodes (labels remapped to 0..N-1), else
    the largest class count among the source tasks (episode labels are task-local 0..C-1)."""
    if cfg.episodes.n_way is not None:
        return cfg.episodes.n_way
    return max(len(t.categories) for t in sources)


def _finetune_batches(setup: _Setup, pre, meta_epoch: int) -> Iterator[Batch]:
    """F epochs over the target pool, shuffled and augmented from a generator that depends only on the
    seed and the meta-epoch: every learner fine-tunes on the same batch stream."""
    from megatron.data.episodes import iterate_batches

    cfg = setup.cfg
    rng = np.random.default_rng(derive_seed(cfg.seed, "finetune", meta_epoch))
    for _ in range(cfg.training.finetune_epochs):
        yield from iterate_batches(setup.pool, cfg.training.batch_size, pre, rng, shuffle=True)


@contextlib.contextmanager
def _lent_detector(learner: MetaLearner, detector) -> Iterator[None]:
    """Let ``learner.adapt`` work on ``detector`` (the target-sized copy) instead of the meta-model."""
    original = learner.detector
    learner.detector = detector
    try:
        yield
    finally:
        learner.detector = original


def load_start_checkpoint(detector: torch.nn.Module, path: Path):
    """Load ``detector.checkpoint`` (megatron pretrain, mmdet or torchvision weights) through
    :func:`megatron.training.weights.load_checkpoint`; returns its load report."""
    from megatron.training.weights import load_checkpoint

    report = load_checkpoint(detector, path)
    log.info("%s", report)
    return report


# --- the run ---------------------------------------------------------------------------------------------

def run_experiment(cfg: ExperimentConfig, run_dir: Path | None = None, pm: PluginManager | None = None,
                   resume: bool = False, learners: list[str] | None = None, progress: bool = True) -> dict:
    """Run ``cfg.learner.name`` (and the ``finetune`` baseline at equal compute when
    ``cfg.output.compare_baseline`` and the learner is not ``finetune`` itself), or the given ``learners``
    in order (the first sets the compute the baseline gets). Returns the run record, also written
    atomically to ``run_dir/run.json``; see the module docstring for what happens."""
    from megatron import get_plugin_manager

    pm = pm if pm is not None else get_plugin_manager()
    options = validate_experiment_plugins(cfg, pm)
    names = list(learners) if learners else [cfg.learner.name]
    if not learners and cfg.output.compare_baseline and cfg.learner.name != BASELINE:
        names.append(BASELINE)
    for name in names:
        if name not in pm.registers["learner"]:
            raise ConfigError(f"unknown learner {name!r}; known learners: {', '.join(pm.registers['learner'].names())}")
    device = resolve_device(cfg.training.device)
    env = mdist.init_from_env(device.type)  # a single-process DistEnv unless launched by torchrun
    device = mdist.device_for(env, device)
    amp = resolve_amp(cfg.training.amp, device)

    def make_run_dir() -> Path:
        path = resolve_run_dir(cfg, run_dir, resume)
        path.mkdir(parents=True, exist_ok=True)
        return path

    run_dir = mdist.on_main(make_run_dir, env)

    with _threads(cfg.training.num_threads), _deterministic(device), progress_bars(progress and env.is_main) as bar:
        seed_everything(cfg.seed)
        record = mdist.on_main(lambda: _start_record(cfg, run_dir, resume, device), env)
        if env.enabled:
            record["distributed"] = {"world_size": env.world_size, "backend": env.backend}
        # rank 0 loads first: a dataset plugin that builds a cache on first use (medsynth) builds it once
        if not env.is_main:
            mdist.barrier(env)
        tasks = load_tasks(cfg, pm)
        if env.is_main:
            mdist.barrier(env)
        taskset = build_taskset(cfg, tasks)
        sources = taskset.sources
        selection = None
        if cfg.similarity.select_sources:
            selection = mdist.on_main(lambda: _select_sources(cfg, pm, taskset.target, sources, device), env)
            sources = [t for t in sources if t.name in selection["chosen"]]
        from megatron.data.episodes import split_target

        pool, held_out = split_target(taskset.target, cfg.data.shots, cfg.data.eval_images, cfg.seed)
        record.update({
            "target": taskset.target.name, "sources": [t.name for t in sources], "shots": len(pool),
            "eval_images": len(held_out), "selection": selection,
            "target_categories": list(taskset.target.categories),
            "head_classes": head_classes_for(cfg, sources),
        })
        record.setdefault("learners", {})
        setup = _Setup(cfg, pm, run_dir, device, amp, sources, pool, held_out, record["head_classes"], options,
                       bar, record, env)
        if env.is_main:
            write_record(run_dir, record)
            call_hook(pm, "megatron_run_start", config=cfg, run_dir=run_dir)

        for i, name in enumerate(names):
            budget = _budget_for(cfg, name, i, names, record)
            try:
                record["learners"][name] = _train_learner(setup, name, budget, resume)
            except TrainingError as exc:
                record["status"] = "failed"
                record["error"] = f"{name}: {exc}"
                if env.is_main:
                    write_record(run_dir, record)
                raise TrainingError(f"learner {name!r}: {exc} (run directory: {run_dir})") from exc
            if env.enabled:
                record["distributed"]["comm_s"] = round(setup.comm.seconds, 3)
            if env.is_main:
                write_record(run_dir, record)
        if len(names) > 1:
            record["comparison"] = _comparison(cfg, names, record)
        record["status"] = "complete"
        if env.is_main:
            write_record(run_dir, record)
            atomic_write_text(run_dir / SUMMARY_FILE, summary_markdown(record))
            if cfg.output.plots:
                from megatron.training.plots import plot_map50_curve, plot_train_loss

                plot_map50_curve(record, run_dir / CURVE_FILE)
                plot_train_loss(record, run_dir / "train_loss.png")
            call_hook(pm, "megatron_run_end", run_dir=run_dir, record=record)
        mdist.barrier(env)  # nobody leaves before the record is written
    return record


def _start_record(cfg: ExperimentConfig, run_dir: Path, resume: bool, device: torch.device) -> dict[str, Any]:
    config_json = cfg.model_dump(mode="json")
    if resume:
        from megatron.training.record import load_record

        old = load_record(run_dir)
        diffs = _config_differences(old.get("config", {}), config_json)
        if diffs:
            raise ConfigError(f"--resume: the config differs from the one {run_dir} was started with "
                              f"({'; '.join(diffs[:8])}); resume with the same config (it is in {run_dir / CONFIG_FILE})")
    atomic_write_text(run_dir / CONFIG_FILE, dump_config(cfg))
    return {
        "megatron_version": __version__,
        "status": "running",
        "config": config_json,
        "versions": collect_versions(device),
        "seed": cfg.seed,
        "amp": cfg.training.amp,
        "run_dir": str(run_dir),
        "learners": {},
    }


# keys a resumed run may change without changing its numbers
_RESUME_FREE = ("output", "training.num_threads", "training.device")


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


def detector_feature_extractor(cfg, pm, sources: list[Task], device: torch.device):
    """``(make, description)``: ``make()`` builds the configured detector (checkpoint loaded, seeded) and
    returns a function mapping a ``(B, 3, S, S)`` batch to its ``features``. Shared by ``megatron run
    --select-sources`` and ``megatron similarity`` so both rank sources the same way."""
    from megatron.config import validate_plugin_options

    def make():
        det_cls = pm.registers["detector"].get(cfg.detector.name)
        options = validate_plugin_options(det_cls, cfg.detector.options, "detector.options")
        torch.manual_seed(derive_seed(cfg.seed, "similarity-features"))
        det = det_cls(head_classes_for(cfg, sources), cfg.data.input_size, options)
        if cfg.detector.checkpoint is not None:
            load_start_checkpoint(det, cfg.detector.checkpoint)
        det.to(device).eval()

        def embed(images: torch.Tensor) -> torch.Tensor:
            batch = Batch(images=images.to(device), boxes=[], labels=[], meta=[{} for _ in range(len(images))])
            with torch.no_grad():
                return det.features(batch)

        return embed

    weights = f"weights from {cfg.detector.checkpoint}" if cfg.detector.checkpoint else \
        "RANDOM initial weights (no detector.checkpoint): texture statistics only"
    return make, f"{cfg.detector.name} detector features, {weights}"


def _select_sources(cfg, pm, target: Task, sources: list[Task], device: torch.device) -> dict[str, Any]:
    from megatron.similarity import SimilarityContext, build_metric, select_sources

    make, description = detector_feature_extractor(cfg, pm, sources, device)
    ctx = SimilarityContext(seed=cfg.seed, device=device, input_size=cfg.data.input_size,
                            make_feature_extractor=make, feature_extractor_desc=description)
    metric = build_metric(pm, cfg, cfg.similarity.metric, ctx)
    selection = select_sources(metric, target, sources, cfg.similarity.select_sources)
    log.info("%s", selection.reason)
    return selection.to_dict()


# --- one learner ---------------------------------------------------------------------------------------

def _build_learner(setup: _Setup, name: str, compute: ComputeAccount) -> MetaLearner:
    cfg = setup.cfg
    t = cfg.training
    det_cls = setup.pm.registers["detector"].get(cfg.detector.name)
    learner_cls = setup.pm.registers["learner"].get(name)
    # identical initial weights for every learner: the detector is built right after the same seed
    seed_everything(derive_seed(cfg.seed, "init"))
    detector = det_cls(setup.head_classes, cfg.data.input_size, setup.options.detector)
    if cfg.detector.checkpoint is not None:
        load_start_checkpoint(detector, cfg.detector.checkpoint)
    detector.to(setup.device)
    mdist.broadcast_module(detector, setup.env)  # rank 0's initial weights everywhere, whatever the init did
    scaler = torch.amp.GradScaler("cuda") if setup.amp == "fp16" else None
    ctx = LearnerContext(device=setup.device, amp=setup.amp, compute=compute, inner_steps=t.inner_steps,
                         inner_lr=t.inner_lr, outer_lr=t.outer_lr, outer_optimizer=t.outer_optimizer,
                         weight_decay=t.weight_decay, finetune_lr=t.finetune_lr, grad_clip=t.grad_clip, scaler=scaler,
                         all_reduce_mean=mdist.make_all_reduce_mean(setup.env, setup.comm),
                         world_size=setup.env.world_size)
    if name == cfg.learner.name:
        learner_options = setup.options.learner
    else:
        from megatron.config import validate_plugin_options

        learner_options = validate_plugin_options(learner_cls, {}, f"learner {name!r} options")
    try:
        learner = learner_cls(detector, learner_options, ctx)
    except MegatronError:
        raise
    except Exception as exc:
        raise PluginError(f"learner plugin {name!r} failed to start: {type(exc).__name__}: {exc}") from exc
    # the training stream starts from the same seed for every learner (and for a run restarted from scratch)
    seed_everything(derive_seed(cfg.seed, "train"))
    return learner


def _train_learner(setup: _Setup, name: str, budget: Budget, resume: bool) -> dict[str, Any]:
    from megatron.data.episodes import EpisodeSampler
    from megatron.data.preprocess import Preprocessor

    cfg = setup.cfg
    t = cfg.training
    ckpt_path = setup.run_dir / "checkpoints" / name / CHECKPOINT_FILE
    compute = ComputeAccount(budget=budget.limit)
    learner = _build_learner(setup, name, compute)
    pre_train = Preprocessor(cfg.data.input_size, clahe=cfg.data.clahe, augment=cfg.data.augment)
    pre_eval = pre_train.without_augment()
    sampler = EpisodeSampler(cfg.episodes.support_size, cfg.episodes.query_size, pre_train,
                             seed=derive_seed(cfg.seed, "episodes"), n_way=cfg.episodes.n_way, k_shot=cfg.episodes.k_shot)
    lrec: dict[str, Any] = {
        "epochs": [], "final": None, "compute": None, "stopped_by": None, "budget": budget.how,
        "head_classes": setup.head_classes, "steps_done": 0, "source_epochs_done": 0.0, "finetune_epochs_done": 0,
    }
    finetune_cost: int | None = None
    step_cost = 0
    env = setup.env
    if env.enabled and t.meta_batch % env.world_size:
        raise ConfigError(f"training.meta_batch = {t.meta_batch} cannot be split over {env.world_size} processes: "
                          f"set it to a multiple of {env.world_size}")
    # rank 0 reads the checkpoint and sends it: the other machines need not see the run directory to resume
    state = mdist.on_main(lambda: safe_torch_load(ckpt_path) if resume and ckpt_path.exists() else None, env)
    if state is not None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{ckpt_path}: checkpoint format {state.get('format')} is not {CHECKPOINT_FORMAT}")
        lrec = state["record"]
        if state.get("finished"):
            log.info("resume: %s already finished", name)
            return lrec
        learner.detector.load_state_dict(state["detector"])
        learner.load_state_dict(state["learner"])
        sampler.load_state_dict(state["sampler"])
        compute.load_state_dict(state["compute"])
        compute.budget = budget.limit
        finetune_cost, step_cost = state["finetune_cost"], state["step_cost"]
        set_rng_state(state["rng"])
        log.info("resume: %s continues after meta-epoch %d", name, len(lrec["epochs"]))

    def save(finished: bool) -> None:
        # every rank must hold the weights rank 0 writes (a TrainingError here keeps the previous checkpoint)
        mdist.check_in_sync(learner.detector, env, name)
        if not env.is_main:
            return
        atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "learner_name": name, "finished": finished,
            "meta_epoch": len(lrec["epochs"]), "detector": learner.detector.state_dict(),
            "learner": learner.state_dict(), "sampler": sampler.state_dict(), "compute": compute.state_dict(),
            "rng": rng_state(), "finetune_cost": finetune_cost, "step_cost": step_cost, "record": lrec,
        }, ckpt_path)

    cap = t.meta_epochs if budget.limit is None else (t.max_meta_epochs or DEFAULT_EPOCH_CAP_FACTOR * t.meta_epochs)
    bar = setup.progress
    epoch_task = bar.add_task(f"{name}: meta-epochs", total=cap if budget.limit is None else None) if bar else None
    if bar:
        bar.update(epoch_task, completed=len(lrec["epochs"]))
    stopped_by = "epochs"
    while True:
        e = len(lrec["epochs"])
        if e >= cap:
            stopped_by = "epochs" if budget.limit is None else "epoch_cap"
            break
        tasks = learner.source_tasks(e, t.meta_epochs, setup.sources)
        steps = steps_per_source_epoch(cfg, tasks)
        total_steps = steps * t.source_epochs
        reserve = finetune_cost if finetune_cost is not None else 2 * t.finetune_epochs * len(setup.pool)
        started, started_cpu = time.perf_counter(), time.process_time()
        losses: list[float] = []
        budget_hit = False
        step_task = bar.add_task(f"{name}: meta-epoch {e + 1} steps", total=total_steps) if bar else None
        for step in range(total_steps):
            if budget.limit is not None and compute.spent + step_cost + reserve > budget.limit:
                budget_hit = True
                break
            # how far the run is, for learners with a schedule (Reptile's annealed outer step size)
            if budget.limit is not None:
                learner.set_progress(min(1.0, compute.spent / budget.limit))
            else:
                learner.set_progress((e + step / total_steps) / t.meta_epochs)
            before = compute.spent
            counted = (compute.images_forward, compute.images_backward)
            episodes = sampler.meta_batch(tasks, t.meta_batch)  # the same global meta-batch on every rank
            try:
                stats = learner.meta_step(mdist.shard(episodes, env))
            except torch.OutOfMemoryError as exc:
                raise TrainingError(f"out of memory in meta-epoch {e + 1}, step {step + 1}: lower "
                                    "episodes.support_size/query_size, training.meta_batch or data.input_size") from exc
            compute.discard()
            loss = float(stats.get("loss", float("nan")))
            if env.enabled:
                # BatchNorm statistics of the ranks' shards averaged; loss and image passes summed over ranks,
                # so every rank takes the same budget and schedule decisions
                mdist.all_reduce_buffers_mean(learner.detector, env)
                loss_sum, fwd, bwd = mdist.sync_step(
                    [loss, compute.images_forward - counted[0], compute.images_backward - counted[1]], env)
                loss = loss_sum / env.world_size
                compute.images_forward, compute.images_backward = counted[0] + int(fwd), counted[1] + int(bwd)
                stats = {**stats, "loss": loss}
            step_cost = compute.spent - before
            if not math.isfinite(loss):
                raise TrainingError(f"the outer loss became {loss} in meta-epoch {e + 1}, step {step + 1}; the last "
                                    f"good checkpoint ({ckpt_path if ckpt_path.exists() else 'none yet'}) is kept. "
                                    "Lower training.outer_lr / inner_lr, keep training.grad_clip on, or use --amp off.")
            losses.append(loss)
            lrec["steps_done"] += 1
            lrec["source_epochs_done"] = round(lrec["source_epochs_done"] + 1.0 / steps, 6)
            if env.is_main:
                call_hook(setup.pm, "megatron_meta_step_end", learner=name, meta_epoch=e + 1, step=step + 1,
                          stats={**{k: float(v) for k, v in stats.items()}, "global_step": lrec["steps_done"],
                                 "compute_spent": compute.spent})
            if bar:
                bar.update(step_task, advance=1, description=f"{name}: meta-epoch {e + 1} loss {loss:.3f}")
        if bar:
            bar.remove_task(step_task)
        if budget_hit and not losses and e > 0:
            stopped_by = "budget"
            break  # nothing new to evaluate
        t_source = time.perf_counter()
        before = compute.spent
        with mdist.local_context(learner.ctx):  # every rank fine-tunes the same copy; nothing to average
            adapted = _adapt(setup, learner, pre_train, e)
        compute.discard()
        finetune_cost = compute.spent - before
        lrec["finetune_epochs_done"] += t.finetune_epochs
        t_finetune = time.perf_counter()
        metrics = evaluate_detector(adapted, setup.held_out, pre_eval, cfg, setup.device, learner.ctx, env)
        del adapted
        t_eval = time.perf_counter()
        lrec["epochs"].append({
            "meta_epoch": e + 1, "train_loss": float(np.mean(losses)) if losses else None, "steps": len(losses),
            "wall_s": round(time.perf_counter() - started, 3),
            # process CPU time (all threads): comparable across runs on a shared machine, where wall time is not
            "cpu_s": round(time.process_time() - started_cpu, 3),
            "stage_wall_s": {"source_training": round(t_source - started, 3),
                             "target_finetuning": round(t_finetune - t_source, 3),
                             "evaluation": round(t_eval - t_finetune, 3)},
            "compute": {"images_forward": compute.images_forward, "images_backward": compute.images_backward,
                        "spent": compute.spent},
            "metrics": metrics,
        })
        lrec["compute"] = {**lrec["epochs"][-1]["compute"], "budget": budget.limit}
        lrec["final"] = metrics
        lrec["baseline_equivalent_epochs"] = round(lrec["source_epochs_done"] + lrec["finetune_epochs_done"], 4)
        save(finished=False)
        setup.record["learners"][name] = lrec
        if env.is_main:
            write_record(setup.run_dir, setup.record)
            call_hook(setup.pm, "megatron_evaluation_end", learner=name, meta_epoch=e + 1, split="heldout",
                      metrics=metrics)
        if bar:
            bar.update(epoch_task, advance=1,
                       description=f"{name}: meta-epochs (mAP50 {100 * metrics['mAP50']:.1f}%)")
        if budget_hit:
            stopped_by = "budget"
            break
    if bar:
        bar.remove_task(epoch_task)
    lrec["stopped_by"] = stopped_by
    lrec["meta_epochs_run"] = len(lrec["epochs"])
    save(finished=True)
    return lrec


def _adapt(setup: _Setup, learner: MetaLearner, pre_train, meta_epoch: int):
    """Fine-tune a target-sized copy of the meta-model on the target pool (the meta-model is untouched)."""
    cfg = setup.cfg
    target_model = copy.deepcopy(learner.detector)
    n_target = len(setup.pool.categories)
    if n_target != setup.head_classes:
        target_model.set_num_classes(n_target)
        target_model.to(setup.device)
    with _lent_detector(learner, target_model):
        adapted = learner.adapt(_finetune_batches(setup, pre_train, meta_epoch), freeze=cfg.detector.freeze)
    return adapted


def evaluate_detector(detector, held_out: Task, pre_eval, cfg: ExperimentConfig, device: torch.device,
                      ctx: LearnerContext | None = None, env: mdist.DistEnv | None = None) -> dict[str, Any]:
    """Predict on every held-out image (no gradient, not charged) and score with the core evaluator.

    Distributed: each rank predicts its share of the images; rank 0 gathers the detections, scores them and
    sends the metrics to every rank."""
    from megatron.data.episodes import iterate_batches
    from megatron.evaluation.coco import evaluate

    env = env if env is not None else mdist.DistEnv()
    mine = held_out
    if env.enabled:
        import dataclasses

        mine = dataclasses.replace(held_out, records=mdist.shard_records(held_out.records, env))
    was_training = detector.training
    detector.eval()
    detections: list[Detections] = []
    with torch.no_grad(), (ctx.autocast() if ctx is not None else contextlib.nullcontext()):
        for batch in (iterate_batches(mine, cfg.training.batch_size, pre_eval) if mine.records else ()):
            preds = detector.predict(batch.to(device))
            for det, meta in zip(preds, batch.meta):
                if det.image_id == -1:
                    det.image_id = int(meta["image_id"])
                det.boxes = np.asarray(det.boxes, dtype=np.float32).reshape(-1, 4)
                det.scores = np.asarray(det.scores, dtype=np.float32).reshape(-1)
                det.labels = np.asarray(det.labels, dtype=np.int64).reshape(-1)
            detections.extend(preds)
    detector.train(was_training)
    ev = cfg.evaluation

    def score() -> dict[str, Any]:
        return evaluate(detections, held_out.records, list(held_out.categories), score_threshold=ev.score_threshold,
                        iou_threshold=ev.iou_threshold, max_detections=ev.max_detections)

    if not env.enabled:
        return score()
    parts = mdist.gather_objects(detections, env)
    # back in the split's image order, as one process produces them (score ties are then broken alike)
    position = {r.image_id: i for i, r in enumerate(held_out.records)}
    detections = sorted((d for part in parts for d in part), key=lambda d: position.get(d.image_id, -1))
    return mdist.on_main(score, env)


# --- progress ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[Any]:
    """Rich progress bars (one row per loop) on stderr when it is a terminal and ``enabled``; else ``None``."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        yield bar
