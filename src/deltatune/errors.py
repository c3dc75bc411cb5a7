"""The one exception type a user can cause, and helpers that phrase it.

Every error that bad input can cause (a config key, a data line, a missing file, an incompatible delta)
is raised as :class:`DeltatuneError`. The CLI prints its message in one or two lines and exits with
code 2; the Python API lets it propagate.
"""

from __future__ import annotations


class DeltatuneError(Exception):
    """An error the user can fix: the message names the file, line or key and what to do."""


class ConfigError(DeltatuneError):
    """A run configuration is invalid (unknown key, bad value, bad YAML)."""


class DataError(DeltatuneError):
    """A data file is missing, unreadable or has a malformed example."""


def where(path: object, line: int | None = None) -> str:
    """Return ``path:line`` (or just ``path``) for the start of an error message."""
    return f"{path}:{line}" if line is not None else str(path)
