"""A stand-in for megatron.training.runner.run_experiment: records with chosen metrics, instantly (top-level, picklable)."""
from __future__ import annotations

from pathlib import Path

from megatron.atomic_io import atomic_write_json

SOURCES = ["brain_mri", "breast_mri", "chest_xray", "mammography", "pneumonia", "ultrasound"]
# learner -> added mAP50 (fraction); finetune is the reference
# the positive control (finetune from random weights, `training.pretrain_epochs: 0`) is far worse, with its own noise
EFFECT = {"finetune": 0.0, "reptile": 0.05, "maml": 0.0, "incremental": 0.01, "incremental-frozen": -0.02,
          "finetune_scratch": -0.25}
# seed -> shared offset (same for every learner: what pairing removes)
SEED_OFFSET = {0: 0.0, 1: 0.08, 2: -0.04, 3: 0.02, 4: 0.05}
# learner -> seed -> extra noise (not shared), so some comparisons are undecided
NOISE = {"maml": {0: 0.03, 1: -0.04, 2: 0.02, 3: -0.01, 4: 0.01},
         "finetune_scratch": {0: 0.01, 1: -0.02, 2: 0.015, 3: 0.0, 4: -0.01}}
# seed -> what `training.replicate: 1` changes (the A/A control: independent randomness, no effect on average)
REPLICATE_NOISE = {0: 0.01, 1: -0.012, 2: 0.004, 3: -0.006, 4: 0.003}
CALLS: list[tuple[str, bool]] = []


def final_map50(learner: str, seed: int, n_sources: int, shots: int, lr: float, replicate: int = 0,
                effect: dict | None = None, noise: dict | None = None) -> float:
    effect = EFFECT if effect is None else {**EFFECT, **effect}
    noise = NOISE if noise is None else {**NOISE, **noise}
    return round(0.30 + effect.get(learner, 0.0) + SEED_OFFSET.get(seed, 0.0) + noise.get(learner, {}).get(seed, 0.0)
                 + replicate * REPLICATE_NOISE.get(seed, 0.0)
                 + 0.01 * n_sources + 0.001 * shots - 10 * abs(lr - 0.001), 6)


def fake_label(cfg) -> str:
    """Which learner the fake's numbers are for: the plugin, or a variant the config gives away."""
    if cfg.learner.name == "finetune" and cfg.training.pretrain_epochs == 0 and cfg.detector.checkpoint is None:
        return "finetune_scratch"
    return cfg.learner.options.get("label_for_fake") or cfg.learner.name


def fake_runner(cfg, run_dir, pm=None, resume=False, progress=False, learners=None, effect=None, noise=None,
                replicate_matters=True):
    run_dir = Path(run_dir)
    CALLS.append((run_dir.name, resume))
    label = fake_label(cfg)
    if not cfg.similarity.select_sources:
        sources = list(cfg.data.sources)
        selection = None
    else:
        sources = SOURCES[-cfg.similarity.select_sources:]  # "closest": the last N
        selection = {"metric": cfg.similarity.metric, "k": cfg.similarity.select_sources, "chosen": sources}
    final = final_map50(label, cfg.seed, len(sources), cfg.data.shots, cfg.training.outer_lr,
                        cfg.training.replicate if replicate_matters else 0, effect, noise)
    budget = cfg.training.compute_budget
    epochs = []
    for e in (1, 2, 3):
        m = final * e / 3
        epochs.append({"meta_epoch": e, "train_loss": 1.0 / e, "steps": 4, "wall_s": 0.01,
                       "compute": {"images_forward": budget * e // 6, "images_backward": budget * e // 6,
                                   "spent": 2 * (budget * e // 6)},
                       "metrics": {"mAP50": m, "mAP50_95": m / 2, "precision": m + 0.1, "recall": m + 0.05,
                                   "F1": m + 0.07, "per_class_AP50": {"lesion": m}}})
    lrec = {"epochs": epochs, "final": epochs[-1]["metrics"], "compute": {**epochs[-1]["compute"], "budget": budget},
            "stopped_by": "budget", "baseline_equivalent_epochs": 3 * (cfg.training.source_epochs
                                                                      + cfg.training.finetune_epochs)}
    record = {"megatron_version": "0.1.0", "status": "complete", "config": cfg.model_dump(mode="json"),
              "versions": {"python": "3.x", "torch": "2.x", "platform": "test", "cpu": "fake", "device": "cpu",
                           "threads": 1},
              "seed": cfg.seed, "target": cfg.data.target, "sources": sources, "shots": cfg.data.shots,
              "selection": selection, "learners": {cfg.learner.name: lrec}}
    atomic_write_json(run_dir / "run.json", record)  # as the real runner does
    ckpt = run_dir / "checkpoints" / cfg.learner.name
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "last.pt").write_bytes(b"weights")
    return record


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so the benchmark does not catch it as a cell failure."""


def killing_runner(cfg, run_dir, pm=None, resume=False, progress=False, learners=None):
    """Runs cells normally until the cell named `KILL_AT`, where it leaves a 'running' record and dies."""
    run_dir = Path(run_dir)
    if run_dir.name == KILL_AT[0]:
        CALLS.append((run_dir.name, resume))
        atomic_write_json(run_dir / "run.json", {"status": "running", "config": cfg.model_dump(mode="json"),
                                                 "learners": {}})
        raise Killed()
    return fake_runner(cfg, run_dir, pm, resume, progress)


KILL_AT = [""]


def failing_runner(cfg, run_dir, pm=None, resume=False, progress=False, learners=None):
    if cfg.seed == 1 and cfg.learner.name == "reptile":
        raise RuntimeError("loss became nan")
    return fake_runner(cfg, run_dir, pm, resume, progress)


def underpowered_runner(cfg, run_dir, pm=None, resume=False, progress=False, learners=None):
    """A grid whose noise hides even the effect of pre-training: scratch is as good as finetune up to big noise."""
    return fake_runner(cfg, run_dir, pm, resume, progress, effect={"finetune_scratch": -0.05},
                       noise={"finetune_scratch": {0: 0.12, 1: -0.15, 2: 0.03, 3: -0.1, 4: 0.1}})


def replicate_ignored_runner(cfg, run_dir, pm=None, resume=False, progress=False, learners=None):
    """A runner that does not use `training.replicate`: the A/A pair gives identical numbers."""
    return fake_runner(cfg, run_dir, pm, resume, progress, replicate_matters=False)


#: the cell `dying_runner` kills on its first try (an environment variable: submitit's jobs inherit it)
DIE_AT_ENV = "MEGATRON_TEST_DIE_AT_CELL"


def dying_runner(cfg, run_dir, pm=None, resume=False, progress=False, learners=None):
    """Like a job whose node dies: in the cell named by ``$MEGATRON_TEST_DIE_AT_CELL``, on its first try, leaves a
    'running' record and SIGKILLs its own process; every other call runs normally (and says whether it resumed)."""
    import os
    import signal

    run_dir = Path(run_dir)
    marker = run_dir / "died-once"
    if run_dir.name == os.environ.get(DIE_AT_ENV) and not marker.exists():
        marker.write_text("killed\n")
        atomic_write_json(run_dir / "run.json", {"status": "running", "config": cfg.model_dump(mode="json"),
                                                 "learners": {}})
        os.kill(os.getpid(), signal.SIGKILL)
    if resume:
        (run_dir / "resumed").write_text("yes\n")
    return fake_runner(cfg, run_dir, pm, resume, progress)
