"""What every deployable format provides: the `Format` record, the `Backend` it opens, and the choices
(providers, precisions, calibration methods) the CLI offers. Torch-free, so `unet-edge --help` stays fast.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..artifact import NCHW_FLOAT, NHWC_UINT8, ExportedArtifact, read_metadata
from ..errors import ArtifactError

if TYPE_CHECKING:
    from ..checkpoint import LoadedModel

__all__ = [
    "Backend",
    "CalibMethod",
    "ExportRequest",
    "Format",
    "Precision",
    "Provider",
    "backend_fields",
    "default_threads",
    "import_runtime",
    "needs_runtime",
    "preprocess",
]


class Provider(str, Enum):
    """Where a model runs: the names users type. Each format maps the ones it supports to its runtime's own."""

    CPU = "cpu"
    CUDA = "cuda"
    TENSORRT = "tensorrt"

    @property
    def torch_device(self) -> str:
        """The PyTorch device this provider's work lands on (also what bench's roofline is measured on)."""
        return "cpu" if self is Provider.CPU else "cuda"


class Precision(str, Enum):
    """Numeric precision of an exported model's weights and compute."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"


class CalibMethod(str, Enum):
    """How int8 activation ranges are calibrated (ONNX Runtime's methods)."""

    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"


def default_threads() -> int:
    """One thread per available core: the same count is given to every runtime."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def import_runtime(module: str, extra: str) -> Any:
    """Import an optional runtime package, or fail with one line naming the pip extra that installs it."""
    import importlib

    from ..quiet import third_party_output

    try:
        with third_party_output(f"importing {module}"):  # some print deprecation warnings and C++ log lines on import
            return importlib.import_module(module)
    except ImportError:
        raise ArtifactError(f"{module} is not installed: pip install 'unet-edge[{extra}]'") from None


def needs_runtime(module: str, extra: str) -> Callable[[Provider], str | None]:
    """A `Format.unavailable` for a format whose runtime is one optional package: the one-line reason when it is missing."""

    def unavailable(provider: Provider) -> str | None:
        try:
            import_runtime(module, extra)
        except ArtifactError as exc:
            return str(exc)
        return None

    return unavailable


def preprocess(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """H x W x 3 uint8 RGB -> 3 x H x W float32, scaled to [0, 1] then normalised (as at training)."""
    scaled = image.astype(np.float32) / 255.0
    normalised = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))


@dataclass
class Backend:
    """A loaded model plus what it needs to be run and reported. Subclasses implement `predict_logits`
    and `device_runner` (and `predict_masks` for models that return masks)."""

    backend: str
    provider: str
    precision: str
    path: Path
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    ignore_index: int | None
    input_format: str = NCHW_FLOAT
    meta: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)

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
        if self.input_format == NHWC_UINT8:
            return self.predict_masks(images)
        return self.predict_masks(np.stack([preprocess(image, self.mean, self.std) for image in images]))

    def device_runner(self, images: np.ndarray) -> Callable[[], None]:
        """A closure that runs one batch with inputs and outputs already on the device, waiting for it
        to finish (what bench times as latency)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds (sessions, GPU memory)."""


def backend_fields(runtime: str, provider: str, path: Path, meta: dict[str, Any], entry: dict[str, Any] | None) -> dict[str, Any]:
    """A `Backend`'s fields from the metadata stored in a model file (`artifact_metadata`'s keys) and its
    manifest entry (whose precision wins: it is what the export recorded)."""
    info = read_metadata(meta, path)
    return {
        "backend": runtime,
        "provider": provider,
        "precision": (entry or {}).get("precision", info.precision),
        "path": path,
        "classes": info.classes,
        "mean": info.mean,
        "std": info.std,
        "ignore_index": info.ignore_index,
        "input_format": info.input_format,
        "meta": meta,
        "model_config": info.model_config,
    }


@dataclass
class ExportRequest:
    """Everything a format's export needs: the loaded checkpoint, the folder, and the export options.
    A format uses the fields that apply to it and ignores the rest."""

    loaded: LoadedModel
    folder: Path
    opset: int = 18
    # The BatchNorm-folded copy of loaded.model when folding was asked for (formats with a conv graph use it).
    folded_model: Any = None
    end_to_end: bool = False
    probabilities: bool = False
    # Fixed-size formats export at this H x W (dynamic-size formats ignore it).
    image_size: tuple[int, int] | None = None
    # Formats with bounded dynamic shapes (ExecuTorch) accept batches up to max_batch and sides up to max_size.
    max_batch: int = 8
    max_size: int = 1024
    # Reduced-precision variants: which ones, and how they are calibrated and held to the accuracy budget.
    precisions: tuple[Precision, ...] = ()
    fold_variants: bool = True
    data_root: Path | None = None
    calib_data: Path | None = None
    calib_images: int = 32
    calib_method: CalibMethod = CalibMethod.MINMAX
    max_miou_drop: float = 0.01
    progress: Callable[[str], None] | None = None


@dataclass(frozen=True)
class Format:
    """A deployable format: how to export to it, how to run it, and what it supports.

    `export` writes the fp32 artifact(s); `export_variants`, when the format has reduced precisions,
    writes those listed in the request. `open` loads a file for one provider (the sha256 check against
    the manifest is done before it is called). `providers` maps each supported provider to the runtime's
    own name for it; `unavailable` says why a supported provider cannot run on this machine (None: it can).
    """

    name: str
    runtime: str
    suffixes: tuple[str, ...]
    file: str
    export: Callable[[ExportRequest], list[ExportedArtifact]]
    open: Callable[[Path, Provider, int | None, dict[str, Any] | None], Backend]
    providers: Mapping[Provider, str]
    unavailable: Callable[[Provider], str | None]
    precisions: tuple[Precision, ...] = (Precision.FP32,)
    export_variants: Callable[[ExportRequest], list[ExportedArtifact]] | None = None
    # Any H x W at run time (True), or exported at ExportRequest.image_size and run at that size only.
    dynamic_size: bool = True
    # The pip extra that installs this format's exporter and runtime (None: a core dependency).
    extra: str | None = None
    # A content check for files whose suffix alone does not identify the format (archives, for example).
    sniff: Callable[[Path], bool] | None = None
    # Whether its export reads ExportRequest.folded_model (a converted conv graph) when folding is asked for.
    folds_batchnorm: bool = True

    def matches(self, path: Path) -> bool:
        """Whether `path` is a model of this format (by suffix, then by content where a sniff is given)."""
        if self.sniff is not None:
            return self.sniff(path)
        return path.suffix.lower() in self.suffixes

    def runtime_provider(self, path: Path, provider: Provider) -> str:
        """The runtime's name for `provider`, or a one-line error when this format does not run there."""
        if provider not in self.providers:
            supported = ", ".join(p.value for p in self.providers)
            raise ArtifactError(f"{path}: {self.name} models do not run on provider {provider.value!r} (supported: {supported})")
        return self.providers[provider]
