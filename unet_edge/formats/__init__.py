"""The model formats, one module each, and the registry that export, verify, bench and predict iterate.

Adding a format is one module here defining `FORMAT = Format(...)` (its export function, its `Backend`,
the export options it reads and what it supports; heavy imports inside functions) plus one line in
`FORMATS`. Nothing else names a format: the export pipeline, the CLI's options, bench, verify and predict
all read the registry. The registry is a plain dict: nothing registers itself on import. The training
checkpoint is registered too, as a read-only format (it has no `export`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from . import checkpoint, executorch, litert, ncnn, onnx, openvino, pt2, torchscript
from .base import (
    BUDGET_TOLERANCE,
    IMAGE_SIZE,
    Backend,
    DeployTarget,
    ExportRequest,
    Format,
    FormatOption,
    Precision,
    Provider,
    QuantBudget,
    available_cores,
    default_threads,
    preprocess,
    within_budget,
)

__all__ = [
    "BUDGET_TOLERANCE",
    "FORMATS",
    "IMAGE_SIZE",
    "Backend",
    "DeployTarget",
    "ExportRequest",
    "Format",
    "FormatOption",
    "Precision",
    "Provider",
    "QuantBudget",
    "available_cores",
    "default_threads",
    "detect_format",
    "export_formats",
    "export_options",
    "option_formats",
    "preprocess",
    "within_budget",
]

# In detection order: formats recognised by content (TorchScript) before the checkpoint, which takes the other zips.
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        onnx.FORMAT,
        torchscript.FORMAT,
        openvino.FORMAT,
        ncnn.FORMAT,
        executorch.FORMAT,
        pt2.FORMAT,
        litert.FORMAT,
        checkpoint.FORMAT,
    )
}


def export_formats() -> dict[str, Format]:
    """The registered formats export writes (the read-only ones left out), in registry order."""
    return {name: fmt for name, fmt in FORMATS.items() if fmt.exportable}


def export_options() -> dict[str, FormatOption]:
    """Every export option the registered formats declare, by name (one declaration each)."""
    options: dict[str, FormatOption] = {}
    for fmt in export_formats().values():
        for option in fmt.options:
            if options.setdefault(option.name, option) is not option:
                raise ValueError(
                    f"format {fmt.name!r} declares option {option.name!r} again: share the one declaration"
                )
    return options


def option_formats(name: str) -> Iterator[str]:
    """The formats that read the export option `name`."""
    return (fmt.name for fmt in export_formats().values() if any(option.name == name for option in fmt.options))


def detect_format(path: Path) -> Format | None:
    """The format of a model file (by content where its format sniffs, else by suffix); None when none matches."""
    return next((fmt for fmt in FORMATS.values() if fmt.matches(path)), None)
