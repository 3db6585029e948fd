"""The deployable formats, one module each, and the registry that export, verify, bench and predict iterate.

Adding a format is one module here defining `FORMAT = Format(...)` (its export function, its `Backend`
and what it supports; heavy imports inside functions) plus one line in `FORMATS` and its tests. The
registry is a plain dict: nothing registers itself on import.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from . import executorch, litert, ncnn, onnx, openvino, torchscript
from .base import Backend, CalibMethod, ExportRequest, Format, Precision, Provider, default_threads, preprocess

__all__ = [
    "FORMATS",
    "Backend",
    "CalibMethod",
    "ExportFormat",
    "ExportRequest",
    "Format",
    "Precision",
    "Provider",
    "default_threads",
    "detect_format",
    "preprocess",
]

FORMATS: dict[str, Format] = {f.name: f for f in (onnx.FORMAT, torchscript.FORMAT, openvino.FORMAT, ncnn.FORMAT, executorch.FORMAT, litert.FORMAT)}

# `--format` choices: every registered format, or all of them.
ExportFormat = Enum("ExportFormat", {**{name.upper(): name for name in FORMATS}, "ALL": "all"}, type=str)  # type: ignore[misc]


def detect_format(path: Path) -> Format | None:
    """The format of a model file (by content where its format sniffs, else by suffix); None when none matches."""
    return next((fmt for fmt in FORMATS.values() if fmt.matches(path)), None)
