"""The medsynth lesion-swap family (the meta-learning positive control): the tasks share one scene generator and
disagree only on which shape is the lesion, as designed; the family is opt-in and leaves the suite unchanged."""
from __future__ import annotations

import numpy as np
import pytest

from megatron_plugins.datasets import medsynth_scenes
from megatron_plugins.datasets.medsynth import MEDSYNTH_SWAP_TASKS, MEDSYNTH_TASKS, MedSynthDataset
from megatron_plugins.datasets.medsynth_scenes import (LESION_SWAP_RULES, LESION_SWAP_SHAPES, LESION_SWAP_SOURCES,
                                                       LESION_SWAP_TARGET, box_of, lesion_swap_scene, render)

SIZE = 64


def scene_boxes(seed: int, index: int) -> dict[str, list[tuple]]:
    """Every painted object's box of one scene, by shape."""
    _, objects = lesion_swap_scene(np.random.default_rng([seed, index]), SIZE)
    out: dict[str, list[tuple]] = {s: [] for s in LESION_SWAP_SHAPES}
    for shape, alpha in objects:
        out[shape].append(tuple(box_of(alpha, 0.5 * min(1.0, float(alpha.max())))))
    return out


def test_every_shape_is_the_lesion_of_exactly_one_source_task():
    assert sorted(LESION_SWAP_SOURCES.values()) == sorted(LESION_SWAP_SHAPES)
    assert LESION_SWAP_RULES[LESION_SWAP_TARGET] in LESION_SWAP_SHAPES


@pytest.mark.parametrize("index", range(4))
def test_the_same_scene_is_annotated_differently_by_each_task(index):
    objects = scene_boxes(7, index)
    assert all(objects[s] for s in LESION_SWAP_SHAPES)  # every scene holds every shape
    annotated = {}
    for task, shape in LESION_SWAP_SOURCES.items():
        image, boxes, labels = medsynth_scenes.render_lesion_swap(np.random.default_rng([7, index]), SIZE, shape)
        assert set(labels.tolist()) == {0}
        annotated[task] = sorted(map(tuple, boxes.tolist()))
        assert annotated[task] == sorted(objects[shape])  # the boxes are the lesion shape's, and only those
    # four tasks, one image: four disjoint sets of boxes, together every object of the scene
    all_boxes = [b for boxes in annotated.values() for b in boxes]
    assert len(all_boxes) == len(set(all_boxes)) == sum(len(v) for v in objects.values())


def test_the_tasks_share_appearance_shapes_differ_in_nothing_but_outline():
    """Contrast and size are drawn from one distribution for every shape: the mean box side per shape agrees."""
    sides = {s: [] for s in LESION_SWAP_SHAPES}
    for i in range(40):
        for shape, boxes in scene_boxes(3, i).items():
            sides[shape] += [b[2] - b[0] for b in boxes]
    means = [np.mean(v) for v in sides.values()]
    assert max(means) - min(means) < 0.3 * np.mean(means)


def test_the_family_is_opt_in_and_the_suite_is_unchanged(tmp_path):
    default = MedSynthDataset(MedSynthDataset.Options(cache_dir=tmp_path))
    assert default.task_names() == list(MEDSYNTH_TASKS)
    assert not set(MEDSYNTH_SWAP_TASKS) & set(MEDSYNTH_TASKS)
    # a task's random stream is keyed by its index: the suite's tasks keep theirs (the family is appended)
    assert list(medsynth_scenes.TASK_SPECS)[:len(MEDSYNTH_TASKS)] == list(MEDSYNTH_TASKS)


def test_the_family_loads_as_coco_tasks_with_the_target_sized_by_target_images(tmp_path):
    ds = MedSynthDataset(MedSynthDataset.Options(cache_dir=tmp_path, tasks=["swap_disc", "swap_target"],
                                                 images_per_task=3, target_images=5, image_size=64))
    tasks = {t.name: t for t in ds.load()}
    assert len(tasks["swap_disc"]) == 3 and len(tasks["swap_target"]) == 5
    assert tasks["swap_target"].categories == ["lesion"]
    rec = tasks["swap_disc"].records[0]
    expected = render("swap_disc", 0, 0, 64)
    assert np.array_equal(tasks["swap_disc"].load_image(rec), expected[0])
    assert np.allclose(rec.boxes, expected[1])
