"""Reading image files into the arrays every megatron dataset hands out.

:func:`read_image` returns ``(H, W)`` uint8/uint16 grayscale or ``(H, W, 3)`` uint8 RGB, whatever the file
holds (8/16-bit PNG/TIFF, JPEG, BMP, ...). OpenCV decodes (``IMREAD_UNCHANGED`` keeps 16 bits); Pillow is
the fallback for what OpenCV cannot read. Every failure is a :class:`~megatron.errors.DataError` that names
the file and says how to fix it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from megatron.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".pgm", ".ppm", ".webp")

_FIX_CORRUPT = ("re-export it as an 8/16-bit grayscale or 8-bit RGB PNG, or remove the image and its "
                "annotations from the dataset")


def read_image(path: Path) -> np.ndarray:
    """The pixels of ``path``: ``(H, W)`` uint8|uint16 grayscale or ``(H, W, 3)`` uint8 RGB."""
    path = Path(path)
    if not path.is_file():
        where = "is a folder, not an image file" if path.exists() else "does not exist"
        raise DataError(f"image {path} {where}; fix: check the image folder / file_name in the annotations "
                        "(paths are relative to the image folder)")
    image = None
    try:
        # imdecode over a numpy buffer rather than imread: works for non-ASCII paths on every platform
        buffer = np.fromfile(str(path), dtype=np.uint8)
        if buffer.size:
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
