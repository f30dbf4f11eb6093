"""The interface of dataset plugins: options in, tasks out."""
from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from megatron.data.problems import Problem, raise_for_errors
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


def tasks_or_raise(loaded: list[tuple[Task, list[Problem]]], source: str) -> list[Task]:
    """The tasks of ``load_with_problems()``, or one DataError listing the errors (``source``: the file or folder
    as the user gave it, named in the message with the ``megatron data check`` command for it). A plugin whose
    reader collects problems writes ``load()`` as ``return tasks_or_raise(self.load_with_problems(), where)``."""
    for _, problems in loaded:
        raise_for_errors(problems, source)
    return [task for task, _ in loaded]
