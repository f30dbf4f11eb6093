"""CT / MR volumes -> 2D (or 2.5D) slice tasks, with boxes from label maps or a LUNA16-style lesion CSV.

**Reading.** NIfTI files through nibabel; DICOM series through pydicom (one series = the files sharing a
``SeriesInstanceUID``; a folder holding two series is refused unless ``series_uid`` names the one to read).
Slices of a series are ordered by ``ImagePositionPatient`` projected on the slice normal (the cross product of
``ImageOrientationPatient``'s row and column directions), ``InstanceNumber`` breaking ties or standing in when
positions are missing. Slices at unequal spacing are a warning: they are treated as given (stacked in order, at
their mean spacing). CT values become Hounsfield units through ``RescaleSlope``/``RescaleIntercept``
(pydicom's modality LUT); NIfTI values are taken with the header's ``scl_slope``/``scl_inter``.

**Orientation.** Every volume is brought to the closest canonical orientation, RAS+ (voxel axes i, j, k
pointing Right, Anterior, Superior), by the transform nibabel's ``as_closest_canonical`` applies
(:func:`nibabel.orientations.io_orientation` / ``apply_orientation``); DICOM's LPS patient coordinates are
turned into RAS first. A volume whose affine cannot be inverted is an error naming the file.

**Slices.** ``axis`` axial (k), coronal (j) or sagittal (i). The image of slice ``s`` is
``np.take(volume, s, axis).T`` (:func:`slice_plane`): its columns run along the lower of the two remaining voxel
axes, its rows along the higher (axial: columns = i, rows = j). A pixel ``(x, y)`` (pixel-edge coordinates, so
the centre of column ``c`` is ``x = c + 0.5``) of slice ``s`` is the voxel with ``col_axis = x - 0.5``,
``row_axis = y - 0.5``, ``slice_axis = s`` (:func:`pixel_to_voxel`), and ``affine @ voxel`` its world position in mm.

**Intensity** (:class:`Intensity`): a named CT window (:data:`CT_WINDOWS`, Hounsfield units) or
``[centre, width]`` (values ``centre - width/2 .. centre + width/2`` -> 0..255), or ``percentile``: the
volume's own ``low..high`` percentiles -> 0..255 (MR, whose values have no absolute unit). One mapping per
volume, so neighbouring slices share it. **2.5D**: the slice and its neighbours ``offset`` slices before and
after as the three channels (R = before, G = the slice, B = after; an edge slice repeats itself), the input
convention of 2.5D lesion detectors.

**Which slices become images**: every slice with a lesion, plus ``empty_fraction`` of the volume's
lesion-free slices drawn with ``seed`` (0: none, 1: all).

**What each record keeps** (``ImageRecord.meta``): ``volume_id``, ``volume_path``, ``axis`` (its name),
``slice_axis``, ``col_axis``, ``row_axis``, ``slice_index``, ``n_slices``, ``spacing`` (mm: [row, column]),
``slice_spacing`` (mm), ``affine`` (canonical voxel -> RAS world, 4x4 nested lists) and ``shape`` (canonical);
``group`` is the patient (DICOM ``PatientID``) when known, else the volume id: a volume is never split.
"""
from __future__ import annotations

import csv
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

from megatron.data.dicom import codec_message, is_dicom_file, read_dataset
from megatron.data.masks import categories_of, volume_label_map_boxes
from megatron.data.paths import walk_files
from megatron.data.problems import Problem
from megatron.errors import DataError
from megatron.types import ImageRecord, Task

NIFTI_SUFFIXES = (".nii", ".nii.gz")
AXES: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}
#: named CT windows, (centre, width) in Hounsfield units (the usual radiology presets)
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
#: a label map's affine may differ from its image's by this much (mm) and still be the same grid (float32 headers)
AFFINE_TOLERANCE_MM = 1e-3
#: relative spread of slice gaps above which a DICOM series counts as unequally spaced
SPACING_TOLERANCE = 0.01
#: DICOM patient coordinates (LPS) -> RAS: x and y change sign
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
LUNA_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
#: the ``volume`` plugin options that decide the pixels a model sees (slicing, 2.5D, intensity): a model file keeps
#: the target's (``preprocessing["volume"]``) so `megatron evaluate` / `predict` re-read new volumes the same way
READING_OPTIONS = ("axis", "channels", "neighbour_offset", "intensity", "percentiles")
#: the dataset plugin these options belong to
VOLUME_PLUGIN = "volume"


# ------------------------------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class Geometry:
    """A volume's grid as stored (``shape``, ``affine``: voxel -> RAS mm) and its canonical (RAS+) form."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def orientation(self) -> np.ndarray:
        return io_orientation(self.affine)

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        out = [0, 0, 0]
        for axis, (target, _flip) in enumerate(self.orientation):
            out[int(target)] = self.shape[axis]
        return tuple(out)  # type: ignore[return-value]

    @property
    def canonical_affine(self) -> np.ndarray:
        return self.affine @ inv_ornt_aff(self.orientation, self.shape)

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(apply_orientation(array, self.orientation))


def check_affine(affine: np.ndarray, where: str) -> np.ndarray:
    affine = np.asarray(affine, np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise DataError(f"{where}: its affine (voxel -> world) is not invertible: {np.round(affine, 4).tolist()}; "
                        "fix: repair the header's sform/qform (e.g. with nibabel or fslorient) so that every voxel "
                        "axis has a non-zero spacing, or re-export the scan")
    return affine


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing (mm) along each voxel axis: the lengths of the affine's columns."""
    return np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)


def world_to_voxel(affine: np.ndarray, world: np.ndarray) -> np.ndarray:
    world = np.asarray(world, np.float64).reshape(-1, 3)
    return (np.linalg.inv(affine) @ np.c_[world, np.ones(len(world))].T).T[:, :3]


def voxel_to_world(affine: np.ndarray, voxel: np.ndarray) -> np.ndarray:
    voxel = np.asarray(voxel, np.float64).reshape(-1, 3)
    return (np.asarray(affine, np.float64) @ np.c_[voxel, np.ones(len(voxel))].T).T[:, :3]


def plane_axes(slice_axis: int) -> tuple[int, int]:
    """``(col_axis, row_axis)`` of the slice image along ``slice_axis`` (module docstring)."""
    col_axis, row_axis = (a for a in range(3) if a != slice_axis)
    return col_axis, row_axis


def slice_plane(volume: np.ndarray, slice_axis: int, index: int) -> np.ndarray:
    """The 2D image of slice ``index`` along ``slice_axis``: rows along the higher remaining axis."""
    return np.take(volume, int(index), axis=slice_axis).T


def pixel_to_voxel(x: float, y: float, slice_index: float, slice_axis: int) -> np.ndarray:
    """Voxel coordinates of the pixel-edge point ``(x, y)`` on slice ``slice_index`` (module docstring)."""
    col_axis, row_axis = plane_axes(slice_axis)
    voxel = np.zeros(3)
    voxel[col_axis], voxel[row_axis], voxel[slice_axis] = x - 0.5, y - 0.5, slice_index
    return voxel


# ------------------------------------------------------------------------------------------ sources
@dataclass
class VolumeSource:
    """One volume on disk: a NIfTI file or the (ordered) files of one DICOM series."""

    volume_id: str
    path: Path
    kind: Literal["nifti", "dicom"]
    geometry: Geometry
    group: str
    files: tuple[Path, ...] = ()  # DICOM: the series' files in slice order
    modality: str = ""
    problems: list[Problem] = field(default_factory=list)


def nifti_stem(path: Path) -> str:
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def is_nifti(path: Path) -> bool:
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def read_nifti_source(path: Path) -> VolumeSource:
    """A NIfTI file's geometry (header only, no voxels read); errors name the file."""
    path = Path(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises several types on a bad file
        raise DataError(f"NIfTI file {path} cannot be read ({type(exc).__name__}: {exc}); fix: re-export it, or "
                        "remove it from the folder") from None
    if len(img.shape) != 3:
        squeezed = tuple(n for n in img.shape if n != 1)
        if len(img.shape) < 3 or len(squeezed) != 3:
            raise DataError(f"NIfTI file {path} has shape {img.shape}, not one 3D volume; fix: split 4D series "
                            "into one file per volume (e.g. fslsplit), or give 3D scans only")
    affine = check_affine(img.affine, f"NIfTI file {path}")
    stem = nifti_stem(path)
    return VolumeSource(stem, path, "nifti", Geometry(tuple(int(n) for n in img.shape[:3]), affine), group=stem)


def read_nifti_array(path: Path) -> np.ndarray:
    img = nib.load(str(path))
    data = np.asarray(img.get_fdata(dtype=np.float32))
    return data.reshape(data.shape[:3]) if data.ndim > 3 else data


def find_nifti(root: Path) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    return [p for p in walk_files(root) if is_nifti(p)]


# ------------------------------------------------------------------------------------- DICOM series
def find_dicom_series(root: Path, series_uid: list[str] | None) -> list[VolumeSource]:
    """Every DICOM series under ``root``, one folder at a time (a folder with two series and no
    ``series_uid`` choosing between them is an error listing them)."""
    root = Path(root)
    folders: dict[Path, list[Path]] = {}
    for p in walk_files(root):
        if is_dicom_file(p):
            folders.setdefault(p.parent, []).append(p)
    out = []
    for folder, files in folders.items():
        by_series: dict[str, list] = {}
        for f in files:
            ds = read_dataset(f, header_only=True)
            if "PixelData" not in ds:
                continue  # SEG, SR, RTSTRUCT...: not slices of the series
            by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
        chosen = _choose_series(folder, by_series, series_uid)
        out.extend(series_source(folder, uid, by_series[uid]) for uid in chosen)
    return out


def _choose_series(folder: Path, by_series: dict[str, list], series_uid: list[str] | None) -> list[str]:
    if series_uid is not None:
        return [uid for uid in by_series if uid in series_uid]
    if len(by_series) > 1:
        listing = "; ".join(f"{uid or '(no SeriesInstanceUID)'} ({_description(items[0][1])}, {len(items)} files)"
                            for uid, items in by_series.items())
        raise DataError(f"DICOM folder {folder} mixes {len(by_series)} series: {listing}; fix: put each series in its "
                        "own folder, or name the one(s) to read with the `series_uid` option")
    return list(by_series)


def _description(ds) -> str:
    return str(ds.get("SeriesDescription", "") or "").strip() or "no description"


def series_source(folder: Path, uid: str, items: list) -> VolumeSource:
    """The geometry of one series from its headers: slices ordered along the normal, LPS -> RAS."""
    where = f"DICOM series {uid} in {folder}"
    first = items[0][1]
    try:
        orientation = np.asarray([float(v) for v in first.ImageOrientationPatient], np.float64)
        row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    except (AttributeError, ValueError, TypeError):
        raise DataError(f"{where}: no ImageOrientationPatient / PixelSpacing, so the slices cannot be placed in "
                        "space; fix: export the series with its geometry (a CT/MR image storage export does)") from None
    normal = np.cross(orientation[:3], orientation[3:])
    positions = [np.asarray([float(v) for v in ds.get("ImagePositionPatient", [0, 0, 0])], np.float64)
                 for _, ds in items]
    has_positions = all("ImagePositionPatient" in ds for _, ds in items)
    keys = [(float(p @ normal) if has_positions else 0.0, int(ds.get("InstanceNumber", 0) or 0))
            for p, (_, ds) in zip(positions, items)]
    order = sorted(range(len(items)), key=lambda i: keys[i])
    problems: list[Problem] = []
    step = _slice_step(np.asarray([positions[i] for i in order]), normal, has_positions, first, where, problems)
    lps = np.eye(4)
    lps[:3, 0] = orientation[:3] * col_spacing
    lps[:3, 1] = orientation[3:] * row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = positions[order[0]]
    affine = check_affine(LPS_TO_RAS @ lps, where)
    shape = (int(first.Columns), int(first.Rows), len(items))
    patient = str(first.get("PatientID", "") or "").strip()
    return VolumeSource(uid or folder.name, folder, "dicom", Geometry(shape, affine), group=patient or uid or folder.name,
                        files=tuple(items[i][0] for i in order), modality=str(first.get("Modality", "")),
                        problems=problems)


def _slice_step(ordered: np.ndarray, normal: np.ndarray, has_positions: bool, first, where: str,
                problems: list[Problem]) -> np.ndarray:
    """The vector from one slice to the next (mean over the series); unequal gaps are a warning."""
    if len(ordered) < 2 or not has_positions:
        thickness = float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)) or 1.0)
        return normal * thickness
    gaps = np.diff(ordered @ normal)
    if np.any(np.abs(gaps) < 1e-6):
        raise DataError(f"{where}: two slices share one position; fix: the folder holds duplicates or two "
                        "acquisitions of one series: keep one of each slice")
    if gaps.max() - gaps.min() > SPACING_TOLERANCE * abs(gaps.mean()):
        problems.append(Problem("warning", "unequal_slice_spacing", where, "",
                                f"slice gaps range {gaps.min():.3g}..{gaps.max():.3g} mm: the slices are treated as "
                                f"given, stacked in order at their mean spacing {gaps.mean():.3g} mm",
                                "resample the series to equal spacing if world positions must be exact"))
    return (ordered[-1] - ordered[0]) / (len(ordered) - 1)


def read_dicom_array(files: tuple[Path, ...]) -> np.ndarray:
    """The series' modality values (Hounsfield units for CT) as ``(columns, rows, slices)`` float32."""
    from pydicom.pixels import apply_modality_lut, pixel_array

    planes = []
    for path in files:
        ds = read_dataset(path)
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        try:
            arr = pixel_array(ds)
        except Exception as exc:  # noqa: BLE001 - decoders raise many types
            raise DataError(codec_message(path, ts, exc)) from None
        planes.append(np.asarray(apply_modality_lut(arr, ds), np.float32))
    return np.ascontiguousarray(np.stack(planes, axis=-1).transpose(1, 0, 2))


def read_canonical(source: VolumeSource) -> np.ndarray:
    """The volume's values in canonical (RAS+) voxel order, float32."""
    data = read_nifti_array(source.path) if source.kind == "nifti" else read_dicom_array(source.files)
    if data.shape != source.geometry.shape:
        raise DataError(f"{source.path}: holds {data.shape} voxels but its header says {source.geometry.shape}; "
                        "fix: re-export the scan")
    return source.geometry.to_canonical(data)


# ------------------------------------------------------------------------------------------ intensity
@dataclass(frozen=True)
class Intensity:
    """How modality values become 0..255: a window ``(centre, width)`` or ``percentile`` (module docstring)."""

    window: tuple[float, float] | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)

    @classmethod
    def from_option(cls, option: str | tuple[float, float] | list[float],
                    percentiles: tuple[float, float] = (0.5, 99.5)) -> "Intensity":
        if isinstance(option, str):
            if option == "percentile":
                return cls(None, tuple(percentiles))  # type: ignore[arg-type]
            if option not in CT_WINDOWS:
                raise DataError(f"intensity {option!r} is not a named window; fix: use one of "
                                f"{', '.join(CT_WINDOWS)}, percentile, or [centre, width] in Hounsfield units")
            return cls(CT_WINDOWS[option], tuple(percentiles))  # type: ignore[arg-type]
        centre, width = (float(v) for v in option)
        if not width > 0:
            raise DataError(f"window [centre, width] = [{centre:g}, {width:g}]: the width must be > 0")
        return cls((centre, width), tuple(percentiles))  # type: ignore[arg-type]

    def apply(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, np.float32)
        if self.window is not None:
            centre, width = self.window
            lo, hi = centre - width / 2.0, centre + width / 2.0
        else:
            finite = values[np.isfinite(values)]
            lo, hi = (np.percentile(finite, self.percentiles) if finite.size else (0.0, 0.0))
        if not hi > lo:
            return np.zeros(values.shape, np.uint8)
        scaled = (np.nan_to_num(values, nan=lo) - lo) * (255.0 / (hi - lo))
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def slice_image(volume: np.ndarray, slice_axis: int, index: int, offset: int | None) -> np.ndarray:
    """Slice ``index`` as ``(H, W)`` (``offset`` None) or 2.5D ``(H, W, 3)``: slices ``index - offset``,
    ``index``, ``index + offset`` (clamped to the volume) as the three channels."""
    if offset is None:
        return np.ascontiguousarray(slice_plane(volume, slice_axis, index))
    last = volume.shape[slice_axis] - 1
    planes = [slice_plane(volume, slice_axis, min(max(index + d, 0), last)) for d in (-offset, 0, offset)]
    return np.ascontiguousarray(np.stack(planes, axis=-1))


# ---------------------------------------------------------------------------------------- the loader
class VolumeSliceLoader:
    """``Task.image_loader`` for slice records: reads the record's volume once (an LRU of ``cache_size`` decoded,
    windowed uint8 volumes per process) and returns its slice (or 2.5D stack). Picklable: a data-loader worker
    gets the sources and settings, with an empty cache."""

    def __init__(self, sources: Mapping[str, VolumeSource], intensity: Intensity, slice_axis: int,
                 offset: int | None, cache_size: int = 4):
        self.sources = dict(sources)
        self.intensity = intensity
        self.slice_axis = int(slice_axis)
        self.offset = offset
        self.cache_size = max(1, int(cache_size))
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        # what makes two loaders give the same pixels (hashed per decoded image by the preprocessing cache)
        self._identity = (tuple(sorted((k, str(s.path), s.files) for k, s in self.sources.items())), intensity,
                          self.slice_axis, offset)

    def volume(self, volume_id: str) -> np.ndarray:
        with self._lock:
            if volume_id in self._cache:
                self._cache.move_to_end(volume_id)
                return self._cache[volume_id]
        source = self.sources[volume_id]
        shown = self.intensity.apply(read_canonical(source))
        with self._lock:
            self._cache[volume_id] = shown
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return shown

    def __call__(self, record) -> np.ndarray:
        meta = record.meta
        return slice_image(self.volume(meta["volume_id"]), self.slice_axis, int(meta["slice_index"]), self.offset)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VolumeSliceLoader) and other._identity == self._identity

    def __hash__(self) -> int:
        return hash((VolumeSliceLoader, self._identity))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"], state["_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"VolumeSliceLoader({len(self.sources)} volumes, {self.intensity}, axis {self.slice_axis}, offset {self.offset})"


# ---------------------------------------------------------------------------------------- annotations
def read_label_map(path: Path, source: VolumeSource) -> np.ndarray:
    """A label map on ``source``'s grid, in canonical voxel order (int); a different grid is an error naming both."""
    label = nib.load(str(path))
    shape = tuple(int(n) for n in label.shape[:3])
    affine = np.asarray(label.affine, np.float64)
    grid = source.geometry
    if shape != grid.shape or not np.allclose(affine, grid.affine, atol=AFFINE_TOLERANCE_MM):
        raise DataError(f"label map {path} is not on the grid of its image {source.path}: label map {shape} voxels, "
                        f"affine {np.round(affine, 3).tolist()}; image {grid.shape} voxels, affine "
                        f"{np.round(grid.affine, 3).tolist()}; fix: resample the label map onto the image "
                        "(nibabel.processing.resample_from_to with order=0), or pair it with the right image")
    data = np.asanyarray(label.dataobj)
    data = data.reshape(data.shape[:3])
    if data.dtype.kind == "f":
        data = np.rint(data)
    return grid.to_canonical(data.astype(np.int64))


@dataclass(frozen=True)
class Lesion:
    """One row of a lesion CSV: a sphere in world coordinates (mm, ``space`` as given in the file)."""

    volume_id: str
    centre: tuple[float, float, float]
    diameter: float
    category: str
    where: str  # "FILE line N", for errors


def read_lesion_csv(path: Path, default_class: str, class_column: str | None, space: str) -> list[Lesion]:
    """The rows of a LUNA16-style CSV (``seriesuid, coordX, coordY, coordZ, diameter_mm``; coordinates in ``space``,
    LPS as in LUNA16 / DICOM / ITK, or RAS), centres converted to RAS."""
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in LUNA_COLUMNS + ((class_column,) if class_column else ()) if c not in columns]
        if missing:
            raise DataError(f"lesion CSV {path} lacks the column(s) {missing} (has {columns}); fix: give the "
                            f"LUNA16 header {','.join(LUNA_COLUMNS)}")
        sign = np.array([-1.0, -1.0, 1.0]) if space == "LPS" else np.ones(3)
        out = []
        for line, row in enumerate(reader, start=2):
            where = f"lesion CSV {path} line {line}"
            try:
                centre = np.array([float(row[c]) for c in LUNA_COLUMNS[1:4]]) * sign
                diameter = float(row["diameter_mm"])
            except (TypeError, ValueError):
                raise DataError(f"{where}: coordinates and diameter must be numbers, got {dict(row)}; fix the row") from None
            if not (np.all(np.isfinite(centre)) and diameter > 0):
                raise DataError(f"{where}: needs finite coordinates and a diameter > 0, got {dict(row)}; fix the row")
            category = (row[class_column] or "").strip() if class_column else default_class
            out.append(Lesion(row["seriesuid"].strip(), tuple(centre.tolist()), diameter, category or default_class,
                              where))
    return out


def sphere_boxes(lesion: Lesion, affine: np.ndarray, shape: tuple[int, int, int], slice_axis: int,
                 where_volume: str) -> dict[int, np.ndarray]:
    """The box of the lesion sphere on each slice it crosses (canonical grid): the circle of radius
    ``sqrt(r^2 - d^2)`` where the slice lies ``d`` mm from the centre. A sphere between two slices gets its full
    radius on the nearest one. A centre outside the volume is an error naming the CSV row."""
    voxel = world_to_voxel(affine, np.asarray(lesion.centre))[0]
    extent = np.asarray(shape, np.float64)
    if np.any(voxel < -0.5) or np.any(voxel > extent - 0.5):
        raise DataError(f"{lesion.where}: lesion centre {list(np.round(lesion.centre, 2))} (RAS mm) lies outside "
                        f"{where_volume} (voxel {np.round(voxel, 1).tolist()}, volume {list(shape)} voxels); fix: check "
                        "the row's seriesuid and coordinates (LUNA16 coordinates are LPS world mm: set csv_space)")
    spacing = spacing_of(affine)
    col_axis, row_axis = plane_axes(slice_axis)
    radius = lesion.diameter / 2.0
    centre_slice = voxel[slice_axis]
    reach = radius / spacing[slice_axis]
    indices = [s for s in range(int(np.ceil(centre_slice - reach)), int(np.floor(centre_slice + reach)) + 1)
               if 0 <= s < shape[slice_axis]]
    out = {}
    for s in indices or [int(np.clip(np.rint(centre_slice), 0, shape[slice_axis] - 1))]:
        d = abs(s - centre_slice) * spacing[slice_axis]
        r = np.sqrt(max(radius ** 2 - d ** 2, 0.0)) if indices else radius
        cx, cy = voxel[col_axis] + 0.5, voxel[row_axis] + 0.5
        hx, hy = r / spacing[col_axis], r / spacing[row_axis]
        box = np.array([max(cx - hx, 0.0), max(cy - hy, 0.0), min(cx + hx, shape[col_axis]),
                        min(cy + hy, shape[row_axis])], np.float32)
        if box[2] > box[0] and box[3] > box[1]:
            out[s] = box
    return out


def csv_slice_boxes(lesions: list[Lesion], source: VolumeSource, slice_axis: int,
                    categories: list[str]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per slice: the boxes and labels of every CSV lesion of ``source``."""
    grid = source.geometry
    per_slice: dict[int, tuple[list, list]] = {}
    for lesion in lesions:
        for s, box in sphere_boxes(lesion, grid.canonical_affine, grid.canonical_shape, slice_axis,
                                   f"volume {source.volume_id} ({source.path})").items():
            boxes, labels = per_slice.setdefault(s, ([], []))
            boxes.append(box)
            labels.append(categories.index(lesion.category))
    return {s: (np.asarray(b, np.float32).reshape(-1, 4), np.asarray(lab, np.int64)) for s, (b, lab) in per_slice.items()}


def label_map_slice_boxes(path: Path, source: VolumeSource, slice_axis: int, classes: Mapping[int, str | None],
                          categories: list[str], min_size: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per slice: the boxes of the label map's connected components (:mod:`megatron.data.masks`)."""
    return volume_label_map_boxes(read_label_map(path, source), slice_axis, classes, categories,
                                  f"label map {path}", min_size)


# ---------------------------------------------------------------------------------------- slice choice
def select_slices(n_slices: int, lesion_slices: set[int], empty_fraction: float, seed: int,
                  volume_id: str) -> list[int]:
    """Every lesion slice plus ``round(empty_fraction * lesion-free slices)`` of the others, drawn from a generator
    seeded by ``seed`` and the volume id (the same volumes and seed give the same slices, in any order)."""
    empty = [s for s in range(n_slices) if s not in lesion_slices]
    k = int(round(empty_fraction * len(empty)))
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(volume_id.encode())])
    chosen = set(rng.choice(empty, size=k, replace=False).tolist()) if k else set()
    return sorted(set(lesion_slices) | chosen)

# ---------------------------------------------------------------------------------------- the task
@dataclass(frozen=True)
class VolumeAnnotations:
    """Where a volume's boxes come from: label maps in ``label_dir`` (one per volume, same name) or a lesion CSV."""

    label_dir: Path | None = None
    lesion_csv: Path | None = None
    classes: Mapping[int, str | None] = field(default_factory=lambda: {1: "lesion"})
    csv_class: str = "lesion"
    csv_class_column: str | None = None
    csv_space: Literal["LPS", "RAS"] = "LPS"
    min_size: int = 1


@dataclass(frozen=True)
class SliceSettings:
    """Which slices become images and how they look (module docstring)."""

    axis: str = "axial"
    intensity: Intensity = Intensity()
    offset: int | None = None  # 2.5D: neighbours this many slices away as the other channels; None: 2D
    empty_fraction: float = 0.0
    seed: int = 0
    cache_size: int = 4


def find_sources(root: Path, kind: str = "auto", series_uid: list[str] | None = None) -> list[VolumeSource]:
    """The volumes under ``root`` (a NIfTI file, a folder of NIfTI files, or a folder of DICOM series)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"volume path {root} does not exist; fix: give a NIfTI file or a folder of scans")
    nifti = find_nifti(root) if kind in ("auto", "nifti") else []
    if nifti:
        sources = [read_nifti_source(p) for p in nifti]
    elif kind in ("auto", "dicom"):
        sources = find_dicom_series(root, series_uid)
    else:
        sources = []
    if not sources:
        chosen = f" with SeriesInstanceUID in {series_uid}" if series_uid else ""
        raise DataError(f"{root} holds no volume{chosen} (searched for {', '.join(NIFTI_SUFFIXES)} files and DICOM "
                        "series); fix: point the option at the scans' folder" + (", check series_uid" if chosen else ""))
    seen: dict[str, Path] = {}
    for s in sources:
        if s.volume_id in seen:
            raise DataError(f"two volumes are both called {s.volume_id!r}: {seen[s.volume_id]} and {s.path}; fix: "
                            "rename one (volume ids are file names without .nii(.gz), or DICOM SeriesInstanceUIDs)")
        seen[s.volume_id] = s.path
    return sources


def find_label_map(label_dir: Path, source: VolumeSource) -> Path | None:
    """``label_dir/<image file name>``, or ``label_dir/<volume id>.nii(.gz)`` (nnU-Net's ``_0000`` channel
    suffix dropped)."""
    names = [source.path.name] if source.kind == "nifti" else []
    ids = [source.volume_id, source.volume_id.removesuffix("_0000")]
    names += [f"{i}{suffix}" for i in ids for suffix in (".nii.gz", ".nii")]
    return next((Path(label_dir) / n for n in names if (Path(label_dir) / n).is_file()), None)


def annotation_categories(annotations: VolumeAnnotations, lesions: list[Lesion] | None) -> list[str]:
    if annotations.label_dir is not None:
        return categories_of(annotations.classes)
    if lesions is not None:
        return sorted({lesion.category for lesion in lesions}) if annotations.csv_class_column else [annotations.csv_class]
    return []


def volume_boxes(source: VolumeSource, annotations: VolumeAnnotations, lesions: list[Lesion] | None,
                 slice_axis: int, categories: list[str]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per slice of ``source``: its boxes and labels (empty dict: no lesion, or no annotations)."""
    if annotations.label_dir is not None:
        path = find_label_map(annotations.label_dir, source)
        if path is None:
            raise DataError(f"volume {source.volume_id} ({source.path}) has no label map in {annotations.label_dir} "
                            f"(looked for {source.path.name if source.kind == 'nifti' else source.volume_id + '.nii.gz'}); "
                            "fix: add it, or move the scan out of the folder")
        return label_map_slice_boxes(path, source, slice_axis, annotations.classes, categories, annotations.min_size)
    if lesions is not None:
        mine = [lesion for lesion in lesions if lesion.volume_id == source.volume_id]
        return csv_slice_boxes(mine, source, slice_axis, categories)
    return {}


def slice_records(source: VolumeSource, boxes: dict[int, tuple[np.ndarray, np.ndarray]], settings: SliceSettings,
                  first_id: int) -> list:
    """The records of the chosen slices of one volume (module docstring, "What each record keeps")."""

    slice_axis = AXES[settings.axis]
    col_axis, row_axis = plane_axes(slice_axis)
    shape, affine = source.geometry.canonical_shape, source.geometry.canonical_affine
    spacing = spacing_of(affine)
    chosen = select_slices(shape[slice_axis], set(boxes), settings.empty_fraction, settings.seed, source.volume_id)
    empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    records = []
    for n, s in enumerate(chosen):
        b, lab = boxes.get(s, empty)
        meta = {"volume_id": source.volume_id, "volume_path": str(source.path), "axis": settings.axis,
                "slice_axis": slice_axis, "col_axis": col_axis, "row_axis": row_axis, "slice_index": int(s),
                "n_slices": int(shape[slice_axis]), "spacing": [float(spacing[row_axis]), float(spacing[col_axis])],
                "slice_spacing": float(spacing[slice_axis]), "affine": affine.tolist(), "shape": list(shape)}
        records.append(ImageRecord(first_id + n, source.path, int(shape[col_axis]), int(shape[row_axis]), b, lab,
                                   f"{source.volume_id}_{settings.axis}{s:03d}", group=source.group, meta=meta))
    return records


def read_volume_task(root: Path, name: str, annotations: VolumeAnnotations, settings: SliceSettings, *,
                     kind: str = "auto", series_uid: list[str] | None = None, modality: str = "",
                     source: str = ""):
    """Every volume under ``root`` as one slice task; returns ``(Task, problems)`` (warnings: unequal slice
    spacing, CSV rows for volumes not found). Bad input raises a DataError naming the file and the fix."""

    if annotations.label_dir is not None and annotations.lesion_csv is not None:
        raise DataError("volume annotations: give either label maps (labels) or a lesion CSV (lesions_csv), not both")
    if settings.axis not in AXES:
        raise DataError(f"axis {settings.axis!r}: expected one of {', '.join(AXES)}")
    sources = find_sources(root, kind, series_uid)
    lesions = (read_lesion_csv(annotations.lesion_csv, annotations.csv_class, annotations.csv_class_column,
                               annotations.csv_space) if annotations.lesion_csv is not None else None)
    categories = annotation_categories(annotations, lesions)
    problems = [p for s in sources for p in s.problems]
    if lesions is not None:
        problems += _unmatched_lesions(lesions, sources, annotations.lesion_csv)
    records: list = []
    for s in sources:
        boxes = volume_boxes(s, annotations, lesions, AXES[settings.axis], categories)
        records += slice_records(s, boxes, settings, len(records) + 1)
    loader = VolumeSliceLoader({s.volume_id: s for s in sources}, settings.intensity, AXES[settings.axis],
                               settings.offset, settings.cache_size)
    task = Task(name=name, categories=categories, records=records, modality=modality or sources[0].modality.lower(),
                source=source or f"volume:{root}", image_loader=loader)
    return task, problems


def volume_task_name(root: str | Path, name: str | None) -> str:
    """The ``volume`` plugin's task name: ``name``, else the root folder's name (a file's name without suffix)."""
    if name:
        return str(name)
    root = Path(root).expanduser()
    return root.resolve().name if root.is_dir() else root.name.split(".")[0]


def target_reading_options(datasets, target: str) -> dict | None:
    """The :data:`READING_OPTIONS` given to the ``volume`` dataset entry (``DatasetSpec``s) that yields the task
    ``target``, as plain values; None when the target is not read by the ``volume`` plugin."""
    for spec in datasets:
        options = dict(spec.options)
        if spec.plugin == VOLUME_PLUGIN and "root" in options and \
                volume_task_name(options["root"], options.get("name")) == target:
            return {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items() if k in READING_OPTIONS}
    return None


def _unmatched_lesions(lesions: list[Lesion], sources: list[VolumeSource], csv_path: Path | None) -> list[Problem]:
    ids = {s.volume_id for s in sources}
    missing = sorted({lesion.volume_id for lesion in lesions} - ids)
    if not missing:
        return []
    rows = sum(lesion.volume_id in missing for lesion in lesions)
    return [Problem("warning", "lesion_volume_not_found", str(csv_path), "",
                    f"{rows} row(s) name {len(missing)} seriesuid(s) with no volume here (e.g. {missing[0]}); they are "
                    "skipped", "add those scans, or ignore this if the folder holds a subset on purpose")]
