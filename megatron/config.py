"""The experiment configuration: pydantic v2 models, ``extra='forbid'``, loaded from YAML with CLI overrides.

A misspelt key is an error naming the key path and the model. Plugin ``options`` dicts are validated against
the plugin's own ``Options`` model by :func:`validate_plugin_options` once the plugin manager is known.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from megatron.errors import ConfigError


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(_Model):
    """One dataset plugin instance; it yields one or more tasks."""

    plugin: str = Field(description="dataset plugin name (see `megatron plugins`)")
    options: dict[str, Any] = Field(default_factory=dict, description="the plugin's options")


class DataConfig(_Model):
    datasets: list[DatasetSpec] = Field(
        # the built-in synthetic suite at the size the default CPU run is measured at (README, "what to expect")
        default_factory=lambda: [DatasetSpec(plugin="medsynth", options={"images_per_task": 60, "target_images": 200,
                                                                         "image_size": 128})],
        description="dataset plugins to load; their tasks make up the task set",
    )
    target: str = Field("eit", description="name of the few-shot target task")
    sources: list[str] | None = Field(None, description="source task names (default: every task but the target)")
    shots: int = Field(20, ge=1, description="K: images in the target's few-shot training pool (the method: 20 or 40)")
    eval_images: int | None = Field(None, ge=1, description="target images kept out of training for evaluation: the validation split (data.validation_images) and the held-out test split. null (default): every target image except max(K, 40) reserved for the K-shot pools (40 is the method's largest K, so K = 20 and K = 40 are evaluated on the same images), and at least 5; see megatron.data.split.split_target")
    validation_images: int | None = Field(None, ge=0, description="target images set apart from the evaluation images to choose the reported model on (the `-best` model; never trained on); null: a quarter of the evaluation images, at most 20; 0: no validation split, the final model is reported")
    split_from: Path | None = Field(None, description="reuse the exact target split (pool / validation / held-out image ids) of another run's run.json")
    input_size: int = Field(128, ge=32, description="square detector input size in pixels (letterbox)")
    clahe: bool = Field(False, description="apply CLAHE to grayscale images before resizing")
    augment: bool = Field(True, description="training augmentations (flips, small rotations, scale/translate, brightness/contrast)")
    cache_dir: Path | None = Field(None, description="where generated/decoded data is cached (default ~/.cache/megatron)")
    workers: int | None = Field(None, ge=0, description="background worker threads decoding and augmenting episodes and batches ahead of the model (pre-training, meta-training, fine-tuning, evaluation); 0: in the training process; null: none on the CPU, on an accelerator the process's share of the cores less one, at most 8. Results are identical for any number")
    prefetch: int = Field(2, ge=1, description="episodes or batches each worker loads ahead")
    cache_bytes: int = Field(1 << 30, ge=0, description="size limit of the decoded-image cache in bytes (images held decoded and downsampled to the input size); 0: off. The data workers (threads) share the one cache")


class DetectorConfig(_Model):
    name: str = Field("yolox", description="detector plugin name")
    options: dict[str, Any] = Field(default_factory=dict, description="the plugin's options (e.g. size: tiny)")
    checkpoint: Path | None = Field(None, description="local checkpoint to start from (mmdet, torchvision or `megatron pretrain`): the usual path is to download the config's COCO weights from the mmdet model zoo and point this at them; the classifier is re-initialised for the task's classes")
    checkpoint_role: Literal["instead_of_stage1", "start_of_stage1"] = Field("instead_of_stage1", description="what detector.checkpoint is: the weights every learner starts from (stage 1 skipped), or the start of stage 1's joint training on the sources (cached under a key that includes the file's sha256)")
    force_checkpoint: bool = Field(False, description="load detector.checkpoint even when under half of its weights fit the detector (a checkpoint of another architecture); the load report in run.json lists what did not fit")
    freeze: Literal["none", "backbone", "backbone+neck"] = Field("none", description="parameter groups frozen while fine-tuning on the target")


class LearnerConfig(_Model):
    name: str = Field("reptile", description="learner plugin name")
    options: dict[str, Any] = Field(default_factory=dict, description="the learner's own options")


class EpisodeConfig(_Model):
    support_size: int = Field(4, ge=1, description="images in an episode's support batch")
    query_size: int = Field(4, ge=1, description="images in an episode's query batch")
    n_way: int | None = Field(None, ge=1, description="N-way episodes: classes per episode, labels remapped to 0..N-1 (default: image-level K-shot, all classes)")
    k_shot: int | None = Field(None, ge=1, description="with n_way: annotated images per class in the support set")


class TrainingConfig(_Model):
    """Meta-epochs, learning rates, compute budget, precision and device.

    A meta-epoch is ``source_epochs`` (M) epochs of outer steps over the source tasks, then
    ``finetune_epochs`` (F) fine-tuning epochs on the target pool and an evaluation on the validation and held-out
    splits; it is worth M + F baseline epochs (the method: M = 10, F = 5, 20 meta-epochs ~ 300 baseline epochs;
    see examples/configs/gpu.yaml). Stage 1 (``pretrain_*``) runs first and is cached. The defaults are sized for
    `megatron run --learner reptile --detector yolox` on a 2-core CPU (YOLOX-tiny at 128 px, the built-in suite at
    60 images per source task): measured times and numbers are in the README's "what to expect". The
    fine-tuning recipe (cosine decay after a warm-up, precise BatchNorm statistics) is what makes the answer
    stable from seed to seed (benchmarks/bench_seed_spread.py). F = 20 because at F = 10 the transfer-learning
    baseline had not finished learning the target: ten more epochs gained it about 34 mAP50 points, so a
    meta-learner could win against a baseline cut short (benchmarks/results/finetune_epochs/; lengths beyond 20
    are not measured in whole runs). Second-order MAML costs several times more per step than Reptile (cap it
    with --budget).
    """

    meta_epochs: int = Field(4, ge=1, description="meta-epochs (each: source training, target fine-tuning, evaluation)")
    source_epochs: int = Field(1, ge=1, description="M: passes over the source tasks per meta-epoch (method: 10)")
    finetune_epochs: int = Field(20, ge=0, description="F: fine-tuning epochs on the target pool per meta-epoch (method: 5; at 10 the baseline had not finished learning: benchmarks/results/finetune_epochs/)")
    steps_per_epoch: int | None = Field(None, ge=1, description="outer steps per source epoch (default: enough to see each source image once)")
    meta_batch: int = Field(2, ge=1, description="tasks (episodes) per outer step")
    inner_steps: int = Field(1, ge=1, description="inner-loop adaptation steps per episode")
    inner_lr: float = Field(0.01, gt=0, description="inner-loop (fast adaptation) learning rate")
    outer_lr: float = Field(1e-4, gt=0, description="outer (meta) learning rate; after stage 1 a fine-tuning rate (1e-3 perturbs the pre-trained detector so much that the target mAP50 swings from one meta-epoch to the next)")
    outer_optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    finetune_lr: float = Field(0.001, gt=0, description="learning rate when fine-tuning on the target pool")
    finetune_schedule: Literal["constant", "cosine"] = Field("cosine", description="fine-tuning learning-rate schedule after the warm-up (cosine: decays to 5% over the fine-tuning)")
    finetune_warmup: float = Field(0.1, ge=0, le=1, description="fraction of the fine-tuning steps with a linear learning-rate warm-up")
    finetune_ema: float = Field(0.0, ge=0, lt=1, description="decay of an exponential moving average of the weights while fine-tuning (YOLOX's recipe; the average is the adapted model); 0: off")
    finetune_bn: Literal["train", "frozen", "precise"] = Field("precise", description="BatchNorm while fine-tuning on the target pool: precise (trained, then the statistics recomputed on the pool for the final weights: 'precise BN'), train (running statistics as trained), or frozen (statistics and affine parameters kept from the meta-model)")
    batch_size: int = Field(8, ge=1, description="images per batch when fine-tuning / evaluating")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(10.0, description="gradient-norm clip (None: off)")
    compute_budget: int | None = Field(None, ge=1, description="train every learner until it has spent this many image passes (forward + backward, target fine-tuning included); default: the learner runs meta_epochs and the baseline gets what it spent")
    max_meta_epochs: int | None = Field(None, ge=1, description="under a compute budget, the most meta-epochs a learner may run (default: 10 x meta_epochs)")
    amp: Literal["off", "bf16", "fp16"] = Field("off", description="mixed precision (autocast; fp16 adds a gradient scaler)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's)")
    pretrain_epochs: int = Field(15, ge=0, description="stage 1: epochs of joint training on the source tasks before meta-training when no detector.checkpoint is given (cached by content hash and reused); 0: start from random weights")
    pretrain_lr: float = Field(2e-3, gt=0, description="stage 1: peak learning rate (AdamW, one-cycle schedule)")
    pretrain_seed: int = Field(0, description="stage 1's seed: fixed, so every run of a study (every seed of a benchmark) starts from the same pre-trained detector, as it would from published weights; vary it to put pre-training into the seed-to-seed spread")
    replicate: int = Field(0, ge=0, description="an independent repetition: changes the training randomness — initial head, episode draws, augmentation and batch order — but not the target split or the stage-1 checkpoint")


class EvaluationConfig(_Model):
    score_threshold: float = Field(0.3, ge=0, le=1, description="detections at or above this score count for precision/recall/F1")
    iou_threshold: float = Field(0.5, gt=0, lt=1, description="IoU for a true positive in precision/recall/F1")
    max_detections: int = Field(100, ge=1)
    operating_point: Literal["max_f1", "sensitivity", "fixed"] = Field("max_f1", description="the score threshold chosen on the validation split, reported (P/R/F1 and the FROC point on the held-out split) beside the fixed score_threshold's figures and stored in the model file as `megatron predict`'s default: max_f1 = the highest validation F1; sensitivity = the highest threshold reaching target_sensitivity on validation; fixed = score_threshold (also what applies without a validation split)")
    target_sensitivity: float = Field(0.9, gt=0, le=1, description="the validation sensitivity (recall) the `sensitivity` operating point must reach")


class SimilarityConfig(_Model):
    metrics: list[str] = Field(default_factory=lambda: ["wasserstein", "embedding", "label_aware"])
    select_sources: int | None = Field(None, ge=1, description="meta-train on the K source tasks closest to the target")
    metric: str = Field("wasserstein", description="the metric used by select_sources")
    sample_size: int = Field(50, ge=1, description="images sampled per dataset")
    unlabelled_target: list[Path] = Field(
        default_factory=list,
        description="folders of unlabelled images of the target (raster or DICOM, read like `megatron similarity "
                    "--folders`) that source selection may read besides the K-image pool and the validation split; "
                    "a file that is one of the target's held-out test images (the same path or the same bytes) is "
                    "refused")
    options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-metric options, by metric name")


class OutputConfig(_Model):
    dir: Path = Field(Path("runs"), description="parent folder of run directories")
    name: str | None = Field(None, description="run directory name (default: <learner>-<detector>-<seed>)")
    compare_baseline: bool = Field(True, description="also run the `finetune` baseline at the same compute and compare")
    plots: bool = True
    save_models: bool = Field(True, description="write each learner's adapted target detector to models/<learner>-final.pth and -best.pth")


class LoggerSpec(_Model):
    """One logger plugin switched on for the run (``megatron plugins`` lists them; a bare name is shorthand)."""

    name: str = Field(description="logger plugin name, e.g. tensorboard or csv")
    options: dict[str, Any] = Field(default_factory=dict, description="the logger's options")

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


class ExperimentConfig(_Model):
    data: DataConfig = Field(default_factory=DataConfig)
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    episodes: EpisodeConfig = Field(default_factory=EpisodeConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    similarity: SimilarityConfig = Field(default_factory=SimilarityConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    loggers: list[LoggerSpec] = Field(default_factory=list, description="logger plugins switched on for the run (`{name, options}` or a bare name), e.g. [tensorboard, csv]")
    seed: int = Field(0, description="drives Python, NumPy and torch generators")

    @model_validator(mode="after")
    def _check(self) -> "ExperimentConfig":
        if self.episodes.k_shot is not None and self.episodes.n_way is None:
            raise ValueError("episodes.k_shot needs episodes.n_way (N-way K-shot episodes)")
        return self


def format_validation_error(exc: ValidationError, source: str = "config",
                            origins: dict[str, str] | None = None) -> str:
    """Every error of ``exc``, one line each with its key path. ``origins`` maps an override key (dotted) to
    where it came from (``--set training.meta_epochs=0``, ``--meta-epochs``): an error in that key, or under
    it, is labelled with it instead of ``source``."""
    origins = origins or {}
    lines = []
    from_file = from_cli = 0
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (misspelt?); see `megatron config show` for the valid keys"
        origin = _origin_of(loc, origins)
        if origin is None:
            from_file += 1
            lines.append(f"  {loc}: {msg}")
        else:
            from_cli += 1
            lines.append(f"  {loc}: {msg} (from {origin})")
    where = source if not from_cli else "command line" if not from_file else f"{source} and the command line"
    return "\n".join([f"{where}: {exc.error_count()} error(s) in {exc.title}", *lines])


def _origin_of(loc: str, origins: dict[str, str]) -> str | None:
    """The origin of the longest override key that is ``loc``, one of its parents, or under it (``--set
    training.meta_epochs.x=1`` turns ``training.meta_epochs`` into a mapping: the error there is the --set's)."""
    best = None
    for key, origin in origins.items():
        related = loc == key or loc.startswith(key + ".") or key.startswith(loc + ".")
        if related and (best is None or len(key) > len(best[0])):
            best = (key, origin)
    return best[1] if best else None


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """``set_dotted(d, "training.meta_epochs", 3)`` — how CLI overrides are applied to the YAML dict.

    A ``None`` value is set like any other (YAML ``null``: "off" / "default" for optional keys). An integer
    part indexes a list (``data.datasets.0.options.root``). A path that cannot be followed is a ConfigError.
    """
    keys = dotted.split(".")
    if not dotted or any(not k.strip() for k in keys):
        raise ConfigError(f"{dotted!r} is not a config key; expected a dotted path such as training.meta_epochs")
    cur: Any = data
    for depth, k in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(cur, list):
            if not k.lstrip("-").isdigit() or not -len(cur) <= int(k) < len(cur):
                where = ".".join(keys[:depth]) or "(top level)"
                raise ConfigError(f"{dotted}: {where} is a list of {len(cur)} item(s); {k!r} is not an index into it "
                                  f"(use 0..{len(cur) - 1}, or set the whole list: {where}=[...])")
            if last:
                cur[int(k)] = value
                return
            nxt = cur[int(k)]
            if not isinstance(nxt, (dict, list)):
                nxt = {}
                cur[int(k)] = nxt
            cur = nxt
            continue
        if last:
            cur[k] = value
            return
        nxt = cur.get(k)
        if not isinstance(nxt, (dict, list)):
            nxt = {}
            cur[k] = nxt
        cur = nxt


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Set every dotted key of ``overrides`` in ``data`` (in order; ``None`` included: it is YAML ``null``)."""
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in ``path`` (``safe_load``); a ConfigError naming the file when it is missing or bad."""
    p = Path(path)
    try:
        loaded = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {p} is a folder; pass the YAML file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(exc).split())}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (data, detector, learner, ...)")
    return loaded


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                origins: dict[str, str] | None = None) -> ExperimentConfig:
    """Read YAML (``safe_load``), apply dotted ``overrides`` (they win over the file; a ``None`` value sets the
    key to null, e.g. ``{"training.grad_clip": None}`` turns clipping off), validate. ``origins`` labels
    errors in overridden keys with where the override came from (default: ``override KEY``). Errors:
    :class:`ConfigError`."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(Path(path))
        data = read_config_file(path)
    apply_overrides(data, overrides)
    labels = {key: f"override {key}" for key in (overrides or {})}
    labels.update(origins or {})
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, labels)) from None


def validate_plugin_options(plugin_cls: type, options: dict[str, Any], where: str) -> BaseModel:
    """Validate ``options`` against ``plugin_cls.Options``; errors name the key path (``where`` + key)."""
    try:
        return plugin_cls.Options.model_validate(options)
    except ValidationError as exc:
        lines = [f"{where}: {exc.error_count()} error(s) in the options of {plugin_cls.PLUGIN_NAME!r}"]
        valid = ", ".join(plugin_cls.Options.model_fields) or "(none)"
        for err in exc.errors():
            loc = ".".join([where, *(str(p) for p in err["loc"])])
            msg = err["msg"] if err["type"] != "extra_forbidden" else f"unknown option (valid: {valid})"
            lines.append(f"  {loc}: {msg}")
        raise ConfigError("\n".join(lines)) from None


def dump_config(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
