"""TorchScript: a scripted model (what LibTorch in C++ loads), run by `TorchBackend` (torch_backend.py).

Scripting (not tracing) keeps the padding logic shape-generic, so any H x W works; the metadata
rides along as the archive's extra file `unet_edge.json`.
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

from ..artifact import ExportedArtifact, artifact_metadata, io_spec
from ..errors import ArtifactError
from .base import Backend, ExportRequest, Format, Precision, Provider, Snippet, backend_fields
from .torch_backend import TORCH_PROVIDERS, TorchBackend, torch_device, torch_unavailable

__all__ = [
    "FORMAT",
    "TORCHSCRIPT_FILE",
    "TORCHSCRIPT_METADATA_FILE",
    "archive_names",
    "export",
    "export_torchscript",
    "load_torchscript",
]

TORCHSCRIPT_FILE = "model.ts"
# TorchScript archives carry the artifact metadata as this extra file (ONNX as metadata_props).
TORCHSCRIPT_METADATA_FILE = "unet_edge.json"


def export_torchscript(module: Any, path: str | os.PathLike[str], metadata: dict[str, str]) -> Path:
    """Script `module` and save it atomically with `metadata` as the archive's `unet_edge.json`."""
    import torch

    from ..io import atomic_write_bytes

    path = Path(path)
    buffer = io.BytesIO()  # in memory first: TorchScript's C++ archive writer aborts the process on a full disk
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", FutureWarning
        )  # torch.jit is deprecated but still the format C++ (LibTorch) loads
        scripted = torch.jit.script(module.eval())
        torch.jit.save(scripted, buffer, _extra_files={TORCHSCRIPT_METADATA_FILE: json.dumps(metadata)})
    atomic_write_bytes(path, buffer.getvalue())
    return path


def export(request: ExportRequest) -> list[ExportedArtifact]:
    """model.ts: the checkpoint's model, scripted."""
    loaded = request.loaded
    path = export_torchscript(
        loaded.model, request.folder / TORCHSCRIPT_FILE, artifact_metadata(loaded, Precision.FP32.value)
    )
    inputs, outputs = io_spec(len(loaded.classes))
    return [ExportedArtifact(TORCHSCRIPT_FILE, "torchscript", "fp32", path, inputs, outputs)]


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


def load_torchscript(path: Path) -> tuple[Any, dict[str, Any]]:
    """The scripted module of a TorchScript file (on the CPU) and the metadata stored in its archive."""
    import torch

    extra = {TORCHSCRIPT_METADATA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError subclasses with long messages
        raise ArtifactError(f"{path}: not a loadable TorchScript model ({str(exc).splitlines()[0][:160]})") from None
    try:
        return module, json.loads(extra[TORCHSCRIPT_METADATA_FILE] or "{}")
    except json.JSONDecodeError:
        raise ArtifactError(f"{path}: unreadable {TORCHSCRIPT_METADATA_FILE} metadata in the archive") from None


def open_model(path: Path, provider: Provider, threads: int | None, entry: dict[str, Any] | None) -> Backend:
    """Load a TorchScript file on `provider`'s device, with the metadata stored in it."""
    device = torch_device(FORMAT, path, provider, threads)
    module, meta = load_torchscript(path)
    return TorchBackend(module, device=device, **backend_fields(FORMAT.runtime, device, path, meta, entry))


# How a program loads this format with its runtime alone: the README's snippet, which deploy writes into EMBEDDING.md.
EMBEDDING = Snippet(
    "TorchScript, with only torch, numpy and Pillow (LibTorch's `torch::jit::load` reads the same file in C++)",
    "import json\n\nimport numpy as np\nimport torch\nfrom PIL import Image",
    """\
torch.set_num_threads(4)
extra = {"unet_edge.json": ""}
model = torch.jit.load("model.ts", _extra_files=extra)  # the metadata rides in the archive
meta = json.loads(extra["unet_edge.json"])
mean, std = (np.array(json.loads(meta[key]), np.float32) for key in ("mean", "std"))
image = np.asarray(Image.open("image.png").convert("RGB"))  # H x W x 3 uint8, any size
x = np.ascontiguousarray(((image / 255.0 - mean) / std).transpose(2, 0, 1)[None], np.float32)  # 1 x 3 x H x W
with torch.inference_mode():
    mask = model(torch.from_numpy(x))[0].argmax(0).numpy()  # H x W class indices
""",
)


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
    folds_batchnorm=False,  # the checkpoint's own modules, scripted as trained
    torch_variants=True,
    embedding=EMBEDDING,
    export_seconds=0.5,
)
