"""Typed errors that the CLI turns into one line (`error: <message>`) and a non-zero exit."""

from __future__ import annotations

__all__ = ["UNetEdgeError", "DataError", "CheckpointError", "ArtifactError", "TrainingError"]


class UNetEdgeError(Exception):
    """Base class: the message names the file and the problem, and is shown to the user as is."""


class DataError(UNetEdgeError):
    """A dataset folder, image or label that cannot be used."""


class CheckpointError(UNetEdgeError):
    """A checkpoint that is missing, corrupt, untrusted or not a unet-edge checkpoint."""


class ArtifactError(UNetEdgeError):
    """An exported model that is missing, tampered with, truncated or of an unknown format."""


class TrainingError(UNetEdgeError):
    """Training cannot go on (for example the loss became non-finite)."""
