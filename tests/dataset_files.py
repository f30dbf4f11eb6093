"""Hand-made dataset folders for tests: a COCO folder (images + annotations.json) and a YOLO folder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megatron.data.io import write_image


def make_coco(root: Path, images=None, annotations=None, categories=None, pixels=None) -> Path:
    """A COCO folder: root/images/*.png + root/annotations.json. ``pixels`` maps file_name -> array."""
    images = images if images is not None else [
        {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
        {"id": 2, "file_name": "b.png", "width": 64, "height": 48},
    ]
    annotations = annotations if annotations is not None else [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 10]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 4, 4]},
        {"id": 3, "image_id": 2, "category_id": 7, "bbox": [30, 20, 8, 8]},
    ]
    categories = categories if categories is not None else [{"id": 7, "name": "mass"}, {"id": 3, "name": "nodule"}]
    (root / "images").mkdir(parents=True, exist_ok=True)
    pixels = pixels or {}
    for img in images:
        if isinstance(img, dict) and "file_name" in img:
            w, h = int(img.get("width", 8) or 8), int(img.get("height", 8) or 8)
            arr = pixels.get(img["file_name"], np.full((max(h, 1), max(w, 1)), 100, np.uint8))
            write_image(root / "images" / img["file_name"], arr)
    ann = root / "annotations.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}, indent=1))
    return ann


def make_yolo(root: Path, labels: dict[str, str], sizes: dict[str, tuple[int, int]] | None = None,
              names=("lesion", "cyst"), split: str | None = None, names_file="classes.txt") -> Path:
    sizes = sizes or {stem: (200, 100) for stem in labels}
    sub = split or ""
    for stem, (w, h) in sizes.items():
        write_image(root / "images" / sub / f"{stem}.png", np.zeros((h, w), np.uint16))
    (root / "labels" / sub).mkdir(parents=True, exist_ok=True)
    for stem, text in labels.items():
        (root / "labels" / sub / f"{stem}.txt").write_text(text)
    if names_file == "classes.txt":
        (root / "classes.txt").write_text("\n".join(names) + "\n")
    elif names_file == "data.yaml":
        (root / "data.yaml").write_text("names:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(names)))
    return root
