"""``yolo``: one detection task from the YOLO txt layout (images/, labels/, class-names file)."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from megatron import hookimpl
from megatron.data.problems import Problem, raise_for_errors
from megatron.data.yolo import read_yolo_task
from megatron.api.dataset import DatasetOptions, DatasetPlugin
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

    def load_with_problems(self) -> list[tuple[Task, list[Problem]]]:
        o = self.options
        root = Path(o.root).expanduser()
        return [read_yolo_task(root, name=o.name or root.resolve().name, split=o.split, modality=o.modality)]

    def load(self) -> list[Task]:
        [(task, problems)] = self.load_with_problems()
        raise_for_errors(problems, str(Path(self.options.root).expanduser()))
        return [task]


@hookimpl
def megatron_register_datasets() -> list[type]:
    return [YoloDataset]
