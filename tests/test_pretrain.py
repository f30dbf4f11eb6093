"""``megatron pretrain``: merged label space over the source tasks, a checkpoint `run` can start from."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron import hookimpl
from megatron.config import load_config
from megatron.api.dataset import DatasetOptions, DatasetPlugin
from megatron.training.pretrain import PretrainSettings, interleaved_batches, merged_categories, pretrain
from megatron.types import ImageRecord, Task
from megatron.training.weights import load_weights, read_checkpoint_header


@pytest.fixture(autouse=True)
def _single_torch_thread(_torch_threads):
    """mmdet models on small inputs: one intra-op thread is faster, and far faster on a loaded machine."""
    torch.set_num_threads(1)



def squares_task(name: str, categories: list[str], n_images: int, seed: int) -> Task:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n_images):
        x, y, s = (int(v) for v in rng.integers(5, 40, 3))
        records.append(ImageRecord(image_id=i, path=None, width=96, height=96,
                                   boxes=np.array([[x, y, x + s + 10, y + s + 10]], np.float32),
                                   labels=np.array([i % len(categories)]), file_name=f"{name}{i}.png"))

    def load(record: ImageRecord) -> np.ndarray:
        img = np.full((96, 96), 30, np.uint8)
        x1, y1, x2, y2 = record.boxes[0].astype(int)
        img[y1:y2, x1:x2] = 200 if record.labels[0] == 0 else 120
        return img

    return Task(name=name, categories=categories, records=records, image_loader=load, source="test")


class SquaresDataset(DatasetPlugin):
    PLUGIN_NAME = "test-squares"
    Options = DatasetOptions

    def load(self) -> list[Task]:
        return [squares_task("xray", ["nodule", "mass"], 6, 0), squares_task("mri", ["nodule"], 4, 1),
                squares_task("eit", ["lesion"], 4, 2)]


class SquaresPlugin:
    @hookimpl
    def megatron_register_datasets(self):
        return [SquaresDataset]


def test_merged_categories_are_prefixed_by_task():
    tasks = SquaresDataset().load()[:2]
    categories, offsets = merged_categories(tasks)
    assert categories == ["xray/nodule", "xray/mass", "mri/nodule"]
    assert offsets == {"xray": 0, "mri": 2}


def test_an_epoch_visits_every_source_image_once():
    from megatron.data.preprocess import Preprocessor

    tasks = SquaresDataset().load()[:2]
    seen = [(t.name, m["image_id"]) for t, b in interleaved_batches(tasks, 4, Preprocessor(64), np.random.default_rng(0))
            for m in b.meta]
    assert sorted(seen) == sorted([("xray", i) for i in range(6)] + [("mri", i) for i in range(4)])


def test_pretrain_writes_a_checkpoint_run_can_start_from(tmp_path, make_plugin_manager):
    pm = make_plugin_manager(SquaresPlugin())
    cfg = load_config(overrides={"data.datasets": [{"plugin": "test-squares"}], "data.target": "eit",
                                 "data.input_size": 64, "data.augment": False, "detector.name": "yolox",
                                 "training.device": "cpu"})
    out = tmp_path / "pre" / "yolox.pt"
    steps = []
    result = pretrain(cfg, pm, out, PretrainSettings(epochs=2, lr=1e-3, batch_size=4),
                      progress=False, on_step=lambda i, loss: steps.append(loss))
    assert out.is_file() and result.epochs == 2
    assert result.steps == len(steps) == 2 * (2 + 1)  # ceil(6/4) + ceil(4/4) batches per epoch
    assert all(np.isfinite(steps))
    header = read_checkpoint_header(out)
    assert header["num_classes"] == 3
    assert header["meta"]["categories"] == ["xray/nodule", "xray/mass", "mri/nodule"]
    assert header["meta"]["tasks"] == ["xray", "mri"] and "eit" not in header["meta"]["categories"]
    assert len(header["meta"]["losses"]) == 2
    # what `run` does: the target's class count; everything but the classifier comes from the checkpoint
    det_cls = pm.register_of("detector").get("yolox")
    torch.manual_seed(123)
    target = det_cls(1, 64)
    report = load_weights(target, out)
    assert report.reinitialised_classifier == (3, 1)
    saved = torch.load(out, weights_only=True)["state_dict"]
    stem = "model.backbone.stem.conv.conv.weight"
    assert torch.equal(target.state_dict()[stem], saved[stem])


def test_pretrain_cli_reports_bad_config(tmp_path, capsys):
    from megatron.cli import main

    rc = main(["pretrain", "--out", str(tmp_path / "x.pt"), "--set", "detector.name=nonexistent-detector"])
    assert rc == 2
    assert "nonexistent-detector" in capsys.readouterr().err
