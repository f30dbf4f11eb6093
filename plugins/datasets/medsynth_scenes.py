"""The image generators behind the ``medsynth`` dataset plugin: one function per synthetic modality.

Each ``render_<task>(rng, size)`` returns ``(image, boxes, labels)``: a ``(size, size)`` uint8 image, xyxy
float32 boxes (tight around each lesion's half-maximum region, so a box always sits on its lesion) and
task-local labels. Only numpy and OpenCV are used; all randomness comes from ``rng`` so an image is a pure
function of (seed, task, index). Sizes below are given for a 256-px image and scale with ``size``.

SYNTHETIC data: anatomy-like, not anatomy. See registry_docs/plugins/datasets/medsynth.md for what each task
models and which tasks were made alike on purpose.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Callable

import cv2
import numpy as np

#: bump when the output of any renderer changes: it keys the on-disk cache
GENERATOR_VERSION = 2


# ----------------------------------------------------------------------------------------- building blocks
@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def smooth_noise(rng: np.random.Generator, size: int, cells: int | tuple[int, int]) -> np.ndarray:
    """Zero-mean unit-std noise with correlation length ``size / cells`` (cells may differ per axis: (y, x))."""
    cy, cx = (cells, cells) if isinstance(cells, int) else cells
    small = rng.standard_normal((cy + 1, cx + 1)).astype(np.float32)
    out = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    return (out - out.mean()) / (out.std() + 1e-6)


def fractal_noise(rng: np.random.Generator, size: int, base_cells: int, octaves: int = 3,
                  persistence: float = 0.5, aniso: float = 1.0) -> np.ndarray:
    """Sum of smooth-noise octaves (1/f-like tissue texture); ``aniso`` > 1 stretches it along x."""
    out = np.zeros((size, size), np.float32)
    amp, cells = 1.0, base_cells
    for _ in range(octaves):
        out += amp * smooth_noise(rng, size, (cells, max(2, int(cells / aniso))))
        amp *= persistence
        cells = min(cells * 2, size // 2)
    return out / (out.std() + 1e-6)


def ellipse_mask(size: int, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0,
                 edge: float = 1.0) -> np.ndarray:
    """Soft ellipse (1 inside, 0 outside) with a transition ``edge`` px wide."""
    yy, xx = _grid(size)
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = xx - cx, yy - cy
    u, v = (c * dx + s * dy) / ax, (-s * dx + c * dy) / ay
    rho = np.sqrt(u * u + v * v)
    return _sigmoid((1.0 - rho) * min(ax, ay) / max(edge, 1e-3))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * np.clip(x, -30, 30)))).astype(np.float32)


@dataclass
class Shape:
    """A lesion outline in polar form around (cx, cy)."""

    cx: float
    cy: float
    r: float
    aspect: float = 1.0  # x-radius / y-radius
    angle: float = 0.0
    wobble: float = 0.05  # amplitude of low harmonics (0: ellipse; 0.3: irregular)
    harmonics: int = 3
    spikes: int = 0  # spiculation: number of thin radial spikes
    spike_len: float = 1.0  # in units of r
    edge: float = 1.0  # boundary blur in px


def shape_alpha(rng: np.random.Generator, size: int, sh: Shape) -> np.ndarray:
    """A full-size float32 alpha map of the shape (1 inside, soft edge), computed on a local window."""
    alpha = np.zeros((size, size), np.float32)
    reach = sh.r * max(sh.aspect, 1 / sh.aspect) * (1.6 + sh.spike_len * (sh.spikes > 0)) + 3 * sh.edge + 2
    x0, x1 = int(max(0, sh.cx - reach)), int(min(size, sh.cx + reach + 1))
    y0, y1 = int(max(0, sh.cy - reach)), int(min(size, sh.cy + reach + 1))
    if x1 <= x0 or y1 <= y0:
        return alpha
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    c, s = np.cos(sh.angle), np.sin(sh.angle)
    dx, dy = xx - sh.cx, yy - sh.cy
    u, v = (c * dx + s * dy) / np.sqrt(sh.aspect), (-s * dx + c * dy) * np.sqrt(sh.aspect)
    rho = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    radius = np.ones_like(rho)
    for k in range(2, 2 + sh.harmonics):
        radius += sh.wobble * rng.standard_normal() / (k - 1) ** 0.7 * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    if sh.spikes:
        width = rng.uniform(0.06, 0.11)
        for phi in rng.uniform(0, 2 * np.pi, sh.spikes):
            d = np.angle(np.exp(1j * (theta - phi)))  # wrapped angular distance
            radius += sh.spike_len * rng.uniform(0.5, 1.2) * np.clip(1 - np.abs(d) / width, 0, 1) ** 2
    radius = np.maximum(radius, 0.3) * sh.r
    alpha[y0:y1, x0:x1] = _sigmoid((radius - rho) / max(sh.edge, 1e-3) * 1.8)
    return alpha


def box_of(alpha: np.ndarray, threshold: float = 0.5) -> np.ndarray | None:
    """Tight xyxy box of ``alpha > threshold`` (pixel edges), or None when empty."""
    ys = np.flatnonzero((alpha > threshold).any(axis=1))
    xs = np.flatnonzero((alpha > threshold).any(axis=0))
    if len(xs) == 0 or len(ys) == 0:
        return None
    return np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], np.float32)


def sample_count(rng: np.random.Generator, p_empty: float, mean_extra: float, kmax: int) -> int:
    """0 with probability ``p_empty``, else 1 + Poisson(mean_extra) capped at ``kmax``."""
    if rng.random() < p_empty:
        return 0
    return int(min(kmax, 1 + rng.poisson(mean_extra)))


def sample_centers(rng: np.random.Generator, region: np.ndarray, radii: list[float], min_gap: float = 3.0,
                   tries: int = 60) -> list[tuple[float, float] | None]:
    """Non-overlapping centres inside ``region`` (bool mask), one per radius (None where none fits)."""
    ys, xs = np.nonzero(region)
    out: list[tuple[float, float] | None] = []
    placed: list[tuple[float, float, float]] = []
    h, w = region.shape
    for r in radii:
        found = None
        for _ in range(tries if len(xs) else 0):
            i = int(rng.integers(len(xs)))
            cx, cy = float(xs[i]) + rng.uniform(-0.5, 0.5), float(ys[i]) + rng.uniform(-0.5, 0.5)
            ring = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 8, endpoint=False)]
            if not all(0 <= px < w and 0 <= py < h and region[int(py), int(px)] for px, py in ring):
                continue
            if any(np.hypot(cx - px, cy - py) < r + pr + min_gap for px, py, pr in placed):
                continue
            found = (cx, cy)
            placed.append((cx, cy, r))
            break
        out.append(found)
    return out


def log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def finish(image: np.ndarray, rng: np.random.Generator, noise: float, blur: float = 0.0) -> np.ndarray:
    if blur > 0:
        image = cv2.GaussianBlur(image, (0, 0), blur)
    if noise > 0:
        image = image + noise * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def rician(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """MRI magnitude noise: |signal + complex Gaussian| (keeps the dark background above zero)."""
    re = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    im = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return np.sqrt(re * re + im * im)


class Lesions:
    """Collects lesion alphas, boxes and labels while a scene is painted."""

    def __init__(self) -> None:
        self.boxes: list[np.ndarray] = []
        self.labels: list[int] = []

    def add(self, alpha: np.ndarray, label: int, threshold: float = 0.5) -> bool:
        """Record the box of a painted lesion. At small ``image_size`` a lesion can be narrower than a pixel,
        so the threshold is relative to its peak: every visibly painted lesion gets a box."""
        peak = float(alpha.max())
        if peak < 0.05:  # painted at under 5 % of its contrast: invisible, so no box
            return False
        box = box_of(alpha, threshold * min(1.0, peak))
        if box is None:
            return False
        self.boxes.append(box)
        self.labels.append(label)
        return True

    def result(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        boxes = np.stack(self.boxes).astype(np.float32) if self.boxes else np.zeros((0, 4), np.float32)
        return image, boxes, np.asarray(self.labels, np.int64)


def choose_labels(rng: np.random.Generator, n: int, probs: list[float]) -> list[int]:
    return [int(k) for k in rng.choice(len(probs), size=n, p=np.asarray(probs) / np.sum(probs))]


def _erode(mask: np.ndarray, px: int) -> np.ndarray:
    if px <= 0:
        return mask
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    return cv2.erode(mask.astype(np.uint8), k).astype(bool)


# ----------------------------------------------------------------------------------------- mammography
MAMMOGRAPHY_CLASSES = ["circumscribed_mass", "spiculated_mass", "calcification_cluster"]


def render_mammography(rng: np.random.Generator, size: int):
    """MLO-like view: breast silhouette on black, pectoral muscle, streaky fibro-glandular tissue."""
    S, f = size, size / 256.0
    yy, xx = _grid(S)
    flip = rng.random() < 0.5
    ax, ay = S * rng.uniform(0.76, 0.9), S * rng.uniform(0.43, 0.49)
    cy = S * rng.uniform(0.47, 0.55)
    breast = ellipse_mask(S, 0, cy, ax, ay, edge=2.5 * f)
    # fibro-glandular density: streaks running towards the nipple (stretched along x), denser near the
    # chest wall and in the upper-outer quadrant, varying per woman (density category)
    dist_nipple = np.sqrt(((xx - ax) / ax) ** 2 + ((yy - cy) / ay) ** 2)
    density_bias = rng.uniform(-1.2, 0.6)
    texture = fractal_noise(rng, S, 8, octaves=4, persistence=0.55, aniso=3.0)
    # the subcutaneous fat band near the skin holds no glandular tissue
    inner = ellipse_mask(S, 0, cy, ax - 14 * f, ay - 14 * f, edge=10 * f)
    density = _sigmoid(1.8 * texture + density_bias + 1.2 * _sigmoid((0.75 - dist_nipple) * 6)) * inner
    image = breast * (88 + 100 * density + 6 * fractal_noise(rng, S, 32, octaves=2))
    # pectoral muscle: bright triangle in the upper chest-wall corner
    p0, p1 = S * rng.uniform(0.2, 0.32), S * rng.uniform(0.45, 0.7)
    pect = _sigmoid((p0 * (1 - yy / p1) - xx) / (2.5 * f)) * breast
    image = image * (1 - pect) + pect * (rng.uniform(200, 220) + 5 * smooth_noise(rng, S, 6))
    image += (1 - breast) * 4
    region = _erode((breast > 0.5) & (pect < 0.1), int(10 * f))
    les = Lesions()
    n = sample_count(rng, 0.12, 0.6, 3)
    labels = choose_labels(rng, n, [0.4, 0.35, 0.25])
    radii = [{0: log_uniform(rng, 6, 15), 1: log_uniform(rng, 5, 11), 2: log_uniform(rng, 6, 13)}[k] * f
             for k in labels]
    for k, r, c in zip(labels, radii, sample_centers(rng, region, [r * 1.8 for r in radii])):
        if c is None:
            continue
        if k == 0:  # round/oval, smooth sharp margin, homogeneous
            a = shape_alpha(rng, S, Shape(*c, r, aspect=rng.uniform(0.75, 1.35), angle=rng.uniform(0, np.pi),
                                          wobble=0.04, edge=1.0 * f))
            image += a * rng.uniform(35, 60)
        elif k == 1:  # spiculated: irregular core with thin radiating spicules
            a = shape_alpha(rng, S, Shape(*c, r, wobble=0.15, harmonics=4, spikes=int(rng.integers(7, 13)),
                                          spike_len=rng.uniform(0.9, 1.6), edge=1.2 * f))
            image += a * rng.uniform(40, 65)
        else:  # cluster of tiny very bright specks
            a = np.zeros((S, S), np.float32)
            for _ in range(int(rng.integers(5, 14))):
                ang, rad = rng.uniform(0, 2 * np.pi), r * np.sqrt(rng.uniform(0, 1))
                a = np.maximum(a, shape_alpha(rng, S, Shape(c[0] + rad * np.cos(ang), c[1] + rad * np.sin(ang),
                                                            rng.uniform(0.8, 1.6) * f, wobble=0.1, edge=0.5 * f)))
            image += a * rng.uniform(70, 100)
        les.add(a, k)
    return les.result(finish(image, rng, noise=2.0, blur=0.6 * f))


# ----------------------------------------------------------------------------------------- chest X-rays
CHEST_XRAY_CLASSES = ["nodule", "mass"]
PNEUMONIA_XRAY_CLASSES = ["consolidation", "infiltrate"]


def _xray_anatomy(rng: np.random.Generator, S: int, pediatric: bool):
    """PA chest radiograph: soft tissue, dark lung fields, mediastinum + spine, ribs, clavicles, diaphragm."""
    f = S / 256.0
    yy, xx = _grid(S)
    scale = rng.uniform(0.8, 0.9) if pediatric else rng.uniform(0.93, 1.02)
    mid = S / 2 + rng.normal(0, 4 * f)
    body = ellipse_mask(S, mid, S * 0.6, S * 0.5 * scale, S * 0.62, edge=6 * f)
    image = 25 + body * (150 + 8 * smooth_noise(rng, S, 4))
    lungs = np.zeros((S, S), np.float32)
    top = S * (0.16 + (1 - scale) * 0.5)
    for side in (-1, 1):
        cx = mid + side * S * 0.19 * scale
        lung = ellipse_mask(S, cx, S * 0.46, S * 0.135 * scale * rng.uniform(0.95, 1.05),
                            S * 0.3 * scale * rng.uniform(0.95, 1.05), angle=side * 0.08, edge=5 * f)
        lung *= _sigmoid((yy - top) / (4 * f))  # rounded apex
        lungs = np.maximum(lungs, lung)
    # heart shadow takes a bite out of the left (image-right) lung
    heart = ellipse_mask(S, mid + S * 0.06, S * 0.6, S * 0.12 * scale, S * 0.1, edge=6 * f)
    lungs *= 1 - heart
    vessels = np.clip(fractal_noise(rng, S, 16, octaves=3), -1, 3)
    hilum = np.exp(-(((xx - mid) / (S * 0.2)) ** 2 + ((yy - S * 0.45) / (S * 0.2)) ** 2))
    image -= lungs * (rng.uniform(95, 115) - 14 * vessels * (0.4 + hilum))
    # ribs: posterior arcs, thick bright bands across each hemithorax
    ribs = np.zeros((S, S), np.float32)
    n_ribs, spacing = 9, S * 0.062 * scale
    for side in (-1, 1):
        for i in range(n_ribs):
            y0 = top - 4 * f + i * spacing + rng.normal(0, 0.08 * spacing)
            xs = np.linspace(0, S * 0.34 * scale, 24)
            ys = y0 + 0.5 * xs * (0.25 + 0.015 * i) + 0.0012 / f * xs ** 2
            pts = np.stack([mid + side * (xs + S * 0.03), ys], 1).astype(np.int32)
            cv2.polylines(ribs, [pts], False, 1.0, thickness=max(1, int(round(S * rng.uniform(0.014, 0.022)))),
                          lineType=cv2.LINE_AA)
    ribs = cv2.GaussianBlur(ribs, (0, 0), 1.5 * f)
    image += ribs * body * rng.uniform(12, 20) * (0.6 + 0.4 * lungs)
    # clavicles
    clav = np.zeros((S, S), np.float32)
    for side in (-1, 1):
        pts = np.array([[mid + side * S * 0.05, top + 5 * f], [mid + side * S * 0.3 * scale, top - 14 * f]], np.int32)
        cv2.line(clav, tuple(pts[0]), tuple(pts[1]), 1.0, thickness=max(1, int(S * 0.03)), lineType=cv2.LINE_AA)
    image += cv2.GaussianBlur(clav, (0, 0), 2 * f) * 30 * body
    # spine / mediastinum: bright vertical band
    image += 25 * _sigmoid((S * 0.05 - np.abs(xx - mid)) / (4 * f)) * body
    return image, lungs, f


def render_chest_xray(rng: np.random.Generator, size: int):
    """Adult PA chest X-ray; classes: small round sharp nodules, larger lobulated masses."""
    image, lungs, f = _xray_anatomy(rng, size, pediatric=False)
    region = _erode(lungs > 0.6, int(4 * f))
    les = Lesions()
    n = sample_count(rng, 0.15, 0.5, 3)
    labels = choose_labels(rng, n, [0.55, 0.45])
    radii = [(log_uniform(rng, 3, 8) if k == 0 else log_uniform(rng, 10, 22)) * f for k in labels]
    for k, r, c in zip(labels, radii, sample_centers(rng, region, radii)):
        if c is None:
            continue
        if k == 0:
            a = shape_alpha(rng, size, Shape(*c, r, wobble=0.03, edge=0.8 * f))
            image += a * rng.uniform(28, 48)
        else:
            a = shape_alpha(rng, size, Shape(*c, r, aspect=rng.uniform(0.8, 1.25), angle=rng.uniform(0, np.pi),
                                             wobble=0.2, harmonics=4, edge=2.0 * f))
            image += a * rng.uniform(35, 55) * (1 + 0.08 * smooth_noise(rng, size, 24))
        les.add(a, k)
    return les.result(finish(image, rng, noise=3.0, blur=0.8 * f))


def render_pneumonia_xray(rng: np.random.Generator, size: int):
    """Pediatric AP chest X-ray, hazier and lower contrast; classes: lobar consolidation, patchy infiltrate."""
    image, lungs, f = _xray_anatomy(rng, size, pediatric=True)
    region = _erode(lungs > 0.5, int(2 * f))
    les = Lesions()
    n = sample_count(rng, 0.12, 0.4, 3)
    labels = choose_labels(rng, n, [0.5, 0.5])
    radii = [(log_uniform(rng, 12, 24) if k == 0 else log_uniform(rng, 9, 16)) * f for k in labels]
    # consolidations fill a lobe up to the pleura: their soft edge may reach the lung border
    for k, r, c in zip(labels, radii, sample_centers(rng, region, [0.7 * r for r in radii], min_gap=4)):
        if c is None:
            continue
        if k == 0:  # large, fuzzy-edged, fairly homogeneous opacity
            a = shape_alpha(rng, size, Shape(*c, r, aspect=rng.uniform(0.7, 1.4), angle=rng.uniform(0, np.pi),
                                             wobble=0.18, harmonics=3, edge=r * 0.3))
            image += a * rng.uniform(85, 115) * lungs
        else:  # patchy: several small soft blobs scattered around c
            a = np.zeros((size, size), np.float32)
            for _ in range(int(rng.integers(4, 9))):
                ang, rad = rng.uniform(0, 2 * np.pi), r * 0.75 * np.sqrt(rng.uniform(0, 1))
                a = np.maximum(a, shape_alpha(rng, size, Shape(c[0] + rad * np.cos(ang), c[1] + rad * np.sin(ang),
                                                               rng.uniform(2.5, 5.5) * f, wobble=0.2,
                                                               edge=1.8 * f)))
            image += a * rng.uniform(65, 90) * lungs
        les.add(a, k)
    # portable AP film: compressed contrast, mid-grey haze, more noise
    image = 122 + 0.62 * (image - 110) + 6 * smooth_noise(rng, size, 3)
    return les.result(finish(image, rng, noise=4.0, blur=1.2 * f))


# ----------------------------------------------------------------------------------------- MRI
BRAIN_MRI_CLASSES = ["tumor", "metastasis"]
BREAST_MRI_CLASSES = ["benign_mass", "malignant_mass"]


def render_brain_mri(rng: np.random.Generator, size: int):
    """Axial T1 post-contrast-like slice: scalp, skull, CSF, grey/white matter, ventricles."""
    S, f = size, size / 256.0
    cx, cy = S / 2 + rng.normal(0, 3 * f), S / 2 + rng.normal(0, 3 * f)
    ax, ay = S * rng.uniform(0.34, 0.39), S * rng.uniform(0.42, 0.46)
    ang = rng.normal(0, 0.05)
    head = ellipse_mask(S, cx, cy, ax, ay, ang, edge=1.5 * f)
    skull_in = ellipse_mask(S, cx, cy, ax - 7 * f, ay - 7 * f, ang, edge=1.2 * f)
    brain = ellipse_mask(S, cx, cy, ax - 13 * f, ay - 13 * f, ang, edge=1.5 * f)
    gyri = fractal_noise(rng, S, 20, octaves=2)
    white = ellipse_mask(S, cx, cy, ax - 13 * f - 10 * f, ay - 13 * f - 10 * f, ang, edge=3 * f)
    white = _sigmoid((white - 0.5) * 6 + 1.5 * gyri) * brain
    image = head * rng.uniform(180, 205)  # scalp fat
    image = image * (1 - skull_in) + skull_in * 28  # cortical bone: dark
    image = image * (1 - brain) + brain * (rng.uniform(78, 90) + 32 * white + 5 * fractal_noise(rng, S, 24))
    # lateral ventricles: two dark crescents near the midline
    for side in (-1, 1):
        v = ellipse_mask(S, cx + side * 11 * f, cy - 4 * f, 6 * f * rng.uniform(0.8, 1.2), 26 * f * rng.uniform(0.8, 1.1),
                         angle=ang + side * 0.22, edge=1.5 * f)
        image = image * (1 - v) + v * 38
    region = _erode(brain > 0.5, int(10 * f))
    les = Lesions()
    n = sample_count(rng, 0.12, 0.7, 4)
    labels = choose_labels(rng, n, [0.45, 0.55])
    radii = [(log_uniform(rng, 10, 22) if k == 0 else log_uniform(rng, 3, 7)) * f for k in labels]
    for k, r, c in zip(labels, radii, sample_centers(rng, region, [r * 1.3 for r in radii])):
        if c is None:
            continue
        if k == 0:  # ring-enhancing tumour: bright irregular rim, dark necrotic core, dark oedema halo
            sh = Shape(*c, r, aspect=rng.uniform(0.8, 1.25), angle=rng.uniform(0, np.pi), wobble=0.15,
                       harmonics=4, edge=1.2 * f)
            outer = shape_alpha(np.random.default_rng(int(rng.integers(2 ** 31))), S, sh)
            sub = np.random.default_rng(int(rng.integers(2 ** 31)))
            inner = shape_alpha(sub, S, Shape(*c, r * rng.uniform(0.5, 0.7), wobble=0.2, edge=1.5 * f))
            halo = shape_alpha(sub, S, Shape(*c, r * 1.45, wobble=0.25, edge=4 * f))
            image -= halo * 18 * brain
            image += (outer - inner) * rng.uniform(60, 85) - inner * rng.uniform(20, 35)
            a = outer
        else:  # metastasis: small, solid, round, bright
            a = shape_alpha(rng, S, Shape(*c, r, wobble=0.04, edge=0.8 * f))
            image += a * rng.uniform(55, 85)
        les.add(a, k)
    image = rician(rng, image, 4.0)
    return les.result(finish(image, rng, noise=0.0, blur=0.7 * f))


def render_breast_mri(rng: np.random.Generator, size: int):
    """Axial fat-suppressed post-contrast breast MRI: dark, two breasts on the chest wall, enhancing masses."""
    S, f = size, size / 256.0
    yy, xx = _grid(S)
    wall = S * rng.uniform(0.58, 0.66)
    chest = _sigmoid((yy - wall) / (2 * f))
    image = chest * (74 + 18 * fractal_noise(rng, S, 10))
    heart = ellipse_mask(S, S / 2 + rng.normal(0, 6 * f), wall + S * 0.28, S * 0.2, S * 0.17, edge=4 * f)
    image += heart * rng.uniform(45, 65)  # contrast-filled heart chambers
    breasts = np.zeros((S, S), np.float32)
    for side in (-1, 1):
        bx = S / 2 + side * S * rng.uniform(0.21, 0.25)
        b = ellipse_mask(S, bx, wall, S * rng.uniform(0.17, 0.21), S * rng.uniform(0.26, 0.36), edge=2 * f)
        breasts = np.maximum(breasts, b * (1 - chest))
    skin = np.clip(breasts - cv2.erode(breasts, np.ones((3, 3), np.uint8), iterations=max(1, int(2 * f))), 0, 1)
    fgt = _sigmoid(2.2 * fractal_noise(rng, S, 10, octaves=3, aniso=0.6) - rng.uniform(0.5, 1.8))
    image += breasts * (44 + 80 * fgt ** 1.5) + skin * 50
    region = _erode(breasts > 0.5, int(8 * f))
    les = Lesions()
    n = sample_count(rng, 0.15, 0.4, 3)
    labels = choose_labels(rng, n, [0.5, 0.5])
    radii = [(log_uniform(rng, 5, 13) if k == 0 else log_uniform(rng, 7, 17)) * f for k in labels]
    for k, r, c in zip(labels, radii, sample_centers(rng, region, [r * 1.3 for r in radii])):
        if c is None:
            continue
        if k == 0:  # benign: oval, smooth, homogeneous enhancement
            a = shape_alpha(rng, S, Shape(*c, r, aspect=rng.uniform(0.7, 1.4), angle=rng.uniform(0, np.pi),
                                          wobble=0.04, edge=1.0 * f))
            image += a * rng.uniform(85, 120)
        else:  # malignant: irregular / spiculated, rim enhancement
            sub = np.random.default_rng(int(rng.integers(2 ** 31)))
            a = shape_alpha(rng, S, Shape(*c, r, wobble=0.22, harmonics=5, spikes=int(rng.integers(0, 7)),
                                          spike_len=0.6, edge=1.2 * f))
            inner = shape_alpha(sub, S, Shape(*c, r * 0.55, wobble=0.2, edge=2 * f))
            image += a * rng.uniform(100, 135) - inner * rng.uniform(35, 55)
        les.add(a, k)
    image = rician(rng, image, 5.0)
    return les.result(finish(image, rng, noise=0.0, blur=0.8 * f))


# ----------------------------------------------------------------------------------------- ultrasound
BREAST_ULTRASOUND_CLASSES = ["benign_mass", "malignant_mass"]


def render_breast_ultrasound(rng: np.random.Generator, size: int):
    """B-mode breast ultrasound (linear probe): tissue layers by depth, speckle, hypoechoic masses with
    posterior enhancement (benign) or shadowing (malignant)."""
    S, f = size, size / 256.0
    yy, xx = _grid(S)

    def boundary(depth: float, amp: float) -> np.ndarray:
        wave = cv2.resize(rng.standard_normal((1, 6)).astype(np.float32), (S, 1), interpolation=cv2.INTER_CUBIC)
        return (depth + amp * wave)[0][None, :] * S

    b_skin, b_fat, b_gland, b_retro, b_muscle = (boundary(d, a) for d, a in
                                                 ((0.04, 0.005), (0.22, 0.04), (0.55, 0.06), (0.68, 0.03), (0.86, 0.02)))
    layer = lambda b: _sigmoid((yy - b) / (2 * f))  # noqa: E731 - 0 above the boundary, 1 below
    echo = 0.9 * (1 - layer(b_skin))  # bright skin line
    echo += (layer(b_skin) - layer(b_fat)) * (0.28 + 0.1 * fractal_noise(rng, S, 8))  # lobulated fat
    gland = 0.55 + 0.18 * fractal_noise(rng, S, 10, aniso=3.0)
    echo += (layer(b_fat) - layer(b_gland)) * gland  # echogenic fibroglandular layer
    echo += (layer(b_gland) - layer(b_retro)) * 0.25
    striation = 0.42 + 0.12 * np.sin(yy / (2.2 * f) + 2 * smooth_noise(rng, S, (4, 2)))
    echo += (layer(b_retro) - layer(b_muscle)) * striation  # pectoralis with fibre striation
    echo += layer(b_muscle) * 0.12  # deep: rib shadow / lung
    echo = np.clip(echo, 0.02, None)
    region = ((yy > b_fat + 6 * f) & (yy < b_retro - 6 * f)) & (xx > 12 * f) & (xx < S - 12 * f)
    les = Lesions()
    n = sample_count(rng, 0.12, 0.15, 2)
    labels = choose_labels(rng, n, [0.5, 0.5])
    radii = [log_uniform(rng, 8, 20) * f for k in labels]
    for k, r, c in zip(labels, radii, sample_centers(rng, region, radii, min_gap=8)):
        if c is None:
            continue
        if k == 0:  # benign: oval, wider than tall, circumscribed, posterior acoustic enhancement
            a = shape_alpha(rng, S, Shape(*c, r, aspect=rng.uniform(1.4, 2.0), angle=rng.normal(0, 0.1),
                                          wobble=0.04, edge=1.0 * f))
            echo = echo * (1 - a) + a * rng.uniform(0.08, 0.16)
            posterior, gain = a, rng.uniform(1.3, 1.6)
        else:  # malignant: irregular/angular, taller than wide, echogenic halo, posterior shadow
            a = shape_alpha(rng, S, Shape(*c, r, aspect=rng.uniform(0.65, 0.95), wobble=0.28, harmonics=6,
                                          spikes=int(rng.integers(3, 8)), spike_len=0.35, edge=1.2 * f))
            halo = cv2.GaussianBlur(a, (0, 0), 2.5 * f) - a
            echo = echo * (1 - a) + a * rng.uniform(0.03, 0.08) + np.clip(halo, 0, 1) * 0.5
            posterior, gain = a, rng.uniform(0.35, 0.55)
        # the acoustic effect runs downwards (away from the probe) from the lesion's columns
        cols = posterior.max(axis=0)
        below = np.cumsum(posterior, axis=0) > 0.5
        behind = below & (posterior < 0.5)
        fade = np.exp(-np.clip(yy - c[1] - r, 0, None) / (3 * r))
        echo = echo * (1 + (gain - 1) * behind * cols[None, :] * fade)
        les.add(a, k)
    # speckle: correlated complex Gaussian scattering -> Rayleigh amplitude (coarser laterally)
    re = cv2.GaussianBlur(rng.standard_normal((S, S), dtype=np.float32), (0, 0), sigmaX=1.6 * f, sigmaY=0.8 * f)
    im = cv2.GaussianBlur(rng.standard_normal((S, S), dtype=np.float32), (0, 0), sigmaX=1.6 * f, sigmaY=0.8 * f)
    speckle = np.sqrt(re * re + im * im)
    speckle /= speckle.mean()
    tgc = 1.0 - 0.35 * yy / S  # residual depth attenuation after time-gain compensation
    # log-like compression of the echo amplitude, as a scanner's display map does (no hard saturation)
    amplitude = np.clip(echo * speckle * tgc, 0, None)
    image = 255 * (1 - np.exp(-1.6 * amplitude)) ** 1.3
    return les.result(finish(image, rng, noise=1.5, blur=0.6 * f))


# ----------------------------------------------------------------------------------------- EIT (target)
EIT_CLASSES = ["perfusion_defect", "fluid_inclusion"]
EIT_GRID = 32


def render_eit(rng: np.random.Generator, size: int):
    """EIT-like reconstruction: a coarse 32x32 conductivity-change map on a thorax-shaped domain, upsampled
    and blurred (the low resolution of EIT), narrow mid-grey histogram; blob-like defects/inclusions."""
    S, G = size, EIT_GRID
    gy, gx = np.mgrid[0:G, 0:G].astype(np.float32) + 0.5
    cx, cy = G / 2 + rng.normal(0, 0.4), G / 2 + rng.normal(0, 0.4)
    ax, ay = G * rng.uniform(0.43, 0.47), G * rng.uniform(0.33, 0.37)
    rho = np.sqrt(((gx - cx) / ax) ** 2 + ((gy - cy) / ay) ** 2)
    thorax = _sigmoid((1 - rho) * 8) * _sigmoid((cy + ay * 0.85 - gy) * 1.5)  # flattened posterior (back)
    lungs = np.zeros((G, G), np.float32)
    lung_rho = []
    for side in (-1, 1):
        lx, ly = cx + side * ax * 0.45, cy + ay * 0.05
        lr = np.sqrt(((gx - lx) / (ax * 0.36)) ** 2 + ((gy - ly) / (ay * 0.62)) ** 2)
        lung_rho.append(lr)
        lungs = np.maximum(lungs, _sigmoid((1 - lr) * 5))
    heart = _sigmoid((1 - np.sqrt(((gx - cx - 1) / (ax * 0.28)) ** 2 + ((gy - cy + ay * 0.45) / (ay * 0.3)) ** 2)) * 5)
    ventilation = rng.uniform(12, 18)
    coarse = thorax * (4 + 1.5 * rng.standard_normal((G, G)).astype(np.float32) * 0.6)
    coarse += lungs * ventilation * (1 + 0.12 * rng.standard_normal((G, G)).astype(np.float32)) - heart * 7

    def to_image(grid: np.ndarray) -> np.ndarray:
        """The same linear pipeline for the scene and for each lesion's own contribution."""
        up = cv2.resize(grid, (S, S), interpolation=cv2.INTER_CUBIC)
        return cv2.GaussianBlur(up, (0, 0), S / 48.0)

    lesion_maps, labels_out = [], []
    n = sample_count(rng, 0.12, 0.5, 3)
    labels = choose_labels(rng, n, [0.55, 0.45])
    region = lungs > 0.7
    rad = [rng.uniform(1.6, 3.6) for _ in labels]
    for k, r, c in zip(labels, rad, sample_centers(rng, region, [0.8 * r for r in rad], min_gap=1.0)):
        if c is None:
            continue
        aspect = rng.uniform(0.7, 1.4)
        u, v = (gx - c[0]) / (r * np.sqrt(aspect)), (gy - c[1]) / (r / np.sqrt(aspect))
        blob = _sigmoid((1 - np.sqrt(u * u + v * v)) * 3.5)
        amp = -rng.uniform(16, 24) if k == 0 else rng.uniform(11, 17)
        if k == 0:  # a perfusion/ventilation defect removes the lung signal locally
            blob = blob * lungs
        lesion_maps.append(blob * amp)
        labels_out.append(k)
    image = 128 + to_image(coarse + sum(lesion_maps) if lesion_maps else coarse)
    # reconstruction artefact: faint ringing along the electrode belt
    yy, xx = _grid(S)
    belt = np.abs(cv2.resize(rho, (S, S), interpolation=cv2.INTER_LINEAR) - 1)
    image += 2.5 * np.cos(xx * 12 / S * np.pi) * np.exp(-belt * 8) * (belt < 0.5)
    les = Lesions()
    for m, k in zip(lesion_maps, labels_out):
        contribution = np.abs(to_image(m))
        if contribution.max() > 0:
            les.add(contribution / contribution.max(), k)  # box: half-maximum of the lesion's own signal
    return les.result(finish(image, rng, noise=1.2, blur=0.0))


# ----------------------------------------------------------------------------------------- lesion-swap family
# The positive control of the meta-learning hypothesis (benchmarks/results/positive_control_meta/README.md):
# every task paints the SAME kind of scene — one bright object of each shape on the same textured background —
# and the tasks differ only in WHICH shape they annotate as the lesion. A detector jointly trained on the
# source tasks sees each shape labelled in some tasks and unlabelled (background) in the others, so its best
# joint answer is "every shape is a lesion with the same low confidence"; a start that adapts to one rule
# within the fine-tuning budget is what meta-learning promises. Not part of the default suite: opt in with
# the dataset option `tasks`.
LESION_SWAP_SHAPES: tuple[str, ...] = ("disc", "ring", "square", "cross")
#: source task -> the shape it annotates
LESION_SWAP_SOURCES: dict[str, str] = {f"swap_{shape}": shape for shape in LESION_SWAP_SHAPES}
#: the target: one more task of the family (its own images), annotating the ring
LESION_SWAP_TARGET = "swap_target"
LESION_SWAP_TARGET_SHAPE = "ring"
LESION_SWAP_RULES: dict[str, str] = {**LESION_SWAP_SOURCES, LESION_SWAP_TARGET: LESION_SWAP_TARGET_SHAPE}
LESION_SWAP_CLASSES = ["lesion"]


def swap_shape_alpha(shape: str, size: int, cx: float, cy: float, r: float, edge: float) -> np.ndarray:
    """Soft alpha map (1 inside) of one object of the family: all four have the same extent ``2r``."""
    yy, xx = _grid(size)
    dx, dy = np.abs(xx - cx), np.abs(yy - cy)
    inside = lambda d: _sigmoid(d / edge)  # noqa: E731 - d > 0 inside the boundary
    if shape == "disc":
        return inside(r - np.hypot(dx, dy))
    if shape == "ring":
        rho = np.hypot(dx, dy)
        return np.minimum(inside(r - rho), inside(rho - 0.5 * r))
    if shape == "square":
        return np.minimum(inside(0.85 * r - dx), inside(0.85 * r - dy))
    if shape == "cross":
        arm = 0.33 * r
        return np.maximum(np.minimum(inside(r - dx), inside(arm - dy)), np.minimum(inside(r - dy), inside(arm - dx)))
    raise ValueError(f"unknown lesion-swap shape {shape!r}; choose from {LESION_SWAP_SHAPES}")


def lesion_swap_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """One scene of the family: the image and every painted object as ``(shape, alpha)``. One object of each
    shape (a fifth of a random shape in half the images), the same contrast and size distribution for every
    shape, on smooth mid-grey texture."""
    S, f = size, size / 64.0
    image = 100 + 14 * fractal_noise(rng, S, 4, octaves=2)
    shapes = list(LESION_SWAP_SHAPES)
    if rng.random() < 0.5:
        shapes.append(str(rng.choice(LESION_SWAP_SHAPES)))
    shapes = [shapes[i] for i in rng.permutation(len(shapes))]
    radii = [log_uniform(rng, 4.0, 7.0) * f for _ in shapes]
    region = np.zeros((S, S), bool)
    margin = int(2 * f) + 1
    region[margin:S - margin, margin:S - margin] = True
    objects = []
    for shape, r, c in zip(shapes, radii, sample_centers(rng, region, [1.2 * r for r in radii], min_gap=2 * f)):
        if c is None:
            continue
        alpha = swap_shape_alpha(shape, S, c[0], c[1], r, edge=0.6 * f)
        image += alpha * rng.uniform(45, 75)
        objects.append((shape, alpha))
    return finish(image, rng, noise=3.0, blur=0.4 * f), objects


def render_lesion_swap(rng: np.random.Generator, size: int, lesion_shape: str):
    """A scene of the family with boxes (class 0, ``lesion``) on the objects of ``lesion_shape`` only."""
    image, objects = lesion_swap_scene(rng, size)
    les = Lesions()
    for shape, alpha in objects:
        if shape == lesion_shape:
            les.add(alpha, 0)
    return les.result(image)


# ----------------------------------------------------------------------------------------- the suite
@dataclass(frozen=True)
class TaskSpec:
    name: str
    modality: str
    classes: list[str]
    render: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray, np.ndarray]]


TASK_SPECS: dict[str, TaskSpec] = {s.name: s for s in (
    TaskSpec("mammography", "mammography", MAMMOGRAPHY_CLASSES, render_mammography),
    TaskSpec("chest_xray", "x-ray", CHEST_XRAY_CLASSES, render_chest_xray),
    TaskSpec("pneumonia_xray", "x-ray", PNEUMONIA_XRAY_CLASSES, render_pneumonia_xray),
    TaskSpec("brain_mri", "mri", BRAIN_MRI_CLASSES, render_brain_mri),
    TaskSpec("breast_mri", "mri", BREAST_MRI_CLASSES, render_breast_mri),
    TaskSpec("breast_ultrasound", "ultrasound", BREAST_ULTRASOUND_CLASSES, render_breast_ultrasound),
    TaskSpec("eit", "eit", EIT_CLASSES, render_eit),
    # appended after the suite: a task's random stream is keyed by its index here, so the suite's images stay
    *(TaskSpec(task, "synthetic-shapes", LESION_SWAP_CLASSES, partial(render_lesion_swap, lesion_shape=shape))
      for task, shape in LESION_SWAP_RULES.items()),
)}


def render(task: str, seed: int, index: int, size: int):
    """Image ``index`` of ``task`` for ``seed``: independent of which other tasks/images are generated."""
    task_key = list(TASK_SPECS).index(task)
    rng = np.random.default_rng([seed, task_key, index, GENERATOR_VERSION])
    return TASK_SPECS[task].render(rng, size)
