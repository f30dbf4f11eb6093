"""The interface of dataset plugins: options in, tasks out."""
from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from megatron.data.problems import Problem
from megatron.types import Task


class DatasetOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetPlugin:
    """Abstract dataset plugin: ``load()`` returns one :class:`~megatron.types.Task` per dataset/modality."""

    PLUGIN_NAME: ClassVar[str]
    Options: ClassVar[type[DatasetOptions]] = DatasetOptions

    def __init__(self, options: DatasetOptions | None = None):
        self.options = options if options is not None else self.Options()

    def load(self) -> list[Task]:
        raise NotImplementedError

    def load_with_problems(self) -> list[tuple[Task, list[Problem]]]:
        """Every task with every problem found while reading it, errors included (``megatron data check -c``
        lists them all). Optional: the default is ``load()`` with no problems, its DataError propagating."""
        return [(task, []) for task in self.load()]
