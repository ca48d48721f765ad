"""The errors a user can cause: each carries a one-line message naming the setting, file or value.

The command line prints a :class:`MimkitError` as ``mimkit <command>: error: <message>`` and exits
with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MimkitError(Exception):
    """A problem the user can fix; the message says what was wrong and what would be valid."""


class ConfigError(MimkitError, ValueError):
    """A configuration value, key or command-line option that cannot be used."""


class DataError(ConfigError):
    """A dataset that cannot be read or evaluated as configured (missing, truncated, one class)."""


class CheckpointError(MimkitError, RuntimeError):
    """A checkpoint that cannot be used or written; the message says which file and why."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint of another architecture or optimizer: the config differs, nothing is corrupt."""


class RunFolderError(MimkitError, RuntimeError):
    """A run folder that holds another run, is in use by another process, or cannot be written."""


class NonFiniteError(MimkitError, RuntimeError):
    """Training produced NaN or inf (loss, gradient or weights) and stopped before saving garbage."""


__all__ = ["CheckpointError", "CheckpointMismatchError", "ConfigError", "DataError", "MimkitError", "NonFiniteError",
           "RunFolderError"]
