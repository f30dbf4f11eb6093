"""Reading image files into the arrays every megatron dataset hands out.

:func:`read_image` returns ``(H, W)`` uint8/uint16 grayscale or ``(H, W, 3)`` uint8 RGB, whatever the file
holds (8/16-bit PNG/TIFF, JPEG, BMP, ...). OpenCV decodes (``IMREAD_UNCHANGED`` keeps 16 bits); Pillow is
the fallback for what OpenCV cannot read. Every failure is a :class:`~megatron.errors.DataError` that names
the file and says how to fix it.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from megatron.data.dicom import DEFAULT_DISPLAY, DicomDisplay, is_dicom_file, read_dicom, read_header
from megatron.errors import DataError


log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".pgm", ".ppm", ".webp")
# every suffix read_image takes: the raster ones and DICOM (DICOM files without a suffix are recognised by
# their DICM magic: megatron.data.dicom.is_dicom_file; megatron.data.folder.read_image_folder finds both)
READABLE_SUFFIXES = IMAGE_SUFFIXES + (".dcm", ".dicom", ".dic")

_FIX_CORRUPT = ("re-export it as an 8/16-bit grayscale or 8-bit RGB PNG, or remove the image and its "
                "annotations from the dataset")

_CV_LOG_LOCK = threading.Lock()


@contextlib.contextmanager
def _opencv_quiet() -> Iterator[None]:
    """OpenCV's own warnings off while decoding (e.g. ``[ WARN:0] ... PNG input buffer is incomplete`` on
    stderr for a truncated PNG): a file OpenCV cannot decode is reported once, by megatron, with its name and
    the fix."""
    logging_api = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging_api is None:  # pragma: no cover - OpenCV builds without the logging API
        yield
        return
    with _CV_LOG_LOCK:
        before = logging_api.getLogLevel()
        logging_api.setLogLevel(min(before, logging_api.LOG_LEVEL_ERROR))
        try:
            yield
        finally:
            logging_api.setLogLevel(before)


def read_image(path: Path, frame: int | None = None, dicom: "DicomDisplay | None" = None) -> np.ndarray:
    """The pixels of ``path``: ``(H, W)`` uint8|uint16 grayscale or ``(H, W, 3)`` uint8 RGB.

    ``frame``: the 0-based frame of a multi-frame DICOM file (required for those; other files have one
    frame). ``dicom``: how DICOM grayscale is windowed (default: the file's first VOI LUT / window).
    """

    path = Path(path)
    if not path.is_file():
        where = "is a folder, not an image file" if path.exists() else "does not exist"
        raise DataError(f"image {path} {where}; fix: check the image folder / file_name in the annotations "
                        "(paths are relative to the image folder)")
    if is_dicom_file(path):
        return read_dicom(path, frame, dicom)
    if frame not in (None, 0):
        raise DataError(f"image {path}: frame {frame!r} was given, but frame indices address multi-frame DICOM "
                        "files and this is not one; fix: drop the frame index for this image")
    image = None
    try:
        # imdecode over a numpy buffer rather than imread: works for non-ASCII paths on every platform
        buffer = np.fromfile(str(path), dtype=np.uint8)
        if buffer.size:
            with _opencv_quiet():
                image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    except (OSError, cv2.error) as exc:
        log.debug("opencv could not decode %s: %s", path, exc)
    if image is not None and image.ndim == 3 and image.shape[2] in (3, 4):
        code = cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB
        image = cv2.cvtColor(image, code)
    if image is None:
        image = _read_with_pillow(path)
    return _to_supported(image, path)


def _read_with_pillow(path: Path) -> np.ndarray:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - Pillow ships with matplotlib
        raise DataError(f"image {path} cannot be decoded (corrupt or unsupported format); fix: {_FIX_CORRUPT}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "PA", "LA", "CMYK", "YCbCr", "RGBA", "HSV", "LAB"):
                im = im.convert("L" if im.mode in ("LA",) else "RGB")
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        size = path.stat().st_size
        what = "is empty" if size == 0 else f"cannot be decoded ({type(exc).__name__}: {exc})"
        raise DataError(f"image {path} {what}: corrupt, truncated or unsupported format; fix: {_FIX_CORRUPT}") from None


def _to_supported(image: np.ndarray, path: Path) -> np.ndarray:
    """Bring a decoded array to the supported dtypes/layouts, or explain why it cannot be."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 2:  # gray + alpha
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3) or image.size == 0:
        raise DataError(f"image {path} has unsupported shape {image.shape}; fix: store 2-D grayscale or "
                        "3-channel RGB images (one frame, no volumes)")
    if image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    elif image.dtype in (np.int8, np.int16, np.int32, np.uint32, np.int64):
        lo, hi = int(image.min()), int(image.max())
        if lo < 0 or hi > 65535:
            raise DataError(f"image {path} holds integer values {lo}..{hi}, outside 0..65535; fix: rescale it "
                            "to unsigned 8 or 16 bits")
        image = image.astype(np.uint16 if hi > 255 or image.dtype.itemsize > 1 else np.uint8)
    elif image.dtype.kind == "f":
        raise DataError(f"image {path} stores floating-point pixels ({image.dtype}); fix: window/rescale it "
                        "to 8 or 16 bits and save as PNG/TIFF (megatron reads integer intensities)")
    if image.ndim == 3 and image.dtype == np.uint16:
        # 16-bit colour is rare in medical detection data: keep the top 8 bits
        image = (image >> 8).astype(np.uint8)
    if image.dtype not in (np.uint8, np.uint16):
        raise DataError(f"image {path} has unsupported pixel type {image.dtype}; fix: save it as 8/16-bit PNG")
    return np.ascontiguousarray(image)


def read_image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header (no pixel decoding when Pillow can parse it)."""

    path = Path(path)
    if is_dicom_file(path):
        header = read_header(path)
        if not header.rows or not header.columns:
            raise DataError(f"DICOM file {path} holds no image (no Rows/Columns); fix: remove it from the dataset")
        return header.columns, header.rows
    try:
        from PIL import Image

        with Image.open(path) as im:
            width, height = im.size
            return int(width), int(height)
    except Exception:  # noqa: BLE001 - any header failure falls back to a full decode with a clear error
        image = read_image(path)
        return int(image.shape[1]), int(image.shape[0])


def write_image(path: Path, image: np.ndarray, png_compression: int = 1) -> None:
    """Write ``(H, W)`` uint8/uint16 or ``(H, W, 3)`` uint8 RGB losslessly (PNG recommended)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = image
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_PNG_COMPRESSION, int(png_compression)] if path.suffix.lower() == ".png" else []
    ok, encoded = cv2.imencode(path.suffix or ".png", array, params)
    if not ok:
        raise DataError(f"could not encode image {path} ({image.dtype}, shape {image.shape}); fix: use a .png name")
    encoded.tofile(str(path))


class DicomImageLoader:
    """``Task.image_loader`` reading ``record.path`` (frame ``record.frame``) with a chosen :class:`DicomDisplay`;
    files that are not DICOM are read as usual. Picklable and hashable (data-loader workers, image cache)."""

    def __init__(self, display: DicomDisplay = DEFAULT_DISPLAY):
        self.display = display

    def __call__(self, record: Any) -> np.ndarray:
        if record.path is None:
            raise DataError(f"image {record.image_id} ({record.file_name}) has no file path to read")
        return read_image(record.path, frame=getattr(record, "frame", None), dicom=self.display)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DicomImageLoader) and other.display == self.display

    def __hash__(self) -> int:
        return hash((DicomImageLoader, self.display))

    def __repr__(self) -> str:
        return f"DicomImageLoader({self.display!r})"
