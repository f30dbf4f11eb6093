"""Starting from published (model-zoo) weights: a COCO-style mmdet checkpoint loads with the classifier
re-initialised for the task's classes and its load report goes to the run record; a checkpoint of another
architecture is refused with the mismatch table unless forced; the checkpoint as the start of stage 1 (cached under
its checksum) or in place of it."""
from __future__ import annotations

import pytest
import torch

from megatron.config import ExperimentConfig
from megatron.errors import MegatronError
from megatron.experiment import build_detector
from megatron.training import runner
from megatron.training.pretrain import stage1_cache_key

SIZE = 64


@pytest.fixture(autouse=True)
def _single_torch_thread(_torch_threads):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def coco_yolox_file(tmp_path_factory) -> tuple:
    """A model-zoo-style checkpoint of YOLOX-tiny for COCO's 80 classes (mmdet names, no ``model.`` prefix)."""
    from megatron_plugins.detectors.yolox import YOLOX

    torch.manual_seed(3)
    coco = YOLOX(80, SIZE)
    path = tmp_path_factory.mktemp("zoo") / "yolox_tiny_coco.pth"
    state = {k.removeprefix("model."): v for k, v in coco.state_dict().items()}
    torch.save({"state_dict": state}, path)
    return path, state


def config(checkpoint=None, **detector) -> ExperimentConfig:
    return ExperimentConfig.model_validate({"data": {"input_size": SIZE},
                                            "detector": {"name": "yolox", "checkpoint": checkpoint, **detector}})


def test_coco_weights_load_with_the_classifier_reinitialised_and_a_report_for_the_record(coco_yolox_file,
                                                                                        make_plugin_manager):
    path, state = coco_yolox_file
    record: dict = {}
    det = build_detector(config(path), make_plugin_manager(), 3, checkpoint=path, report=record)
    report = record["load_report"]
    cls_names = set(det.parameter_groups()["head_cls"])
    assert set(report["classifier_reinitialised"]) == {n for n in cls_names if n.endswith("weight") or
                                                       n.endswith("bias")}
    assert report["mismatched"] == len(cls_names) and report["loaded"] == len(state) - len(cls_names)
    own = det.state_dict()
    assert torch.equal(own["model.backbone.stem.conv.conv.weight"], state["backbone.stem.conv.conv.weight"])
    assert own["model.bbox_head.multi_level_conv_cls.0.weight"].shape[0] == 3


def test_a_checkpoint_of_another_architecture_is_refused_with_its_mismatch_table_unless_forced(
        coco_yolox_file, tmp_path, make_plugin_manager):
    path, state = coco_yolox_file
    keys = sorted(state)
    foreign = {f"encoder.layers.{i}.attn.weight": torch.zeros(4, 4) for i in range(len(keys))}
    other = tmp_path / "detr.pth"
    torch.save({"state_dict": {**{k: state[k] for k in keys[:10]}, **foreign}}, other)
    with pytest.raises(MegatronError, match=r"(?s)only 10 of its \d+ weights.*unexpected.*detector\.force_checkpoint"):
        build_detector(config(other), make_plugin_manager(), 3, checkpoint=other)
    record: dict = {}
    build_detector(config(other, force_checkpoint=True), make_plugin_manager(), 3, checkpoint=other, report=record)
    assert record["load_report"]["loaded"] == 10 and record["load_report"]["unexpected"] == len(foreign)


def test_the_stage1_cache_key_changes_with_the_start_checkpoints_content(tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"w": torch.zeros(2)}, a)
    torch.save({"w": torch.ones(2)}, b)
    role = {"checkpoint_role": "start_of_stage1"}
    key_a, inputs = stage1_cache_key(config(a, **role), [])
    key_b, _ = stage1_cache_key(config(b, **role), [])
    key_none, _ = stage1_cache_key(config(None), [])
    assert len({key_a, key_b, key_none}) == 3
    assert inputs["start_checkpoint"] and len(inputs["start_checkpoint"]) == 64


@pytest.mark.parametrize("role, stage1_runs", [("instead_of_stage1", False), ("start_of_stage1", True)])
def test_the_checkpoint_replaces_stage1_or_starts_it(role, stage1_runs, tmp_path, monkeypatch, make_plugin_manager):
    ckpt = tmp_path / "zoo.pth"
    torch.save({"w": torch.zeros(1)}, ckpt)
    calls = []
    monkeypatch.setattr(runner, "stage1_cache_key", lambda cfg, sources, pm: ("k" * 64, {"start_checkpoint": "s"}))

    def fake_stage1(cfg, pm, sources, progress=True, cache_key=None):
        calls.append(cfg.detector.checkpoint)
        return {"checkpoint": str(tmp_path / "stage1.pth"), "cache_key": cache_key[0], "reused": False,
                "epochs": 1, "wall_s": 0.0}

    monkeypatch.setattr(runner, "stage1_checkpoint", fake_stage1)

    class NoEvents:
        def stage_start(self, *a, **k): ...
        def stage_end(self, *a, **k): ...

    record: dict = {}
    start = runner._stage_pretrain(config(ckpt, checkpoint_role=role), make_plugin_manager(), [],
                                   runner.mdist.init_from_env("cpu"), NoEvents(), record)
    assert bool(calls) == stage1_runs
    assert start == (tmp_path / "stage1.pth" if stage1_runs else ckpt)
    if stage1_runs:
        assert calls == [ckpt]  # stage 1 itself starts from the model-zoo weights (pretrain's build_detector)
        assert record["pretrain"]["started_from"]["checkpoint"] == str(ckpt)
    else:
        assert record["pretrain"]["source"] == "detector.checkpoint"
