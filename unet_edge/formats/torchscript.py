"""TorchScript: a scripted model (what LibTorch in C++ loads), and `TorchBackend`, the PyTorch runtime
that also runs checkpoints in eager mode.

Scripting (not tracing) keeps the padding logic shape-generic, so any H x W works; the metadata
rides along as the archive's extra file `unet_edge.json`.
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import ExportedArtifact, artifact_metadata, io_spec
from ..cpuinfo import cpu_bf16_skip_reason
from ..errors import ArtifactError
from .base import Backend, ExportRequest, Format, Precision, Provider, Snippet, backend_fields

__all__ = [
    "FORMAT",
    "TORCHSCRIPT_FILE",
    "TORCHSCRIPT_METADATA_FILE",
    "TORCH_PROVIDERS",
    "TorchBackend",
    "TorchDtype",
    "TorchVariant",
    "archive_names",
    "export",
    "export_torchscript",
    "load_torchscript",
    "torch_device",
    "torch_unavailable",
]

TORCHSCRIPT_FILE = "model.ts"
# TorchScript archives carry the artifact metadata as this extra file (ONNX as metadata_props).
TORCHSCRIPT_METADATA_FILE = "unet_edge.json"
# PyTorch runs on CPU and CUDA; TensorRT is an ONNX Runtime provider and does not apply.
TORCH_PROVIDERS = {Provider.CPU: "cpu", Provider.CUDA: "cuda"}


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


class TorchVariant(str, Enum):
    """How bench runs a PyTorch module: as loaded (NCHW), with NHWC weights and inputs, through
    `torch.compile`, or replayed from a captured CUDA graph (the last two on NHWC too)."""

    EAGER = "eager"
    CHANNELS_LAST = "channels-last"
    COMPILE = "compile"
    CUDAGRAPHS = "cudagraphs"


class TorchDtype(str, Enum):
    """The dtype a PyTorch module's weights and inputs are cast to for a bench row."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class TorchBackend(Backend):
    """A PyTorch module (eager from a checkpoint, or TorchScript) on CPU or CUDA."""

    def __init__(self, module: Any, *, device: str, channels_last: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        import torch

        self._torch = torch
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest algorithm per input shape
        self.module = module.to(self.device).eval()
        self.dtype = torch.float32
        self.variant = TorchVariant.EAGER
        self.channels_last = False
        if channels_last:
            self._use_channels_last()

    def _use_channels_last(self) -> None:
        """Weights and inputs both NHWC: an NHWC input to NCHW weights makes cuDNN convert at every layer."""
        self.module = self.module.to(memory_format=self._torch.channels_last)
        self.channels_last = True

    def use_variant(self, variant: TorchVariant | str, dtype: TorchDtype | str = TorchDtype.FP32) -> str | None:
        """Run as `variant` in `dtype` from now on; the reason when that does not apply here (None: it does)."""
        torch = self._torch
        variant, dtype = TorchVariant(variant), TorchDtype(dtype)
        if variant is TorchVariant.CUDAGRAPHS and self.device.type != "cuda":
            return "CUDA graphs need a CUDA device"
        if variant is TorchVariant.COMPILE and isinstance(self.module, torch.jit.ScriptModule):
            return "torch.compile takes eager modules, not TorchScript"
        if dtype is TorchDtype.BF16 and self.device.type == "cpu" and (reason := cpu_bf16_skip_reason()):
            return reason
        self.dtype = {TorchDtype.FP32: torch.float32, TorchDtype.BF16: torch.bfloat16, TorchDtype.FP16: torch.float16}[
            dtype
        ]
        self.module = self.module.to(self.dtype)
        self.precision = dtype.value
        if variant is TorchVariant.EAGER:  # plain NCHW, whatever layout the backend was opened with
            self.module = self.module.to(memory_format=torch.contiguous_format)
            self.channels_last = False
        else:
            self._use_channels_last()
        if variant is TorchVariant.COMPILE:
            # One static-shape graph per (dtype, batch, size) of the same forward: above dynamo's default limit
            # of 8 it would fall back to eager silently and the row would measure eager under compile's name.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.module = torch.compile(self.module, dynamic=False)
        self.variant = variant
        return None

    def _to_device(self, images: np.ndarray) -> Any:
        x = self._torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device, self.dtype)
        return x.contiguous(memory_format=self._torch.channels_last) if self.channels_last else x

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.module(self._to_device(images)).float().cpu().numpy()

    def device_runner(self, images: np.ndarray) -> Callable[[], None]:
        torch = self._torch
        x = self._to_device(images)
        if self.variant is TorchVariant.CUDAGRAPHS:
            return self._graph_runner(x)
        cuda = self.device.type == "cuda"

        def run() -> None:
            with torch.inference_mode():
                self.module(x)
            if cuda:
                torch.cuda.synchronize(self.device)

        return run

    def _graph_runner(self, x: Any) -> Callable[[], None]:
        """Capture one forward pass on `x` as a CUDA graph (after warm-up on a side stream, as capture
        requires) and return its replay: one launch instead of one per kernel."""
        torch = self._torch
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode():
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self.module(x)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.module(x)

        def run() -> None:
            graph.replay()
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


def torch_device(fmt: Format, path: Path, provider: Provider, threads: int | None) -> str:
    """The PyTorch device a file of `fmt` runs on for `provider` (one line when it cannot), with `threads` set."""
    import torch

    device = fmt.runtime_provider(path, provider)
    reason = torch_unavailable(provider)
    if reason:
        raise ArtifactError(f"{path}: {reason}")
    if threads:
        torch.set_num_threads(threads)
    return device


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
)
