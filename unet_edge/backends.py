"""One interface over every way unet-edge runs a model: PyTorch eager, TorchScript and ONNX Runtime.

A `Backend` turns a batch of normalised float32 N x 3 x H x W images into N x K x H x W logits
(`predict_logits`), and hands bench a device-resident runner so that timing excludes host copies.
verify, bench and predict all go through `open_backend`, so a new precision or runtime plugs in here.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError
from .io import sha256_file

__all__ = [
    "ORT_PROVIDERS",
    "Backend",
    "OnnxRuntimeBackend",
    "TorchBackend",
    "artifact_format",
    "check_manifest_sha256",
    "open_backend",
    "ort_provider_status",
    "preprocess",
    "read_manifest",
]

# Short names users type, and the ONNX Runtime execution provider each one means.
ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def preprocess(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """H x W x 3 uint8 RGB -> 3 x H x W float32, scaled to [0, 1] then normalised (as at training)."""
    scaled = image.astype(np.float32) / 255.0
    normalised = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))


def artifact_format(path: str | os.PathLike[str]) -> str:
    """'onnx', 'torchscript' or 'checkpoint', from the file's content (not only its name)."""
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path}: is a folder, expected a model file (.onnx, .ts or a checkpoint)")
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            raise ArtifactError(f"{path}: truncated or corrupt archive") from None
        if any("/code/" in name or name.endswith("constants.pkl") for name in names):
            return "torchscript"
        if any(name.endswith("data.pkl") for name in names):
            return "checkpoint"
        raise ArtifactError(f"{path}: a zip archive that is neither a TorchScript model nor a checkpoint")
    if path.suffix.lower() == ".onnx":
        return "onnx"
    raise ArtifactError(f"{path}: unsupported model file (expected .onnx, a TorchScript archive or a checkpoint)")


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not a valid manifest ({exc})") from None


def manifest_entry(path: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(manifest, the artifact's entry in it) for a file that sits beside a manifest.json."""
    path = Path(path)
    manifest = read_manifest(path.parent)
    if manifest is None:
        return None, None
    for entry in manifest.get("artifacts", []):
        if entry.get("file") == path.name:
            return manifest, entry
    return manifest, None


def check_manifest_sha256(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """When the manifest beside `path` lists it, the file's sha256 must match before anything runs it."""
    manifest, entry = manifest_entry(path)
    if entry is None:
        return None
    expected = entry.get("sha256")
    actual = sha256_file(path)
    if expected and actual != expected:
        size = Path(path).stat().st_size
        hint = f"truncated: {size} of {entry['size_bytes']} bytes" if size < entry.get("size_bytes", 0) else "modified"
        raise ArtifactError(
            f"{path}: sha256 {actual[:12]}... does not match manifest.json ({expected[:12]}...): file was {hint}"
        )
    return entry


@dataclass
class Backend:
    """A loaded model plus what it needs to be run and reported."""

    backend: str
    provider: str
    precision: str
    path: Path
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    ignore_index: int | None
    input_format: str = "nchw-float32"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.backend}[{self.provider}] {self.precision}"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        """N x 3 x H x W float32 normalised images -> N x K x H x W float32 logits (host memory)."""
        raise NotImplementedError

    def predict_masks(self, images: np.ndarray) -> np.ndarray:
        """The model's own input (float NCHW, or uint8 NHWC for end-to-end models) -> N x H x W uint8 masks."""
        return self.predict_logits(images).argmax(1).astype(np.uint8)

    def segment(self, images: np.ndarray) -> np.ndarray:
        """N x H x W x 3 uint8 RGB images -> N x H x W uint8 class masks, whatever the model's input format."""
        if self.input_format == "nhwc-uint8":
            return self.predict_masks(images)
        return self.predict_masks(np.stack([preprocess(image, self.mean, self.std) for image in images]))

    def device_runner(self, images: np.ndarray) -> Callable[[], None]:
        """A closure that runs one batch with inputs and outputs already on the device, waiting for it
        to finish (what bench times as latency)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds (sessions, GPU memory)."""


class TorchBackend(Backend):
    """PyTorch eager (from a checkpoint) or TorchScript, on CPU or CUDA."""

    def __init__(self, module: Any, *, device: str, channels_last: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        import torch

        self._torch = torch
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.channels_last = channels_last

    def _to_device(self, images: np.ndarray):
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


class OnnxRuntimeBackend(Backend):
    """An ONNX model in an ONNX Runtime session with one execution provider (falling back to CPU)."""

    def __init__(self, session: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        if self.input_format == "nhwc-uint8":
            raise ArtifactError(f"{self.path}: an end-to-end model returns class masks, not logits")
        feed = np.ascontiguousarray(images, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: feed})[0].astype(np.float32, copy=False)

    def predict_masks(self, images: np.ndarray) -> np.ndarray:
        if self.input_format != "nhwc-uint8":
            return super().predict_masks(images)
        feed = np.ascontiguousarray(images, dtype=np.uint8)
        return self.session.run([self.output_name], {self.input_name: feed})[0]

    def device_runner(self, images: np.ndarray) -> Callable[[], None]:
        feed = np.ascontiguousarray(images, dtype=np.float32)
        if self.provider == "CPUExecutionProvider":
            return lambda: self.session.run([self.output_name], {self.input_name: feed})
        import onnxruntime as ort

        # Inputs copied to the GPU once and outputs left there: latency excludes host<->device copies.
        binding = self.session.io_binding()
        device_input = ort.OrtValue.ortvalue_from_numpy(feed, "cuda", 0)
        binding.bind_ortvalue_input(self.input_name, device_input)
        binding.bind_output(self.output_name, "cuda", 0)

        def run() -> None:
            binding.synchronize_inputs()
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        return run

    def close(self) -> None:
        del self.session


def ort_provider_status(short_name: str) -> tuple[bool, str]:
    """Whether an ONNX Runtime provider can run here, and why not when it cannot."""
    import onnxruntime as ort

    name = ORT_PROVIDERS.get(short_name, short_name)
    available = ort.get_available_providers()
    if name in available:
        if name != "CPUExecutionProvider":
            try:
                import torch

                if not torch.cuda.is_available():
                    return False, f"{name}: no CUDA GPU visible"
            except ImportError:
                pass
        return True, ""
    package = "onnxruntime-gpu" if name in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "a build of onnxruntime with it"
    return False, f"{name}: not in this onnxruntime build ({package} not installed or no GPU)"


def session_options(threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    return options


def default_threads() -> int:
    """One thread per available core: the same count is given to PyTorch and ONNX Runtime."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _onnx_metadata(model_path: Path) -> dict[str, str]:
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for damaged files
        raise ArtifactError(f"{model_path}: not a readable ONNX model ({exc.__class__.__name__})") from None
    return {prop.key: prop.value for prop in model.metadata_props}


def _meta_fields(meta: dict[str, Any]) -> dict[str, Any]:
    def load(key: str, default: Any) -> Any:
        value = meta.get(key, default)
        return json.loads(value) if isinstance(value, str) else value

    classes = load("classes", None)
    if not classes:
        raise ArtifactError("model metadata has no class names: export it with unet-edge")
    return {
        "classes": list(classes),
        "mean": tuple(load("mean", [0.485, 0.456, 0.406])),
        "std": tuple(load("std", [0.229, 0.224, 0.225])),
        "ignore_index": load("ignore_index", None),
        "precision": meta.get("precision", "fp32"),
        "input_format": meta.get("input_format", "nchw-float32"),
    }


def open_backend(path: str | os.PathLike[str], provider: str = "cpu", threads: int | None = None) -> Backend:
    """Load a checkpoint, TorchScript file or ONNX file for `provider` (cpu, cuda, tensorrt).

    A file listed in a manifest.json beside it is checked against its sha256 first.
    """
    path = Path(path)
    kind = artifact_format(path)
    entry = check_manifest_sha256(path) if kind != "checkpoint" else None
    if kind == "onnx":
        return _open_onnx(path, provider, threads, entry)
    import torch

    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if provider in ("cuda", "tensorrt") else provider
    if device == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"{path}: provider {provider!r} needs a CUDA GPU, and none is visible")
    if kind == "checkpoint":
        from .checkpoint import load_model

        loaded = load_model(path)
        return TorchBackend(
            loaded.model,
            device=device,
            channels_last=device == "cuda",
            backend="pytorch",
            provider=device,
            precision="fp32",
            path=path,
            classes=loaded.classes,
            mean=loaded.mean,
            std=loaded.std,
            ignore_index=loaded.ignore_index,
            meta={"checkpoint": loaded.state},
        )
    extra = {"unet_edge.json": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError subclasses with long messages
        raise ArtifactError(f"{path}: not a loadable TorchScript model ({str(exc).splitlines()[0][:160]})") from None
    meta = json.loads(extra["unet_edge.json"] or "{}")
    fields = _meta_fields(meta)
    return TorchBackend(
        module,
        device=device,
        backend="torchscript",
        provider=device,
        precision=fields["precision"],
        path=path,
        classes=fields["classes"],
        mean=fields["mean"],
        std=fields["std"],
        ignore_index=fields["ignore_index"],
        meta=meta,
    )


def _open_onnx(path: Path, provider: str, threads: int | None, entry: dict[str, Any] | None) -> Backend:
    import onnxruntime as ort

    ok, reason = ort_provider_status(provider)
    if not ok:
        raise ArtifactError(f"{path}: {reason}")
    meta = _onnx_metadata(path)
    try:
        fields = _meta_fields(meta)
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    ep = ORT_PROVIDERS.get(provider, provider)
    providers = [ep] if ep == "CPUExecutionProvider" else [ep, "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]})") from None
    return OnnxRuntimeBackend(
        session,
        backend="onnxruntime",
        provider=ep,
        precision=(entry or {}).get("precision", fields["precision"]),
        path=path,
        classes=fields["classes"],
        mean=fields["mean"],
        std=fields["std"],
        ignore_index=fields["ignore_index"],
        input_format=fields["input_format"],
        meta=meta,
    )
