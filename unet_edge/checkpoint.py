"""Checkpoints: dicts of tensors and plain JSON-able values, written atomically, loaded without pickle code.

Loading always uses ``torch.load(weights_only=True)``, so a checkpoint from an untrusted source
cannot run code: a pickle payload that is not plain data is refused with a one-line error.
"""

from __future__ import annotations

import io
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import CheckpointError
from .io import atomic_write_bytes, newest
from .model import ModelConfig, UNetStudent, build_model

__all__ = ["LoadedModel", "find_latest_checkpoint", "load_checkpoint", "load_model", "save_checkpoint"]

_REQUIRED_KEYS = ("model", "config", "classes", "mean", "std")


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically (a crash leaves the previous file or the new one, whole)."""
    state = {**state, "producer": f"unet-edge {__version__}"}
    # Serialised in memory first: torch.save's C++ archive writer aborts the process when the disk fills up,
    # while a Python write fails with an OSError that leaves the previous file in place.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a unet-edge checkpoint safely, with a one-line error for anything else."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a checkpoint file such as RUN/best.pt")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    with open(path, "rb") as handle:
        head = handle.read(2)
    # torch.save writes a zip archive ("PK"); older files are a bare pickle (protocol >= 2 opens with 0x80).
    if head != b"PK" and head[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a readable checkpoint (not a file written by torch.save)")
    if head == b"PK" and not zipfile.is_zipfile(path):  # the archive's directory, at its end, is missing: cut off
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt archive)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Detected pickle protocol 4": the error says enough
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike for bad files
        message = str(exc)
        if "GLOBAL" in message or "Unsupported global" in message:
            blocked = re.search(r"Unsupported global: (?:GLOBAL )?([\w.]+)|GLOBAL ([\w.]+)", message)
            what = next((g for g in blocked.groups() if g), "an object") if blocked else "an object"
            raise CheckpointError(
                f"{path}: refused to load: the file asks to run or build {what}, not plain weights "
                f"(checkpoints are loaded with weights_only=True)"
            ) from None
        detail = next(
            (line.strip() for line in reversed(message.splitlines()) if line.strip() and "documentation" not in line),
            "",
        )
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc.__class__.__name__}: {detail[:160]})") from None
    if not isinstance(state, dict) or any(key not in state for key in _REQUIRED_KEYS):
        raise CheckpointError(f"{path}: not a unet-edge checkpoint (expected keys: {', '.join(_REQUIRED_KEYS)})")
    return state


@dataclass
class LoadedModel:
    """A model in eval mode with what it needs to preprocess and name its outputs."""

    model: UNetStudent
    config: ModelConfig
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    ignore_index: int | None
    state: dict[str, Any]
    path: Path


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the `UNetStudent` stored in a checkpoint and load its weights (eval mode)."""
    state = load_checkpoint(path)
    try:
        config = ModelConfig.from_dict(state["config"])
        model = build_model(config)
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match the stored model config ({first_line[:200]})") from None
    model.to(device).eval()
    return LoadedModel(
        model=model,
        config=config,
        classes=list(state["classes"]),
        mean=tuple(state["mean"]),
        std=tuple(state["std"]),
        ignore_index=state.get("ignore_index"),
        state=state,
        path=Path(path),
    )


def find_latest_checkpoint(runs_dir: str | os.PathLike[str] = "runs", name: str = "best.pt") -> Path:
    """The newest `runs/*/best.pt` by modification time."""
    found = newest(runs_dir, f"*/{name}")
    if found is None:
        raise CheckpointError(
            f"{runs_dir}: no run with a {name} found; train one with `unet-edge train` or pass a checkpoint"
        )
    return found
