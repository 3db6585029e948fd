"""LiteRT (TFLite) flatbuffer (model.tflite): converted with litert_torch, run with the ai_edge_litert Interpreter.

The converter cannot keep height and width (or batch) dynamic: the model's pad lowers with the shape baked
in. So the model is exported at one size, 1 x 3 x H x W NCHW float32 (`--image-size`, default: the training crop
size), and other images follow one rule: an image smaller than H x W is zero-padded (in normalised space, as the model
pads) at the bottom/right, a larger one is cut into overlapping H x W tiles, each pixel taken from the tile
whose centre is nearest (at least a quarter tile from any inner tile edge); the mask comes back at the
image's own size. The rule is approximate (pad and tile borders see zeros where the checkpoint sees image), so
export at the size the images have: verify on images of another size reports the agreement it costs. Metadata sits in
the sidecar model.json. model_int8.tflite is litert_torch's PT2E
static quantisation (int8 weights per channel, int8 activations, int8 input and output with the scale and
zero point in the tensor details), calibrated on training images and held to the mIoU budget.
"""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import ExportedArtifact, artifact_metadata, io_spec
from ..errors import ArtifactError
from ..io import atomic_write_bytes, atomic_write_text
from .base import (
    IMAGE_SIZE,
    Backend,
    ExportRequest,
    Format,
    Precision,
    Provider,
    Snippet,
    backend_fields,
    default_threads,
    import_runtime,
    needs_runtime,
)

__all__ = ["FORMAT", "LiteRtBackend", "export", "export_variants", "open_model", "tiles"]

LITERT_FILE = "model.tflite"
INT8_LITERT_FILE = "model_int8.tflite"
EXTRA = "litert"
DEFAULT_SIZE = (256, 256)
SIZE_RULE = "smaller images zero-padded bottom/right to the export size; larger ones cut into overlapping tiles of it"


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]


def _spans(length: int, size: int) -> list[tuple[int, int, int]]:
    """(tile start, first kept pixel, end of kept pixels) along one axis: tiles overlap by half a tile and each
    pixel is kept from the tile whose centre is nearest, so it is at least size/4 away from an inner tile edge."""
    if length <= size:
        return [(0, 0, length)]
    starts = [*list(range(0, length - size, size // 2)), length - size]
    bounds = [0] + [(a + b + size) // 2 for a, b in itertools.pairwise(starts)] + [length]
    return [(start, bounds[i], bounds[i + 1]) for i, start in enumerate(starts)]


def tiles(height: int, width: int, size: tuple[int, int]) -> Iterator[tuple[slice, slice, slice, slice]]:
    """For an image of height x width: (tile rows, tile cols) to cut and (kept rows, kept cols) inside the tile."""
    for y, y0, y1 in _spans(height, size[0]):
        for x, x0, x1 in _spans(width, size[1]):
            yield slice(y, y + size[0]), slice(x, x + size[1]), slice(y0 - y, y1 - y), slice(x0 - x, x1 - x)


def _padded(tile: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """C x h x w -> 1 x C x H x W, zeros at the bottom/right."""
    out = np.zeros((1, tile.shape[0], *size), np.float32)
    out[0, :, : tile.shape[1], : tile.shape[2]] = tile
    return out


def _export_size(request: ExportRequest) -> tuple[int, int]:
    """--image-size, else the checkpoint's training crop size (the size its images have), else DEFAULT_SIZE."""
    if request.option(IMAGE_SIZE):
        height, width = request.option(IMAGE_SIZE)
        return int(height), int(width)
    trained = (request.loaded.state.get("train_config") or {}).get("image_size")
    return (int(trained), int(trained)) if trained else DEFAULT_SIZE


def _source(request: ExportRequest) -> Any:
    return (request.folded_model if request.folded_model is not None else request.loaded.model).eval()


def _write(module: Any, size: tuple[int, int], path: Path, metadata: dict[str, str], quant_config: Any = None) -> None:
    """Convert at 1 x 3 x H x W and write the .tflite and its metadata sidecar atomically (sidecar first)."""
    import torch

    litert_torch = import_runtime("litert_torch", EXTRA)
    sample = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            converted = litert_torch.convert(module, (sample,), quant_config=quant_config)
        except Exception as exc:  # the converter raises many error types
            raise ArtifactError(f"{path}: litert_torch could not convert the model ({_first_line(exc)})") from None
    content = converted.model_content()  # bytes: the converter's own file writer aborts the process on a full disk
    atomic_write_text(path.with_suffix(".json"), json.dumps({**metadata, "input_size": list(size)}, indent=2) + "\n")
    atomic_write_bytes(path, content)


def _artifact(
    request: ExportRequest, file: str, precision: Precision, size: tuple[int, int], extra: dict[str, Any]
) -> ExportedArtifact:
    path = request.folder / file
    inputs, outputs = io_spec(len(request.loaded.classes), size=size)
    for spec in (*inputs, *outputs):
        spec["shape"][0] = 1
    info = {
        "batchnorm_folded": request.folded_model is not None,
        "size_contract": {"fixed": list(size), "batch": 1, "other_sizes": SIZE_RULE},
    }
    return ExportedArtifact(
        file, "litert", precision.value, path, inputs, outputs, None, {**info, **extra}, [path.with_suffix(".json")]
    )


def export(request: ExportRequest) -> list[ExportedArtifact]:
    """model.tflite (float32, 1 x 3 x H x W at --image-size) + model.json (metadata)."""
    size = _export_size(request)
    request.say(f"converting to LiteRT at {size[0]}x{size[1]}")
    request.folder.mkdir(parents=True, exist_ok=True)
    _write(
        _source(request), size, request.folder / LITERT_FILE, artifact_metadata(request.loaded, Precision.FP32.value)
    )
    return [_artifact(request, LITERT_FILE, Precision.FP32, size, {})]


def export_variants(request: ExportRequest) -> list[ExportedArtifact]:
    """model_int8.tflite: PT2E static int8 (litert_torch's quantizer), calibrated on training-image tiles, within the
    budget."""
    import torch

    budget = request.require_budget(Precision.INT8)
    import_runtime("litert_torch", EXTRA)
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from .pt2e import convert_pt2e

    size = _export_size(request)
    calibration = budget.calibration()
    request.say(f"quantising to int8 with litert_torch's PT2E quantizer ({len(calibration)} training images)")
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = torch.export.export(_source(request), (torch.zeros(1, 3, *size),)).module()
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for image in calibration:
                for rows, cols, _, _ in tiles(image.shape[1], image.shape[2], size):
                    prepared(torch.from_numpy(_padded(image[:, rows, cols], size)))
        converted = convert_pt2e(prepared, fold_quantize=False)
    path = request.folder / INT8_LITERT_FILE
    request.say(f"converting int8 to LiteRT at {size[0]}x{size[1]}")
    _write(
        converted,
        size,
        path,
        artifact_metadata(request.loaded, Precision.INT8.value),
        QuantConfig(pt2e_quantizer=quantizer),
    )
    quantization = budget.check(
        path,
        Precision.INT8,
        tool="litert_torch PT2EQuantizer (static, torchao pt2e prepare/convert)",
        weights="int8, per channel, symmetric",
        activations="int8, per tensor; int8 input and output (scale and zero point in the tensor details)",
        calibration=budget.calibration_record(),
    )
    return [_artifact(request, INT8_LITERT_FILE, Precision.INT8, size, {"quantization": quantization})]


class LiteRtBackend(Backend):
    """A LiteRT Interpreter (XNNPACK delegate) at its fixed size; other sizes by padding or tiling (see the module)."""

    def __init__(self, interpreter: Any, size: tuple[int, int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.interpreter, self.size = interpreter, size
        self.input, self.output = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

    def _feed(self, tile: np.ndarray) -> None:
        if self.input["dtype"] != np.float32:  # int8 model: quantise with the input's own scale and zero point
            scale, zero = self.input["quantization"]
            info = np.iinfo(self.input["dtype"])
            tile = np.clip(np.round(tile / scale) + zero, info.min, info.max).astype(self.input["dtype"])
        self.interpreter.set_tensor(self.input["index"], tile)

    def _run(self, tile: np.ndarray) -> np.ndarray:
        self._feed(tile)
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self.output["index"])[0]
        if out.dtype != np.float32:
            scale, zero = self.output["quantization"]
            out = (out.astype(np.float32) - zero) * scale
        return out

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        batch, _, height, width = images.shape
        logits = np.empty((batch, self.num_classes, height, width), np.float32)
        for index, image in enumerate(np.asarray(images, np.float32)):
            for rows, cols, keep_rows, keep_cols in tiles(height, width, self.size):
                out = self._run(_padded(image[:, rows, cols], self.size))
                logits[index, :, rows, cols][:, keep_rows, keep_cols] = out[:, keep_rows, keep_cols]
        return logits

    def device_runner(self, images: np.ndarray) -> Callable[[], None]:
        feeds = [
            _padded(image[:, rows, cols], self.size)
            for image in np.asarray(images, np.float32)
            for rows, cols, _, _ in tiles(images.shape[2], images.shape[3], self.size)
        ]

        def run() -> None:
            for feed in feeds:
                self._feed(feed)
                self.interpreter.invoke()

        return run

    def close(self) -> None:
        del self.interpreter


def open_model(path: Path, provider: Provider, threads: int | None, entry: dict[str, Any] | None) -> Backend:
    """Load the flatbuffer into an Interpreter with `threads` threads, metadata and size from the sidecar."""
    litert = import_runtime("ai_edge_litert.interpreter", EXTRA)
    device = FORMAT.runtime_provider(path, provider)
    sidecar = path.with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: metadata file {sidecar.name} is missing beside it") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{sidecar}: not valid metadata ({exc.__class__.__name__})") from None
    try:
        interpreter = litert.Interpreter(model_path=str(path), num_threads=threads or default_threads())
        interpreter.allocate_tensors()
    except (RuntimeError, ValueError) as exc:
        raise ArtifactError(f"{path}: LiteRT cannot load it ({_first_line(exc)})") from None
    height, width = (int(v) for v in interpreter.get_input_details()[0]["shape"][2:])
    size = (height, width)
    return LiteRtBackend(interpreter, size, **backend_fields(FORMAT.runtime, device, path, meta, entry))


# How a program loads this format with its runtime alone: the README's snippet, which deploy writes into EMBEDDING.md.
EMBEDDING = Snippet(
    "LiteRT, with only ai-edge-litert, numpy and Pillow (an image of the export size, `model.json`'s `input_size`)",
    "import json\n\nimport numpy as np\nfrom ai_edge_litert.interpreter import Interpreter\nfrom PIL import Image",
    """\
meta = json.load(open("model.json"))
interpreter = Interpreter(model_path="model.tflite", num_threads=4)  # from ai_edge_litert.interpreter
interpreter.allocate_tensors()
mean, std = (np.array(json.loads(meta[key]), np.float32) for key in ("mean", "std"))
image = np.asarray(Image.open("image.png").convert("RGB"))  # H x W x 3 uint8, H x W = meta["input_size"]
# 1 x 3 x H x W float32, contiguous
x = np.ascontiguousarray(((image / 255.0 - mean) / std).transpose(2, 0, 1)[None], np.float32)
interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
interpreter.invoke()
mask = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0].argmax(0)  # H x W class indices
""",
    notes={
        "int8": "This file has int8 input and output: quantise `x` with the input's `quantization` (scale, zero point) "
        "from `get_input_details()` and dequantise the output with the output's before the argmax."
    },
)


FORMAT = Format(
    name="litert",
    runtime="litert",
    suffixes=(".tflite",),
    file=LITERT_FILE,
    export=export,
    open=open_model,
    providers={Provider.CPU: "xnnpack"},
    unavailable=needs_runtime("ai_edge_litert", EXTRA),
    precisions=(Precision.FP32, Precision.INT8),
    export_variants=export_variants,
    options=(IMAGE_SIZE,),
    target_options=lambda target: {IMAGE_SIZE.name: target.image_size},  # exported at the size it runs at
    dynamic_size=False,
    extra=EXTRA,
    embedding=EMBEDDING,
    export_seconds=10,
)
