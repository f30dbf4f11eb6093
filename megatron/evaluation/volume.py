"""Back from slices to volumes: 3D candidates and FROC per scan (the LUNA16 convention).

A detector trained on slices (:mod:`megatron.data.volumes`) finds boxes slice by slice; a radiologist, LUNA16
and nnDetection count lesions per scan. Here:

1. **Linking.** Per volume and class, boxes on neighbouring slices are chained into one 3D object: slices are
   visited in order, and each box (best score first) joins the chain of its class whose last box lies at most
   ``max_gap`` slices back and overlaps it most, if that overlap — intersection over the *smaller* box, so a
   sphere's small cap still joins its large cross-section — is at least ``link_overlap``; otherwise it starts a
   chain. A chain takes one box per slice. Detections scoring below ``min_score`` are not linked (they would
   bridge separate lesions). Ground-truth boxes are linked the same way into lesions.
2. **A candidate** (one chain of detections): its score is the best box score; its centre the score-weighted mean
   of the box centres and slice indices, mapped through the record's affine to world millimetres (RAS, and LPS
   as LUNA16 writes them); its diameter the largest box side in mm.
   **A lesion** (one chain of ground-truth boxes): its centre the area-weighted mean, its radius half the largest
   of its in-plane extent and its slice extent (mm).
3. **FROC per scan.** Candidates in descending score order: one that lies within a lesion's radius of its centre
   (same class) hits it; a further candidate on a lesion already hit is ignored (neither hit nor false positive,
   as LUNA16 counts them); every other candidate is a false positive. Sensitivity against false positives **per
   volume** at 1/8 … 8 (:data:`megatron.evaluation.froc.FROC_FP_RATES`), read off the staircase by
   :func:`megatron.evaluation.froc.froc_curve` / :func:`~megatron.evaluation.froc.sensitivity_at`.

False positives are counted on the slices evaluated: FROC per scan is exact when every slice of each volume is
(``slices_evaluated`` = ``slices_total`` in the result; the ``volume`` plugin with ``empty_fraction: 1``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from megatron.data.volumes import pixel_to_voxel, plane_axes, spacing_of, voxel_to_world
from megatron.errors import DataError
from megatron.evaluation.froc import FROC_FP_RATES, froc_curve, sensitivity_at

LINK_OVERLAP = 0.3
LINK_MAX_GAP = 1
LINK_MIN_SCORE = 0.05
VOLUME_META_KEYS = ("volume_id", "slice_index", "slice_axis", "affine")


@dataclass
class Object3D:
    """A linked chain of slice boxes: a 3D candidate (detections) or a lesion (ground truth)."""

    volume_id: str
    label: int
    score: float
    centre_voxel: list[float]  # canonical voxel coordinates (i, j, k)
    centre_ras: list[float]  # world mm, RAS
    centre_lps: list[float]  # world mm, LPS (LUNA16's coordX, coordY, coordZ)
    diameter_mm: float
    slices: list[int]  # first and last slice index
    n_boxes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def overlap_min(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over the smaller box's area (1.0: one box inside the other)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return float(w * h / smaller) if smaller > 0 else 0.0


def link_boxes(slices: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
               link_overlap: float = LINK_OVERLAP, max_gap: int = LINK_MAX_GAP) -> list[list[int]]:
    """Chains (lists of indices into the inputs) of one volume's boxes (module docstring, step 1)."""
    chains: list[list[int]] = []
    order = np.lexsort((-scores, slices))  # by slice, best score first within a slice
    for i in order:
        s, lab = int(slices[i]), int(labels[i])
        best, best_overlap = None, link_overlap
        for c, chain in enumerate(chains):
            last = chain[-1]
            if int(labels[last]) != lab or not 1 <= s - int(slices[last]) <= max_gap + 1:
                continue
            ov = overlap_min(boxes[last], boxes[i])
            if ov >= best_overlap:
                best, best_overlap = c, ov
        if best is None:
            chains.append([int(i)])
        else:
            chains[best].append(int(i))
    return chains


def _volume_meta(record) -> dict:
    meta = getattr(record, "meta", {}) or {}
    missing = [k for k in VOLUME_META_KEYS if k not in meta]
    if missing:
        raise DataError(f"image {record.image_id} ({record.file_name}) is not a slice of a volume (its meta lacks "
                        f"{missing}); fix: read the dataset with the `volume` plugin to evaluate per scan")
    return meta


def chain_object(meta: dict, slices: np.ndarray, boxes: np.ndarray, weights: np.ndarray, label: int,
                 score: float) -> Object3D:
    """The 3D object of one chain (module docstring, step 2); ``weights``: scores or areas."""
    affine = np.asarray(meta["affine"], np.float64)
    axis = int(meta["slice_axis"])
    w = np.asarray(weights, np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))
    cx = float(w @ ((boxes[:, 0] + boxes[:, 2]) / 2))
    cy = float(w @ ((boxes[:, 1] + boxes[:, 3]) / 2))
    cs = float(w @ slices)
    voxel = pixel_to_voxel(cx, cy, cs, axis)
    ras = voxel_to_world(affine, voxel)[0]
    spacing = spacing_of(affine)
    col_axis, row_axis = plane_axes(axis)
    in_plane = float(np.max(np.maximum((boxes[:, 2] - boxes[:, 0]) * spacing[col_axis],
                                       (boxes[:, 3] - boxes[:, 1]) * spacing[row_axis])))
    depth = float((slices.max() - slices.min() + 1) * spacing[axis])
    return Object3D(str(meta["volume_id"]), int(label), float(score), voxel.round(3).tolist(), ras.round(3).tolist(),
                    (ras * [-1.0, -1.0, 1.0]).round(3).tolist(), round(max(in_plane, depth if len(slices) > 1 else 0.0), 3),
                    [int(slices.min()), int(slices.max())], int(len(slices)))


def volume_objects(records: Sequence, per_record: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                   ground_truth: bool, link_overlap: float = LINK_OVERLAP, max_gap: int = LINK_MAX_GAP,
                   min_score: float = LINK_MIN_SCORE) -> dict[str, list[Object3D]]:
    """Per volume id: the linked 3D objects of ``per_record`` = ``(boxes, scores, labels)`` aligned with ``records``
    (ground truth: scores are ignored, boxes weighted by area)."""
    by_volume: dict[str, list] = {}
    for record, (boxes, scores, labels) in zip(records, per_record):
        meta = _volume_meta(record)
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        scores = np.ones(len(boxes)) if ground_truth else np.asarray(scores, np.float64).reshape(-1)
        keep = np.ones(len(boxes), bool) if ground_truth else scores >= min_score
        entry = by_volume.setdefault(str(meta["volume_id"]), [meta, [], [], [], []])
        entry[1].append(np.full(int(keep.sum()), int(meta["slice_index"])))
        entry[2].append(boxes[keep])
        entry[3].append(scores[keep])
        entry[4].append(np.asarray(labels, np.int64).reshape(-1)[keep])
    out: dict[str, list[Object3D]] = {}
    for volume_id, (meta, s, b, sc, lab) in by_volume.items():
        slices, boxes, scores, labels = (np.concatenate(x) for x in (s, b, sc, lab))
        boxes = boxes.reshape(-1, 4)
        objects = []
        for chain in link_boxes(slices, boxes, scores, labels, link_overlap, max_gap):
            c = np.asarray(chain)
            areas = (boxes[c, 2] - boxes[c, 0]) * (boxes[c, 3] - boxes[c, 1])
            objects.append(chain_object(meta, slices[c], boxes[c], areas if ground_truth else scores[c],
                                        int(labels[c[0]]), float(scores[c].max())))
        out[volume_id] = sorted(objects, key=lambda o: -o.score)
    return out


def match_candidates(candidates: list[Object3D], lesions: list[Object3D]) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, hit)`` per candidate of one volume (module docstring, step 3): kept False for a repeat hit."""
    kept = np.ones(len(candidates), bool)
    hit = np.zeros(len(candidates), bool)
    taken = np.zeros(len(lesions), bool)
    centres = np.asarray([les.centre_ras for les in lesions], np.float64).reshape(-1, 3)
    radii = np.asarray([les.diameter_mm / 2 for les in lesions], np.float64)
    for n, cand in enumerate(candidates):
        dist = np.linalg.norm(centres - np.asarray(cand.centre_ras), axis=1) if len(lesions) else np.zeros(0)
        inside = (dist <= radii) & np.asarray([les.label == cand.label for les in lesions], bool)
        free = inside & ~taken
        if free.any():
            j = int(np.flatnonzero(free)[np.argmin(dist[free])])
            taken[j] = hit[n] = True
        elif inside.any():
            kept[n] = False
    return kept, hit


def volume_froc(records: Sequence, detections: Sequence, link_overlap: float = LINK_OVERLAP,
                max_gap: int = LINK_MAX_GAP, min_score: float = LINK_MIN_SCORE,
                rates: Sequence[float] = FROC_FP_RATES) -> dict[str, Any]:
    """FROC per scan of slice ``detections`` (:class:`~megatron.types.Detections`, aligned with ``records``, the
    slice records of the ``volume`` plugin): returns the rates, the sensitivity at each, their mean, the curve, the
    counts and the candidates (module docstring)."""
    if len(records) != len(detections):
        raise ValueError(f"{len(detections)} detections for {len(records)} records")
    candidates = volume_objects(records, [(d.boxes, d.scores, d.labels) for d in detections], False,
                                link_overlap, max_gap, min_score)
    lesions = volume_objects(records, [(r.boxes, None, r.labels) for r in records], True, link_overlap, max_gap)
    scores, hits = [], []
    for volume_id in lesions:
        kept, hit = match_candidates(candidates.get(volume_id, []), lesions[volume_id])
        scores += [c.score for c, k in zip(candidates.get(volume_id, []), kept) if k]
        hits += hit[kept].tolist()
    n_lesions = sum(len(v) for v in lesions.values())
    curve = froc_curve(np.asarray(scores), np.asarray(hits, bool), n_lesions, len(lesions))
    sens = sensitivity_at(curve, rates) if n_lesions else [0.0] * len(rates)
    totals: dict[str, int] = {str(r.meta["volume_id"]): int(r.meta.get("n_slices", 0)) for r in records}
    return {
        "fp_per_scan": [float(r) for r in rates], "sensitivity": sens,
        "mean_sensitivity": float(np.mean(sens)) if sens else 0.0,
        "curve": {"fp_per_scan": curve["fp_per_image"], "sensitivity": curve["sensitivity"], "score": curve["score"]},
        "n_volumes": len(lesions), "n_lesions": int(n_lesions), "n_candidates": len(scores),
        "slices_evaluated": len(records), "slices_total": int(sum(totals.values())),
        "matching": "hit: a 3D candidate centre within a lesion's radius of its centre (same class); further hits on "
                    "that lesion ignored; every other candidate a false positive (LUNA16)",
        "candidates": {v: [c.to_dict() for c in cs] for v, cs in candidates.items()},
    }
