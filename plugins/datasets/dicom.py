"""``dicom``: one task from a folder of DICOM files, with COCO annotations or none (image-only use)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from megatron import hookimpl
from megatron.data.coco import DEFAULT_GROUP_FIELD, read_coco_task
from megatron.data.dicom import DicomDisplay, read_header
from megatron.data.folder import dicom_grouping, read_image_folder
from megatron.data.groups import GROUP_BY_HELP, GROUP_FIELD_HELP, GROUPING_NONE, DicomGrouping, dicom_group
from megatron.data.io import DicomImageLoader
from megatron.data.paths import ALLOW_HELP
from megatron.errors import DataError
from megatron.data.problems import Problem
from megatron.api.dataset import DatasetOptions, DatasetPlugin, tasks_or_raise
from megatron.types import Task


class DicomDataset(DatasetPlugin):
    """DICOM files as one task: annotated through a COCO file, or unannotated for similarity.

    Pixels are shown as a radiology viewer shows them (pydicom): modality LUT (rescale slope/intercept),
    the file's VOI LUT or window (or your own), MONOCHROME1 inverted, palette/YBR converted to RGB, one
    image per frame of a multi-frame file.

    Example (config)::

        data:
          datasets:
            - plugin: dicom
              options: {root: data/ct_scans, annotation_file: data/ct_scans/annotations.json, window: [40, 400]}
            - plugin: dicom
              options: {root: data/new_modality}   # no annotations: similarity only
    """

    PLUGIN_NAME = "dicom"

    class Options(DatasetOptions):
        root: Path = Field(description="folder of DICOM files, searched recursively; the annotations' file_name "
                           "paths are relative to it")
        annotation_file: Path | None = Field(None, description="COCO detection JSON whose file_names point at the "
                                             "DICOM files (a multi-frame file's image entry gives its 0-based "
                                             "`frame`); none: every DICOM image under root, without boxes "
                                             "(similarity only: `run` needs boxes)")
        name: str | None = Field(None, description="task name (default: the root folder's name)")
        modality: str = Field("", description="imaging modality, informative (e.g. `ct`, `mammography`)")
        categories: list[str] | None = Field(None, description="with annotation_file: category names to keep, in "
                                             "label order (default: all, ordered by COCO id)")
        window: Literal["file", "none"] | tuple[float, float] = Field(
            "file", description="grayscale display: `file` (the file's VOI LUT or WindowCenter/WindowWidth number "
            "window_index; no window when it has none), `none` (modality values as 16-bit, windowed like any "
            "16-bit image), or [center, width] in modality units (e.g. Hounsfield units)")
        window_index: int = Field(0, ge=0, description="which of the file's windows / VOI LUTs (0: the first)")
        frames: Literal["all", "first", "middle"] = Field(
            "all", description="without annotation_file: the frames of a multi-frame file that become images")
        group_by: Literal["patient", "study", "none"] = Field("patient", description=GROUP_BY_HELP + "; with "
                                                              "annotation_file, used when the COCO file names no "
                                                              "patients (group_field)")
        group_field: str | None = Field(DEFAULT_GROUP_FIELD, description="with annotation_file: " + GROUP_FIELD_HELP)
        allow_outside_paths: bool = Field(False, description=ALLOW_HELP)

        @model_validator(mode="after")
        def _consistent(self):
            if self.categories is not None and self.annotation_file is None:
                raise ValueError("categories needs annotation_file (an unannotated folder has no categories)")
            if not isinstance(self.window, str) and not self.window[1] >= 1:
                raise ValueError(f"window width {self.window[1]:g} must be >= 1 ([center, width])")
            return self

    def display(self) -> DicomDisplay:
        return DicomDisplay(window=self.options.window, window_index=self.options.window_index)

    def load_with_problems(self) -> list[tuple[Task, list[Problem]]]:
        o = self.options
        root = Path(o.root).expanduser()
        name = o.name or root.resolve().name
        if o.annotation_file is None:
            task, problems = read_image_folder(root, name, modality=o.modality, dicom_only=True, frames=o.frames,
                                               display=self.display(), source=f"dicom:{root}", group_by=o.group_by,
                                               allow_outside_paths=o.allow_outside_paths)
            return [(task, problems)]
        ann = Path(o.annotation_file).expanduser()
        task, problems = read_coco_task(ann, root, name=name, modality=o.modality, categories=o.categories,
                                        source=f"dicom:{ann}", group_field=o.group_field,
                                        allow_outside_paths=o.allow_outside_paths)
        task.image_loader = DicomImageLoader(self.display())
        if task.grouping == GROUPING_NONE and o.group_by != "none":
            task.grouping = _groups_from_headers(task, o.group_by, str(ann), problems)
        return [(task, problems)]

    def load(self) -> list[Task]:
        o = self.options
        return tasks_or_raise(self.load_with_problems(), str(Path(o.annotation_file or o.root).expanduser()))


def _groups_from_headers(task: Task, group_by: DicomGrouping, where: str, problems: list[Problem]) -> str:
    """Set each record's group from its DICOM file's header (PatientID / StudyInstanceUID); the description."""
    headers: dict[Path, object] = {}
    for record in task.records:
        if record.path is None or not record.path.is_file():
            continue  # reported by the reader already
        if record.path not in headers:
            try:
                headers[record.path] = read_header(record.path)
            except DataError:
                continue  # an unreadable file is reported when its pixels are read
        record.group = dicom_group(headers[record.path], group_by)
    return dicom_grouping(task.records, group_by, where, problems)


@hookimpl
def megatron_register_datasets() -> list[type]:
    return [DicomDataset]
