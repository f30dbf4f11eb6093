"""Segmentation masks -> boxes: the one converter every mask source goes through.

Label maps (each pixel value a class), instance masks (each value one object) and DICOM SEG segments all
become detection boxes here, so the ``masks`` and ``volume`` dataset plugins agree on what a box is:

- **label map**: per class value, the connected components of its pixels (scipy.ndimage.label, 8-connected
  in 2D: diagonal neighbours belong to one lesion), one box per component. A volume is converted slice by
  slice (a lesion spanning 9 slices gives 9 boxes, one per slice).
- **instance mask**: every distinct non-zero value is one object, whatever its shape (one box around all its
  pixels), all of one class.
- ``classes`` maps mask values to class names (``{1: tumour, 2: cyst}``); a value mapped to ``None`` is
  ignored on purpose (e.g. an organ label around the lesions); a value that is neither is an error naming
  the file and the value, because silently dropping or inventing a class would change the task.
- Components smaller than ``min_size`` pixels are dropped (speckle in automatic segmentations).

Boxes are ``(x1, y1, x2, y2)`` on pixel edges: a component covering columns 3..7 has ``x1 = 3``, ``x2 = 8``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
from scipy import ndimage

from megatron.errors import DataError

BACKGROUND = 0
#: 8-connectivity in 2D: pixels touching at a corner are one component
CONNECTIVITY_2D = ndimage.generate_binary_structure(2, 2)


def categories_of(classes: Mapping[int, str | None]) -> list[str]:
    """The class names of ``classes`` in the order of their lowest mask value (each name once)."""
    out: list[str] = []
    for value in sorted(classes):
        name = classes[value]
        if name is not None and name not in out:
            out.append(name)
    return out


def check_values(mask: np.ndarray, classes: Mapping[int, str | None], where: str) -> None:
    """DataError when ``mask`` holds a non-background value that ``classes`` does not mention."""
    values = np.unique(mask)
    unknown = [int(v) for v in values if int(v) != BACKGROUND and int(v) not in classes]
    if unknown:
        known = ", ".join(f"{k}: {v}" for k, v in sorted(classes.items())) or "none"
        raise DataError(f"{where}: mask value(s) {unknown} have no class name (classes: {{{known}}}); fix: add "
                        f"them to the `classes` option ({{{unknown[0]}: <name>}}), or map them to null to ignore them")


def component_boxes(binary: np.ndarray, min_size: int = 1) -> np.ndarray:
    """``(n, 4)`` float32 boxes of the 8-connected components of a 2D boolean mask with >= ``min_size`` pixels."""
    labelled, n = ndimage.label(binary, structure=CONNECTIVITY_2D)
    if n == 0:
        return np.zeros((0, 4), np.float32)
    sizes = np.bincount(labelled.ravel(), minlength=n + 1)[1:]
    boxes = []
    for index, found in enumerate(ndimage.find_objects(labelled)):
        if found is None or sizes[index] < min_size:
            continue
        rows, cols = found
        boxes.append((cols.start, rows.start, cols.stop, rows.stop))
    return np.asarray(boxes, np.float32).reshape(-1, 4)


def label_map_boxes(mask: np.ndarray, classes: Mapping[int, str | None], categories: list[str], where: str,
                    min_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Boxes and labels (indices into ``categories``) of a 2D label map: one box per connected component of
    each class value (module docstring). Values mapped to None are ignored; unknown values are an error."""
    mask = _as_2d(mask, where)
    check_values(mask, classes, where)
    boxes, labels = [], []
    for value in np.unique(mask):
        name = classes.get(int(value)) if int(value) != BACKGROUND else None
        if name is None:
            continue
        found = component_boxes(mask == value, min_size)
        boxes.append(found)
        labels.append(np.full(len(found), categories.index(name), np.int64))
    return _stack(boxes, labels)


def instance_mask_boxes(mask: np.ndarray, label: int, where: str, min_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of a 2D instance mask (every non-zero value one object, module docstring), all labelled ``label``."""
    mask = _as_2d(mask, where)
    values = [v for v in np.unique(mask) if int(v) != BACKGROUND]
    if not values:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    objects = ndimage.find_objects(np.where(mask == BACKGROUND, 0, np.searchsorted(values, mask) + 1))
    sizes = [int(np.count_nonzero(mask == v)) for v in values]
    boxes = [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s, n in zip(objects, sizes)
             if s is not None and n >= min_size]
    out = np.asarray(boxes, np.float32).reshape(-1, 4)
    return out, np.full(len(out), label, np.int64)


def volume_label_map_boxes(volume: np.ndarray, axis: int, classes: Mapping[int, str | None],
                           categories: list[str], where: str, min_size: int = 1) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per slice index along ``axis`` of a 3D label map: the boxes and labels on that slice's image
    (``np.take(volume, index, axis).T``, as :func:`megatron.data.volumes.slice_plane` shows it); slices without a
    box are left out."""
    check_values(volume, classes, where)
    out = {}
    for index in np.flatnonzero(np.any(np.moveaxis(volume, axis, 0).reshape(volume.shape[axis], -1), axis=1)):
        plane = np.take(volume, int(index), axis=axis).T  # the slice image's layout (megatron.data.volumes)
        boxes, labels = label_map_boxes(plane, classes, categories, f"{where} slice {int(index)}", min_size)
        if len(boxes):
            out[int(index)] = (boxes, labels)
    return out


def _as_2d(mask: np.ndarray, where: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] in (3, 4) and np.all(mask[..., :3] == mask[..., :1]):
        mask = mask[..., 0]  # a grey label map saved as RGB(A)
    if mask.ndim != 2:
        raise DataError(f"{where}: a mask must be one 2D array of integer values, got shape {mask.shape}; fix: save "
                        "label maps as single-channel 8/16-bit PNG (colour-coded masks are not label maps)")
    if mask.dtype.kind == "f":
        if not np.all(mask == np.rint(mask)):
            raise DataError(f"{where}: the mask holds fractional values (a probability map?); fix: threshold it to "
                            "integer labels first")
        mask = mask.astype(np.int64)
    return mask


def _stack(boxes: list[np.ndarray], labels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not boxes:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    return np.concatenate(boxes).astype(np.float32), np.concatenate(labels).astype(np.int64)


def segment_boxes(segments: Mapping[int, np.ndarray], classes: Mapping[int, str | None], categories: list[str],
                  where: str, min_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of binary masks keyed by segment number (DICOM SEG segments may overlap, so each is converted on
    its own): one box per connected component, labelled by ``classes[segment number]``."""
    unknown = sorted(int(n) for n, m in segments.items() if n not in classes and np.any(m))
    if unknown:
        known = ", ".join(f"{k}: {v}" for k, v in sorted(classes.items())) or "none"
        raise DataError(f"{where}: segment number(s) {unknown} have no class name (classes: {{{known}}}); fix: add "
                        "them to the `classes` option, or map them to null to ignore them")
    boxes, labels = [], []
    for number, binary in sorted(segments.items()):
        name = classes.get(int(number))
        if name is None:
            continue
        found = component_boxes(np.asarray(binary, bool), min_size)
        boxes.append(found)
        labels.append(np.full(len(found), categories.index(name), np.int64))
    return _stack(boxes, labels)


class SegMasks:
    """A DICOM SEG object's masks per source image, addressed by the source's SOP Instance UID (highdicom)."""

    def __init__(self, path: Path):
        import highdicom as hd  # only DICOM SEG sources need highdicom (a heavy import)

        self.path = Path(path)
        try:
            self.seg = hd.seg.segread(str(self.path))
        except Exception as exc:  # noqa: BLE001 - highdicom/pydicom raise many types on a bad file
            raise DataError(f"DICOM SEG {self.path} cannot be read ({type(exc).__name__}: {exc}); fix: check that it "
                            "is a Segmentation Storage object") from None
        self.segment_numbers = [int(n) for n in self.seg.segment_numbers]
        self.sop_uids = {str(sop) for _study, _series, sop in self.seg.get_source_image_uids()}

    def segment_labels(self) -> dict[int, str]:
        """Segment number -> its SegmentLabel (the default class names)."""
        return {n: str(self.seg.get_segment_description(n).segment_label) for n in self.segment_numbers}

    def masks_for(self, sop_uid: str) -> dict[int, np.ndarray]:
        """Segment number -> boolean ``(rows, columns)`` mask on the source image ``sop_uid``."""
        pixels = self.seg.get_pixels_by_source_instance([sop_uid], segment_numbers=self.segment_numbers,
                                                        assert_missing_frames_are_empty=True)
        return {n: pixels[0, :, :, k] > 0 for k, n in enumerate(self.segment_numbers)}
