"""The contract pages in registry_docs/contracts/: each names every member of its base class, and the complete
example on each page is imported and run here, as a plugin author would use it."""
from __future__ import annotations

import copy
import importlib
import inspect
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_detector  # noqa: E402

from megatron.docs import CONTRACT_KINDS, contract_page_path  # noqa: E402
from megatron.errors import DataError  # noqa: E402


def example_module(kind: str, tmp_path: Path, monkeypatch):
    """The first ```python block under "## Complete minimal example" of the kind's contract page, imported as a
    module named after the file its docstring names (``my_fomaml.py`` -> ``my_fomaml``)."""
    text = contract_page_path(kind).read_text()
    section = text.split("## Complete minimal example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    name = re.match(r'"""(\w+)\.py', code).group(1)
    (tmp_path / f"{name}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    return importlib.import_module(name)


# --- the pages name what the base classes have ---------------------------------------------------------------
def public_members(cls: type) -> set[str]:
    return {n for n, v in vars(cls).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))}


@pytest.mark.parametrize("kind", CONTRACT_KINDS)
def test_every_kind_has_a_contract_page_naming_every_member_of_its_base_class(kind):
    from megatron.pluginmanager import KINDS

    text = contract_page_path(kind).read_text()
    base = KINDS[kind][1]
    missing = sorted(m for m in public_members(base) | {"PLUGIN_NAME", "Options"} if f"`{m}" not in text)
    assert not missing, f"{contract_page_path(kind)} does not mention {missing} of {base.__qualname__}"
    assert "## Complete minimal example" in text or kind == "detector"
    assert "Errors to raise" in text or kind == "logger"


def test_learner_contract_names_every_context_field():
    from dataclasses import fields

    from megatron.api.learner import LearnerContext

    text = contract_page_path("learner").read_text()
    missing = [f.name for f in fields(LearnerContext) if f"`{f.name}`" not in text]
    assert not missing, f"contracts/learner.md does not describe LearnerContext fields {missing}"


def test_dataset_contract_names_every_task_and_record_field():
    from dataclasses import fields

    from megatron.types import ImageRecord, Task

    text = contract_page_path("dataset").read_text()
    missing = [f.name for cls in (Task, ImageRecord) for f in fields(cls) if f"`{f.name}" not in text]
    assert not missing, f"contracts/dataset.md does not describe {missing}"


# --- the learner example --------------------------------------------------------------------------------------
def blob_episodes(n_episodes: int = 2, seed: int = 0):
    from megatron.data.episodes import EpisodeSampler
    from megatron.data.preprocess import Preprocessor

    tasks = tiny_detector.BlobsDataset(tiny_detector.BlobsOptions(images_per_task=8)).load()[:3]
    sampler = EpisodeSampler(2, 2, Preprocessor(64), seed=seed)
    return sampler.meta_batch(tasks, n_episodes)


def make_learner(cls, **ctx):
    from megatron.api.learner import LearnerContext

    torch.manual_seed(0)
    detector = tiny_detector.TinyDetector(2, 64)
    return cls(detector, None, LearnerContext(outer_lr=0.01, inner_lr=0.05, inner_steps=2, **ctx))


def test_learner_example_runs_charges_its_compute_and_resumes_exactly(tmp_path, monkeypatch, make_plugin_manager):
    mod = example_module("learner", tmp_path, monkeypatch)
    pm = make_plugin_manager(mod, tiny_detector, builtins=False)
    cls = pm.registers["learner"].get("my-fomaml")
    episodes = blob_episodes()

    learner = make_learner(cls)
    before = copy.deepcopy(learner.detector.state_dict())
    stats = learner.meta_step(episodes)
    assert set(stats) == {"loss"} and np.isfinite(stats["loss"])
    assert any(not torch.equal(before[k], v) for k, v in learner.detector.state_dict().items())
    # 2 episodes x (2 inner steps x 2 support + 2 query) images, forward and backward alike
    assert learner.ctx.compute.images_forward == learner.ctx.compute.images_backward == 2 * (2 * 2 + 2)

    # resume: weights + state_dict into a fresh learner continue exactly like the uninterrupted one
    learner.meta_step(episodes)
    resumed = make_learner(cls)
    half = make_learner(cls)
    half.meta_step(episodes)
    resumed.detector.load_state_dict(half.detector.state_dict())
    resumed.load_state_dict(copy.deepcopy(half.state_dict()))
    resumed.meta_step(episodes)
    for (name, a), b in zip(learner.detector.state_dict().items(), resumed.detector.state_dict().values()):
        assert torch.equal(a, b), name


def test_learner_example_through_a_run(tmp_path, monkeypatch, make_plugin_manager):
    from megatron.config import load_config
    from megatron.training.runner import run_experiment

    mod = example_module("learner", tmp_path, monkeypatch)
    pm = make_plugin_manager(mod, tiny_detector)
    cfg = load_config(None, {
        "data.datasets": [{"plugin": "blobs", "options": {"images_per_task": 8}}], "data.target": "target",
        "data.shots": 4, "data.eval_images": 4, "data.input_size": 64, "detector.name": "tiny",
        "learner.name": "my-fomaml", "learner.options": {"inner_steps": 1}, "training.meta_epochs": 1,
        "training.steps_per_epoch": 2, "training.finetune_epochs": 1, "training.pretrain_epochs": 0,
        "output.dir": str(tmp_path / "runs"), "output.compare_baseline": False, "output.plots": False,
        "output.save_models": False})
    record = run_experiment(cfg, run_dir=tmp_path / "run", pm=pm, progress=False)
    lrec = record["learners"]["my-fomaml"]
    assert lrec["steps_done"] == 2 and lrec["final"]["mAP50"] >= 0.0
    assert record["status"] == "complete"


# --- the dataset example -------------------------------------------------------------------------------------
def write_csv_dataset(root: Path, rows: str) -> Path:
    import cv2

    (root / "images").mkdir(parents=True)
    cv2.imwrite(str(root / "images" / "a.png"), np.full((40, 60), 90, np.uint8))
    cv2.imwrite(str(root / "images" / "b.png"), np.full((30, 20), 30, np.uint16))
    (root / "boxes.csv").write_text("image,x1,y1,x2,y2,label\n" + rows)
    return root


def test_dataset_example_loads_tasks_and_reports_bad_input_by_file_and_line(tmp_path, monkeypatch, make_plugin_manager):
    mod = example_module("dataset", tmp_path / "mod", monkeypatch) if (tmp_path / "mod").mkdir() is None else None
    pm = make_plugin_manager(mod, builtins=False)
    cls = pm.registers["dataset"].get("csv-boxes")
    root = write_csv_dataset(tmp_path / "chest", "a.png,1,2,11,12,nodule\na.png,5,5,25,30,mass\nb.png,0,0,10,10,nodule\n")
    (task,) = cls(cls.Options(root=root, modality="x-ray")).load()
    assert (task.name, task.categories, task.modality) == ("chest", ["mass", "nodule"], "x-ray")
    a, b = task.records
    assert (a.width, a.height, b.width, b.height) == (60, 40, 20, 30)
    assert a.boxes.tolist() == [[1, 2, 11, 12], [5, 5, 25, 30]] and a.labels.tolist() == [1, 0]
    assert task.load_image(b).dtype == np.uint16  # 16-bit kept; the preprocessing windows it

    bad = write_csv_dataset(tmp_path / "bad", "a.png,1,2,11,12,nodule\na.png,5,x,25,30,mass\n")
    with pytest.raises(DataError, match=r"boxes.csv, line 3: .*fix that line"):
        cls(cls.Options(root=bad)).load()
    missing = write_csv_dataset(tmp_path / "missing", "c.png,1,2,11,12,nodule\n")
    with pytest.raises(DataError, match=r"'c.png' is not in .*images"):
        cls(cls.Options(root=missing)).load()


# --- the similarity and logger examples --------------------------------------------------------------------------
def test_similarity_example_ranks_by_mean_grey_level(tmp_path, monkeypatch, make_plugin_manager):
    from megatron.types import ImageRecord, Task

    mod = example_module("similarity", tmp_path, monkeypatch)
    pm = make_plugin_manager(mod, builtins=False)
    metric = pm.registers["similarity"].get("mean-intensity")()

    def constant(name: str, value: int) -> Task:
        records = [ImageRecord(i, None, 8, 8, np.zeros((0, 4)), np.zeros(0)) for i in range(3)]
        return Task(name, ["x"], records, image_loader=lambda r: np.full((8, 8), value, np.uint8))

    a, b = metric.summarize(constant("a", 100)), metric.summarize(constant("b", 140))
    assert metric.distance(a, a) == 0.0 and metric.distance(a, b) == metric.distance(b, a) == 40.0


def test_logger_example_gets_its_options_and_writes_lines(tmp_path, monkeypatch, make_plugin_manager):
    import json

    from megatron.config import load_config
    from megatron.training.run_loggers import active_loggers

    mod = example_module("logger", tmp_path / "mod", monkeypatch) if (tmp_path / "mod").mkdir() is None else None
    pm = make_plugin_manager(mod, builtins=False)
    cfg = load_config(None, {"loggers": [{"name": "jsonl", "options": {"every": 2}}]})
    with active_loggers(cfg, pm, tmp_path / "run"):
        for n in (1, 2, 3, 4):
            pm.hook.megatron_meta_step_end(learner="maml", meta_epoch=1, step=n,
                                           stats={"loss": 1.0, "global_step": n, "compute_spent": n})
        pm.hook.megatron_evaluation_end(learner="maml", meta_epoch=1, split="heldout", metrics={"mAP50": 0.5, "F1": 0.4})
    lines = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [(x["event"], x.get("global_step")) for x in lines] == [("step", 2), ("step", 4), ("evaluation", None)]
    assert inspect.getsource(mod).startswith('"""my_jsonl_logger.py')
