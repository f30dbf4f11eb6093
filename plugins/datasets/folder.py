"""``folder``: a folder of unannotated images (PNG/JPEG/TIFF/... and DICOM) as one task without boxes."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from megatron import hookimpl
from megatron.data.dicom import DicomDisplay
from megatron.data.folder import read_image_folder
from megatron.data.groups import GROUP_BY_HELP, GROUP_PATTERN_HELP, GROUPS_CSV_HELP, one_group_source
from megatron.data.paths import ALLOW_HELP
from megatron.data.problems import Problem
from megatron.api.dataset import DatasetOptions, DatasetPlugin, tasks_or_raise
from megatron.types import Task


class FolderDataset(DatasetPlugin):
    """Unannotated images for the image-only similarity metrics (asked before anything is annotated).

    Every raster image (PNG, JPEG, TIFF, BMP, ...) and DICOM file under ``root`` is one image (each frame of
    a multi-frame DICOM file, by default). The task has no boxes and no categories: ``megatron similarity``
    ranks it with the image-only metrics; ``megatron run`` refuses it (a detector needs boxes).

    Example (config)::

        data:
          datasets:
            - plugin: folder
              options: {root: data/eit_unlabelled, name: eit}
          target: eit
    """

    PLUGIN_NAME = "folder"

    class Options(DatasetOptions):
        root: Path = Field(description="folder of images and/or DICOM files")
        name: str | None = Field(None, description="task name (default: the folder's name)")
        modality: str = Field("", description="imaging modality, informative")
        recursive: bool = Field(True, description="search sub-folders too")
        window: Literal["file", "none"] | tuple[float, float] = Field(
            "file", description="DICOM files: grayscale display, as the `dicom` plugin's option")
        window_index: int = Field(0, ge=0, description="DICOM files: which of the file's windows / VOI LUTs")
        frames: Literal["all", "first", "middle"] = Field(
            "all", description="multi-frame DICOM files: the frames that become images")
        group_by: Literal["patient", "study", "none"] = Field("patient", description=GROUP_BY_HELP)
        group_pattern: str | None = Field(None, description=GROUP_PATTERN_HELP + " (overrides group_by)")
        groups_csv: Path | None = Field(None, description=GROUPS_CSV_HELP + " (overrides group_by)")
        allow_outside_paths: bool = Field(False, description=ALLOW_HELP)

        @model_validator(mode="after")
        def _window(self):
            if not isinstance(self.window, str) and not self.window[1] >= 1:
                raise ValueError(f"window width {self.window[1]:g} must be >= 1 ([center, width])")
            return one_group_source(self)

    def load_with_problems(self) -> list[tuple[Task, list[Problem]]]:
        o = self.options
        root = Path(o.root).expanduser()
        display = DicomDisplay(window=o.window, window_index=o.window_index)
        task, problems = read_image_folder(root, o.name or root.resolve().name, modality=o.modality,
                                           recursive=o.recursive, frames=o.frames, display=display,
                                           group_by=o.group_by, group_pattern=o.group_pattern,
                                           groups_csv=Path(o.groups_csv).expanduser() if o.groups_csv else None,
                                           allow_outside_paths=o.allow_outside_paths)
        return [(task, problems)]

    def load(self) -> list[Task]:
        return tasks_or_raise(self.load_with_problems(), str(Path(self.options.root).expanduser()))


@hookimpl
def megatron_register_datasets() -> list[type]:
    return [FolderDataset]
