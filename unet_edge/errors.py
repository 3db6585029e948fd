"""Typed errors that the CLI turns into one line (`error: <message>`) and a non-zero exit."""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "CheckpointError",
    "DataError",
    "OutputError",
    "TrainingError",
    "TrainingInterrupted",
    "UNetEdgeError",
]


class UNetEdgeError(Exception):
    """Base class: the message names the file and the problem, and is shown to the user as is."""

    exit_code = 1


class DataError(UNetEdgeError):
    """A dataset folder, image or label that cannot be used."""


class CheckpointError(UNetEdgeError):
    """A checkpoint that is missing, corrupt, untrusted or not a unet-edge checkpoint."""


class ArtifactError(UNetEdgeError):
    """An exported model that is missing, tampered with, truncated or of an unknown format."""


class OutputError(UNetEdgeError):
    """A file or folder that cannot be written (missing parent, no permission, a folder where a file goes)."""


class TrainingError(UNetEdgeError):
    """Training cannot go on (for example the loss became non-finite)."""


class TrainingInterrupted(UNetEdgeError):
    """Training stopped by Ctrl-C (SIGINT) after saving last.pt; exits 130 as shells expect."""

    exit_code = 130
