"""Errors a user can cause.

Every error raised because of user input is a :class:`MedsegError`. Its message is
one line that names the file (when there is one), what was expected, what was found
and what to do. The CLI prints that line without a traceback and exits non-zero.
"""

from __future__ import annotations

from pathlib import Path


class MedsegError(Exception):
    """Base class of all user-facing medseg errors."""

    exit_code = 2

    def __init__(
        self,
        problem: str,
        *,
        path: str | Path | None = None,
        expected: str | None = None,
        found: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.problem = problem
        self.path = None if path is None else str(path)
        self.expected = expected
        self.found = found
        self.fix = fix
        super().__init__(self.format())

    def format(self) -> str:
        parts = []
        if self.path:
            parts.append(f"{self.path}: {self.problem}")
        else:
            parts.append(self.problem)
        if self.expected is not None:
            parts.append(f"expected {self.expected}")
        if self.found is not None:
            parts.append(f"found {self.found}")
        if self.fix:
            parts.append(f"fix: {self.fix}")
        return "; ".join(parts)


class InputNotFoundError(MedsegError):
    """A path given by the user does not exist or holds nothing usable."""


class UnreadableFileError(MedsegError):
    """A file exists but cannot be read as the format it claims to be."""


class UnsupportedInputError(MedsegError):
    """A file is readable but not something medseg can process (4D, 2D given to 3D...)."""


class GeometryError(MedsegError):
    """Two grids that must agree do not (image vs label, output vs source)."""


class DataError(MedsegError):
    """Training or evaluation data is inconsistent (labels, pairs, values)."""


class ConfigError(MedsegError):
    """A configuration file or override is invalid."""


class UnknownModelError(MedsegError):
    """A model name is not in the registry and is not a checkpoint file."""


class CheckpointError(MedsegError):
    """A checkpoint file is missing, foreign, or damaged."""


class OutputError(MedsegError):
    """An output location cannot be written safely."""


class ResourceError(MedsegError):
    """The work does not fit the memory (host or GPU) available for it."""


class MissingDependencyError(MedsegError):
    """An optional package that a feature needs is not installed."""
