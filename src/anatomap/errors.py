"""Errors that name the file (or key) and the problem in one line."""

from __future__ import annotations

from pathlib import Path


class AnatomapError(Exception):
    """Base class of every error anatomap raises on purpose (the CLI prints it in one line).

    ``exit_code`` is the CLI's exit status for it: 2 (bad input), 3 for an I/O failure.
    """

    exit_code: int = 2


class VolumeError(AnatomapError):
    """A scan that cannot be used: names the file and says what is wrong with it."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ConfigError(AnatomapError):
    """An invalid configuration: names the key (and the file) and the problem."""


class CheckpointError(AnatomapError):
    """A checkpoint that cannot be loaded for the asked purpose."""
