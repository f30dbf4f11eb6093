"""The ``voc`` dataset plugin: one megatron task from Pascal VOC XML annotations (LabelImg, CVAT exports).

``root/Annotations/*.xml`` (one per image) + an image folder (``JPEGImages/`` by default) + optionally
``root/ImageSets/Main/<split>.txt``. Each XML file names its image (``<filename>``), its size (``<size>``) and
its objects (``<object><name>``, ``<bndbox>`` with ``xmin ymin xmax ymax``, ``<difficult>``). Bad input is a
:class:`megatron.errors.DataError` naming the file (and object) and the fix, as the dataset contract says.
"""
from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import Field

from megatron import hookimpl
from megatron.api.dataset import DatasetOptions, DatasetPlugin
from megatron.errors import DataError
from megatron.types import ImageRecord, Task

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


class VOCOptions(DatasetOptions):
    root: Path = Field(description="folder holding Annotations/ (one VOC XML file per image)")
    image_dir: str = Field("JPEGImages", description="image folder under root")
    split: str | None = Field(None, description="read only the image ids listed in ImageSets/Main/<split>.txt")
    name: str | None = Field(None, description="task name (default: the root folder's name)")
    modality: str = Field("", description="imaging modality, e.g. microscopy or x-ray")
    classes: list[str] | None = Field(None, description="class names in label order (default: every name found, sorted); an object of another class is an error")
    skip_difficult: bool = Field(False, description="leave out objects marked <difficult>1</difficult>")
    one_based: bool = Field(True, description="VOC's 1-based pixel coordinates (xmin = 1 is the first column); false for tools writing 0-based ones")


class VOCDataset(DatasetPlugin):
    """Pascal VOC XML annotations (LabelImg, CVAT): one task, boxes converted to 0-based xyxy pixel edges."""

    PLUGIN_NAME: ClassVar[str] = "voc"
    Options: ClassVar[type[DatasetOptions]] = VOCOptions

    def load(self) -> list[Task]:
        opts = self.options
        root = Path(opts.root)
        ann_dir = root / "Annotations"
        if not ann_dir.is_dir():
            raise DataError(f"{ann_dir} does not exist; fix: `root` must be the folder holding Annotations/ "
                            "(one VOC XML file per image)")
        files = self._annotation_files(root, ann_dir)
        parsed = [self._parse(path) for path in files]
        objects = [o for _, _, _, objs in parsed for o in objs]
        if not objects:
            raise DataError(f"{ann_dir}: no object in any of the {len(files)} XML file(s); fix: annotate at least one "
                            "box (an empty task cannot be trained on)")
        if opts.classes is not None:
            categories = list(opts.classes)
            for path, _, _, objs in parsed:
                for i, (name, _, _) in enumerate(objs):
                    if name not in categories:
                        raise DataError(f"{path}: object {i + 1} has class {name!r}, which is not in the `classes` "
                                        f"option {categories}; fix the name or add the class")
        else:
            categories = sorted({name for name, _, _ in objects})
        records = []
        for image_id, (path, image_path, (width, height), objs) in enumerate(parsed, start=1):
            boxes = [self._clip(box, width, height, path, i) for i, (_, box, _) in enumerate(objs)]
            records.append(ImageRecord(
                image_id, image_path, width, height,
                np.array(boxes, dtype=np.float32).reshape(-1, 4),
                np.array([categories.index(name) for name, _, _ in objs], dtype=np.int64),
                file_name=str(image_path.relative_to(root)) if image_path.is_relative_to(root) else image_path.name,
            ))
        name = opts.name or root.resolve().name
        return [Task(name, categories, records, modality=opts.modality, source=f"{self.PLUGIN_NAME}:{root}")]

    # --- reading -------------------------------------------------------------------------------------------
    def _annotation_files(self, root: Path, ann_dir: Path) -> list[Path]:
        if self.options.split is None:
            files = sorted(ann_dir.glob("*.xml"))
            if not files:
                raise DataError(f"{ann_dir} holds no .xml file; fix: put one VOC XML annotation per image there")
            return files
        listing = root / "ImageSets" / "Main" / f"{self.options.split}.txt"
        if not listing.is_file():
            raise DataError(f"split {self.options.split!r}: {listing} does not exist; fix the `split` option or "
                            "leave it out to read every annotation")
        files = []
        for line_no, line in enumerate(listing.read_text().splitlines(), start=1):
            image_id = line.split()[0] if line.split() else ""
            if not image_id:
                continue
            path = ann_dir / f"{image_id}.xml"
            if not path.is_file():
                raise DataError(f"{listing}, line {line_no}: no annotation {path}; fix the id or add the file")
            files.append(path)
        return files

    def _parse(self, path: Path) -> tuple[Path, Path, tuple[int, int], list[tuple[str, list[float], bool]]]:
        try:
            tree = ET.parse(path)
        except ET.ParseError as exc:
            raise DataError(f"{path}: not valid XML ({exc}); fix or re-export the file") from None
        ann = tree.getroot()
        image_path = self._image_path(path, ann)
        width, height = self._size(path, ann, image_path)
        objects = []
        for i, obj in enumerate(ann.findall("object"), start=1):
            name = (obj.findtext("name") or "").strip()
            if not name:
                raise DataError(f"{path}: object {i} has no <name>; fix: give every object its class name")
            if self.options.skip_difficult and (obj.findtext("difficult") or "0").strip() == "1":
                continue
            bnd = obj.find("bndbox")
            if bnd is None:
                raise DataError(f"{path}: object {i} ({name}) has no <bndbox>; fix: give it xmin, ymin, xmax, ymax")
            try:
                x1, y1, x2, y2 = (float(bnd.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
                raise DataError(f"{path}: object {i} ({name}): <bndbox> needs numeric xmin, ymin, xmax, ymax; fix "
                                "that box") from None
            if self.options.one_based:
                x1, y1 = x1 - 1, y1 - 1
            if x2 <= x1 or y2 <= y1:
                raise DataError(f"{path}: object {i} ({name}) has no area (xmin {x1 + self.options.one_based:g}, "
                                f"xmax {x2:g}, ymin {y1 + self.options.one_based:g}, ymax {y2:g}); fix that box or "
                                "delete the object")
            objects.append((name, [x1, y1, x2, y2], False))
        return path, image_path, (width, height), objects

    def _image_path(self, xml_path: Path, ann: ET.Element) -> Path:
        folder = Path(self.options.root) / self.options.image_dir
        file_name = (ann.findtext("filename") or "").strip()
        # the named file, else the same stem with another image suffix (an image converted after annotation)
        stem = Path(file_name).stem if file_name else xml_path.stem
        candidates = ([folder / file_name] if file_name else []) + [folder / f"{stem}{s}" for s in IMAGE_SUFFIXES]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        expected = candidates[0] if file_name else folder / f"{xml_path.stem}.jpg"
        raise DataError(f"{xml_path}: its image {expected} does not exist; fix <filename> or the `image_dir` option "
                        f"(now {self.options.image_dir!r})")

    @staticmethod
    def _size(xml_path: Path, ann: ET.Element, image_path: Path) -> tuple[int, int]:
        try:
            width, height = int(float(ann.findtext("size/width"))), int(float(ann.findtext("size/height")))
        except (TypeError, ValueError):
            width = height = 0
        if width > 0 and height > 0:
            return width, height
        from PIL import Image  # no or zero <size> (some exporters): read the image header

        try:
            with Image.open(image_path) as im:
                return im.size
        except OSError as exc:
            raise DataError(f"{xml_path}: no <size> and its image {image_path} cannot be opened ({exc}); fix the "
                            "file or add <size><width>/<height>") from None

    @staticmethod
    def _clip(box: list[float], width: int, height: int, path: Path, index: int) -> list[float]:
        x1, y1, x2, y2 = box
        clipped = [max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)]
        if clipped != box:
            log.warning("%s: object %d %s lies partly outside the %dx%d image; clipped to %s", path, index + 1, box,
                        width, height, clipped)
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            raise DataError(f"{path}: object {index + 1} {box} lies outside the {width}x{height} image; fix that box")
        return clipped


@hookimpl
def megatron_register_datasets() -> list[type]:
    return [VOCDataset]
