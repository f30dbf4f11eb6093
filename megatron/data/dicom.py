"""DICOM files -> the pixel arrays every megatron dataset hands out, displayed as radiology software does.

The core reader (:func:`megatron.data.io.read_image`) sends every DICOM file here (``.dcm``/``.dicom``, or
the ``DICM`` magic at byte 128), so COCO tasks whose ``file_name``s point at DICOM files, the ``dicom`` and
``folder`` dataset plugins, similarity and ``predict``/``evaluate`` all read DICOM the same way.

pydicom does the work; megatron only chooses the order and the output range:

1. **Decode** one frame: :func:`pydicom.pixels.pixel_array` (``index=frame``). Signed pixel data comes back
   sign-extended (``int16``); ``YBR_FULL``/``YBR_FULL_422`` come back as RGB (pydicom's
   :func:`~pydicom.pixels.convert_color_space`). Compressed transfer syntaxes (JPEG baseline/extended/lossless,
   JPEG-LS, JPEG 2000, HTJ2K, RLE) decode through the pydicom plugins installed with megatron (pylibjpeg with
   libjpeg, openjpeg and rle); when a decode fails the :class:`~megatron.errors.DataError` names the file, the
   transfer syntax and the package.
2. **Grayscale** (``MONOCHROME1``/``MONOCHROME2``):

   - the modality LUT: :func:`pydicom.pixels.apply_modality_lut` (Modality LUT Sequence, or
     ``RescaleSlope``/``RescaleIntercept``: e.g. CT values become Hounsfield units);
   - the VOI LUT: :func:`pydicom.pixels.apply_voi_lut` with the file's VOI LUT Sequence or
     ``WindowCenter``/``WindowWidth`` (``VOILUTFunction`` LINEAR, LINEAR_EXACT or SIGMOID; the window
     ``window_index``, first by default), or your own ``(center, width)`` through
     :func:`pydicom.pixels.apply_windowing` (LINEAR). The windowed image is what a viewer shows, so it is
     returned as **uint8** ``0..255`` (the VOI output range mapped linearly) and the pipeline uses it as is;
   - with no window (``window="none"``, or a file without VOI LUT and window): the modality values as
     **uint16**, shifted so that the lowest value the file can hold is 0 (e.g. HU + 1024 for a 12-bit CT with
     intercept -1024); values that are not integers or span more than 16 bits (32-bit data, fractional
     rescale slopes) are instead scaled from the image's own min..max to 0..65535. The pipeline then windows
     them like any 16-bit PNG (0.5th to 99.5th percentile per image,
     :func:`megatron.data.preprocess.normalise_intensity`), which either mapping leaves unchanged;
   - ``MONOCHROME1`` (and a ``PresentationLUTShape`` of ``INVERSE``) is inverted, so that high values are
     bright as on a viewer's screen.
3. **Colour**: ``PALETTE COLOR`` through :func:`pydicom.pixels.apply_color_lut`; RGB (and YBR, converted in
   step 1) scaled from ``BitsStored`` to uint8 ``(H, W, 3)``.

Multi-frame files are addressed by a 0-based frame index (``ImageRecord.frame``; ``"frame"`` in a COCO
image entry). Reading a multi-frame file without a frame index is an error that says so.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
_MAGIC_OFFSET = 128
_MAGIC = b"DICM"
_RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".pgm", ".ppm", ".webp", ".json", ".txt",
                    ".yaml", ".yml", ".csv", ".md")

# pip packages that decode each compressed transfer syntax (pydicom's decoder plugins, installed with megatron:
# pylibjpeg + its libjpeg/openjpeg/rle plugins, pip wheels for every platform with no system library, unlike
# python-gdcm's; they cover every syntax below); python-gdcm decodes all of them too
_PYLIBJPEG_LIBJPEG = "pylibjpeg pylibjpeg-libjpeg"
_PYLIBJPEG_OPENJPEG = "pylibjpeg pylibjpeg-openjpeg"
CODEC_PACKAGES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": _PYLIBJPEG_LIBJPEG,  # JPEG Baseline (8-bit; Pillow decodes most of them)
    "1.2.840.10008.1.2.4.51": _PYLIBJPEG_LIBJPEG,  # JPEG Extended (12-bit)
    "1.2.840.10008.1.2.4.57": _PYLIBJPEG_LIBJPEG,  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": _PYLIBJPEG_LIBJPEG,  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": _PYLIBJPEG_LIBJPEG,  # JPEG-LS Lossless (or pyjpegls)
    "1.2.840.10008.1.2.4.81": _PYLIBJPEG_LIBJPEG,  # JPEG-LS Near-Lossless (or pyjpegls)
    "1.2.840.10008.1.2.4.90": _PYLIBJPEG_OPENJPEG,  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": _PYLIBJPEG_OPENJPEG,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": _PYLIBJPEG_OPENJPEG,  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": _PYLIBJPEG_OPENJPEG,  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": _PYLIBJPEG_OPENJPEG,  # HTJ2K
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",  # RLE Lossless (pydicom decodes it natively too)
}


@dataclass(frozen=True)
class DicomDisplay:
    """How grayscale DICOM pixels are windowed for display.

    ``window``: ``"file"`` (the file's VOI LUT or window number ``window_index``; no window when it has
    none), ``"none"`` (the modality values, 16-bit, windowed later like any 16-bit image) or
    ``(center, width)`` in modality units (e.g. Hounsfield units: ``(40, 400)`` is a soft-tissue window).
    """

    window: str | tuple[float, float] = "file"
    window_index: int = 0

    def __post_init__(self) -> None:
        w = self.window
        if isinstance(w, str):
            if w not in ("file", "none"):
                raise ConfigError(f"DICOM window {w!r}: expected 'file', 'none' or [center, width]")
        else:
            try:
                center, width = (float(v) for v in w)
            except (TypeError, ValueError):
                raise ConfigError(f"DICOM window {w!r}: expected 'file', 'none' or [center, width]") from None
            if not width >= 1:
                raise ConfigError(f"DICOM window width {width:g} must be >= 1 (LINEAR windowing, DICOM PS3.3 "
                                  "C.11.2.1.2); give [center, width] with width >= 1")
            object.__setattr__(self, "window", (center, width))
        if int(self.window_index) < 0:
            raise ConfigError(f"DICOM window_index {self.window_index} must be >= 0 (0 is the file's first window)")


DEFAULT_DISPLAY = DicomDisplay()


# --------------------------------------------------------------------------------------------- file detection
def has_dicom_magic(path: Path) -> bool:
    """True when ``path`` holds ``DICM`` at byte 128 (the DICOM Part 10 file preamble)."""
    try:
        with open(path, "rb") as f:
            f.seek(_MAGIC_OFFSET)
            return f.read(4) == _MAGIC
    except OSError:
        return False


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm``/``.dicom``/``.dic`` file, or any other file (not a known raster/text suffix) with the
    DICOM magic. Files without preamble are recognised by their suffix only."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix in _RASTER_SUFFIXES:
        return False
    return path.is_file() and has_dicom_magic(path)


# ------------------------------------------------------------------------------------------------- reading
def _pydicom():
    try:
        import pydicom
    except ImportError:  # pragma: no cover - a declared dependency
        raise DataError("reading DICOM needs pydicom; fix: `pip install 'pydicom>=3'`") from None
    return pydicom


def read_dataset(path: Path, header_only: bool = False):
    """The pydicom Dataset of ``path`` (``header_only``: pixel data deferred, not read); DataError when it is
    not a readable DICOM file."""
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    kwargs: dict[str, Any] = {"defer_size": "256 KB"} if header_only else {}
    try:
        try:
            return pydicom.dcmread(path, **kwargs)
        except InvalidDicomError:
            # no 128-byte preamble + DICM (old ACR-NEMA style or raw data set): accepted for .dcm files only
            if path.suffix.lower() not in DICOM_SUFFIXES:
                raise
            ds = pydicom.dcmread(path, force=True, **kwargs)
            if not any(k in ds for k in ("SOPClassUID", "PixelData", "Rows", "Modality", "StudyInstanceUID")):
                raise InvalidDicomError("no DICM preamble and no recognisable DICOM data elements")
            return ds
    except InvalidDicomError as exc:
        raise DataError(f"DICOM file {path} is not a valid DICOM file ({exc}); fix: re-export it from the PACS/"
                        "viewer as DICOM Part 10, or remove it") from None
    except Exception as exc:  # noqa: BLE001 - truncated or malformed files raise many types
        size = path.stat().st_size if path.exists() else 0
        what = "is empty" if size == 0 else f"cannot be parsed ({type(exc).__name__}: {exc})"
        raise DataError(f"DICOM file {path} {what}: corrupt or truncated; fix: re-export it, or remove the image "
                        "and its annotations") from None


def _photometric(ds) -> str:
    return str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()


def number_of_frames(ds) -> int:
    from pydicom.pixels.utils import get_nr_frames

    return int(get_nr_frames(ds, warn=False))


@dataclass(frozen=True)
class DicomHeader:
    """What a folder scan needs to know about one DICOM file without decoding it."""

    path: Path
    rows: int
    columns: int
    frames: int
    photometric: str
    transfer_syntax: str
    has_pixels: bool
    modality: str = ""
    sop_class: str = ""
    patient_id: str = ""  # PatientID and StudyInstanceUID: the groups a split keeps together
    study_uid: str = ""
    spacing: tuple[float, float] | None = None  # PixelSpacing (else ImagerPixelSpacing), mm: (row, column)


def read_header(path: Path) -> DicomHeader:
    """Size, frame count, photometric interpretation and transfer syntax of ``path`` (pixels not decoded)."""
    ds = read_dataset(path, header_only=True)
    has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    sop = ds.get("SOPClassUID", "")
    return DicomHeader(path=Path(path), rows=int(ds.get("Rows", 0) or 0), columns=int(ds.get("Columns", 0) or 0),
                       frames=number_of_frames(ds) if has_pixels else 0, photometric=_photometric(ds),
                       transfer_syntax=f"{ts.name} ({ts})" if ts is not None else "unknown",
                       has_pixels=has_pixels, modality=str(ds.get("Modality", "")),
                       sop_class=getattr(sop, "name", str(sop)), patient_id=str(ds.get("PatientID", "") or "").strip(),
                       study_uid=str(ds.get("StudyInstanceUID", "") or "").strip(), spacing=_pixel_spacing(ds))


def _pixel_spacing(ds) -> tuple[float, float] | None:
    """The (row, column) pixel spacing in mm from PixelSpacing or ImagerPixelSpacing; None when absent or bad."""
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(tag)
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if row > 0 and col > 0:
            return row, col
    return None


def read_dicom(path: Path, frame: int | None = None, display: DicomDisplay | None = None) -> np.ndarray:
    """Frame ``frame`` of the DICOM file ``path`` as displayed (module docstring): ``(H, W)`` uint8 (windowed)
    or uint16 (no window), or ``(H, W, 3)`` uint8 RGB. ``frame`` is required for multi-frame files."""
    path = Path(path)
    display = display if display is not None else DEFAULT_DISPLAY
    ds = read_dataset(path, header_only=True)  # pixel data deferred: one frame is decoded, not the whole file
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        what = getattr(ds.get("SOPClassUID", ""), "name", "") or str(ds.get("Modality", "")) or "unknown kind"
        raise DataError(f"DICOM file {path} holds no image (no Pixel Data; {what}); fix: remove it from the image "
                        "folder / annotations (structured reports, RT structures and DICOMDIR files are not images)")
    n = number_of_frames(ds)
    where = f"DICOM file {path}" + (f" frame {frame}" if frame is not None else "")
    if frame is None:
        if n > 1:
            raise DataError(f"DICOM file {path} holds {n} frames and no frame index was given; fix: give the 0-based "
                            "frame (\"frame\": N in the COCO image entry), or read the folder with the `dicom` "
                            "plugin, which makes one image per frame")
        index = None
    else:
        if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)) or not 0 <= int(frame) < n:
            raise DataError(f"{where}: frame index {frame!r} is out of range, the file holds {n} frame(s) "
                            f"(0..{n - 1}); fix: correct the frame index")
        index = int(frame) if n > 1 else None
    arr = _decode(ds, path, index)
    if arr.ndim == 3 and arr.shape[2] not in (3, 4) and index is None:  # a one-frame (1, H, W) stack
        arr = arr[0]
    return to_display(arr, ds, display, where)


def _decode(ds, path: Path, index: int | None) -> np.ndarray:
    from pydicom.pixels import pixel_array
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        if index is not None and ts is not None and ts != DeflatedExplicitVRLittleEndian:
            # read just this frame's bytes from the file (a tomosynthesis stack can be a gigabyte)
            return np.asarray(pixel_array(path, index=index))
        return np.asarray(pixel_array(ds, index=index))
    except (NotImplementedError, RuntimeError) as exc:
        raise DataError(codec_message(path, ts, exc)) from None
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on corrupt data
        if ts is not None and ts.is_compressed:
            raise DataError(codec_message(path, ts, exc)) from None
        raise DataError(f"DICOM file {path}: cannot decode its pixel data ({type(exc).__name__}: {exc}); fix: "
                        "re-export the file, or remove it and its annotations") from None


def codec_message(path: Path, ts, exc: BaseException) -> str:
    """The error for pixel data that cannot be decoded: file, transfer syntax, and the package to install."""
    uid = str(ts) if ts is not None else "unknown"
    name = getattr(ts, "name", uid)
    reason = " ".join(str(exc).split())
    if len(reason) > 300:
        reason = reason[:300] + "..."
    packages = CODEC_PACKAGES.get(uid)
    if packages:
        # megatron installs these decoders (pyproject.toml); failing here means a broken install or data they reject
        fix = (f"megatron installs its decoder ({packages}): if it is missing, reinstall it, `pip install {packages}`; "
               "if it is installed, the data is damaged or a variant it cannot read: convert the file to an "
               "uncompressed transfer syntax (gdcmconv --raw, or dcmtk's dcmdjpeg / dcmdjpls) or try "
               "`pip install python-gdcm`")
    else:
        fix = ("convert the file to an uncompressed transfer syntax (e.g. `gdcmconv --raw IN OUT`), or install "
               "python-gdcm, which decodes most transfer syntaxes")
    return (f"DICOM file {path}: cannot decode its pixel data, stored as {name} (transfer syntax {uid}): {reason}; "
            f"fix: {fix}")


# ------------------------------------------------------------------------------------------------- display
def modality_range(ds) -> tuple[float, float]:
    """The lowest and highest value the modality LUT stage can output (as pydicom's windowing computes it)."""
    if ds.get("ModalityLUTSequence"):
        depth = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2 ** depth - 1)
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 0:
        lo, hi = 0.0, float(2 ** bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    return lo, hi


def window_count(ds) -> int:
    """How many alternative VOI transforms the file offers (VOI LUT Sequence items, or window values)."""
    if ds.get("VOILUTSequence"):
        return len(ds.VOILUTSequence)
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return min(ds["WindowCenter"].VM, ds["WindowWidth"].VM)
    return 0


def _to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    scaled = (np.asarray(values, np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _inverted(ds) -> bool:
    shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
    return _photometric(ds) == "MONOCHROME1" or shape == "INVERSE"


def to_display(arr: np.ndarray, ds, display: DicomDisplay = DEFAULT_DISPLAY, where: str = "DICOM file") -> np.ndarray:
    """Decoded stored values of one frame -> the displayed image (module docstring, steps 2 and 3)."""
    from pydicom.pixels import apply_color_lut

    pi = _photometric(ds)
    if pi in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim != 2:
            raise DataError(f"{where}: {pi} pixel data has shape {arr.shape}, expected one (rows, columns) frame; "
                            "fix: re-export the file")
        return _grey_display(arr, ds, display, where)
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        depth = int(ds.RedPaletteColorLookupTableDescriptor[2]) if "RedPaletteColorLookupTableDescriptor" in ds else 8
        return _to_uint8(rgb, 0, 2 ** depth - 1)
    if pi in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT") and arr.ndim == 3 and arr.shape[2] == 3:
        # YBR_FULL(_422) was converted to RGB by pixel_array(); JPEG 2000 decoders undo ICT/RCT themselves
        if arr.dtype == np.uint8:
            return np.ascontiguousarray(arr)
        bits = int(ds.get("BitsStored", 8) or 8)
        return _to_uint8(arr, 0, 2 ** bits - 1)
    raise DataError(f"{where}: photometric interpretation {pi!r} with pixel shape {arr.shape} is not supported "
                    "(supported: MONOCHROME1, MONOCHROME2, PALETTE COLOR, RGB, YBR_FULL, YBR_FULL_422); fix: "
                    "convert the file to MONOCHROME2 or RGB")


def _grey_display(arr: np.ndarray, ds, display: DicomDisplay, where: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing

    values = apply_modality_lut(arr, ds)
    lo, hi = modality_range(ds)
    if values.dtype.kind == "f" and "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds:
        finite = values[np.isfinite(values)]  # float pixel data: its own range
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    window = display.window
    if isinstance(window, tuple):
        center, width = window
        ds.WindowCenter, ds.WindowWidth = center, width
        ds.VOILUTFunction = "LINEAR"
        shown = _to_uint8(apply_windowing(values, ds, 0), lo, hi)
    elif window == "file" and window_count(ds):
        n = window_count(ds)
        index = int(display.window_index)
        if index >= n:
            raise DataError(f"{where}: window_index {index} asks for window {index + 1}, but the file offers {n} "
                            f"(VOI LUT / WindowCenter-WindowWidth); fix: choose window_index 0..{n - 1}, give your own "
                            "window [center, width], or use window: none")
        if ds.get("VOILUTSequence"):
            item = ds.VOILUTSequence[index]
            if values.dtype.kind == "f" and np.all(values == np.rint(values)):
                values = values.astype(np.int64)  # the LUT is indexed by integer values
            out = apply_voi_lut(values, ds, index=index, prefer_lut=True)
            shown = _to_uint8(out, 0, 2 ** int(item.LUTDescriptor[2]) - 1)
        else:
            try:
                out = apply_voi_lut(values, ds, index=index)
            except ValueError as exc:
                raise DataError(f"{where}: its window cannot be applied ({exc}); fix: give your own window "
                                "[center, width] or use window: none") from None
            shown = _to_uint8(out, lo, hi)
    else:
        return _unwindowed(values, lo, hi, _inverted(ds))
    return (255 - shown) if _inverted(ds) else shown


def _unwindowed(values: np.ndarray, lo: float, hi: float, invert: bool) -> np.ndarray:
    """Modality values -> uint16: shifted by ``lo`` (exact) when integral and ``hi - lo`` fits 16 bits, else this
    image's own min..max scaled to 0..65535 (the pipeline's percentile window is per image anyway)."""
    v = np.asarray(values, np.float64)
    if invert:
        v = lo + hi - v
    finite = np.isfinite(v)
    if hi - lo <= 65535 and float(lo).is_integer() and bool(np.all(v[finite] == np.rint(v[finite]))):
        out = v - lo
    else:
        vmin, vmax = (float(v[finite].min()), float(v[finite].max())) if finite.any() else (0.0, 0.0)
        out = (v - vmin) * (65535.0 / (vmax - vmin) if vmax > vmin else 0.0)
    return np.clip(np.rint(np.where(finite, out, 0.0)), 0, 65535).astype(np.uint16)
