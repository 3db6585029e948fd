"""TorchScript: a scripted model (what LibTorch in C++ loads), and `TorchBackend`, the PyTorch runtime
that also runs checkpoints in eager mode.

Scripting (not tracing) keeps the padding logic shape-generic, so any H x W works; the metadata
rides along as the archive's extra file `unet_edge.json`.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import TORCHSCRIPT_FILE, TORCHSCRIPT_METADATA_FILE, ExportedArtifact, artifact_metadata, io_spec
from ..errors import ArtifactError
from .base import Backend, ExportRequest, Format, Precision, Provider, backend_fields

__all__ = ["FORMAT", "TORCH_PROVIDERS", "TorchBackend", "archive_names", "export", "export_torchscript", "torch_unavailable"]

# PyTorch runs on CPU and CUDA; TensorRT is an ONNX Runtime provider and does not apply.
TORCH_PROVIDERS = {Provider.CPU: "cpu", Provider.CUDA: "cuda"}


def export_torchscript(module: Any, path: str | os.PathLike[str], metadata: dict[str, str]) -> Path:
    """Script `module` and save it atomically with `metadata` as the archive's `unet_edge.json`."""
    import torch

    from ..io import atomic_path

    path = Path(path)
    with warnings.catch_warnings(), atomic_path(path) as tmp:
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still the format C++ (LibTorch) loads
        scripted = torch.jit.script(module.eval())
        torch.jit.save(scripted, str(tmp), _extra_files={TORCHSCRIPT_METADATA_FILE: json.dumps(metadata)})
    return path


def export(request: ExportRequest) -> list[ExportedArtifact]:
    """model.ts: the checkpoint's model, scripted."""
    loaded = request.loaded
    path = export_torchscript(loaded.model, request.folder / TORCHSCRIPT_FILE, artifact_metadata(loaded, Precision.FP32.value))
    inputs, outputs = io_spec(len(loaded.classes))
    return [ExportedArtifact(TORCHSCRIPT_FILE, "torchscript", "fp32", path, inputs, outputs)]


class TorchBackend(Backend):
    """A PyTorch module (eager from a checkpoint, or TorchScript) on CPU or CUDA."""

    def __init__(self, module: Any, *, device: str, channels_last: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        import torch

        self._torch = torch
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.channels_last = channels_last

    def _to_device(self, images: np.ndarray) -> Any:
        x = self._torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
        return x.contiguous(memory_format=self._torch.channels_last) if self.channels_last else x

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.module(self._to_device(images)).float().cpu().numpy()

    def device_runner(self, images: np.ndarray) -> Callable[[], None]:
        torch = self._torch
        x = self._to_device(images)
        cuda = self.device.type == "cuda"

        def run() -> None:
            with torch.inference_mode():
                self.module(x)
            if cuda:
                torch.cuda.synchronize(self.device)

        return run

    def close(self) -> None:
        del self.module
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()


def torch_unavailable(provider: Provider) -> str | None:
    """Why PyTorch cannot run on `provider` here (None: it can)."""
    if provider is not Provider.CUDA:
        return None
    import torch

    return None if torch.cuda.is_available() else "cuda: PyTorch sees no CUDA GPU"


def archive_names(path: Path) -> list[str] | None:
    """The member names of a zip archive (TorchScript files and checkpoints are zips); None for other files."""
    with open(path, "rb") as handle:
        if handle.read(2) != b"PK":
            return None
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except zipfile.BadZipFile:
        raise ArtifactError(f"{path}: truncated or corrupt archive") from None


def is_torchscript(path: Path) -> bool:
    """A zip archive with TorchScript code in it."""
    names = archive_names(path) or []
    return any("/code/" in name or name.endswith("constants.pkl") for name in names)


def open_model(path: Path, provider: Provider, threads: int | None, entry: dict[str, Any] | None) -> Backend:
    """Load a TorchScript file on `provider`'s device, with the metadata stored in it."""
    import torch

    device = FORMAT.runtime_provider(path, provider)
    reason = torch_unavailable(provider)
    if reason:
        raise ArtifactError(f"{path}: {reason}")
    if threads:
        torch.set_num_threads(threads)
    extra = {TORCHSCRIPT_METADATA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError subclasses with long messages
        raise ArtifactError(f"{path}: not a loadable TorchScript model ({str(exc).splitlines()[0][:160]})") from None
    meta = json.loads(extra[TORCHSCRIPT_METADATA_FILE] or "{}")
    return TorchBackend(module, device=device, **backend_fields(FORMAT.runtime, device, path, meta, entry))


FORMAT = Format(
    name="torchscript",
    runtime="torchscript",
    suffixes=(".ts", ".pt", ".pth"),
    file=TORCHSCRIPT_FILE,
    export=export,
    open=open_model,
    providers=TORCH_PROVIDERS,
    unavailable=torch_unavailable,
    sniff=is_torchscript,
)
