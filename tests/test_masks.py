"""Masks as boxes: the connected-component converter (label maps, instance masks, minimum size, class map) and
the ``masks`` dataset plugin on PNG label / instance / palette masks, with its bad inputs."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from megatron.data.io import write_image
from megatron.data.masks import categories_of, component_boxes, instance_mask_boxes, label_map_boxes
from megatron.errors import DataError
from megatron_plugins.datasets.masks import MasksDataset


def test_each_connected_component_of_each_class_is_one_box_on_pixel_edges():
    mask = np.zeros((20, 20), np.uint8)
    mask[2:5, 3:8] = 1  # rows 2..4, columns 3..7
    mask[10:12, 10:12] = 1
    mask[15:18, 1:4] = 2
    boxes, labels = label_map_boxes(mask, {1: "tumour", 2: "cyst"}, ["tumour", "cyst"], "m.png")
    got = sorted(zip(labels.tolist(), boxes.tolist()))
    assert got == [(0, [3, 2, 8, 5]), (0, [10, 10, 12, 12]), (1, [1, 15, 4, 18])]


def test_pixels_touching_at_a_corner_are_one_lesion():
    mask = np.zeros((6, 6), bool)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True
    assert component_boxes(mask).tolist() == [[1, 1, 4, 4]]


def test_components_below_the_minimum_size_are_dropped():
    mask = np.zeros((10, 10), np.uint8)
    mask[0, 0] = 1  # 1 pixel of speckle
    mask[4:7, 4:7] = 1  # 9 pixels
    boxes, _ = label_map_boxes(mask, {1: "lesion"}, ["lesion"], "m.png", min_size=4)
    assert boxes.tolist() == [[4, 4, 7, 7]]


def test_a_value_mapped_to_null_is_ignored_and_an_unmapped_value_is_an_error_naming_file_and_value():
    mask = np.zeros((8, 8), np.uint8)
    mask[1:3, 1:3] = 1
    mask[5:7, 5:7] = 7
    boxes, _ = label_map_boxes(mask, {1: "lesion", 7: None}, ["lesion"], "m.png")
    assert boxes.tolist() == [[1, 1, 3, 3]]
    with pytest.raises(DataError, match=r"case3\.png: mask value\(s\) \[7\] have no class name.*map them to null"):
        label_map_boxes(mask, {1: "lesion"}, ["lesion"], "case3.png")


def test_an_instance_mask_gives_one_box_per_value_even_when_touching():
    mask = np.zeros((10, 10), np.uint16)
    mask[1:4, 1:4] = 300
    mask[1:4, 4:6] = 301  # touches instance 300: still its own object
    mask[8, 0] = mask[8, 9] = 5  # one object in two pieces: one box around both
    boxes, labels = instance_mask_boxes(mask, 0, "inst.png")
    assert sorted(boxes.tolist()) == [[0, 8, 10, 9], [1, 1, 4, 4], [4, 1, 6, 4]]
    assert labels.tolist() == [0, 0, 0]


def test_categories_follow_the_lowest_value_of_each_name():
    assert categories_of({3: "cyst", 1: "tumour", 2: "tumour", 9: None}) == ["tumour", "cyst"]


def make_dataset(tmp_path, masks: dict[str, np.ndarray], size: int = 32):
    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "masks" / "a").mkdir(parents=True)
    for name, mask in masks.items():
        write_image(tmp_path / "images" / "a" / f"{name}.png", np.full((size, size), 90, np.uint8))
        Image.fromarray(mask).save(tmp_path / "masks" / "a" / f"{name}_mask.png")
    return MasksDataset.Options(images=tmp_path / "images", masks=tmp_path / "masks", mask_suffix="_mask",
                                classes={255: "lesion"}, name="seg")


def test_a_png_segmentation_dataset_becomes_a_detection_task(tmp_path):
    lesion = np.zeros((32, 32), np.uint8)
    lesion[4:10, 6:20] = 255
    options = make_dataset(tmp_path, {"case1": lesion, "normal": np.zeros((32, 32), np.uint8)})
    [task] = MasksDataset(options).load()
    by_name = {r.file_name: r for r in task.records}
    assert task.categories == ["lesion"]
    assert by_name["a/case1.png"].boxes.tolist() == [[6, 4, 20, 10]]
    assert len(by_name["a/normal.png"].boxes) == 0
    assert task.load_image(by_name["a/case1.png"]).shape == (32, 32)


def test_palette_masks_are_read_as_their_indices(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    write_image(tmp_path / "images" / "x.png", np.zeros((16, 16), np.uint8))
    indices = np.zeros((16, 16), np.uint8)
    indices[2:6, 2:6] = 2
    palette = Image.fromarray(indices, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9))
    palette.save(tmp_path / "masks" / "x.png")
    options = MasksDataset.Options(images=tmp_path / "images", masks=tmp_path / "masks", classes={2: "lesion"})
    [task] = MasksDataset(options).load()
    assert task.records[0].boxes.tolist() == [[2, 2, 6, 6]]


def test_instance_masks_option(tmp_path):
    inst = np.zeros((32, 32), np.uint8)
    inst[1:3, 1:3] = 1
    inst[3:5, 3:5] = 2
    options = make_dataset(tmp_path, {"c": inst}).model_copy(update={"mask_type": "instance", "instance_class": "cell"})
    [task] = MasksDataset(options).load()
    assert task.categories == ["cell"] and len(task.records[0].boxes) == 2


def test_bad_masks_are_errors_naming_the_file(tmp_path):
    bad_value = np.zeros((32, 32), np.uint8)
    bad_value[0:3, 0:3] = 128
    options = make_dataset(tmp_path, {"c": bad_value})
    with pytest.raises(DataError, match=r"c_mask\.png: mask value\(s\) \[128\] have no class name"):
        MasksDataset(options).load()
    (tmp_path / "masks" / "a" / "c_mask.png").unlink()
    with pytest.raises(DataError, match=r"c\.png.*no mask in"):
        MasksDataset(options).load()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / "a" / "c_mask.png")
    with pytest.raises(DataError, match=r"the mask is 8x8 but its image .*c\.png is 32x32"):
        MasksDataset(options).load()


def test_a_masks_config_needs_exactly_one_mask_source(tmp_path):
    with pytest.raises(ValueError, match="exactly one mask source"):
        MasksDataset.Options(images=tmp_path)
