"""One typed register per plugin kind (datasets, detectors, learners, similarity metrics)."""
from __future__ import annotations

import difflib
from typing import Generic, Iterator, TypeVar

from megatron.errors import DuplicateNameError, PluginError, UnknownNameError

T = TypeVar("T")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class MissingMethodError(PluginError):
    """A plugin class that does not define a method its kind requires."""


def missing_methods(cls: type, base: type, required: tuple[str, ...]) -> list[str]:
    """The ``required`` methods ``cls`` does not define itself (only ``base``'s placeholder, which raises
    NotImplementedError, would run)."""
    missing = []
    for name in required:
        owner = next((k for k in cls.__mro__ if name in vars(k)), None)
        if owner is None or owner is base or (isinstance(owner, type) and issubclass(base, owner)):
            missing.append(name)
    return missing


def _near_misses(cls: type, base: type, missing: list[str]) -> str:
    """`` (it defines meta_stpe: misspelt?)`` when the class has a method named close to a missing one."""
    own = [n for k in cls.__mro__ if not issubclass(base, k) for n in vars(k)
           if callable(vars(k)[n]) and not n.startswith("__")]
    close = [c for m in missing for c in difflib.get_close_matches(m, own, n=1, cutoff=0.75)]
    return f" (it defines {', '.join(close)}: misspelt?)" if close else ""


class Register(Generic[T]):
    """Plugin classes of one kind, by ``PLUGIN_NAME``.

    A second class with a name already taken is an error naming both classes (and their modules); an unknown
    name is an error listing the known ones; a class that does not define a ``required`` method (misspelt, or
    forgotten) is refused when it registers, naming the class, its plugin and the method.
    """

    def __init__(self, kind: str, base: type[T], required: tuple[str, ...] = ()):
        self.kind = kind
        self.base = base
        self.required = tuple(required)
        self._classes: dict[str, type[T]] = {}
        self._owners: dict[str, str] = {}  # name -> plugin (pluggy) name that registered it

    def add(self, cls: type[T], owner: str = "?") -> None:
        name = getattr(cls, "PLUGIN_NAME", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"{self.kind} class {_qualname(cls)} (from plugin {owner!r}) has no PLUGIN_NAME string")
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise PluginError(
                f"{self.kind} {name!r} from plugin {owner!r} is {cls!r}, not a subclass of {_qualname(self.base)}"
            )
        missing = missing_methods(cls, self.base, self.required)
        if missing:
            near = _near_misses(cls, self.base, missing)
            raise MissingMethodError(
                f"{self.kind} {name!r} ({_qualname(cls)}, from plugin {owner!r}) does not define the required "
                f"method(s) {', '.join(m + '()' for m in missing)}{near}: every {self.kind} plugin implements "
                f"{', '.join(m + '()' for m in self.required)} (registry_docs/contracts/{self.kind}.md)"
            )
        if name in self._classes and self._classes[name] is not cls:
            other = self._classes[name]
            raise DuplicateNameError(
                f"two {self.kind} plugins are named {name!r}: {_qualname(other)} (plugin {self._owners[name]!r}) "
                f"and {_qualname(cls)} (plugin {owner!r}). Rename one PLUGIN_NAME or block one plugin with "
                "MEGATRON_BLOCK_PLUGINS."
            )
        self._classes[name] = cls
        self._owners[name] = owner

    def get(self, name: str) -> type[T]:
        try:
            return self._classes[name]
        except KeyError:
            known = ", ".join(sorted(self._classes)) or "(none registered)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def owner(self, name: str) -> str:
        return self._owners[name]

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._classes)
