"""Volumes as slice tasks (megatron.data.volumes and the ``volume`` plugin): small NIfTI volumes and DICOM series
with known spheres -> boxes from label maps and from a LUNA16 CSV, RAS reorientation and the world <-> voxel
round trip, slice selection, 2.5D channels, Hounsfield windows, the slice loader's cache, and every bad input of
issue 21 with its message."""
from __future__ import annotations

import logging
import pickle

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from megatron.data import volumes
from megatron.data.volumes import (CT_WINDOWS, Intensity, SliceSettings, VolumeAnnotations, read_volume_task,
                                   select_slices, voxel_to_world, world_to_voxel)
from megatron.errors import DataError
from megatron_plugins.datasets.volume import VolumeDataset

SHAPE = (24, 20, 10)
#: x flipped (an LAS file), 0.8 x 1.0 x 2.0 mm voxels: reorientation and anisotropy are exercised
AFFINE = np.array([[-0.8, 0, 0, 30.0], [0, 1.0, 0, -12.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]])
CENTRE_VOXEL = (8.0, 11.0, 5.0)  # stored voxel indices of the sphere's centre
RADIUS_MM = 3.0


def sphere_volume(shape=SHAPE, affine=AFFINE, centre=CENTRE_VOXEL, radius=RADIUS_MM):
    """HU values (-1000 air, +40 in the sphere) and the sphere's label map, on the stored grid."""
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    dist = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing)))
    inside = dist <= radius
    return np.where(inside, 40, -1000).astype(np.int16), inside.astype(np.uint8)


def write_case(tmp_path, name="case1", label_value=1, label_affine=None):
    image, label = sphere_volume()
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "labels").mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(image, AFFINE), tmp_path / "images" / f"{name}.nii.gz")
    affine = AFFINE if label_affine is None else label_affine
    nib.save(nib.Nifti1Image(label * label_value, affine), tmp_path / "labels" / f"{name}.nii.gz")
    return tmp_path / "images", tmp_path / "labels"


def write_csv(path, rows):
    path.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def centre_lps(centre=CENTRE_VOXEL, affine=AFFINE):
    ras = voxel_to_world(affine, np.asarray(centre))[0]
    return ras * [-1, -1, 1]


def task_of(root, annotations, **settings):
    task, problems = read_volume_task(root, "t", annotations, SliceSettings(**settings))
    return task, problems


# ------------------------------------------------------------------------------------------------ geometry
def test_world_and_voxel_coordinates_round_trip():
    voxels = np.array([[0, 0, 0], [3.5, 7.25, 9], [23, 19, 0]])
    assert np.allclose(world_to_voxel(AFFINE, voxel_to_world(AFFINE, voxels)), voxels)


def test_volumes_are_reoriented_to_ras_as_nibabel_does(tmp_path):
    images, labels = write_case(tmp_path)
    task, _ = task_of(images, VolumeAnnotations(label_dir=labels), empty_fraction=1.0)
    meta = task.records[0].meta
    affine = np.asarray(meta["affine"])
    canonical = nib.as_closest_canonical(nib.load(images / "case1.nii.gz"))
    assert np.allclose(affine, canonical.affine) and meta["shape"] == list(canonical.shape)
    assert np.all(np.diag(affine)[:3] > 0)  # RAS+: every voxel axis points to +world
    record = next(r for r in task.records if r.meta["slice_index"] == 5)
    expected = np.asarray(canonical.dataobj)[:, :, 5].T  # the slice image: rows along j, columns along i
    window = Intensity.from_option("percentile")
    assert np.array_equal(task.load_image(record), window.apply(np.asarray(canonical.get_fdata()))[:, :, 5].T)
    assert expected.shape == (record.height, record.width) == (20, 24)


# ------------------------------------------------------------------------------------------------ boxes
def test_a_label_map_sphere_gives_one_box_per_slice_it_covers_centred_on_the_sphere(tmp_path):
    images, labels = write_case(tmp_path)
    task, problems = task_of(images, VolumeAnnotations(label_dir=labels))
    assert problems == []
    assert [r.meta["slice_index"] for r in task.records] == [4, 5, 6]  # 3 mm radius, 2 mm slices: k = 5 +- 1
    centre = next(r for r in task.records if r.meta["slice_index"] == 5)
    [box] = centre.boxes.tolist()
    # canonical column of the sphere: x flipped, 23 - 8 = 15 (pixel centre 15.5); radius 3 mm = 3.75 columns
    assert (box[0] + box[2]) / 2 == pytest.approx(15.5) and (box[1] + box[3]) / 2 == pytest.approx(11.5)
    assert box == [12, 8, 19, 15]
    assert all(r.group == "case1" for r in task.records) and centre.meta["volume_id"] == "case1"
    assert centre.meta["spacing"] == pytest.approx([1.0, 0.8]) and centre.meta["slice_spacing"] == pytest.approx(2.0)


def test_a_luna16_csv_sphere_becomes_circle_boxes_on_the_slices_it_crosses(tmp_path):
    images, _ = write_case(tmp_path)
    csv = write_csv(tmp_path / "annotations.csv", [("case1", *centre_lps(), 2 * RADIUS_MM)])
    task, _ = task_of(images, VolumeAnnotations(lesion_csv=csv))
    boxes = {r.meta["slice_index"]: r.boxes[0].tolist() for r in task.records}
    assert sorted(boxes) == [4, 5, 6]
    assert boxes[5] == pytest.approx([15.5 - 3.75, 11.5 - 3, 15.5 + 3.75, 11.5 + 3])
    r4 = np.sqrt(RADIUS_MM ** 2 - 2.0 ** 2)  # the cut 2 mm from the centre
    assert boxes[4] == pytest.approx([15.5 - r4 / 0.8, 11.5 - r4, 15.5 + r4 / 0.8, 11.5 + r4], abs=1e-5)
    assert task.categories == ["lesion"]


def test_the_label_map_and_the_csv_of_one_sphere_agree(tmp_path):
    images, labels = write_case(tmp_path)
    csv = write_csv(tmp_path / "a.csv", [("case1", *centre_lps(), 2 * RADIUS_MM)])
    from_labels, _ = task_of(images, VolumeAnnotations(label_dir=labels))
    from_csv, _ = task_of(images, VolumeAnnotations(lesion_csv=csv))
    for a, b in zip(from_labels.records, from_csv.records):
        assert a.meta["slice_index"] == b.meta["slice_index"]
        assert np.allclose((a.boxes[:, :2] + a.boxes[:, 2:]) / 2, (b.boxes[:, :2] + b.boxes[:, 2:]) / 2, atol=0.51)


def test_coronal_slicing_puts_the_sphere_on_the_coronal_slices(tmp_path):
    images, labels = write_case(tmp_path)
    task, _ = task_of(images, VolumeAnnotations(label_dir=labels), axis="coronal")
    assert [r.meta["slice_index"] for r in task.records] == [8, 9, 10, 11, 12, 13, 14]  # j = 11 +- 3 (1 mm)
    assert (task.records[0].width, task.records[0].height) == (24, 10)  # columns i, rows k


# ------------------------------------------------------------------------------------------ slice choice
def test_every_lesion_slice_and_the_configured_share_of_empty_slices_are_kept_reproducibly():
    lesion = {3, 4, 5}
    chosen = select_slices(40, lesion, 0.25, seed=7, volume_id="v")
    assert lesion <= set(chosen) and len(chosen) == 3 + round(0.25 * 37)
    assert chosen == select_slices(40, lesion, 0.25, seed=7, volume_id="v")
    assert chosen != select_slices(40, lesion, 0.25, seed=8, volume_id="v")
    assert select_slices(40, lesion, 0.0, 0, "v") == [3, 4, 5]
    assert select_slices(40, lesion, 1.0, 0, "v") == list(range(40))


# -------------------------------------------------------------------------------------- intensity, 2.5D
def test_named_ct_windows_map_hounsfield_units_to_grey_levels():
    lung = Intensity.from_option("lung")
    assert lung.window == CT_WINDOWS["lung"] == (-600.0, 1500.0)
    assert lung.apply(np.array([-1350.0, -600.0, 150.0, 3000.0])).tolist() == [0, 128, 255, 255]
    assert Intensity.from_option([40, 400]).apply(np.array([-160.0, 240.0])).tolist() == [0, 255]
    with pytest.raises(DataError, match="not a named window.*lung"):
        Intensity.from_option("liver")


def test_percentile_normalisation_uses_the_volume_own_range():
    values = np.arange(1000, dtype=np.float32)
    out = Intensity.from_option("percentile", (10.0, 90.0)).apply(values)
    assert out[int(np.percentile(values, 10))] == 0 and out[-1] == 255 and out[500] == 128


def test_2_5d_gives_the_slice_and_its_neighbours_as_the_three_channels(tmp_path):
    data = np.zeros((8, 8, 6), np.float32) + np.arange(6, dtype=np.float32) * 10  # slice k holds 10 k
    (tmp_path / "v").mkdir()
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "v" / "ramp.nii.gz")
    task, _ = task_of(tmp_path / "v", VolumeAnnotations(), empty_fraction=1.0, offset=2,
                      intensity=Intensity.from_option([50, 100]))
    image = task.load_image(next(r for r in task.records if r.meta["slice_index"] == 2))
    assert image.shape == (8, 8, 3)
    assert image[0, 0].tolist() == [int(np.rint(v * 2.55)) for v in (0, 20, 40)]  # slices 0, 2, 4
    edge = task.load_image(next(r for r in task.records if r.meta["slice_index"] == 5))
    assert edge[0, 0].tolist() == [int(np.rint(v * 255 / 100)) for v in (30, 50, 50)]  # slice 7 is clamped to 5


def test_the_loader_reads_each_volume_once_and_pickles_without_its_cache(tmp_path, monkeypatch):
    images, labels = write_case(tmp_path)
    task, _ = task_of(images, VolumeAnnotations(label_dir=labels), empty_fraction=1.0)
    reads = []
    real = volumes.read_canonical
    monkeypatch.setattr(volumes, "read_canonical", lambda source: reads.append(source.volume_id) or real(source))
    for record in task.records:
        task.load_image(record)
    assert reads == ["case1"]
    clone = pickle.loads(pickle.dumps(task.image_loader))
    assert clone == task.image_loader and hash(clone) == hash(task.image_loader) and len(clone._cache) == 0
    assert np.array_equal(clone(task.records[3]), task.load_image(task.records[3]))


# ------------------------------------------------------------------------------------------- DICOM series
def write_series(folder, hu: np.ndarray, uid=None, positions=None, patient="P7", description="CT chest",
                 shuffle=True):
    """A CT series of ``hu`` ((columns, rows, slices), axial, 0.7 mm pixels, 2.5 mm slices), HU stored with
    intercept -1024; files written in a scrambled order with misleading InstanceNumbers."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    n = hu.shape[2]
    positions = positions if positions is not None else [10.0 + 2.5 * k for k in range(n)]
    order = list(range(n))[::-1] if shuffle else list(range(n))
    for file_index, k in enumerate(order):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID, ds.PatientID, ds.Modality, ds.SeriesDescription = uid, patient, "CT", description
        ds.InstanceNumber = file_index + 1
        ds.ImagePositionPatient = [-50.0, -60.0, positions[k]]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (hu[:, :, k].T + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"IM{uid[-6:]}_{file_index:04d}", enforce_file_format=True)
    return uid


def ramp_hu(shape=(12, 10, 5)):
    """HU = 100 * slice index - 600 (slice k of a feet-to-head series), so order and units are checkable."""
    return np.broadcast_to(np.arange(shape[2]) * 100.0 - 600.0, shape).copy()


def test_a_dicom_series_is_ordered_by_position_in_hounsfield_units_and_grouped_by_patient(tmp_path):
    uid = write_series(tmp_path / "s1", ramp_hu())
    task, problems = task_of(tmp_path, VolumeAnnotations(), empty_fraction=1.0, intensity=Intensity.from_option("lung"))
    assert problems == [] and len(task.records) == 5
    values = [int(task.load_image(r)[0, 0]) for r in sorted(task.records, key=lambda r: r.meta["slice_index"])]
    expected = Intensity.from_option("lung").apply(np.arange(5) * 100.0 - 600.0).tolist()
    assert values == expected  # slice k (canonical, inferior to superior) holds HU 100 k - 600
    meta = task.records[0].meta
    assert meta["volume_id"] == uid and task.records[0].group == "P7"
    affine = np.asarray(meta["affine"])
    # LPS (-50, -60, 10) for the first voxel of the first slice -> RAS; x, y flipped into RAS+ order
    assert np.allclose(np.diag(affine)[:3], [0.7, 0.7, 2.5])
    corner = voxel_to_world(affine, np.array([11, 9, 0]))[0]
    assert np.allclose(corner, [50.0, 60.0, 10.0])


# ------------------------------------------------------------------------------------------- bad input
def test_a_label_map_on_another_grid_is_an_error_naming_both_files(tmp_path):
    shifted = AFFINE.copy()
    shifted[0, 3] += 5
    images, labels = write_case(tmp_path, label_affine=shifted)
    with pytest.raises(DataError, match=r"label map .*labels/case1\.nii\.gz is not on the grid of its image "
                                        r".*images/case1\.nii\.gz.*resample"):
        task_of(images, VolumeAnnotations(label_dir=labels))


def test_a_folder_with_two_series_is_refused_unless_one_is_named(tmp_path):
    first = write_series(tmp_path / "mixed", ramp_hu(), description="lung")
    write_series(tmp_path / "mixed", ramp_hu() + 10, description="bone")
    with pytest.raises(DataError, match=r"mixed mixes 2 series: .*series_uid") as err:
        task_of(tmp_path, VolumeAnnotations())
    assert "(lung, 5 files)" in str(err.value) and "(bone, 5 files)" in str(err.value)
    task, _ = read_volume_task(tmp_path, "t", VolumeAnnotations(), SliceSettings(empty_fraction=1.0), series_uid=[first])
    assert {r.meta["volume_id"] for r in task.records} == {first}


def test_unequal_slice_spacing_is_a_warning_that_the_slices_are_treated_as_given(tmp_path, caplog):
    write_series(tmp_path / "s", ramp_hu(), positions=[0.0, 2.5, 5.0, 10.0, 12.5])
    options = VolumeDataset.Options(root=tmp_path, empty_fraction=1.0)
    with caplog.at_level(logging.WARNING):
        [task] = VolumeDataset(options).load()
    assert len(task.records) == 5
    assert "unequal_slice_spacing" in caplog.text and "treated as given" in caplog.text


def test_a_nifti_with_a_non_invertible_affine_is_an_error_naming_the_file(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), None)
    singular = np.eye(4)
    singular[2, 2] = 0.0
    img.header.set_sform(singular, code=1)
    img.header.set_qform(None, code=0)
    (tmp_path / "v").mkdir()
    nib.save(img, tmp_path / "v" / "flat.nii.gz")
    with pytest.raises(DataError, match=r"flat\.nii\.gz: its affine .* is not invertible"):
        task_of(tmp_path / "v", VolumeAnnotations())


def test_a_csv_lesion_outside_its_volume_is_an_error_naming_the_row(tmp_path):
    images, _ = write_case(tmp_path)
    csv = write_csv(tmp_path / "a.csv", [("case1", *centre_lps(), 6.0), ("case1", 500.0, 0.0, 0.0, 6.0)])
    with pytest.raises(DataError, match=r"a\.csv line 3: lesion centre .* lies outside volume case1"):
        task_of(images, VolumeAnnotations(lesion_csv=csv))


def test_a_label_value_with_no_class_name_is_an_error_naming_the_file_and_value(tmp_path):
    images, labels = write_case(tmp_path, label_value=2)
    with pytest.raises(DataError, match=r"labels/case1\.nii\.gz.*mask value\(s\) \[2\] have no class name"):
        task_of(images, VolumeAnnotations(label_dir=labels, classes={1: "lesion"}))


def test_the_volume_plugin_reads_a_decathlon_layout_with_its_options(tmp_path):
    images, labels = write_case(tmp_path)
    options = VolumeDataset.Options(root=images, labels=labels, classes={1: "tumour"}, intensity="soft_tissue",
                                    channels="2.5d", empty_fraction=0.0)
    [task] = VolumeDataset(options).load()
    assert task.categories == ["tumour"] and len(task.records) == 3
    assert task.load_image(task.records[1]).shape == (20, 24, 3)
    with pytest.raises(ValueError, match="either labels"):
        VolumeDataset.Options(root=images, labels=labels, lesions_csv=tmp_path / "a.csv")


def test_the_example_generator_writes_scans_whose_boxes_sit_on_the_nodules(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "volumes" / "make_volumes.py"
    spec = importlib.util.spec_from_file_location("make_volumes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(tmp_path), "--scans", "2", "--size", "32", "--slices", "12"]) == 0
    for options in (dict(root=tmp_path / "site_a" / "imagesTr", labels=tmp_path / "site_a" / "labelsTr"),
                    dict(root=tmp_path / "site_b" / "scans", lesions_csv=tmp_path / "site_b" / "annotations.csv")):
        [task] = VolumeDataset(VolumeDataset.Options(**options, intensity="lung", empty_fraction=0.0)).load()
        assert task.records and {r.group for r in task.records} == {r.meta["volume_id"] for r in task.records}
        for record in task.records:
            image = task.load_image(record)
            for x1, y1, x2, y2 in record.boxes:
                nodule = Intensity.from_option("lung").apply(np.array([30.0]))[0]  # 30 HU in the lung window
                assert abs(int(image[int((y1 + y2) / 2), int((x1 + x2) / 2)]) - int(nodule)) < 40
    # the MR-like site (arbitrary units, percentile window): nodules as bright as the body, lungs dark
    [task] = VolumeDataset(VolumeDataset.Options(root=tmp_path / "site_c" / "imagesTr", labels=tmp_path / "site_c" /
                                                 "labelsTr", classes={1: "nodule"}, empty_fraction=0.0)).load()
    assert task.records
    for record in task.records:
        image = task.load_image(record)
        for x1, y1, x2, y2 in record.boxes:
            assert image[int((y1 + y2) / 2), int((x1 + x2) / 2)] > 200
