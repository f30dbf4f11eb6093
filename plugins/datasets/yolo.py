"""``yolo``: one detection task from the YOLO txt layout (images/, labels/, class-names file)."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from megatron import hookimpl
from megatron.data.problems import Problem
from megatron.data.groups import GROUP_PATTERN_HELP, GROUPS_CSV_HELP, one_group_source
from megatron.data.paths import ALLOW_HELP
from megatron.data.yolo import read_yolo_task
from megatron.api.dataset import DatasetOptions, DatasetPlugin, tasks_or_raise
from megatron.types import Task


class YoloDataset(DatasetPlugin):
    """A YOLO-layout detection dataset as one task; normalised ``cx cy w h`` become pixel xyxy boxes.

    Example (config)::

        data:
          datasets:
            - plugin: yolo
              options: {root: data/xray_yolo, split: train, name: chest_xray}
    """

    PLUGIN_NAME = "yolo"

    class Options(DatasetOptions):
        root: Path = Field(description="folder holding images/, labels/ and classes.txt or data.yaml (`names`)")
        name: str | None = Field(None, description="task name (default: the root folder's name)")
        split: str | None = Field(None, description="sub-folder of images/ and labels/ to read (e.g. `train`); default: all of them")
        modality: str = Field("", description="imaging modality, informative")
        group_pattern: str | None = Field(None, description=GROUP_PATTERN_HELP)
        groups_csv: Path | None = Field(None, description=GROUPS_CSV_HELP)
        allow_outside_paths: bool = Field(False, description=ALLOW_HELP)

        _one_group_source = model_validator(mode="after")(one_group_source)

    def load_with_problems(self) -> list[tuple[Task, list[Problem]]]:
        o = self.options
        root = Path(o.root).expanduser()
        return [read_yolo_task(root, name=o.name or root.resolve().name, split=o.split, modality=o.modality,
                               group_pattern=o.group_pattern,
                               groups_csv=Path(o.groups_csv).expanduser() if o.groups_csv else None,
                               allow_outside_paths=o.allow_outside_paths)]

    def load(self) -> list[Task]:
        return tasks_or_raise(self.load_with_problems(), str(Path(self.options.root).expanduser()))


@hookimpl
def megatron_register_datasets() -> list[type]:
    return [YoloDataset]
