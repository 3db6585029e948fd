"""What every deployable format provides: the `Format` record, the `Backend` it opens, the choices (providers,
precisions) the CLI offers, and the deploy target each format maps onto its own export options. Torch-free, so
`unet-edge --help` stays fast.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from ..artifact import NCHW_FLOAT, NHWC_UINT8, ExportedArtifact, read_metadata
from ..errors import ArtifactError, UNetEdgeError
from ..images import preprocess

if TYPE_CHECKING:
    from ..checkpoint import LoadedModel

__all__ = [
    "BUDGET_TOLERANCE",
    "IMAGE_SIZE",
    "Backend",
    "DeployTarget",
    "ExportRequest",
    "Format",
    "FormatOption",
    "Precision",
    "Provider",
    "QuantBudget",
    "Snippet",
    "backend_fields",
    "cpp_host",
    "default_threads",
    "import_runtime",
    "needs_runtime",
    "parse_size",
    "preprocess",
    "within_budget",
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


# Threads every runtime gets when a command is not given a count, instead of one per core: for jobs that share
# the machine (several runs side by side, a test suite with one worker per core).
THREADS_ENV = "UNET_EDGE_THREADS"


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _env_threads() -> int | None:
    """$UNET_EDGE_THREADS as a count, None when it is not set."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise UNetEdgeError(f"{THREADS_ENV}={value!r}: must be a whole number of threads >= 1")
    return int(value)


def default_threads() -> int:
    """The thread count every runtime gets when none is asked for: $UNET_EDGE_THREADS when set, else one per
    available core."""
    return _env_threads() or available_cores()


def requested_threads(threads: int | None) -> int | None:
    """`threads`, else $UNET_EDGE_THREADS when set, else None (the runtime keeps its own default: PyTorch's is one
    per core, or $OMP_NUM_THREADS)."""
    return threads or _env_threads()


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
    """A `Format.unavailable` for a format whose runtime is one optional package: the one-line reason when it is
    missing."""

    def unavailable(provider: Provider) -> str | None:
        try:
            import_runtime(module, extra)
        except ArtifactError as exc:
            return str(exc)
        return None

    return unavailable


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


def backend_fields(
    runtime: str, provider: str, path: Path, meta: dict[str, Any], entry: dict[str, Any] | None
) -> dict[str, Any]:
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


@dataclass(frozen=True)
class FormatOption:
    """An export option a format declares (ONNX's opset, ExecuTorch's bounds, ...): declared once, in the format's
    module, and offered by `unet-edge export` as `--NAME` (dashes for underscores) with this default and help.

    `parse` turns the command line's text into the value (None: the value as typed); it raises ValueError with
    the reason for text it refuses. Several formats may declare the same option object (one shared declaration).
    """

    name: str
    default: Any
    help: str
    type: Any = None  # the command line's type (default: the default's type)
    parse: Callable[[Any], Any] | None = None
    min: float | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def parse_size(text: str) -> tuple[int, int]:
    """S or HxW -> (height, width); ValueError for anything else."""
    parts = str(text).lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"expected S or HxW, got {text!r}") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise ValueError(f"expected S or HxW, got {text!r}")
    return (values[0], values[-1])


# Declared here because more than one format reads it: the H x W of formats exported at one size.
IMAGE_SIZE = FormatOption(
    "image_size",
    None,
    "S or HxW: the fixed input size of formats that need one (default: the checkpoint's training crop size, else 256). "
    "Other image sizes are padded or tiled to it.",
    type=Optional[str],  # noqa: UP045  # handed to Typer as an option type at run time, where Optional is its spelling
    parse=parse_size,
)


# A drop equal to the budget passes; float noise in the last bits must not turn it into a failure.
BUDGET_TOLERANCE = 1e-12


def within_budget(miou_drop: float, max_miou_drop: float) -> bool:
    """Whether an mIoU drop keeps to the budget: the one comparison export, verify and deploy make."""
    return miou_drop <= max_miou_drop + BUDGET_TOLERANCE


@dataclass(frozen=True)
class DeployTarget:
    """What an artifact is deployed at, in the terms of the deployment rather than of any format: the image
    size and batch it runs at, the longest image side it must accept (validation images included), and the
    int8 calibration method (None: each format's default). `Format.options_for` maps it onto a format's own
    export options."""

    image_size: tuple[int, int]
    batch_size: int = 1
    max_side: int | None = None
    calibration: str | None = None


@dataclass
class QuantBudget:
    """What a reduced-precision variant is calibrated on and held to: built once per export by the pipeline, so
    the checkpoint's own validation predictions are computed once however many variants are checked.

    `evaluate(path)` -> (the file's val mIoU, the checkpoint's, the number of validation images);
    `calibration()` -> normalised training images (C x H x W float32), loaded on first use.
    """

    max_miou_drop: float
    calibration_data: Path
    calibration: Callable[[], list[np.ndarray]]
    evaluate: Callable[[Path], tuple[float, float, int]]

    def within(self, miou_drop: float) -> bool:
        return within_budget(miou_drop, self.max_miou_drop)

    def calibration_record(self, **details: Any) -> dict[str, Any]:
        """The manifest's `calibration` entry: how many training images of which dataset (and `details`: the method)."""
        return {**details, "images": len(self.calibration()), "data": str(self.calibration_data), "split": "train"}

    def record(
        self, precision: Precision, *, tool: str, miou: float, reference: float, validation_images: int, **details: Any
    ) -> dict[str, Any]:
        """The manifest's quantization record of one reduced-precision file (the one builder every format uses):
        the tool and `details` (weights, activations, calibration, attempts, ...) beside its val mIoU against
        the checkpoint's and the budget."""
        return {
            "precision": precision.value,
            "tool": tool,
            **details,
            "max_miou_drop": self.max_miou_drop,
            "miou_drop": reference - miou,
            f"miou_{precision.value}": miou,
            "miou_reference": reference,
            "validation_images": validation_images,
            "within_budget": self.within(reference - miou),
        }

    def check(self, path: Path, precision: Precision, *, tool: str, **details: Any) -> dict[str, Any]:
        """Measure the file at `path` on the validation images and return its quantization record."""
        miou, reference, images = self.evaluate(path)
        return self.record(precision, tool=tool, miou=miou, reference=reference, validation_images=images, **details)


@dataclass
class ExportRequest:
    """Everything a format's export needs: the loaded checkpoint, the folder, the format options by name (the
    `FormatOption`s formats declare; `option` gives a declared option's value or its default), and for
    reduced-precision variants the precisions asked for and the budget they are held to."""

    loaded: LoadedModel
    folder: Path
    # The BatchNorm-folded copy of loaded.model when folding was asked for (formats with a conv graph use it).
    folded_model: Any = None
    options: Mapping[str, Any] = field(default_factory=dict)
    precisions: tuple[Precision, ...] = ()
    # None when the export has no dataset: variants that need calibration or a budget check are refused.
    budget: QuantBudget | None = None
    progress: Callable[[str], None] | None = None

    def option(self, option: FormatOption) -> Any:
        value = self.options.get(option.name)
        return option.default if value is None else value

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    def require_budget(self, precision: Precision) -> QuantBudget:
        """The budget, or the one-line error of a variant that cannot be made without a dataset."""
        if self.budget is None:
            raise ArtifactError(
                f"{self.loaded.path}: {precision.value} needs a dataset to calibrate on and to check the mIoU budget"
            )
        return self.budget


@dataclass(frozen=True)
class Snippet:
    """How a program loads a format's file and segments one image with its runtime alone: the README's lead-in
    line, the imports the code assumes, the code (naming the fp32 export's files), and notes by precision for
    variants whose interface differs (an int8 input, for example). `cpp`: the shell lines that build and run the
    format's C++ host from examples/cpp (`cpp_host`), with `{model}` for the model file; empty when it has none."""

    intro: str
    imports: str
    code: str
    notes: Mapping[str, str] = field(default_factory=dict)
    cpp: str = ""


# examples/cpp's CMake option of each C++ host program.
CPP_HOSTS = {
    "unet_openvino": "UNET_EDGE_OPENVINO",
    "unet_executorch": "UNET_EDGE_EXECUTORCH",
    "unet_aoti": "UNET_EDGE_AOTI",
}


def cpp_host(program: str) -> str:
    """Build examples/cpp's `program` alone (the other runtimes switched off) and run it on `{model}`."""
    others = " ".join(f"-D{option}=OFF" for name, option in CPP_HOSTS.items() if name != program)
    return (
        "# in a clone of unet-edge; python3 has unet-edge and its extras installed (CMake finds the runtimes there)\n"
        f'cmake -S examples/cpp -B build -DPython3_EXECUTABLE="$(command -v python3)" {others}\n'
        "cmake --build build -j2\n"
        f"build/{program} {{model}} image.png mask.png  # manifest.json beside the model: its sha256 is checked\n"
        f"build/{program} {{model}} image.png mask.png --repeat 30  # also prints the inference latency as JSON\n"
    )


@dataclass(frozen=True)
class Format:
    """A deployable format: how to export to it, how to run it, and what it supports.

    `export` writes the fp32 artifact(s) (None: a read-only format, such as the training checkpoint, that
    bench, verify and predict open but export never writes); `export_variants`, when the format has reduced
    precisions, writes those listed in the request. `open` loads a file for one provider (the sha256 check
    against the manifest is done before it is called). `providers` maps each supported provider to the
    runtime's own name for it; `unavailable` says why a supported provider cannot run on this machine
    (None: it can). `options` are the export options it reads (see `FormatOption`); `check_options` refuses
    a combination of them before anything is written.
    """

    name: str
    runtime: str
    suffixes: tuple[str, ...]
    open: Callable[[Path, Provider, int | None, dict[str, Any] | None], Backend]
    providers: Mapping[Provider, str]
    unavailable: Callable[[Provider], str | None]
    file: str = ""  # the fp32 file an export writes
    export: Callable[[ExportRequest], list[ExportedArtifact]] | None = None
    precisions: tuple[Precision, ...] = (Precision.FP32,)
    export_variants: Callable[[ExportRequest], list[ExportedArtifact]] | None = None
    options: tuple[FormatOption, ...] = ()
    check_options: Callable[[Mapping[str, Any]], None] | None = None
    # Any H x W at run time (True), or exported at the request's image size and run at that size only.
    dynamic_size: bool = True
    # The pip extra that installs this format's exporter and runtime (None: a core dependency).
    extra: str | None = None
    # A content check for files whose suffix alone does not identify the format (archives, for example).
    sniff: Callable[[Path], bool] | None = None
    # Whether its export reads ExportRequest.folded_model (a converted conv graph) when folding is asked for.
    folds_batchnorm: bool = True
    # Runs on PyTorch, so bench's PyTorch variants (eager, channels-last, compile) and dtypes apply to it.
    torch_variants: bool = False
    # Module name -> that layer's output, for the first image (float NCHW); lets parity name the first layer
    # whose output departs from PyTorch's. None: the format's runtime does not expose its layers.
    layer_outputs: Callable[[Path, np.ndarray], dict[str, np.ndarray]] | None = None
    # The embedding snippet deploy writes beside the model it chooses (None: it says there is none).
    embedding: Snippet | None = None
    # A deploy target -> this format's export options (None: it reads none of the target).
    target_options: Callable[[DeployTarget], Mapping[str, Any]] | None = None
    # The int8 calibration methods its export offers, the default first (empty: no choice).
    calibrations: tuple[str, ...] = ()
    # About how many seconds one precision of a small model's export takes on one core (conversion and parity), so
    # that deploy starts the longest exports first and no worker is left converting alone at the end. A ranking,
    # not a promise: measured on a 2-core AMD EPYC for base-8 and base-16 UNetStudents (benchmarks/README.md).
    export_seconds: float = 1.0

    @property
    def exportable(self) -> bool:
        return self.export is not None

    def options_for(self, target: DeployTarget) -> dict[str, Any]:
        """The export options that make this format's artifact fit `target` (empty: its defaults do)."""
        return dict(self.target_options(target)) if self.target_options is not None else {}

    def matches(self, path: Path) -> bool:
        """Whether `path` is a model of this format (by suffix, then by content where a sniff is given)."""
        if self.sniff is not None:
            return self.sniff(path)
        return path.suffix.lower() in self.suffixes

    def runtime_provider(self, path: Path, provider: Provider) -> str:
        """The runtime's name for `provider`, or a one-line error when this format does not run there."""
        if provider not in self.providers:
            supported = ", ".join(p.value for p in self.providers)
            raise ArtifactError(
                f"{path}: {self.name} models do not run on provider {provider.value!r} (supported: {supported})"
            )
        return self.providers[provider]
