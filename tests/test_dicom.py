"""DICOM input: windowing, inversion, slope/intercept against hand computations; frames, colour, codecs,
the core reader, the `dicom`/`folder` plugins, `data check` on DICOM folders and configs, and `run` refusing
unannotated tasks. DICOM files are built with pydicom (and a few of the test files pydicom ships)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid  # noqa: E402

from megatron.data.dicom import DicomDisplay, is_dicom_file, read_dicom, read_header  # noqa: E402
from megatron.data.io import read_image, read_image_size  # noqa: E402
from megatron.errors import ConfigError, DataError  # noqa: E402


def make_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
               suffix_ok: bool = True, **elements) -> Path:
    """A DICOM Part 10 file holding ``pixels`` ((rows, cols), (frames, rows, cols) or (rows, cols, 3))."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "OT"
    arr = np.asarray(pixels)
    bits = bits_stored or arr.dtype.itemsize * 8
    ds.set_pixel_data(arr, photometric_interpretation=photometric, bits_stored=bits)
    for key, value in elements.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR) by hand, output range 0..255."""
    x = np.asarray(x, np.float64)
    lo_edge, hi_edge = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    y = np.where(x <= lo_edge, 0, np.where(x > hi_edge, 255, y))
    return np.rint(y).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ pixels
# a 12-bit unsigned CT-like image: HU = 2 * stored - 1024
STORED = np.array([[400, 512, 520], [532, 600, 700]], np.uint16)
HU = STORED.astype(np.float64) * 2 - 1024  # -224, 0, 16 / 40, 176, 376


def test_slope_intercept_and_window_match_the_standard_formula(tmp_path):
    f = make_dicom(tmp_path / "ct.dcm", STORED, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024,
                   WindowCenter=40, WindowWidth=400)
    image = read_image(f)
    assert image.dtype == np.uint8 and image.shape == (2, 3)
    np.testing.assert_array_equal(image, linear_window(HU, 40, 400))
    # spot values by hand: HU -224 is below the window, HU 0 -> ((0 - 39.5) / 399 + 0.5) * 255 = 102.26
    assert image[0, 0] == 0 and image[0, 1] == 102 and image[1, 0] == 128 and image[1, 2] == 255


def test_monochrome1_is_inverted(tmp_path):
    f = make_dicom(tmp_path / "m1.dcm", STORED, photometric="MONOCHROME1", bits_stored=12, RescaleSlope=2,
                   RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    np.testing.assert_array_equal(read_image(f), 255 - linear_window(HU, 40, 400))


def test_second_window_and_own_window(tmp_path):
    f = make_dicom(tmp_path / "w.dcm", STORED, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024,
                   WindowCenter=[40, 100], WindowWidth=[400, 1000])
    np.testing.assert_array_equal(read_image(f), linear_window(HU, 40, 400))  # the first by default
    second = read_dicom(f, display=DicomDisplay(window_index=1))
    np.testing.assert_array_equal(second, linear_window(HU, 100, 1000))
    own = read_dicom(f, display=DicomDisplay(window=(0, 100)))
    np.testing.assert_array_equal(own, linear_window(HU, 0, 100))
    with pytest.raises(DataError, match=r"window_index 2 .* offers 2.*w\.dcm|w\.dcm.*window_index 2"):
        read_dicom(f, display=DicomDisplay(window_index=2))


def test_no_window_gives_16_bit_modality_values_shifted_to_zero(tmp_path):
    # 12-bit unsigned with intercept -1024: lowest value the file can hold is -1024, so HU + 1024
    f = make_dicom(tmp_path / "nowin.dcm", STORED, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024)
    image = read_image(f)
    assert image.dtype == np.uint16
    np.testing.assert_array_equal(image, (HU + 1024).astype(np.uint16))
    # the file's window is ignored with window: none
    g = make_dicom(tmp_path / "win.dcm", STORED, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024,
                   WindowCenter=40, WindowWidth=400)
    np.testing.assert_array_equal(read_dicom(g, display=DicomDisplay(window="none")), (HU + 1024).astype(np.uint16))


def test_signed_pixel_data(tmp_path):
    values = np.array([[-1000, -1], [0, 1200]], np.int16)
    # 16-bit signed, no rescale: the range starts at -32768
    f = make_dicom(tmp_path / "s16.dcm", values, bits_stored=16)
    np.testing.assert_array_equal(read_image(f), (values.astype(np.int64) + 32768).astype(np.uint16))
    # 12-bit signed (sign bit 11): the range starts at -2048
    g = make_dicom(tmp_path / "s12.dcm", values, bits_stored=12)
    np.testing.assert_array_equal(read_image(g), (values.astype(np.int64) + 2048).astype(np.uint16))
    # and windowed: centre 0, width 2000 on the signed values
    h = make_dicom(tmp_path / "s12w.dcm", values, bits_stored=12, WindowCenter=0, WindowWidth=2000)
    np.testing.assert_array_equal(read_image(h), linear_window(values, 0, 2000))


def test_monochrome1_without_window_inverts_the_range(tmp_path):
    values = np.array([[0, 100], [4000, 4095]], np.uint16)
    f = make_dicom(tmp_path / "m1raw.dcm", values, photometric="MONOCHROME1", bits_stored=12)
    np.testing.assert_array_equal(read_image(f), (4095 - values).astype(np.uint16))


def test_voi_lut_sequence(tmp_path):
    item = Dataset()
    item.LUTDescriptor = [4, 10, 8]  # 4 entries, first stored value mapped: 10, 8 bits per entry
    item.add_new(0x00283006, "US", [0, 50, 200, 255])  # LUT Data
    values = np.array([[5, 10, 11], [12, 13, 40]], np.uint16)
    f = make_dicom(tmp_path / "lut.dcm", values, bits_stored=8, VOILUTSequence=[item])
    # below first_map -> entry 0, above the last entry -> the last entry; 8-bit LUT output is 0..255 as is
    np.testing.assert_array_equal(read_image(f), np.array([[0, 0, 50], [200, 255, 255]], np.uint8))


def test_multi_frame_files_are_addressed_by_frame(tmp_path):
    frames = np.stack([np.full((4, 5), 10 * (i + 1), np.uint8) for i in range(3)])
    f = make_dicom(tmp_path / "mf.dcm", frames, bits_stored=8, WindowCenter=128, WindowWidth=256)
    assert read_header(f).frames == 3 and read_image_size(f) == (5, 4)
    for i in range(3):
        np.testing.assert_array_equal(read_image(f, frame=i), linear_window(frames[i], 128, 256))
    with pytest.raises(DataError, match=r"mf\.dcm holds 3 frames.*frame"):
        read_image(f)
    with pytest.raises(DataError, match=r"mf\.dcm.*frame index 3 is out of range.*3 frame"):
        read_image(f, frame=3)


def test_rgb_and_ybr_full_become_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    f = make_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB", bits_stored=8)
    np.testing.assert_array_equal(read_image(f), rgb)
    # RGB -> YBR_FULL by hand (DICOM PS3.3 C.7.6.3.1.2), stored as YBR_FULL: read back as RGB within rounding
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    ybr = np.stack([0.299 * r + 0.587 * g + 0.114 * b,
                    -0.168736 * r - 0.331264 * g + 0.5 * b + 128,
                    0.5 * r - 0.418688 * g - 0.081312 * b + 128], axis=-1)
    h = make_dicom(tmp_path / "ybr.dcm", np.clip(np.rint(ybr), 0, 255).astype(np.uint8), photometric="YBR_FULL",
                   bits_stored=8)
    back = read_image(h)
    assert back.dtype == np.uint8 and back.shape == (6, 7, 3)
    assert np.abs(back.astype(int) - rgb.astype(int)).max() <= 2


def test_palette_colour_through_its_lookup_table():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("examples_palette.dcm", download=False)
    if path is None:
        pytest.skip("pydicom's examples_palette.dcm is not installed")
    ds = pydicom.dcmread(path)
    image = read_image(path)
    assert image.shape == (ds.Rows, ds.Columns, 3) and image.dtype == np.uint8
    index = int(ds.pixel_array[100, 400])
    red = np.frombuffer(ds.RedPaletteColorLookupTableData, "<u2")  # 16-bit entries, first mapped value 0
    first = int(ds.RedPaletteColorLookupTableDescriptor[1])
    assert image[100, 400, 0] == round(int(red[index - first]) * 255 / 65535)


def test_bad_files_are_clear_errors(tmp_path):
    (tmp_path / "empty.dcm").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.dcm"):
        read_image(tmp_path / "empty.dcm")
    (tmp_path / "text.dcm").write_text("not a dicom file at all, just some text " * 10)
    with pytest.raises(DataError, match=r"text\.dcm"):
        read_image(tmp_path / "text.dcm")
    no_pixels = Dataset()
    no_pixels.file_meta = FileMetaDataset()
    no_pixels.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    no_pixels.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # basic text SR
    no_pixels.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    no_pixels.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    no_pixels.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    with pytest.raises(DataError, match=r"report\.dcm holds no image"):
        read_image(tmp_path / "report.dcm")
    png = tmp_path / "a.png"
    from megatron.data.io import write_image

    write_image(png, np.zeros((3, 3), np.uint8))
    with pytest.raises(DataError, match=r"a\.png: frame 2 .*not"):
        read_image(png, frame=2)
    with pytest.raises(ConfigError, match="width"):
        DicomDisplay(window=(40, 0))


def test_dicom_is_recognised_by_its_magic_without_a_suffix(tmp_path):
    f = make_dicom(tmp_path / "IM0001", STORED, bits_stored=12, WindowCenter=600, WindowWidth=400)
    assert is_dicom_file(f)
    np.testing.assert_array_equal(read_image(f), linear_window(STORED, 600, 400))


# ------------------------------------------------------------------------------------ datasets and check
def dicom_study(root: Path) -> Path:
    """root/ with two single-frame files, one 3-frame file and an SR; plus a COCO file for them."""
    make_dicom(root / "a" / "one.dcm", np.full((8, 10), 100, np.uint8), bits_stored=8, WindowCenter=128,
               WindowWidth=256)
    make_dicom(root / "a" / "two.dcm", np.full((8, 10), 50, np.uint8), bits_stored=8, WindowCenter=128,
               WindowWidth=256)
    make_dicom(root / "b" / "multi.dcm", np.stack([np.full((8, 10), 30 * i, np.uint8) for i in range(3)]),
               bits_stored=8, WindowCenter=128, WindowWidth=256)
    (root / "notes.txt").write_text("scanner notes")
    ann = {"images": [{"id": 1, "file_name": "a/one.dcm", "width": 10, "height": 8},
                      {"id": 2, "file_name": "b/multi.dcm", "frame": 2, "width": 10, "height": 8}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]},
                           {"id": 2, "image_id": 2, "category_id": 1, "bbox": [2, 2, 5, 3]}],
           "categories": [{"id": 1, "name": "lesion"}]}
    (root / "annotations.json").write_text(json.dumps(ann))
    return root / "annotations.json"


def test_coco_file_names_point_at_dicom_files_with_frames(tmp_path):
    from megatron.data.coco import read_coco_task

    ann = dicom_study(tmp_path / "study")
    task, problems = read_coco_task(ann, tmp_path / "study", name="study")
    assert not [p for p in problems if p.severity == "error"]
    by_id = {r.image_id: r for r in task.records}
    assert by_id[2].frame == 2 and by_id[1].frame is None
    np.testing.assert_array_equal(task.load_image(by_id[2]), linear_window(np.full((8, 10), 60), 128, 256))
    bad = json.loads(ann.read_text())
    bad["images"][1]["frame"] = -1
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    _, problems = read_coco_task(tmp_path / "bad.json", tmp_path / "study", name="bad")
    assert any(p.code == "image_bad_frame" and "image id 2" in p.record for p in problems)


def test_dicom_plugin_with_and_without_annotations(tmp_path):
    from megatron.config import validate_plugin_options
    from megatron_plugins.datasets.dicom import DicomDataset

    ann = dicom_study(tmp_path / "study")
    opts = validate_plugin_options(DicomDataset, {"root": str(tmp_path / "study"), "annotation_file": str(ann),
                                                  "window": [100, 50]}, "t")
    [task] = DicomDataset(opts).load()
    assert task.name == "study" and task.categories == ["lesion"] and sum(len(r.boxes) for r in task.records) == 2
    record = next(r for r in task.records if r.image_id == 1)
    np.testing.assert_array_equal(task.load_image(record), linear_window(np.full((8, 10), 100), 100, 50))

    opts = validate_plugin_options(DicomDataset, {"root": str(tmp_path / "study"), "name": "unlabelled"}, "t")
    [(task, problems)] = DicomDataset(opts).load_with_problems()
    assert [(r.file_name, r.frame) for r in task.records] == [
        ("a/one.dcm", None), ("a/two.dcm", None), ("b/multi.dcm", 0), ("b/multi.dcm", 1), ("b/multi.dcm", 2)]
    assert task.categories == [] and not any(len(r.boxes) for r in task.records)
    assert [p.code for p in problems] == ["file_ignored"]  # notes.txt and annotations.json
    opts = validate_plugin_options(DicomDataset, {"root": str(tmp_path / "study"), "frames": "middle"}, "t")
    assert [(r.file_name, r.frame) for r in DicomDataset(opts).load()[0].records][-1] == ("b/multi.dcm", 1)

    with pytest.raises(ConfigError, match="categories needs annotation_file"):
        validate_plugin_options(DicomDataset, {"root": "x", "categories": ["a"]}, "data.datasets.0.options")
    with pytest.raises(ConfigError, match="width"):
        validate_plugin_options(DicomDataset, {"root": "x", "window": [40, 0]}, "data.datasets.0.options")
    empty = tmp_path / "empty"
    empty.mkdir()
    opts = validate_plugin_options(DicomDataset, {"root": str(empty)}, "t")
    with pytest.raises(DataError, match="holds no DICOM files"):
        DicomDataset(opts).load()


def test_data_check_reads_a_dicom_folder(tmp_path, capsys):
    from megatron.cli import main
    from megatron.data.check import check_dataset, detect_format

    root = tmp_path / "scans"
    make_dicom(root / "x" / "1.dcm", STORED, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024,
               WindowCenter=40, WindowWidth=400)
    make_dicom(root / "2.dcm", STORED, bits_stored=12)
    (root / "broken.dcm").write_bytes(b"\x00" * 10)
    assert detect_format(root) == ("dicom", root)
    report = check_dataset(root)
    assert report.format == "dicom" and report.n_images == 2 and report.n_boxes == 0
    assert report.pixel_types == {"uint8 gray": 1, "uint16 gray": 1}
    assert [p.code for p in report.errors] == ["image_unreadable"] and "broken.dcm" in report.errors[0].file
    rc = main(["data", "check", str(root), "--json"])
    assert rc == 1 and json.loads(capsys.readouterr().out)["n_images"] == 2


def test_data_check_config_checks_every_dataset_through_its_plugin(tmp_path, capsys, make_plugin_manager):
    from megatron import hookimpl
    from megatron.cli import main
    from megatron.config import load_config
    from megatron.data.check import check_config
    from megatron.api.dataset import DatasetPlugin
    from megatron.types import ImageRecord, Task

    ann = dicom_study(tmp_path / "study")
    pngs = tmp_path / "pngs"
    from megatron.data.io import write_image

    write_image(pngs / "a.png", np.full((5, 6), 9, np.uint8))

    class Broken(DatasetPlugin):  # a third-party plugin without load_with_problems, one unreadable image
        PLUGIN_NAME = "broken-thirdparty"

        def load(self):
            def loader(record):
                if record.image_id == 2:
                    raise OSError("sector not found")
                return np.zeros((4, 4), np.uint8)
            records = [ImageRecord(i, None, 4, 4, [[0, 0, 2, 2]], [0]) for i in (1, 2)]
            return [Task(name="third", categories=["x"], records=records, image_loader=loader)]

    class Plugin:
        @hookimpl
        def megatron_register_datasets(self):
            return [Broken]

    pm = make_plugin_manager(Plugin())
    datasets = [{"plugin": "dicom", "options": {"root": str(tmp_path / "study"), "annotation_file": str(ann)}},
                {"plugin": "folder", "options": {"root": str(pngs)}},
                {"plugin": "broken-thirdparty"}]
    cfg = load_config(None, {"data.datasets": datasets, "data.target": "study"})
    reports = check_config(cfg, pm)
    assert [r.format for r in reports] == ["dicom", "folder", "broken-thirdparty"]
    assert reports[0].ok and reports[0].n_images == 2 and reports[0].n_boxes == 2
    assert reports[1].ok and reports[1].n_images == 1 and reports[1].pixel_types == {"uint8 gray": 1}
    assert not reports[2].ok and "sector not found" in reports[2].errors[0].message
    assert reports[2].errors[0].record == "image id 2"

    cfg_file = tmp_path / "exp.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump({"data": {"datasets": datasets[:2], "target": "study"}}))
    rc = main(["data", "check", "-c", str(cfg_file), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["ok"] and [d["format"] for d in out["datasets"]] == ["dicom", "folder"]
    rc = main(["data", "check", "-c", str(cfg_file)])
    text = capsys.readouterr().out
    assert rc == 0 and "2 dataset(s) checked" in text
    rc = main(["data", "check"])
    assert rc == 2 and "PATH or -c CONFIG" in capsys.readouterr().err


def test_run_refuses_a_task_without_boxes(tmp_path):
    from megatron.config import load_config
    from megatron.data.folder import read_image_folder
    from megatron.experiment import build_taskset
    from megatron.types import ImageRecord, Task

    make_dicom(tmp_path / "new" / "1.dcm", STORED, bits_stored=12)
    target, _ = read_image_folder(tmp_path / "new", "new")
    source = Task(name="xray", categories=["a"], records=[ImageRecord(1, None, 4, 4, [[0, 0, 2, 2]], [0])])
    cfg = load_config(None, {"data.target": "new", "data.datasets": [{"plugin": "medsynth"}]})
    with pytest.raises(DataError, match=r"'new'.*target task, has no annotated boxes.*`run`"):
        build_taskset(cfg, [source, target])
