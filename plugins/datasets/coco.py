"""``coco``: one detection task from a COCO annotation file and an image folder (read through pycocotools)."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from megatron import hookimpl
from megatron.data.coco import DEFAULT_GROUP_FIELD, default_image_dir, default_task_name, read_coco_task
from megatron.data.groups import GROUP_FIELD_HELP, GROUP_PATTERN_HELP, GROUPS_CSV_HELP, one_group_source
from megatron.data.paths import ALLOW_HELP
from megatron.data.problems import Problem
from megatron.api.dataset import DatasetOptions, DatasetPlugin, tasks_or_raise
from megatron.types import Task


class CocoDataset(DatasetPlugin):
    """A COCO-format detection dataset as one task (8/16-bit grayscale or RGB images).

    Example (config)::

        data:
          datasets:
            - plugin: coco
              options: {annotation_file: data/eit/annotations.json, image_dir: data/eit/images, name: eit}
    """

    PLUGIN_NAME = "coco"

    class Options(DatasetOptions):
        annotation_file: Path = Field(description="COCO detection JSON (images, annotations, categories)")
        image_dir: Path | None = Field(None, description="folder the images' file_name paths are relative to "
                                       "(default: `images/` next to the annotation file if it exists, else its folder)")
        name: str | None = Field(None, description="task name (default: the name of the folder holding the annotation file)")
        modality: str = Field("", description="imaging modality, informative (e.g. `mri`, `eit`)")
        categories: list[str] | None = Field(None, description="category names to keep, in label order "
                                             "(default: all, ordered by COCO id)")
        group_field: str | None = Field(DEFAULT_GROUP_FIELD, description=GROUP_FIELD_HELP)
        group_pattern: str | None = Field(None, description=GROUP_PATTERN_HELP.replace("Default: every image its own patient",
                                                                                 "When set it replaces group_field"))
        groups_csv: Path | None = Field(None, description=GROUPS_CSV_HELP + "; when set it replaces group_field")
        allow_outside_paths: bool = Field(False, description=ALLOW_HELP)

        _one_group_source = model_validator(mode="after")(one_group_source)

    def load_with_problems(self) -> list[tuple[Task, list[Problem]]]:
        o = self.options
        ann = Path(o.annotation_file).expanduser()
        image_dir = Path(o.image_dir).expanduser() if o.image_dir else default_image_dir(ann)
        return [read_coco_task(ann, image_dir, name=o.name or default_task_name(ann),
                               modality=o.modality, categories=o.categories, group_field=o.group_field,
                               allow_outside_paths=o.allow_outside_paths, group_pattern=o.group_pattern,
                               groups_csv=Path(o.groups_csv).expanduser() if o.groups_csv else None)]

    def load(self) -> list[Task]:
        return tasks_or_raise(self.load_with_problems(), str(Path(self.options.annotation_file).expanduser()))


@hookimpl
def megatron_register_datasets() -> list[type]:
    return [CocoDataset]
