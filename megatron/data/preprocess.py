"""Preprocessing: intensity normalisation, optional CLAHE, letterbox resize and training augmentations.

Everything geometric happens in ONE resampling: horizontal/vertical flip, rotation, scale, translation and
the letterbox to the square detector input are composed into a single affine matrix and applied with one
``cv2.warpAffine``; the boxes go through the same matrix, so image and boxes cannot disagree.

Conventions
-----------
- Box coordinates are continuous pixel *edges*: a box ``(x1, y1, x2, y2) = (10, 20, 30, 40)`` covers pixel
  columns 10..29 and rows 20..39. OpenCV samples at pixel *centres*, so the matrix handed to ``warpAffine``
  is the continuous matrix conjugated by the half-pixel shift (:func:`_to_pixel_centre_matrix`); that is
  what makes a letterboxed box land exactly on its pixels.
- Letterbox: ``scale = input_size / max(h, w)`` (both axes), the image is centred with integer padding
  ``pad = (left, top)`` filled with ``pad_value`` (default 0: medical images have dark backgrounds, and a
  black border looks like background rather than an edge the detector could learn).
  :func:`megatron.types.to_original_coords` inverts it with ``meta['scale']`` and ``meta['pad']``.
- Large images are area-downsampled once, at decode time, to at most ``input_size`` on their long side
  (anti-aliasing: a bilinear warp from 2048 px to 256 px would skip 7 of every 8 pixels and lose small
  lesions). The downsampled image is what the decoded-image cache holds; the affine warp then samples it.

Augmentations (``augment=True`` and an ``rng`` given), in this order of composition:
horizontal flip (p=0.5), vertical flip (off by default: anatomy has an orientation), rotation by a uniform
angle in ``±rotate_deg`` about the image centre, isotropic scale in ``scale_range``, translation by up to
``translate_frac`` of the input size, then brightness/contrast (a 256-entry lookup table, applied before the
warp so the padding keeps ``pad_value``).

Boxes under rotation: the transformed box is the axis-aligned box enclosing the 4 rotated corners. That is
exact for rectangular objects but inflates the box of a round lesion: for a circle rotated by θ the
enclosing box grows by a factor ``|cos θ| + |sin θ|`` per side (≤ 1.19 at the default 10°). Keep
``rotate_deg`` small for that reason.

Boxes leaving the image are clipped to it. With augmentation, a clipped box is dropped when its width or
height falls below ``min_box_size`` input pixels or less than ``min_visible_fraction`` of its (transformed,
unclipped) area remains visible: such slivers teach the detector to fire on lesion edges. Without
augmentation no in-image box is dropped (only boxes with no area left at all), so evaluation keeps every
ground-truth box.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Hashable

import cv2
import numpy as np
import torch

from megatron.errors import ConfigError, DataError
from megatron.types import Batch, ImageRecord, Task

log = logging.getLogger(__name__)

# Robust window for non-8-bit images: real 12/16-bit medical images use a fraction of their range (a 12-bit
# CT/X-ray stored as uint16 tops out at 4095, and a few hot pixels or burnt-in labels sit far above the
# tissue), so a min/max stretch would leave the anatomy in a handful of grey levels. The 0.5th and 99.5th
# percentiles ignore those outliers while keeping almost all tissue contrast.
WINDOW_LOW_PERCENTILE = 0.5
WINDOW_HIGH_PERCENTILE = 99.5
# percentiles are estimated on at most this many pixels (a regular subsample): exact enough, much faster
_WINDOW_SAMPLE_PIXELS = 1 << 18


@dataclass
class Sample:
    """One preprocessed image: ``image`` ``(3, S, S)`` float32 in ``[0, 255]``; ``boxes`` ``(n, 4)`` float32 xyxy in
    input (letterboxed) coordinates; ``labels`` ``(n,)`` int64; ``meta`` with ``image_id``, ``orig_size`` ``(h, w)``,
    ``scale``, ``pad`` ``(left, top)`` (the letterbox alone), ``task``, ``augmented`` and ``affine`` (the full 2x3
    matrix from original to input coordinates, augmentation included)."""

    image: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    meta: dict = field(default_factory=dict)


def normalise_intensity(image: np.ndarray) -> np.ndarray:
    """Any image array -> uint8 ``(H, W)`` grayscale or ``(H, W, 3)`` RGB.

    uint8 passes through unchanged. Every other dtype (uint16, int16, int32, float, bool) is windowed to
    ``[0, 255]`` between its 0.5th and 99.5th percentiles (:data:`WINDOW_LOW_PERCENTILE`,
    :data:`WINDOW_HIGH_PERCENTILE`; all channels share one window so colours keep their balance); when those
    coincide (a nearly constant image) the full min..max range is used, and a constant image becomes 0.
    Non-finite values map to 0. ``(H, W, 1)`` is squeezed, ``(H, W, 4)`` loses its alpha channel.
    """
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3) or arr.size == 0:
        raise DataError(
            f"cannot use an image of shape {arr.shape} and dtype {arr.dtype}: expected (H, W) grayscale or "
            "(H, W, 3) RGB with H, W > 0; convert the file to a plain grayscale or RGB image"
        )
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype in (np.uint16, np.int16, np.int32):
        return _window_integer(arr)
    values = arr.astype(np.float32, copy=False)
    finite = np.isfinite(values)
    all_finite = bool(finite.all())
    sample = values if all_finite else values[finite]
    sample = sample.reshape(-1)
    if sample.size == 0:
        return np.zeros(arr.shape, np.uint8)
    if sample.size > _WINDOW_SAMPLE_PIXELS:
        sample = sample[:: sample.size // _WINDOW_SAMPLE_PIXELS + 1]
    lo, hi = np.percentile(sample, [WINDOW_LOW_PERCENTILE, WINDOW_HIGH_PERCENTILE])
    if not hi > lo:
        lo, hi = float(sample.min()), float(sample.max())
    if not hi > lo:
        return np.zeros(arr.shape, np.uint8)
    out = (values - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    if not all_finite:
        out = np.where(finite, out, 0.0)
    # cv2 saturates when converting, so this clips to [0, 255] and rounds in one pass
    return cv2.convertScaleAbs(np.clip(out, 0, 255))


def _window_integer(arr: np.ndarray) -> np.ndarray:
    """Integer fast path (16-bit medical images): the percentiles are taken as actual pixel values
    (``method='nearest'``), so the window can be applied by an integer clip and one saturating cv2 pass,
    3-4x faster than going through float32 on a 2048x2048 image."""
    flat = arr.reshape(-1)
    sample = flat[:: flat.size // _WINDOW_SAMPLE_PIXELS + 1] if flat.size > _WINDOW_SAMPLE_PIXELS else flat
    lo, hi = (int(v) for v in np.percentile(sample, [WINDOW_LOW_PERCENTILE, WINDOW_HIGH_PERCENTILE], method="nearest"))
    if not hi > lo:
        lo, hi = int(sample.min()), int(sample.max())
    if not hi > lo:
        return np.zeros(arr.shape, np.uint8)
    clipped = np.clip(arr, lo, hi)
    # values in [lo, hi] map to [0, 255] (never negative, so convertScaleAbs's abs is a no-op)
    return cv2.convertScaleAbs(clipped, alpha=255.0 / (hi - lo), beta=-lo * 255.0 / (hi - lo))


def _is_gray_rgb(image: np.ndarray) -> bool:
    """Many medical PNGs store grayscale as 3 identical channels; processing one channel is 3x cheaper."""
    return bool(np.array_equal(image[:, :, 0], image[:, :, 1]) and np.array_equal(image[:, :, 0], image[:, :, 2]))


@dataclass(frozen=True)
class Augmentations:
    """Training augmentation strengths (see the module docstring for the order and the box policy)."""

    hflip_prob: float = 0.5
    vflip_prob: float = 0.0  # off: anatomy has an orientation (left/right is often arbitrary, up/down is not)
    rotate_deg: float = 10.0
    scale_range: tuple[float, float] = (0.8, 1.2)
    translate_frac: float = 0.1
    brightness: float = 0.15  # additive shift up to ±brightness * 255
    contrast: float = 0.2  # gain in [1 - contrast, 1 + contrast] about the image mean

    def __post_init__(self) -> None:
        problems = []
        for name in ("hflip_prob", "vflip_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}={getattr(self, name)} must be in [0, 1]")
        if not 0.0 <= self.rotate_deg <= 45.0:
            problems.append(f"rotate_deg={self.rotate_deg} must be in [0, 45] (boxes inflate under rotation)")
        lo, hi = self.scale_range
        if not 0.0 < lo <= hi:
            problems.append(f"scale_range={self.scale_range} must satisfy 0 < low <= high")
        if not 0.0 <= self.translate_frac <= 0.5:
            problems.append(f"translate_frac={self.translate_frac} must be in [0, 0.5]")
        if not 0.0 <= self.brightness <= 1.0:
            problems.append(f"brightness={self.brightness} must be in [0, 1]")
        if not 0.0 <= self.contrast < 1.0:
            problems.append(f"contrast={self.contrast} must be in [0, 1)")
        if problems:
            raise ConfigError("invalid augmentation settings: " + "; ".join(problems))


#: the decoded-image cache's default size limit: decoded images are held downsampled to at most the input
#: size (a 512-px grayscale image is 256 KiB), so this keeps a few thousand of them
DEFAULT_CACHE_BYTES = 1 << 30


class DecodedImageCache:
    """A bounded, thread-safe LRU of decoded images keyed by ``(task name, image_id, path, loader)``.

    Few-shot training decodes the same handful of images every epoch; caching the decoded, normalised,
    (CLAHE'd) and downsampled array makes every epoch after the first skip file decoding. Entries are
    read-only arrays. Bounded by ``max_bytes`` (the arrays' ``nbytes``) and, when given, ``max_images``; either
    limit at 0 disables caching.

    The data workers (threads, :mod:`megatron.data.loader`) share the one cache, so the limit is the whole
    cost and an image decoded by one worker is warm for all; the lock guards it.
    """

    def __init__(self, max_images: int | None = None, max_bytes: int = DEFAULT_CACHE_BYTES):
        if max_images is not None and max_images < 0:
            raise ConfigError(f"cache size must be >= 0 images, got {max_images}")
        if max_bytes < 0:
            raise ConfigError(f"cache size must be >= 0 bytes, got {max_bytes}; set data.cache_bytes")
        self.max_images = max_images
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        # guards the OrderedDict and the byte count: worker threads share one preprocessor
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 and self.max_images != 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: Any) -> None:
        size = int(getattr(value, "nbytes", 0))
        if not self.enabled or size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= int(getattr(old, "nbytes", 0))
            self._items[key] = value
            self.nbytes += size
            self._evict()

    def _evict(self) -> None:
        """Drop least recently used entries until both limits hold (called with the lock held)."""
        while self._items and (self.nbytes > self.max_bytes
                               or (self.max_images is not None and len(self._items) > self.max_images)):
            _, dropped = self._items.popitem(last=False)
            self.nbytes -= int(getattr(dropped, "nbytes", 0))

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __getstate__(self) -> dict:  # picklable (a spawned worker): ships empty, without the lock
        return {"max_images": self.max_images, "max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_images"], state.get("max_bytes", DEFAULT_CACHE_BYTES))


def _loader_key(task: Task) -> Hashable:
    # the loader is part of the key so two different tasks that happen to share a name never share pixels;
    # holding the loader in the key keeps it alive, so its identity cannot be reused by another object
    loader = task.image_loader
    try:
        hash(loader)
        return loader
    except TypeError:
        return id(loader)


def _to_pixel_centre_matrix(m: np.ndarray) -> np.ndarray:
    """Continuous (pixel-edge) affine ``x' = A x + t`` -> the matrix OpenCV wants (pixel centres at integers).

    With ``p = x - 0.5``: ``p' = A p + (A @ [0.5, 0.5] + t - 0.5)``.
    """
    a = m[:2, :2]
    t = m[:2, 2] + a @ np.array([0.5, 0.5]) - 0.5
    return np.hstack([a, t[:, None]])


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Boxes through a 2x3 (or 3x3) affine: the axis-aligned box enclosing the 4 transformed corners."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros((0, 4), np.float64)
    x1, y1, x2, y2 = boxes.T
    corners = np.stack([np.stack([x1, y1], -1), np.stack([x2, y1], -1),
                        np.stack([x2, y2], -1), np.stack([x1, y2], -1)], 1)  # (n, 4, 2)
    moved = corners @ matrix[:2, :2].T + matrix[:2, 2]
    return np.concatenate([moved.min(1), moved.max(1)], 1)


class Preprocessor:
    """Raw image + boxes -> :class:`Sample` at the square detector input size.

    ``Preprocessor(input_size, clahe=False, augment=False)``; augmentation happens only when ``augment`` is
    on *and* an ``rng`` is passed, so the same object serves training (with an rng) and evaluation (without).
    Deterministic given the rng: every call draws the same number of random values whatever is enabled.

    Keyword options: ``augmentations`` (an :class:`Augmentations`), ``pad_value`` (letterbox fill, 0..255),
    ``cache_bytes`` (the decoded-image LRU's size limit in bytes, 0 = off), ``cache_size`` (a limit in images
    as well, 0 = off) or ``cache`` (a :class:`DecodedImageCache` to share), ``min_box_size`` (input px) and ``min_visible_fraction`` (see the module docstring),
    ``clahe_clip_limit`` and ``clahe_tiles`` (cv2 CLAHE parameters).
    """

    def __init__(self, input_size: int, clahe: bool = False, augment: bool = False, *,
                 augmentations: Augmentations | None = None, pad_value: int = 0, cache_size: int | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, cache: DecodedImageCache | None = None, min_box_size: float = 2.0,
                 min_visible_fraction: float = 0.25, clahe_clip_limit: float = 2.0, clahe_tiles: int = 8):
        if int(input_size) < 8:
            raise ConfigError(f"input_size must be at least 8 pixels, got {input_size}")
        if not 0 <= pad_value <= 255:
            raise ConfigError(f"pad_value must be in 0..255, got {pad_value}")
        if not 0.0 <= min_visible_fraction <= 1.0:
            raise ConfigError(f"min_visible_fraction must be in [0, 1], got {min_visible_fraction}")
        if min_box_size < 0:
            raise ConfigError(f"min_box_size must be >= 0 pixels, got {min_box_size}")
        self.input_size = int(input_size)
        self.clahe = bool(clahe)
        self.augment = bool(augment)
        self.augmentations = augmentations or Augmentations()
        self.pad_value = int(pad_value)
        self.min_box_size = float(min_box_size)
        self.min_visible_fraction = float(min_visible_fraction)
        self.clahe_clip_limit = float(clahe_clip_limit)
        self.clahe_tiles = int(clahe_tiles)
        self.cache = cache if cache is not None else DecodedImageCache(cache_size, cache_bytes)
        # one CLAHE operator per thread: worker threads share this preprocessor, a cv2 CLAHE object is not
        # safe to apply from two threads at once
        self._clahe_ops = threading.local()

    def __repr__(self) -> str:
        return (f"Preprocessor(input_size={self.input_size}, clahe={self.clahe}, augment={self.augment}, "
                f"cache_bytes={self.cache.max_bytes})")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_clahe_ops"]  # cv2 objects (and thread-locals) do not pickle; rebuilt lazily
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._clahe_ops = threading.local()

    def without_augment(self) -> "Preprocessor":
        """The evaluation twin: same settings and the same decoded-image cache, no augmentation."""
        twin = object.__new__(Preprocessor)
        twin.__setstate__(self.__getstate__())
        twin.augment = False
        return twin

    # -- decoding -------------------------------------------------------------------------------------
    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Normalise intensity, (CLAHE), and area-downsample to at most ``input_size`` on the long side.

        Returns uint8 ``(h', w')`` or ``(h', w', 3)``; this is the array the decoded-image cache holds.
        """
        img = normalise_intensity(image)
        if img.ndim == 3 and _is_gray_rgb(img):
            img = np.ascontiguousarray(img[:, :, 0])
        if self.clahe:
            img = self._apply_clahe(img)
        h, w = img.shape[:2]
        if max(h, w) > self.input_size:
            s = self.input_size / max(h, w)
            size = (max(1, round(w * s)), max(1, round(h * s)))
            img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        return img

    def _apply_clahe(self, img: np.ndarray) -> np.ndarray:
        op = getattr(self._clahe_ops, "op", None)
        if op is None:
            op = self._clahe_ops.op = cv2.createCLAHE(clipLimit=self.clahe_clip_limit,
                                                      tileGridSize=(self.clahe_tiles, self.clahe_tiles))
        if img.ndim == 2:
            return op.apply(img)
        # colour: equalise lightness only, so hues are kept
        lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)
        lab[:, :, 0] = op.apply(np.ascontiguousarray(lab[:, :, 0]))
        return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)

    def decode(self, task: Task, record: ImageRecord) -> np.ndarray:
        """The prepared (see :meth:`prepare`) pixels of ``record``, through the decoded-image cache.

        Errors from the task's image loader become :class:`DataError` naming the task and the record; an
        image whose size differs from the record's ``width``/``height`` is an error too (its boxes would
        land in the wrong place).
        """
        key = (task.name, record.image_id, str(record.path or ""), _loader_key(task))
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        where = f"task {task.name!r}, image {record.image_id} ({record.file_name or record.path or 'generated'})"
        try:
            raw = task.load_image(record)
        except DataError:
            raise
        except Exception as exc:  # the loader is user/plugin code: name the record, keep the cause
            raise DataError(f"{where}: could not load the image: {type(exc).__name__}: {exc}. "
                            "Check that the file exists and is a readable image.") from exc
        raw = np.asarray(raw)
        if raw.ndim < 2 or raw.shape[0] != record.height or raw.shape[1] != record.width:
            raise DataError(
                f"{where}: the image is {raw.shape[1] if raw.ndim >= 2 else '?'}x{raw.shape[0] if raw.ndim else '?'} "
                f"(w x h) but the annotation says {record.width}x{record.height}; fix the annotation's "
                "width/height (the boxes are in the annotated frame)"
            )
        try:
            img = self.prepare(raw)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        img.setflags(write=False)
        self.cache.put(key, img)
        return img

    # -- geometry ---------------------------------------------------------------------------------------
    def letterbox(self, height: int, width: int) -> tuple[float, tuple[int, int]]:
        """``(scale, (left, top))`` of the letterbox of an ``height x width`` image into the input square."""
        s = self.input_size / max(height, width)
        left = int((self.input_size - width * s) // 2)
        top = int((self.input_size - height * s) // 2)
        return s, (left, top)

    def _augment_matrix(self, u: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """(flip matrix in original coords, rotation/scale/translation matrix in input coords), both 3x3."""
        aug = self.augmentations
        flip = np.eye(3)
        if u[0] < aug.hflip_prob:
            flip = np.array([[-1.0, 0, width], [0, 1, 0], [0, 0, 1]]) @ flip
        if u[1] < aug.vflip_prob:
            flip = np.array([[1.0, 0, 0], [0, -1, height], [0, 0, 1]]) @ flip
        angle = (2 * u[2] - 1) * aug.rotate_deg
        lo, hi = aug.scale_range
        scale = lo + (hi - lo) * u[3]
        tx = (2 * u[4] - 1) * aug.translate_frac * self.input_size
        ty = (2 * u[5] - 1) * aug.translate_frac * self.input_size
        c = self.input_size / 2.0
        rst = np.vstack([cv2.getRotationMatrix2D((c, c), angle, scale), [0, 0, 1]])
        rst[0, 2] += tx
        rst[1, 2] += ty
        return flip, rst

    def transform(self, prepared: np.ndarray, boxes: np.ndarray, labels: np.ndarray, orig_size: tuple[int, int],
                  rng: np.random.Generator | None = None, image_id: int = -1, task: str = "") -> Sample:
        """Letterbox (+ augment) an already :meth:`prepare`-d image whose original size was ``orig_size``.

        ``boxes`` are in original coordinates.
        """
        h, w = int(orig_size[0]), int(orig_size[1])
        S = self.input_size
        scale, (left, top) = self.letterbox(h, w)
        letterbox_m = np.array([[scale, 0, left], [0, scale, top], [0, 0, 1.0]])
        augmenting = self.augment and rng is not None
        img = prepared
        if augmenting:
            u = rng.random(8)  # fixed count: the stream stays aligned whatever is enabled
            flip, rst = self._augment_matrix(u, w, h)
            full = rst @ letterbox_m @ flip
            aug = self.augmentations
            gain = 1.0 + (2 * u[6] - 1) * aug.contrast
            shift = (2 * u[7] - 1) * aug.brightness * 255.0
            if gain != 1.0 or shift != 0.0:
                mean = float(np.mean(cv2.mean(img)[: (1 if img.ndim == 2 else 3)]))
                lut = np.clip((np.arange(256) - mean) * gain + mean + shift, 0, 255).round().astype(np.uint8)
                img = cv2.LUT(img, lut)
        else:
            full = letterbox_m
        # the prepared image may be downsampled: map original coords -> prepared coords first
        ph, pw = prepared.shape[:2]
        to_prepared = np.diag([pw / w, ph / h, 1.0])
        warp = _to_pixel_centre_matrix(full @ np.linalg.inv(to_prepared))
        border = (self.pad_value,) * (1 if img.ndim == 2 else 3)
        out = cv2.warpAffine(img, warp, (S, S), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                             borderValue=border)

        labels = np.asarray(labels, np.int64).reshape(-1)
        raw = transform_boxes(boxes, full)
        clipped = raw.copy()
        clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, S)
        clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, S)
        cw, ch = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
        if augmenting:
            raw_area = (raw[:, 2] - raw[:, 0]) * (raw[:, 3] - raw[:, 1])
            keep = (cw >= self.min_box_size) & (ch >= self.min_box_size) & (cw > 0) & (ch > 0)
            keep &= cw * ch >= self.min_visible_fraction * raw_area
        else:
            keep = (cw > 0) & (ch > 0)

        # converted in NumPy, not torch: worker threads calling torch ops on whole images would each start
        # torch's intra-op thread pool and oversubscribe the cores
        planes = out.astype(np.float32)
        planes = np.broadcast_to(planes, (3, S, S)) if planes.ndim == 2 else planes.transpose(2, 0, 1)
        image_t = torch.from_numpy(np.ascontiguousarray(planes))
        meta = {
            "image_id": int(image_id), "orig_size": (h, w), "scale": float(scale), "pad": (left, top),
            "task": task, "augmented": augmenting, "affine": full[:2].tolist(),
        }
        return Sample(
            image=image_t,
            boxes=torch.from_numpy(clipped[keep].astype(np.float32)).reshape(-1, 4),
            labels=torch.from_numpy(labels[keep].copy()),
            meta=meta,
        )

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                 rng: np.random.Generator | None = None, image_id: int = -1, task: str = "") -> Sample:
        """Raw pixels (any dtype, gray or RGB) and original-coordinate boxes -> :class:`Sample` (no caching)."""
        image = np.asarray(image)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        labels = np.asarray(labels, np.int64).reshape(-1)
        if len(boxes) != len(labels):
            raise DataError(f"image {image_id} of task {task!r}: {len(boxes)} boxes but {len(labels)} labels")
        return self.transform(self.prepare(image), boxes, labels, image.shape[:2], rng, image_id, task)


def collate(samples: list[Sample]) -> Batch:
    """Stack samples into a :class:`Batch` (images ``(B, 3, S, S)`` float32 in [0, 255])."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    shapes = {tuple(s.image.shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"cannot collate images of different shapes {sorted(shapes)}; use one Preprocessor")
    return Batch(
        images=torch.stack([s.image for s in samples]),
        boxes=[s.boxes for s in samples],
        labels=[s.labels for s in samples],
        meta=[s.meta for s in samples],
    )
