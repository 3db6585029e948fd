"""ExecuTorch program (model.pte): torch.export with bounded dynamic shapes, lowered to the XNNPACK backend.

Batches of 1..`max_batch` images and any height and width from 2 to `max_size` run (export's `--max-batch`,
default 8, and `--max-size`, default 1024; `Dim.DYNAMIC` bounds: named dims fail on the model's pad/crop
arithmetic). ExecuTorch plans its memory for the upper bounds (about 4.4 GB of activations for the
default-size model at 8 x 1024 x 1024), so export with the largest input you will
run. It does not refuse larger inputs itself, so the backend does, by the bounds stored in the program's
metadata (`size_contract`). Metadata is a constant method of the program (`unet_edge_metadata`,
a JSON string). model_int8.pte is quantised with the XNNPACK quantizer (pt2e flow: per-channel int8
weights, int8 activations calibrated on training images) and held to the mIoU budget.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import ExportedArtifact, artifact_metadata, io_spec
from ..errors import ArtifactError
from ..io import atomic_path
from .base import (
    Backend,
    DeployTarget,
    ExportRequest,
    Format,
    FormatOption,
    Precision,
    Provider,
    Snippet,
    backend_fields,
    cpp_host,
    default_threads,
    import_runtime,
    needs_runtime,
)
from .pt2e import exported_once

__all__ = ["FORMAT", "ExecuTorchBackend", "export", "export_variants", "open_model"]

EXECUTORCH_FILE = "model.pte"
INT8_EXECUTORCH_FILE = "model_int8.pte"
EXTRA = "executorch"
METADATA_METHOD = "unet_edge_metadata"
MIN_SIDE = 2
# The bounds of programs written before they were export options.
DEFAULT_CONTRACT = {"batch": [1, 8], "height": [MIN_SIDE, 1024], "width": [MIN_SIDE, 1024]}


MAX_BATCH = FormatOption(
    "max_batch", 8, "Largest batch of formats with bounded dynamic shapes, which plan memory for it.", min=1
)
MAX_SIZE = FormatOption(
    "max_size",
    1024,
    "Largest image height and width of formats with bounded dynamic shapes (their memory grows with it: about 4.4 GB "
    "at 8 x 1024 x 1024 for the default-size model).",
    min=MIN_SIDE,
)


def check_options(options: Mapping[str, Any]) -> None:
    """The bounds must be a batch >= 1 and a side >= MIN_SIDE (refused before anything is exported)."""
    max_batch, max_size = (
        options[o.name] if options.get(o.name) is not None else o.default for o in (MAX_BATCH, MAX_SIZE)
    )
    if max_batch < 1 or max_size < MIN_SIDE:
        raise ArtifactError(
            f"ExecuTorch bounds must be a batch >= 1 and a size >= {MIN_SIDE}, got {max_batch} and {max_size}"
        )


def size_contract(request: ExportRequest) -> dict[str, list[int]]:
    """The shapes the program accepts: batch 1..max_batch, height and width 2..max_size."""
    check_options(request.options)
    max_batch, max_size = request.option(MAX_BATCH), request.option(MAX_SIZE)
    return {"batch": [1, max_batch], "height": [MIN_SIDE, max_size], "width": [MIN_SIDE, max_size]}


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]


def _exported_once(module: Any, contract: dict[str, list[int]]) -> Any:
    """`_exported`, traced once per module and contract (the fp32 program and the int8 variant's prepare step)."""
    return exported_once(module, "executorch " + json.dumps(contract, sort_keys=True), lambda m: _exported(m, contract))


def _exported(module: Any, contract: dict[str, list[int]]) -> Any:
    """torch.export of `module` with dynamic batch, height and width within the size contract."""
    import torch

    max_batch, max_side = contract["batch"][1], contract["height"][1]
    # batch 2 where allowed (a sample batch of 1 specialises the batch dimension), sides within the bounds
    sample_shape = (min(2, max_batch), 3, min(64, max_side), min(96, max_side))
    sample = torch.randn(*sample_shape, generator=torch.Generator().manual_seed(0))
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=max_batch)} if max_batch > 1 else {}
    dims.update({axis: torch.export.Dim.DYNAMIC(min=MIN_SIDE, max=max_side) for axis in (2, 3)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module, (sample,), dynamic_shapes={"x": dims})


def _write_program(program: Any, path: Path, metadata: dict[str, str]) -> None:
    """Lower an exported program to XNNPACK and write the .pte atomically, metadata as a constant method."""
    import_runtime("executorch", EXTRA)
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    try:
        lowered = to_edge_transform_and_lower(
            program, partitioner=[XnnpackPartitioner()], constant_methods={METADATA_METHOD: json.dumps(metadata)}
        )
        buffer = lowered.to_executorch().buffer
    except Exception as exc:  # the lowering passes raise many error types
        raise ArtifactError(f"{path}: ExecuTorch could not lower the model to XNNPACK ({_first_line(exc)})") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as staged:
        Path(staged).write_bytes(buffer)


def _source(request: ExportRequest) -> Any:
    return (request.folded_model if request.folded_model is not None else request.loaded.model).eval()


def _metadata(request: ExportRequest, precision: Precision) -> dict[str, str]:
    return {**artifact_metadata(request.loaded, precision.value), "size_contract": json.dumps(size_contract(request))}


def _artifact(request: ExportRequest, file: str, precision: Precision, extra: dict[str, Any]) -> ExportedArtifact:
    inputs, outputs = io_spec(len(request.loaded.classes))
    info = {
        "batchnorm_folded": request.folded_model is not None,
        "size_contract": size_contract(request),
        "delegate": "XNNPACK",
    }
    return ExportedArtifact(
        file, "executorch", precision.value, request.folder / file, inputs, outputs, None, {**info, **extra}
    )


def export(request: ExportRequest) -> list[ExportedArtifact]:
    """model.pte: float32, XNNPACK-delegated, batch 1..max_batch, any H x W from 2 to max_size."""
    contract = size_contract(request)
    request.say("exporting to ExecuTorch (torch.export, XNNPACK)")
    try:
        program = _exported_once(_source(request), contract)
    except Exception as exc:  # torch.export raises many error types
        raise ArtifactError(f"{request.loaded.path}: torch.export failed for ExecuTorch ({_first_line(exc)})") from None
    request.say("lowering fp32 to XNNPACK (to_edge_transform_and_lower)")
    _write_program(program, request.folder / EXECUTORCH_FILE, _metadata(request, Precision.FP32))
    return [_artifact(request, EXECUTORCH_FILE, Precision.FP32, {})]


def export_variants(request: ExportRequest) -> list[ExportedArtifact]:
    """model_int8.pte: XNNPACK quantizer (pt2e), calibrated on training images, checked against the mIoU budget."""
    import torch

    budget = request.require_budget(Precision.INT8)
    import_runtime("executorch", EXTRA)
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from .pt2e import convert_pt2e

    calibration = budget.calibration()
    request.say(f"quantising to int8 with the XNNPACK quantizer ({len(calibration)} training images)")
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    contract = size_contract(request)
    prepared = prepare_pt2e(_exported_once(_source(request), contract).module(), quantizer)
    with torch.no_grad():
        for image in calibration:
            prepared(torch.from_numpy(image)[None])
    path = request.folder / INT8_EXECUTORCH_FILE
    request.say("lowering int8 to XNNPACK (to_edge_transform_and_lower)")
    _write_program(_exported(convert_pt2e(prepared), contract), path, _metadata(request, Precision.INT8))
    quantization = budget.check(
        path,
        Precision.INT8,
        tool="ExecuTorch XNNPACKQuantizer (torchao pt2e prepare/convert)",
        weights="int8, per channel, symmetric",
        activations="int8, per tensor",
        calibration=budget.calibration_record(),
    )
    return [_artifact(request, INT8_EXECUTORCH_FILE, Precision.INT8, {"quantization": quantization})]


class ExecuTorchBackend(Backend):
    """The program's `forward` method on the ExecuTorch runtime (XNNPACK delegate on the CPU)."""

    def __init__(self, method: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.method = method
        try:
            contract = json.loads(self.meta.get("size_contract", "null")) or DEFAULT_CONTRACT
            (min_h, max_h), (min_w, max_w) = ((int(v) for v in contract[axis]) for axis in ("height", "width"))
            self.bounds: tuple[int, tuple[int, int], tuple[int, int]] = (
                int(contract["batch"][1]),
                (min_h, max_h),
                (min_w, max_w),
            )
        except (ValueError, KeyError, TypeError, IndexError):
            raise ArtifactError(f"{self.path}: the program's size_contract metadata is not readable") from None

    def _inputs(self, images: np.ndarray) -> tuple[Any]:
        import torch

        batch, _, height, width = images.shape
        max_batch, (min_h, max_h), (min_w, max_w) = self.bounds
        if not (batch <= max_batch and min_h <= height <= max_h and min_w <= width <= max_w):
            raise ArtifactError(
                f"{self.path}: a batch of {batch} {height}x{width} images is outside the program's bounds "
                f"(batch <= {max_batch}, height {min_h}..{max_h}, width {min_w}..{max_w}; "
                "export with larger --max-batch/--max-size)"
            )
        return (torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)),)

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        """Logits of any number of images, run in batches of at most the program's bound (timing through
        `device_runner` refuses a larger batch instead: it would time another batch size)."""
        step = self.bounds[0]
        chunks = [
            self.method.execute(self._inputs(images[i : i + step]))[0].numpy() for i in range(0, len(images), step)
        ]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def device_runner(self, images: np.ndarray) -> Callable[[], None]:
        inputs = self._inputs(images)
        return lambda: self.method.execute(inputs)

    def close(self) -> None:
        del self.method


_loaded_methods = 0


def _set_threads(threads: int | None, path: Path) -> None:
    """XNNPACK's thread pool is one per process and must be sized before a method is loaded: resizing it
    under a loaded method hangs that method, so once one is loaded an explicit other thread count is
    refused, and no count given (None) keeps the pool as it is."""
    from executorch.extension.pybindings import portable_lib

    current = portable_lib._threadpool_get_thread_count()
    if threads is None:
        threads = current if _loaded_methods else default_threads()
    if current == threads:
        return
    if _loaded_methods:
        raise ArtifactError(
            f"{path}: ExecuTorch already runs with {current} threads in this process; it cannot change to {threads}"
        )
    portable_lib._unsafe_reset_threadpool(threads)


def open_model(path: Path, provider: Provider, threads: int | None, entry: dict[str, Any] | None) -> Backend:
    """Load the program, read its metadata method and load `forward` with `threads` XNNPACK threads."""
    global _loaded_methods
    import_runtime("executorch", EXTRA)
    from executorch.runtime import Runtime

    device = FORMAT.runtime_provider(path, provider)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _set_threads(threads, path)
        try:
            program = Runtime.get().load_program(path)
            if METADATA_METHOD not in program.method_names:
                raise ArtifactError(f"{path}: not a unet-edge ExecuTorch program (no {METADATA_METHOD} method)")
            meta = json.loads(program.load_method(METADATA_METHOD).execute(())[0])
            method = program.load_method("forward")
            _loaded_methods += 1
        except (RuntimeError, ValueError) as exc:
            raise ArtifactError(f"{path}: ExecuTorch cannot load it ({_first_line(exc)})") from None
    return ExecuTorchBackend(method, **backend_fields(FORMAT.runtime, device, path, meta, entry))


def deploy_options(target: DeployTarget) -> dict[str, Any]:
    """Bounds that hold the deploy batch and every side the program must accept (its memory grows with them)."""
    return {MAX_BATCH.name: target.batch_size, MAX_SIZE.name: target.max_side or max(target.image_size)}


# How a program loads this format with its runtime alone: the README's snippet, which deploy writes into EMBEDDING.md.
EMBEDDING = Snippet(
    "ExecuTorch, with only executorch (its Python runtime uses torch tensors), numpy and Pillow",
    "import json\n\nimport numpy as np\nimport torch\nfrom executorch.runtime import Runtime\nfrom PIL import Image",
    """\
program = Runtime.get().load_program("model.pte")  # from executorch.runtime import Runtime
meta = json.loads(program.load_method("unet_edge_metadata").execute(())[0])
mean, std = (np.array(json.loads(meta[key]), np.float32) for key in ("mean", "std"))
forward = program.load_method("forward")
# H x W x 3 uint8, each side 2..the export's --max-size (1024)
image = np.asarray(Image.open("image.png").convert("RGB"))
# 1 x 3 x H x W float32, contiguous
x = np.ascontiguousarray(((image / 255.0 - mean) / std).transpose(2, 0, 1)[None], np.float32)
mask = forward.execute((torch.from_numpy(x),))[0][0].argmax(0).numpy()  # H x W class indices
""",
    cpp=cpp_host("unet_executorch"),
)


FORMAT = Format(
    name="executorch",
    runtime="executorch",
    suffixes=(".pte",),
    file=EXECUTORCH_FILE,
    export=export,
    open=open_model,
    providers={Provider.CPU: "xnnpack"},
    unavailable=needs_runtime("executorch", EXTRA),
    precisions=(Precision.FP32, Precision.INT8),
    export_variants=export_variants,
    options=(MAX_BATCH, MAX_SIZE),
    check_options=check_options,
    target_options=deploy_options,
    extra=EXTRA,
    embedding=EMBEDDING,
    export_seconds=18,
)
