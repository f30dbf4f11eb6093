"""The benchmark grid: learners x seeds x number of source tasks N x shots K (x learning rates) (x source selection).

Every cell is one ordinary run (:func:`megatron.training.runner.run_experiment`) in ``<out>/cells/<cell-id>/``, at the same
compute budget (image passes) as every other cell, without the runner's own baseline comparison: the ``finetune``
baseline is a learner of the grid like any other, so each setting has its own baseline cells to pair with.

Which source tasks a cell with ``N`` < all uses (``selection``):

- ``random`` (default): a subset of size N drawn from the seed and N (``numpy.random.default_rng([seed, N])``),
  the same for every learner of that seed, so paired differences compare like with like; recorded per cell.
- ``closest``: the N tasks closest to the target by ``similarity.metric`` (the runner's source selection,
  ``similarity.select_sources = N``); the runner records the choice and the distances.
- ``all``: every source task (N is then ignored and recorded as the number of tasks).

Controls (``controls``, on by default; see examples/benchmarks/README.md "Power check"): two learners more, both the
``finetune`` baseline of the grid (its options) at the same budget:

- ``finetune_scratch``, the *positive control*: ``training.pretrain_epochs: 0`` and no ``detector.checkpoint``,
  i.e. from random weights. The pre-trained ``finetune`` must come out better than it; a grid that cannot see
  this known effect is under-powered, and the report withholds its verdicts.
- ``finetune_aa``, the *negative control* (A/A): ``training.replicate`` one more than the base config's, i.e.
  independent training randomness on the same target split and the same stage-1 checkpoint. It must come out "no
  significant difference" from ``finetune``.

They run in the grid's first setting (the first N, K, learning rate and selection listed;
``control_settings: all``: in every setting), after the other learners' cells, so adding or dropping them
leaves the other cells' indices (and shards) unchanged.

Resume: a cell whose ``run.json`` says ``complete`` is not run again; a cell with a ``run.json`` in any other state
(killed mid-run) is resumed through the runner's ``resume=True``. ``cell.json`` pins the cell's definition; a
changed definition under the same directory is an error rather than a silent mix of two experiments.

Reuse (``reuse=[DIR, ...]``, ``--reuse DIR``): a cell not yet run whose experiment is the same as a complete
cell of another benchmark directory — the same resolved config but for where it writes and caches, and the same
megatron, torch, mmdet, mmcv, mmengine and plugin versions — takes that cell's record (marked ``reused_from``)
instead of running again. Experiments that share their reference setting (the five of examples/benchmarks/ all
contain the default recipe with every source task at K = 20, and its controls) then pay for it once. A cell is
deterministic given its config only up to floating-point non-associativity across thread counts, so a reused
cell is the same experiment, not a bit-identical rerun.

Where cells run (:mod:`megatron.benchmark.executors`, ``executor=`` / the file's ``executor:`` section): ``local``
(default) runs them here, ``workers > 1`` in a spawn-context process pool, each process using ``cores // workers``
torch threads; ``slurm`` submits them as one SLURM job array through submitit (resubmitting a cell whose job died
without a result), ``submitit-local`` the same jobs as local processes. Every executor reports each cell's outcome
to one place (:class:`_CellLog`). Across machines by hand: ``shard=(i, n)`` keeps the cells whose index in the
full grid is ``i`` mod ``n`` (see examples/benchmarks/README.md); ``megatron report DIR1 DIR2 ...`` merges the
results.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from megatron.atomic_io import atomic_write_json, atomic_write_text
from megatron.training.rundir import RunDirBusy, lock_run_dir, write_marker
from megatron.config import ExperimentConfig, apply_overrides, format_validation_error, set_dotted
from megatron.errors import ConfigError, MegatronError
from megatron.api.learner import BASELINE_LEARNER as BASELINE
from megatron.experiment import build_taskset, load_tasks
from megatron import get_plugin_manager
from megatron.training import runner
from megatron import __version__, get_plugin_manager
from megatron.training.progress import stream_is_terminal
from megatron.training.record import collect_plugin_versions, package_version
from megatron.training.run_files import CELL_FILE, ERROR_FILE, RECORD_FILE
from megatron.benchmark.executors import CellJob, ExecutorSpec, SlurmOptions, make_executor
from megatron.benchmark.report import DEFAULT_EQUIVALENCE_MARGIN, build_report
from megatron.benchmark.rows import unreadable_json

log = logging.getLogger(__name__)

CELLS_DIR = "cells"
Selection = Literal["random", "closest", "all"]
LR_KEYS = ("outer_lr", "inner_lr", "finetune_lr")
#: the control learners' labels (reserved) and the ``control`` field of their cells
POSITIVE_CONTROL = "finetune_scratch"
NEGATIVE_CONTROL = "finetune_aa"
CONTROL_KINDS = {POSITIVE_CONTROL: "positive", NEGATIVE_CONTROL: "negative"}
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
MIN_SEEDS = 5
# keys the grid sets per cell: a learner variant's `overrides` may not touch them
_GRID_KEYS = ("seed", "data.shots", "data.sources", "training.compute_budget", "learner", "detector.name",
              "similarity.select_sources", "output")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LearnerVariant(_Model):
    """A learner of the grid: a plugin name plus options, under a label (two variants of one plugin, e.g.
    ``incremental`` with and without freezing, need two labels)."""

    name: str = Field(description="learner plugin name")
    label: str | None = Field(None, description="name in the results and plots (default: the plugin name)")
    options: dict[str, Any] = Field(default_factory=dict, description="the learner's options (learner.options)")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="dotted keys of the experiment config set for this variant only, e.g. "
        "{training.inner_steps: 5} (not the keys the grid sets: seed, shots, sources, budget, learner, output)")

    @property
    def id(self) -> str:
        return self.label or self.name


class GridSpec(_Model):
    learners: list[LearnerVariant] = Field(
        default_factory=lambda: [LearnerVariant(name="reptile"), LearnerVariant(name=BASELINE)],
        description="learners (plugin names, or {name, label, options}); `finetune` is added when missing",
    )
    seeds: list[int] = Field(default_factory=lambda: list(DEFAULT_SEEDS), min_length=1,
                             description="seeds: the replicates (default 0..4; fewer than 5 is noted in the report)")
    n_sources: list[int | None] = Field(
        default_factory=lambda: [None], min_length=1,
        description="numbers of source tasks N (null: all); with N < all, `selection` says which")
    shots: list[int] | None = Field(None, description="target shots K (default: data.shots of the base config)")
    lrs: list[float] | None = Field(None, description="learning rates to sweep (default: the base config's)")
    lr_keys: list[Literal["outer_lr", "inner_lr", "finetune_lr"]] = Field(
        default_factory=lambda: ["outer_lr", "finetune_lr"],
        description="which training learning rates a swept `lrs` value sets")
    lr_scale: bool = Field(False, description="`lrs` are multipliers of the base config's rates: each key of "
                           "`lr_keys` is set to its base value times the multiplier, so 1 is the base recipe "
                           "(and its cells are the same experiment as the other grids' base cells)")
    selection: list[Selection] = Field(default_factory=lambda: ["random"], min_length=1,
                                       description="how N < all source tasks are chosen: random | closest | all")
    detector: str | None = Field(None, description="detector plugin (default: the base config's)")
    budget: int | None = Field(None, ge=1, description="compute budget per cell in image passes "
                               "(default: training.compute_budget, else derived from the config)")
    controls: bool = Field(True, description="run the positive (finetune from random weights) and negative (A/A) "
                           "controls of the power check")
    control_settings: Literal["first", "all"] = Field(
        "first", description="where the controls run: the grid's first setting, or every setting")
    finetune_per_image: bool = Field(
        True, description="scale training.finetune_epochs with 1/K (reference: the base config's data.shots), so every "
        "K spends the same fine-tuning image passes: K = 40 gets half the epochs of K = 20")
    pretrain_per_seed: bool = Field(
        False, description="set training.pretrain_seed to each cell's seed, so every seed trains its own stage-1 "
        "checkpoint and the intervals over seeds include stage 1's variance (default: one shared stage 1, seeded by "
        "the base config's training.pretrain_seed)")

    @field_validator("learners", mode="before")
    @classmethod
    def _names_to_variants(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": x} if isinstance(x, str) else x for x in v]
        return v

    @field_validator("n_sources", mode="before")
    @classmethod
    def _all_is_none(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [None if isinstance(x, str) and x.lower() == "all" else x for x in v]
        return v


class ReportSpec(_Model):
    """How the report words its verdicts (recorded in benchmark.json, so a rebuild words them alike)."""

    equivalence_margin: float = Field(
        DEFAULT_EQUIVALENCE_MARGIN, gt=0, description="mAP50 points: a comparison is *equivalent within ±m* when "
        "two one-sided tests exclude a difference of m or more either way (else *inconclusive*, unless better/worse)")


class BenchmarkConfig(_Model):
    """A benchmark YAML: ``base`` (an experiment config mapping, or a path to one relative to this file),
    ``grid`` and ``report``."""

    base: dict[str, Any] | str = Field(default_factory=dict, description="experiment config (mapping or YAML path)")
    grid: GridSpec = Field(default_factory=GridSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)
    description: str = Field("", description="what this benchmark shows (copied into the report)")
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec,
                                   description="where the cells run: local | submitit-local | slurm, with SLURM options")


def load_benchmark_config(path: str | Path | None = None, grid_overrides: dict[str, Any] | None = None,
                          base_overrides: dict[str, Any] | None = None) -> tuple[BenchmarkConfig, dict[str, Any]]:
    """Read a benchmark YAML, apply CLI overrides; returns (config, resolved base experiment dict)."""
    data: dict[str, Any] = {}
    source = "benchmark defaults"
    root = Path.cwd()
    if path is not None:
        p = Path(path)
        source, root = str(p), p.parent
        try:
            loaded = yaml.safe_load(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"benchmark file {p} not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {' '.join(str(exc).split())}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping with `base:` and `grid:` sections")
        data = loaded
    grid = dict(data.get("grid") or {})
    grid.update({k: v for k, v in (grid_overrides or {}).items() if v is not None})
    data["grid"] = grid
    try:
        bcfg = BenchmarkConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    base = bcfg.base
    if isinstance(base, str):
        bp = (root / base) if not Path(base).is_absolute() else Path(base)
        try:
            base = yaml.safe_load(bp.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{source}: base: experiment config {bp} not found") from None
        if not isinstance(base, dict):
            raise ConfigError(f"{bp}: the top level must be a mapping of sections (data, detector, ...)")
    base = copy.deepcopy(base)
    apply_overrides(base, base_overrides)  # `--set KEY=null` included: it unsets a key of the base config
    _validate_experiment(base, f"{source}: base")
    return bcfg, base


def _validate_experiment(data: dict[str, Any], where: str) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None


# ----------------------------------------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    index: int  # position in the full grid (shards use it)
    learner: str  # the variant label
    learner_name: str  # the plugin
    learner_options: dict
    seed: int
    n_sources: int | None  # requested N (None: all)
    shots: int
    lr: float | None
    selection: str
    sources: tuple[str, ...] | None  # fixed subset (random / all); None: chosen by the runner (closest)
    budget: int
    detector: str
    overrides: dict = field(default_factory=dict)  # the variant's dotted config keys
    control: str | None = None  # "positive" | "negative" for the power check's cells
    lr_scale: bool = False  # lr is a multiplier of the base config's rates (GridSpec.lr_scale)

    @property
    def id(self) -> str:
        parts = [_slug(self.learner), f"n{self.n_sources if self.n_sources is not None else 'all'}",
                 f"k{self.shots}"]
        if self.lr is not None:
            parts.append(f"lrx{self.lr:g}" if self.lr_scale else f"lr{self.lr:g}")
        parts += [self.selection, f"s{self.seed}"]
        return "__".join(parts)

    def setting(self) -> dict:
        """What a paired comparison holds fixed (everything but learner and seed)."""
        return {"n_sources": self.n_sources, "shots": self.shots, "lr": self.lr, "selection": self.selection}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sources"] = list(self.sources) if self.sources is not None else None
        d["id"] = self.id
        return d


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", s).strip("-") or "x"


def derive_budget(base: ExperimentConfig, shots: int) -> tuple[int, str]:
    """A compute budget (image passes) from the training schedule, and the formula in words for the report.

    ``2 x meta_epochs x (source_epochs x steps_per_epoch x meta_batch x (support + query) + finetune_epochs x K)``:
    one forward and one backward per image of the method's schedule, independent of the learner and of N (an outer
    step sees ``meta_batch`` episodes whatever the number of tasks), at the largest K of the grid.
    """
    t, e = base.training, base.episodes
    if t.steps_per_epoch is None:
        raise ConfigError("benchmark: no compute budget: give grid.budget (or --budget, image passes per cell), "
                          "training.compute_budget, or training.steps_per_epoch so one can be derived")
    per_meta_epoch = t.source_epochs * t.steps_per_epoch * t.meta_batch * (e.support_size + e.query_size) \
        + t.finetune_epochs * shots
    budget = 2 * t.meta_epochs * per_meta_epoch
    formula = (f"derived: 2 (forward+backward) x {t.meta_epochs} meta-epochs x ({t.source_epochs} source epochs x "
               f"{t.steps_per_epoch} steps x {t.meta_batch} episodes x {e.support_size + e.query_size} images + "
               f"{t.finetune_epochs} fine-tuning epochs x {shots} target images) = {budget:,} image passes")
    return budget, formula


def source_task_names(base: dict[str, Any], pm=None) -> list[str]:
    """The source task names of the base config: ``data.sources`` when given, else every loaded task but the
    target (this loads the datasets once)."""
    cfg = _validate_experiment(base, "base")
    if cfg.data.sources is not None:
        return list(cfg.data.sources)

    if pm is None:
        pm = get_plugin_manager()
    return [t.name for t in build_taskset(cfg, load_tasks(cfg, pm)).sources]


def control_variants(learners: list[LearnerVariant], base_cfg: ExperimentConfig) -> tuple[list[LearnerVariant], list[str]]:
    """The power check's two learners, both copies of the grid's ``finetune`` variant (and its options), and notes."""
    ref = next(v for v in learners if v.id == BASELINE)
    notes = []
    variants = []
    if base_cfg.training.pretrain_epochs == 0 and base_cfg.detector.checkpoint is None:
        notes.append(f"positive control ({POSITIVE_CONTROL}) left out: the base config already starts from random "
                     "weights (training.pretrain_epochs: 0, no detector.checkpoint), so there is nothing to compare")
    else:
        variants.append(LearnerVariant(name=ref.name, label=POSITIVE_CONTROL, options=dict(ref.options), overrides={
            **ref.overrides, "training.pretrain_epochs": 0, "detector.checkpoint": None}))
    variants.append(LearnerVariant(name=ref.name, label=NEGATIVE_CONTROL, options=dict(ref.options), overrides={
        **ref.overrides, "training.replicate": base_cfg.training.replicate + 1}))
    return variants, notes


def random_subset(names: list[str], n: int, seed: int) -> tuple[str, ...]:
    """``n`` of ``names`` drawn from (seed, n): the same for every learner of a seed, different across seeds."""
    rng = np.random.default_rng([int(seed), int(n)])
    pick = rng.choice(len(names), size=n, replace=False)
    return tuple(sorted(names[i] for i in pick))


@dataclass
class Plan:
    cells: list[Cell]
    budget: int
    budget_note: str
    all_sources: list[str]
    base: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def expand_grid(bcfg: BenchmarkConfig, base: dict[str, Any], all_sources: list[str] | None = None, pm=None) -> Plan:
    """All cells of the grid in a fixed order (learner, n, shots, lr, selection, seed)."""
    g = bcfg.grid
    base_cfg = _validate_experiment(base, "base")
    learners, notes = _grid_learners(g)
    controls: list[LearnerVariant] = []
    if g.controls:
        controls, control_notes = control_variants(learners, base_cfg)
        notes += control_notes
    shots_list = list(g.shots) if g.shots else [base_cfg.data.shots]
    if all_sources is None:
        all_sources = source_task_names(base, pm)
    for n in g.n_sources:
        if n is not None and not 1 <= n <= len(all_sources):
            raise ConfigError(f"grid.n_sources: N={n} is outside 1..{len(all_sources)} "
                              f"(the source tasks are {', '.join(all_sources)})")
    budget, note = _grid_budget(g, base_cfg, shots_list)
    settings = _grid_settings(g, shots_list, len(all_sources))
    runs = [(v, settings, None) for v in learners]
    runs += [(v, settings if g.control_settings == "all" else settings[:1], CONTROL_KINDS[v.id]) for v in controls]
    cells = _grid_cells(runs, g, list(all_sources), budget, g.detector or base_cfg.detector.name)
    return Plan(cells, budget, note, list(all_sources), base, notes)


def _grid_learners(g: GridSpec) -> tuple[list[LearnerVariant], list[str]]:
    """The grid's learner variants, checked (unique labels, none reserved, no grid keys overridden), with the
    baseline added when missing; and notes for the report."""
    learners = list(g.learners)
    notes: list[str] = []
    ids = [v.id for v in learners]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"grid.learners: labels must be unique, these repeat: {', '.join(dupes)} "
                          "(give variants of one plugin distinct `label`s)")
    reserved = sorted(set(ids) & set(CONTROL_KINDS))
    if reserved:
        raise ConfigError(f"grid.learners: {', '.join(reserved)} is reserved for the power check's controls "
                          "(grid.controls); give that learner another label")
    for v in learners:
        bad = [k for k in v.overrides if any(k == key or k.startswith(key + ".") for key in _GRID_KEYS)]
        if bad:
            raise ConfigError(f"grid.learners: {v.id}: overrides {', '.join(bad)} are set by the grid per cell; "
                              "use the grid's own lists (seeds, shots, n_sources, lrs, budget) or learner options")
    if BASELINE not in ids:
        learners.append(LearnerVariant(name=BASELINE))
        notes.append(f"added the `{BASELINE}` baseline to the learners: every comparison is paired against it")
    if len(g.seeds) < MIN_SEEDS:
        notes.append(f"{len(g.seeds)} seed(s): fewer than {MIN_SEEDS}, intervals are wide and small effects cannot "
                     "be detected (see the power check)")
    return learners, notes


def _grid_budget(g: GridSpec, base_cfg: ExperimentConfig, shots_list: list[int]) -> tuple[int, str]:
    """Every cell's compute budget and where it comes from (grid.budget, training.compute_budget, or derived)."""
    if g.budget is not None:
        return g.budget, f"given: {g.budget:,} image passes per cell (grid.budget / --budget)"
    if base_cfg.training.compute_budget is not None:
        budget = base_cfg.training.compute_budget
        return budget, f"given: {budget:,} image passes per cell (training.compute_budget)"
    # with fine-tuning scaled per image every K costs the same; else the largest K sets the budget
    return derive_budget(base_cfg, base_cfg.data.shots if g.finetune_per_image else max(shots_list))


def _grid_settings(g: GridSpec, shots_list: list[int], n_all: int) -> list[tuple[int | None, int, float | None, str]]:
    """The settings (N, K, lr, selection) in grid order; N >= all tasks is one ``all`` setting."""
    lrs: list[float | None] = list(g.lrs) if g.lrs else [None]
    settings: list[tuple[int | None, int, float | None, str]] = []
    for n in g.n_sources:
        full = n is None or n >= n_all
        for k in shots_list:
            for lr in lrs:
                for sel in g.selection:
                    # with every task there is nothing to choose: one `all` cell, not one per strategy
                    setting = (None if full else n, int(k), lr, "all" if full else sel)
                    if setting not in settings:
                        settings.append(setting)
    return settings


def _grid_cells(runs: list[tuple[LearnerVariant, list, str | None]], g: GridSpec, all_sources: list[str],
                budget: int, detector: str) -> list[Cell]:
    """One cell per (learner variant, its settings, seed), numbered in that order; duplicates dropped."""
    cells: list[Cell] = []
    seen: set[str] = set()
    for v, its_settings, control in runs:
        for n, k, lr, sel in its_settings:
            for seed in g.seeds:
                if sel == "all":
                    sources: tuple[str, ...] | None = tuple(all_sources)
                elif sel == "random":
                    sources = random_subset(all_sources, n, seed)
                else:
                    sources = None
                overrides = dict(v.overrides)
                if g.pretrain_per_seed:  # the cell's own stage 1 (recorded in its definition and its config)
                    overrides["training.pretrain_seed"] = int(seed)
                cell = Cell(len(cells), v.id, v.name, dict(v.options), int(seed), n, k, lr, sel, sources, budget,
                            detector, overrides, control, bool(g.lr_scale and lr is not None))
                if cell.id in seen:
                    continue
                seen.add(cell.id)
                cells.append(cell)
    return cells


def finetune_epochs_for(base_cfg: ExperimentConfig, shots: int) -> int:
    """``training.finetune_epochs`` at K = ``shots`` with the fine-tuning image passes of the base config's K."""
    return max(1, round(base_cfg.training.finetune_epochs * base_cfg.data.shots / shots))


def cell_config(cell: Cell, base: dict[str, Any], out_dir: Path, lr_keys: list[str],
                finetune_per_image: bool = False) -> ExperimentConfig:
    """The experiment config of one cell (validated); ``finetune_per_image``: see
    :attr:`GridSpec.finetune_per_image`."""
    d = copy.deepcopy(base)
    if finetune_per_image:
        set_dotted(d, "training.finetune_epochs", finetune_epochs_for(_validate_experiment(base, "base"), cell.shots))
    for key, value in cell.overrides.items():  # the variant's keys first: the grid's own keys below win
        set_dotted(d, key, value)
    set_dotted(d, "learner.name", cell.learner_name)
    set_dotted(d, "learner.options", dict(cell.learner_options))
    set_dotted(d, "detector.name", cell.detector)
    set_dotted(d, "seed", cell.seed)
    set_dotted(d, "data.shots", cell.shots)
    set_dotted(d, "training.compute_budget", cell.budget)
    if cell.lr is not None:
        base_training = _validate_experiment(base, "base").training if cell.lr_scale else None
        for key in lr_keys:
            # products rounded to 10 significant digits: 3 x 1e-4 is recorded as 0.0003, not 0.00030000000000000003
            value = float(f"{getattr(base_training, key) * cell.lr:.10g}") if cell.lr_scale else cell.lr
            set_dotted(d, f"training.{key}", value)
    if cell.sources is not None:
        set_dotted(d, "data.sources", list(cell.sources))
        set_dotted(d, "similarity.select_sources", None)
    else:  # closest: the runner ranks the base config's source tasks (default: all) and keeps N
        set_dotted(d, "similarity.select_sources", cell.n_sources)
    set_dotted(d, "output.dir", str(Path(out_dir) / CELLS_DIR))
    set_dotted(d, "output.name", cell.id)
    set_dotted(d, "output.compare_baseline", False)
    return _validate_experiment(d, f"cell {cell.id}")


# --------------------------------------------------------------------------------------------------------- running
def _default_runner(cfg: ExperimentConfig, run_dir: Path, pm=None, resume: bool = False,
                    progress: bool = False) -> dict:
    return runner.run_experiment(cfg, run_dir, pm=pm, resume=resume, progress=progress)


#: the function that runs one cell; tests replace it (or pass ``runner=`` to :func:`run_benchmark`)
run_cell_experiment: Callable[..., dict] = _default_runner


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise MegatronError(unreadable_json(path, exc)) from None


def cell_state(cell_dir: Path) -> str:
    """``complete`` | ``partial`` (a record exists but is not complete: the runner resumes it from its last
    checkpoint) | ``new`` (no record: killed before the runner wrote one, so there is nothing to resume)."""
    rec = read_json(cell_dir / RECORD_FILE)
    if rec is None:
        return "new"
    return "complete" if rec.get("status") == "complete" else "partial"


def _check_cell_file(cell: Cell, cell_dir: Path) -> None:
    path = cell_dir / CELL_FILE
    existing = read_json(path)
    mine = cell.to_dict()
    if existing is None:
        atomic_write_json(path, mine)
        write_marker(cell_dir)  # the cell folder is megatron's: its run may claim it
        return
    # the index may move when a grid gains a learner; the cell itself is what must not change (cells written
    # before variants had overrides and controls read as having none)
    drop = lambda d: {"overrides": {}, "control": None, "lr_scale": False,  # noqa: E731
                      **{k: v for k, v in d.items() if k != "index"}}  # noqa: E731
    if drop(existing) != drop(mine):
        diff = sorted(k for k in mine if k != "index" and existing.get(k) != mine.get(k))
        raise ConfigError(f"{path}: this cell was started with a different definition ({', '.join(diff)} differ); "
                          "use a fresh --out directory, or delete that cell folder to re-run it")
    write_marker(cell_dir)  # cells made before the marker existed


#: config keys that say where a cell writes or caches, or how many threads it uses: not what it computes
# where and how fast a cell runs, not what it computes: the data workers give bit-identical results for any count
# (tests/test_data_workers.py), like the thread count
_PLACE_KEYS = (("output", "dir"), ("output", "name"), ("data", "cache_dir"), ("training", "num_threads"),
               ("data", "workers"), ("data", "prefetch"), ("data", "cache_bytes"))
_VERSION_KEYS = ("megatron", "torch", "mmdet", "mmcv", "mmengine")
_PLUGIN_KINDS = ("dataset", "detector", "learner", "similarity", "logger")


def experiment_fingerprint(cfg_json: dict, versions: dict | None = None) -> str:
    """What makes two cells the same experiment: the config without :data:`_PLACE_KEYS`, plus ``versions``
    (the record's: the libraries and plugins that computed it)."""
    d = copy.deepcopy(cfg_json)
    for section, key in _PLACE_KEYS:
        (d.get(section) or {}).pop(key, None)
    v = versions or {}
    pinned = {k: v.get(k) for k in _VERSION_KEYS}
    pinned["plugins"] = sorted((p.get("kind"), p.get("name"), p.get("package"), p.get("version"))
                               for p in v.get("plugins") or [] if p.get("kind") in _PLUGIN_KINDS)
    return json.dumps({"config": d, "versions": pinned}, sort_keys=True, default=str)


def _current_versions(cfg_json: dict, pm=None) -> dict:
    """The versions a cell of ``cfg_json`` would record if it ran now (see :func:`experiment_fingerprint`)."""

    cfg = ExperimentConfig.model_validate(cfg_json)
    return {"megatron": __version__, **{p: package_version(p) for p in _VERSION_KEYS[1:]},
            "plugins": collect_plugin_versions(cfg, pm or get_plugin_manager(), [cfg.learner.name])}


def reuse_index(dirs: list[Path]) -> dict[str, Path]:
    """Fingerprint -> cell folder, for every complete cell record under ``dirs`` (each a benchmark --out folder)."""
    index: dict[str, Path] = {}
    for d in dirs:
        root = Path(d) / CELLS_DIR
        if not root.is_dir():
            raise ConfigError(f"--reuse {d}: no {CELLS_DIR}/ folder there (expected a `megatron benchmark` --out "
                              "folder or a committed result folder)")
        for cdir in sorted(p for p in root.iterdir() if p.is_dir()):
            rec = read_json(cdir / RECORD_FILE)
            if rec and rec.get("status") == "complete" and rec.get("config"):
                versions = {**(rec.get("versions") or {}), "megatron": rec.get("megatron_version")}
                index.setdefault(experiment_fingerprint(rec["config"], versions), cdir)
    return index


def _reuse_cell(src: Path, cdir: Path) -> None:
    """Copy ``src``'s record into ``cdir``, marked with where it came from."""
    rec = read_json(src / RECORD_FILE) or {}
    rec["reused_from"] = str(src)
    cdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cdir / RECORD_FILE, rec)


@dataclass
class BenchmarkResult:
    out_dir: Path
    plan: Plan
    ran: list[str]
    skipped: list[str]
    failed: dict[str, str]
    report: Any = None  # the ReportResult when a report was written
    reused: dict[str, str] = field(default_factory=dict)  # cell id -> the folder its record came from
    submitted: list[str] = field(default_factory=list)  # cells left running (submitted without waiting)
    executor: str = "local"


def run_benchmark(bcfg: BenchmarkConfig, base: dict[str, Any], out_dir: str | Path, *, workers: int = 1,
                  shard: tuple[int, int] = (0, 1), resume: bool = True, pm=None, progress: bool = True,
                  runner: Callable[..., dict] | None = None, all_sources: list[str] | None = None,
                  report: bool = True, cores: int | None = None, prune_checkpoints: bool = False,
                  reuse: list[str | Path] | None = None, executor: str | None = None,
                  slurm: SlurmOptions | None = None, wait: bool = True) -> BenchmarkResult:
    """Run (or resume) the grid's cells into ``out_dir/cells/``, then write results and report.

    ``runner``: the function run per cell (default :data:`run_cell_experiment`); outside this process (workers,
    submitit jobs) it must be a picklable top-level function. A failed cell is recorded and the others go on.
    ``prune_checkpoints``: delete each cell's checkpoints once it is complete (tens of MB per cell; only a killed
    cell needs them). ``reuse``: benchmark folders whose complete cells stand in for this grid's identical ones
    (module docstring). ``executor`` (default the benchmark file's ``executor.name``, else ``local``), ``slurm``
    and ``wait``: where the cells run (:mod:`megatron.benchmark.executors`); with ``wait=False`` the cells are
    submitted and no report is written (``megatron report OUT`` once they are done).
    """
    out = Path(out_dir)
    check_shard(shard)
    with _benchmark_lock(out, shard):
        return _run_benchmark(bcfg, base, out, workers=workers, shard=shard, resume=resume, pm=pm, progress=progress,
                              runner=runner, all_sources=all_sources, report=report, cores=cores,
                              prune_checkpoints=prune_checkpoints, reuse=reuse, executor=executor, slurm=slurm,
                              wait=wait)


@contextlib.contextmanager
def _benchmark_lock(out: Path, shard: tuple[int, int]) -> Iterator[None]:
    """One benchmark per ``--out`` and shard at a time: a second one stops at once (exit 2) naming the first,
    instead of running into its locked cells and reporting them failed. Different shards may share ``--out``."""
    try:
        lock = lock_run_dir(out, f".benchmark-{shard[0]}-of-{shard[1]}.lock")
    except RunDirBusy as exc:
        since = f", since {exc.holder['started']}" if exc.holder.get("started") else ""
        raise ConfigError(
            f"{out} is in use by another `megatron benchmark` (PID {exc.pid} on {exc.host}{since}, shard "
            f"{shard[0]}/{shard[1]}): two benchmarks into one --out would run the same cells at once. Wait for it to "
            "finish and run this again (complete cells are skipped), or give another --out; shards (--shard i/n) "
            "may share one --out") from None
    with lock:
        yield


def _run_benchmark(bcfg: BenchmarkConfig, base: dict[str, Any], out: Path, *, workers: int, shard: tuple[int, int],
                   resume: bool, pm, progress: bool, runner: Callable[..., dict] | None, all_sources: list[str] | None,
                   report: bool, cores: int | None, prune_checkpoints: bool, reuse: list[str | Path] | None,
                   executor: str | None, slurm: SlurmOptions | None, wait: bool) -> BenchmarkResult:
    # the executor first: a missing sbatch or submitit stops the command before anything is written
    cells = _CellLog(out, _progress(False, 0))
    cell_executor = make_executor(executor or bcfg.executor.name, runner=runner or run_cell_experiment,
                                  out_dir=out, workers=workers, cores=cores, pm=pm, prune=prune_checkpoints,
                                  wait=wait, slurm=slurm or bcfg.executor.slurm, on_start=cells.started)
    plan = expand_grid(bcfg, base, all_sources=all_sources, pm=pm)
    for note in plan.notes:
        log.info(note)
    mine = [c for c in plan.cells if c.index % shard[1] == shard[0]]
    _write_benchmark_file(out, bcfg, plan, shard)
    todo, skipped, reused = _cells_to_run(mine, plan, bcfg, out, resume, reuse, pm)
    cells.bar = _progress(progress, len(todo))
    try:
        cell_executor.run(todo, cells.done)
    finally:
        cells.bar.close()
    waiting = [] if wait else [job.cell_id for job in todo]
    written = build_report([out], out) if report and wait else None  # shards report what they hold
    return BenchmarkResult(out, plan, cells.ran, skipped, cells.failed, written, reused, waiting, cell_executor.name)


def check_shard(shard: tuple[int, int]) -> None:
    i_shard, n_shard = shard
    if not (n_shard >= 1 and 0 <= i_shard < n_shard):
        raise ConfigError(f"--shard {i_shard}/{n_shard}: expected i/n with 0 <= i < n")


def _write_benchmark_file(out: Path, bcfg: BenchmarkConfig, plan: Plan, shard: tuple[int, int]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "benchmark.json", {
        "description": bcfg.description, "grid": bcfg.grid.model_dump(mode="json"), "base": plan.base,
        "report": bcfg.report.model_dump(mode="json"),
        "budget": plan.budget, "budget_note": plan.budget_note, "all_sources": plan.all_sources,
        "n_cells": len(plan.cells), "notes": plan.notes, "shard": f"{shard[0]}/{shard[1]}",
        "controls": sorted({c.learner for c in plan.cells if c.control})})


def _cells_to_run(mine: list[Cell], plan: Plan, bcfg: BenchmarkConfig, out: Path, resume: bool,
                  reuse: list[str | Path] | None, pm) -> tuple[list[CellJob], list[str], dict[str, str]]:
    """The cells still to run (complete ones skipped, identical ones of ``reuse`` folders taken over, killed
    ones resumed); ``(jobs, skipped ids, reused id -> source folder)``."""
    todo: list[CellJob] = []
    skipped: list[str] = []
    reused: dict[str, str] = {}
    index = reuse_index([Path(d) for d in reuse]) if reuse else {}
    versions: dict[str, dict] = {}  # learner plugin -> what a cell of it would record (the rest is the grid's)
    for cell in mine:
        cdir = out / CELLS_DIR / cell.id
        _check_cell_file(cell, cdir)
        state = cell_state(cdir)
        if state == "complete" and resume:
            skipped.append(cell.id)
            continue
        if not resume and state != "new":  # --no-resume: this cell starts over, its old results go
            (cdir / RECORD_FILE).unlink(missing_ok=True)
            shutil.rmtree(cdir / "checkpoints", ignore_errors=True)
            state = "new"
        cfg_json = cell_config(cell, plan.base, out, bcfg.grid.lr_keys, bcfg.grid.finetune_per_image).model_dump(mode="json")
        if index and state == "new":
            if cell.learner_name not in versions:
                versions[cell.learner_name] = _current_versions(cfg_json, pm)
            src = index.get(experiment_fingerprint(cfg_json, versions[cell.learner_name]))
            if src is not None:
                _reuse_cell(src, cdir)
                reused[cell.id] = str(src)
                log.info("cell %s: the same experiment as %s, its record reused", cell.id, src)
                continue
        todo.append(CellJob(cell.id, cfg_json, str(cdir), state == "partial"))
    return todo, skipped, reused


class _CellLog:
    """Where every executor's outcomes land, the same way: completed cells, failed ones (their error also in the
    cell's ``error.txt``), and the progress bar."""

    def __init__(self, out: Path, bar: _progress):
        self.out, self.bar = out, bar
        self.ran: list[str] = []
        self.failed: dict[str, str] = {}

    def started(self, cell_id: str) -> None:
        self.bar.describe(cell_id)

    def done(self, cell_id: str, error: str | None) -> None:
        if error is None:
            self.ran.append(cell_id)
        else:  # one broken cell must not lose the rest of the grid
            self.failed[cell_id] = error
            log.error("cell %s failed: %s", cell_id, error)
            atomic_write_text(self.out / CELLS_DIR / cell_id / ERROR_FILE, error + "\n")
        self.bar.describe(cell_id if error is None else f"{cell_id} (failed: {error.splitlines()[0][:200]})")
        self.bar.advance()


class _progress:
    """A rich progress bar over cells on a terminal, a plain line per finished cell when stdout is a file or pipe
    (a batch job's log), or nothing (tests, workers)."""

    def __init__(self, enabled: bool, total: int):
        self._p = None
        self._plain = enabled and total and not stream_is_terminal(sys.stdout)
        self._done, self._total, self._text = 0, total, ""
        if enabled and total and not self._plain:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(TextColumn("benchmark"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                               TextColumn("{task.description}"))
            self._p.start()
            self._task = self._p.add_task("", total=total)

    def describe(self, text: str) -> None:
        self._text = text
        if self._p:
            self._p.update(self._task, description=text)

    def advance(self) -> None:
        self._done += 1
        if self._p:
            self._p.advance(self._task)
        elif self._plain:
            print(f"{time.strftime('%H:%M:%S')} [benchmark] {self._done}/{self._total} cells done: {self._text}",
                  flush=True)

    def close(self) -> None:
        if self._p:
            self._p.stop()


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise ConfigError(f"--shard {text!r}: expected i/n, e.g. 0/4 (cells whose index mod n == i)")
    return int(m.group(1)), int(m.group(2))
