"""The training checkpoint as a read-only format: bench, verify and predict open a `best.pt` like any exported
model (PyTorch eager, on the CPU or a CUDA GPU); export never writes one (`Format.export` is None).

A checkpoint is a zip archive holding `data.pkl` and no TorchScript code; it is loaded with
`weights_only=True` and checked by `unet_edge.checkpoint.load_model`, so an untrusted file cannot run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import Backend, Format, Provider
from .torch_backend import TORCH_PROVIDERS, TorchBackend, torch_device, torch_unavailable
from .torchscript import archive_names, is_torchscript

__all__ = ["FORMAT", "is_checkpoint", "open_model"]


def is_checkpoint(path: Path) -> bool:
    """A zip archive with a pickled state (`data.pkl`) and no TorchScript code."""
    names = archive_names(path)
    return names is not None and any(name.endswith("data.pkl") for name in names) and not is_torchscript(path)


def open_model(path: Path, provider: Provider, threads: int | None, entry: dict[str, Any] | None) -> Backend:
    """The checkpoint's model in eval mode on `provider`'s device (channels-last on CUDA)."""
    from ..checkpoint import load_model

    device = torch_device(FORMAT, path, provider, threads)
    return TorchBackend.of_loaded(load_model(path), device=device)


FORMAT = Format(
    name="checkpoint",
    runtime="pytorch",
    suffixes=(".pt", ".pth"),
    open=open_model,
    providers=TORCH_PROVIDERS,
    unavailable=torch_unavailable,
    sniff=is_checkpoint,
    torch_variants=True,
)
