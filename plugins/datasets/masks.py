"""``masks``: a 2D segmentation dataset (images + PNG label/instance masks, or DICOM images + DICOM SEG) as a
detection task, boxes from connected components (megatron.data.masks)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field, model_validator

from megatron import hookimpl
from megatron.api.dataset import DatasetOptions, DatasetPlugin, tasks_or_raise
from megatron.data.dicom import is_dicom_file, read_dataset
from megatron.data.io import READABLE_SUFFIXES, DicomImageLoader, read_image_size
from megatron.data.masks import (SegMasks, categories_of, instance_mask_boxes, label_map_boxes, segment_boxes)
from megatron.data.paths import walk_files
from megatron.data.problems import Problem
from megatron.errors import DataError
from megatron.types import ImageRecord, Task

MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")


class MasksDataset(DatasetPlugin):
    """Segmentation masks as one detection task: a box per connected component of each class.

    Masks are PNG (or TIFF/BMP) files beside the images' layout: for ``images/a/b.jpg`` the mask is
    ``masks/a/b<mask_suffix>.png``. A **label** mask holds a class value per pixel (``classes`` maps values to
    names; 0 is background); an **instance** mask holds one value per object (all of class ``instance_class``).
    Palette PNGs are read as their indices. Instead of PNG masks, ``seg`` gives DICOM SEG objects whose segments
    reference DICOM images (by SOP Instance UID); segment numbers map to classes through ``classes``, by default
    the segments' own labels. A mask value with no class is an error naming the file and the value.

    Example (config)::

        data:
          datasets:
            - plugin: masks       # e.g. breast ultrasound with lesion masks
              options: {images: data/busi/images, masks: data/busi/masks, mask_suffix: _mask,
                        classes: {255: lesion}, min_component_size: 20}
            - plugin: masks       # DICOM images + a DICOM SEG
              options: {images: data/ct_slices, seg: data/ct_slices_seg.dcm}
    """

    PLUGIN_NAME = "masks"

    class Options(DatasetOptions):
        images: Path = Field(description="folder of images (searched recursively; PNG, JPEG, TIFF, DICOM ...)")
        masks: Path | None = Field(None, description="folder of mask images with the images' relative paths "
                                   "(stem + mask_suffix, a mask suffix such as .png)")
        seg: Path | None = Field(None, description="instead of masks: a DICOM SEG file, or a folder of them, "
                                 "referencing the DICOM images by SOP Instance UID")
        mask_suffix: str = Field("", description="added to an image's stem to name its mask (e.g. `_mask`)")
        mask_type: Literal["label", "instance"] = Field("label", description="label: each value a class; "
                                                        "instance: each value one object")
        classes: dict[int, str | None] | None = Field(None, description="label masks / SEG: value (segment number) "
                                                      "-> class name, null to ignore (default: {1: lesion}; SEG: the "
                                                      "segment labels)")
        instance_class: str = Field("lesion", description="instance masks: the class of every object")
        min_component_size: int = Field(1, ge=1, description="components smaller than this many pixels are dropped")
        name: str | None = Field(None, description="task name (default: the images folder's name)")
        modality: str = Field("", description="imaging modality, informative")

        @model_validator(mode="after")
        def _one_source(self):
            if (self.masks is None) == (self.seg is None):
                raise ValueError("give exactly one mask source: masks (a folder of mask images) or seg (DICOM SEG)")
            if self.seg is not None and self.mask_type == "instance":
                raise ValueError("seg segments are classes: mask_type instance applies to mask images only")
            return self

    def load_with_problems(self) -> list[tuple[Task, list[Problem]]]:
        o = self.options
        root = Path(o.images).expanduser()
        images = find_images(root)
        if o.seg is not None:
            records, categories, problems = self._seg_records(root, images)
        else:
            records, categories, problems = self._mask_records(root, images)
        task = Task(name=o.name or root.resolve().name, categories=categories, records=records, modality=o.modality,
                    source=f"masks:{root}", image_loader=DicomImageLoader())
        return [(task, problems)]

    def load(self) -> list[Task]:
        return tasks_or_raise(self.load_with_problems(), str(Path(self.options.images).expanduser()))

    # -- mask images ------------------------------------------------------------------------------------
    def _mask_records(self, root: Path, images: list[Path]):
        o = self.options
        classes = dict(o.classes) if o.classes is not None else {1: "lesion"}
        categories = [o.instance_class] if o.mask_type == "instance" else categories_of(classes)
        records, problems = [], []
        for image_id, path in enumerate(images, start=1):
            rel = path.relative_to(root)
            mask_path = find_mask(Path(o.masks).expanduser(), rel, o.mask_suffix)
            if mask_path is None:
                problems.append(Problem("error", "mask_missing", str(path), "", f"no mask in {o.masks} (looked for "
                                        f"{rel.parent / (rel.stem + o.mask_suffix)}{{{','.join(MASK_SUFFIXES)}}})",
                                        "add its mask (an all-zero mask for an image without lesions) or remove it"))
                continue
            width, height = read_image_size(path)
            mask = read_mask(mask_path)
            if mask.shape[:2] != (height, width):
                problems.append(Problem("error", "mask_size", str(mask_path), "", f"the mask is {mask.shape[1]}x"
                                        f"{mask.shape[0]} but its image {path} is {width}x{height}",
                                        "save the mask at the image's size"))
                continue
            where = f"mask {mask_path}"
            if o.mask_type == "instance":
                boxes, labels = instance_mask_boxes(mask, 0, where, o.min_component_size)
            else:
                boxes, labels = label_map_boxes(mask, classes, categories, where, o.min_component_size)
            records.append(ImageRecord(image_id, path, width, height, boxes, labels, str(rel)))
        return records, categories, problems

    # -- DICOM SEG --------------------------------------------------------------------------------------
    def _seg_records(self, root: Path, images: list[Path]):
        o = self.options
        seg_root = Path(o.seg).expanduser()
        segs = [SegMasks(p) for p in ([seg_root] if seg_root.is_file() else
                                      [p for p in walk_files(seg_root) if is_dicom_file(p)])]
        if not segs:
            raise DataError(f"no DICOM SEG file in {seg_root}; fix: point `seg` at the SEG object(s)")
        classes = dict(o.classes) if o.classes is not None else {n: lab for s in segs
                                                                 for n, lab in s.segment_labels().items()}
        categories = categories_of(classes)
        records, problems = [], []
        for image_id, path in enumerate(images, start=1):
            ds = read_dataset(path, header_only=True)
            uid = str(ds.get("SOPInstanceUID", ""))
            seg = next((s for s in segs if uid in s.sop_uids), None)
            if seg is None:
                problems.append(Problem("error", "seg_missing", str(path), "", f"no SEG in {seg_root} references "
                                        f"this image (SOP Instance UID {uid})", "add its segmentation or remove it"))
                continue
            width, height = int(ds.Columns), int(ds.Rows)
            boxes, labels = segment_boxes(seg.masks_for(uid), classes, categories, f"DICOM SEG {seg.path} on {path}",
                                          o.min_component_size)
            records.append(ImageRecord(image_id, path, width, height, boxes, labels, str(path.relative_to(root))))
        return records, categories, problems


def find_images(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"images folder {root} does not exist; fix: check the `images` option")
    found = [p for p in walk_files(root)
             if p.suffix.lower() in READABLE_SUFFIXES or (not p.suffix and is_dicom_file(p))]
    if not found:
        raise DataError(f"images folder {root} holds no image; fix: check the `images` option")
    return found


def find_mask(masks: Path, rel: Path, suffix: str) -> Path | None:
    stem = masks / rel.parent / (rel.stem + suffix)
    return next((stem.with_name(stem.name + s) for s in MASK_SUFFIXES if stem.with_name(stem.name + s).is_file()), None)


def read_mask(path: Path) -> np.ndarray:
    """A mask's values as stored: palette PNGs give their indices (not colours), 16-bit masks stay 16-bit."""
    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except OSError as exc:
        raise DataError(f"mask {path} cannot be read ({exc}); fix: re-save it as a single-channel PNG") from None


@hookimpl
def megatron_register_datasets() -> list[type]:
    return [MasksDataset]
