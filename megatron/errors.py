"""Exceptions that carry a message a user can act on.

Every error megatron raises on bad input is a :class:`MegatronError`: the CLI prints its message (naming
the file or record and the fix) without a traceback and exits non-zero.
"""


class MegatronError(Exception):
    """Base class: the message says what is wrong, where, and how to fix it."""


class ConfigError(MegatronError):
    """An invalid configuration (unknown key, wrong type, unknown plugin name)."""


class DataError(MegatronError):
    """A dataset that cannot be read as given (missing file, malformed annotation, bad box...)."""


class PluginError(MegatronError):
    """A plugin that failed to import, register or run."""


class UnknownNameError(MegatronError, KeyError):
    """A plugin name that no registered plugin has."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DuplicateNameError(PluginError):
    """Two plugin classes of one kind with the same ``PLUGIN_NAME``."""


class TrainingError(MegatronError):
    """Training cannot go on (e.g. a NaN or infinite loss); the last good checkpoint is kept."""
