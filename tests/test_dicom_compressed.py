"""DICOM as PACS exports it: compressed transfer syntaxes decode out of the box (pydicom's own compressed test
files against their uncompressed twins, read through megatron's reader), a failed decode names the file, the
syntax and the package, and DICOM SEG objects become boxes on their source images (the ``masks`` plugin)."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from megatron.data.io import read_image
from megatron.errors import DataError
from megatron_plugins.datasets.masks import MasksDataset


def bundled(name: str) -> str:
    """A test file shipped inside the installed pydicom package (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom no longer bundles {name}"
    return path


def pixels(name: str) -> np.ndarray:
    return pydicom.dcmread(bundled(name)).pixel_array


@pytest.mark.parametrize("compressed, syntax", [
    ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80"),  # JPEG-LS lossless
    ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90"),  # JPEG 2000 lossless
    ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),  # RLE lossless
])
def test_lossless_compressed_mr_decodes_to_its_uncompressed_twin(compressed, syntax):
    ds = pydicom.dcmread(bundled(compressed))
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(ds.pixel_array, pixels("MR_small.dcm"))
    assert np.array_equal(read_image(bundled(compressed)), read_image(bundled("MR_small.dcm")))


def test_jpeg_lossless_rgb_decodes_to_its_rle_twin():
    assert pydicom.dcmread(bundled("SC_rgb_jpeg_gdcm.dcm")).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    assert np.array_equal(read_image(bundled("SC_rgb_jpeg_gdcm.dcm")), read_image(bundled("SC_rgb_rle.dcm")))


@pytest.mark.parametrize("compressed", ["SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_dcmtk_+eb+cr.dcm"])
def test_jpeg_baseline_decodes_close_to_its_lossless_twin(compressed):
    assert pydicom.dcmread(bundled(compressed)).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    lossy = read_image(bundled(compressed)).astype(float)
    reference = read_image(bundled("SC_rgb_rle.dcm")).astype(float)
    assert lossy.shape == reference.shape == (100, 100, 3)
    assert np.abs(lossy - reference).mean() < 2.0  # lossy JPEG: close, not equal


def test_jpeg_extended_12_bit_decodes_to_the_same_picture_as_its_jpeg_2000_twin():
    extended = pydicom.dcmread(bundled("JPGExtended.dcm"))
    assert extended.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.51"
    a, b = extended.pixel_array.astype(float), pixels("JPEG2000.dcm").astype(float)
    assert a.shape == b.shape == (1024, 256)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9
    assert read_image(bundled("JPGExtended.dcm")).shape == (1024, 256)


def test_jpeg_ls_near_lossless_16_bit_decodes():
    ds = pydicom.dcmread(bundled("JPEGLSNearLossless_16.dcm"))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.81"
    arr = ds.pixel_array
    assert arr.shape == (int(ds.Rows), int(ds.Columns)) and arr.dtype == np.uint16 and arr.std() > 0


def test_a_failed_decode_names_the_file_the_syntax_and_the_package(monkeypatch):
    import pydicom.pixels

    def no_decoder(*args, **kwargs):
        raise RuntimeError("Unable to decode as exceptions were raised by all available plugins")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", no_decoder)
    with pytest.raises(DataError) as err:
        read_image(bundled("MR_small_jpeg_ls_lossless.dcm"))
    text = str(err.value)
    assert "MR_small_jpeg_ls_lossless.dcm" in text and "1.2.840.10008.1.2.4.80" in text and "JPEG-LS" in text
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in text


# --------------------------------------------------------------------------------------------- DICOM SEG
def write_source_images(folder, n: int = 2, size: int = 16) -> list[Dataset]:
    """Tiny CT slices of one series (what a SEG references)."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "CT", "P1", "Test^P", "", "O"
        ds.StudyID, ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", "", "", ""
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, float(k)], [1.0, 0, 0, 0, 1.0, 0]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.full((size, size), 100 * (k + 1), np.uint16).tobytes()
        ds.save_as(folder / f"slice{k}.dcm", enforce_file_format=True)
        out.append(ds)
    return out


def write_seg(path, sources: list[Dataset], masks: np.ndarray, labels: list[str]) -> None:
    """A binary SEG (highdicom) with one segment per label over ``sources``; ``masks`` (n, rows, cols, segments)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    descriptions = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=label, segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for i, label in enumerate(labels)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=masks.astype(bool), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=2,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="megatron tests",
        manufacturer_model_name="test", software_versions="0", device_serial_number="0")
    seg.save_as(path)


def test_a_dicom_seg_becomes_boxes_on_the_images_it_references(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    sources = write_source_images(images)
    masks = np.zeros((2, 16, 16, 2), bool)
    masks[0, 2:5, 3:9, 0] = True  # slice 0: a tumour at x 3..9, y 2..5
    masks[1, 10:14, 10:12, 1] = True  # slice 1: a cyst
    masks[1, 0:2, 0:2, 0] = True  # slice 1: a small tumour
    write_seg(tmp_path / "seg.dcm", sources, masks, ["tumour", "cyst"])
    [task] = MasksDataset(MasksDataset.Options(images=images, seg=tmp_path / "seg.dcm")).load()
    assert task.categories == ["tumour", "cyst"]
    by_name = {r.file_name: r for r in task.records}
    assert by_name["slice0.dcm"].boxes.tolist() == [[3, 2, 9, 5]] and by_name["slice0.dcm"].labels.tolist() == [0]
    slice1 = by_name["slice1.dcm"]
    assert sorted(zip(slice1.labels.tolist(), slice1.boxes.tolist())) == [(0, [0, 0, 2, 2]), (1, [10, 10, 12, 14])]


def test_a_seg_segment_with_no_class_name_is_an_error_naming_the_seg(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    sources = write_source_images(images, n=1)
    masks = np.zeros((1, 16, 16, 2), bool)
    masks[0, 2:5, 3:9, 1] = True
    write_seg(tmp_path / "seg.dcm", sources, masks, ["tumour", "cyst"])
    options = MasksDataset.Options(images=images, seg=tmp_path / "seg.dcm", classes={1: "tumour"})
    with pytest.raises(DataError, match=r"seg\.dcm.*segment number\(s\) \[2\] have no class name"):
        MasksDataset(options).load()
