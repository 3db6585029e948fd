"""OpenVINO IR (model.xml + model.bin): export with `openvino.convert_model`, run with the OpenVINO runtime.

The IR keeps dynamic batch, height and width, so any H x W runs. Metadata rides in the IR's rt_info
(section `unet_edge`), and so does the precision to compile with, `inference_precision_hint`, which the
backend passes as INFERENCE_PRECISION_HINT: OpenVINO's CPU plugin computes in bf16 by default on CPUs with
bf16 instructions, so model.xml asks for f32 explicitly, and model_bf16.xml is the same weights with the
bf16 hint. model_int8.xml is quantised by NNCF post-training quantisation on training images and held to
the mIoU budget. Weights are saved in float32 (`save_model` would otherwise compress them to fp16).
"""

from __future__ import annotations

import os
import tempfile
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import METADATA_KEYS, ExportedArtifact, artifact_metadata, io_spec
from ..errors import ArtifactError
from ..io import write_failed
from .base import (
    Backend,
    ExportRequest,
    Format,
    Precision,
    Provider,
    Snippet,
    backend_fields,
    cpp_host,
    default_threads,
    import_runtime,
    needs_runtime,
)

__all__ = ["FORMAT", "OpenVinoBackend", "export", "export_variants", "open_model"]

OPENVINO_FILE = "model.xml"
BF16_OPENVINO_FILE = "model_bf16.xml"
INT8_OPENVINO_FILE = "model_int8.xml"
EXTRA = "openvino"
METADATA_SECTION = "unet_edge"
# The INFERENCE_PRECISION_HINT each precision's IR carries.
PRECISION_HINTS = {Precision.FP32: "f32", Precision.BF16: "bf16", Precision.INT8: "f32"}
HINT_KEY = "inference_precision_hint"


def _openvino() -> Any:
    return import_runtime("openvino", EXTRA)


def _last_line(exc: Exception) -> str:
    """OpenVINO errors start with source locations; the last line says what went wrong."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else exc.__class__.__name__)[:200]


def convert(module: Any) -> Any:
    """The `ov.Model` of a PyTorch module, with dynamic N, H, W and tensors named image/logits."""
    import torch

    ov = _openvino()
    sample = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            model = ov.convert_model(module.eval(), example_input=sample, input=[ov.PartialShape([-1, 3, -1, -1])])
        except Exception as exc:  # the frontends raise their own error types
            raise ArtifactError(f"OpenVINO could not convert the model ({_last_line(exc)})") from None
    model.inputs[0].get_tensor().set_names({"image"})
    model.outputs[0].get_tensor().set_names({"logits"})
    return model


def save(model: Any, path: Path, metadata: dict[str, str], precision: Precision) -> Path:
    """Write `path` (.xml) and its .bin, float32 weights, with `metadata` and the precision hint in rt_info.
    Each file is written to a temporary name and moved into place (weights first)."""
    ov = _openvino()
    for key, value in metadata.items():
        model.set_rt_info(value, [METADATA_SECTION, key])
    model.set_rt_info(PRECISION_HINTS[precision], [METADATA_SECTION, HINT_KEY])
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".openvino-", dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        try:
            ov.save_model(model, str(staged), compress_to_fp16=False)
        except RuntimeError as exc:  # OpenVINO's C++ writer reports a full disk as "basic_ios::clear: iostream error"
            raise write_failed(path, exc) from None
        os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(staged, path)
    return path


def _artifact(
    request: ExportRequest, file: str, precision: Precision, model: Any, extra: dict[str, Any]
) -> ExportedArtifact:
    path = save(model, request.folder / file, artifact_metadata(request.loaded, precision.value), precision)
    inputs, outputs = io_spec(len(request.loaded.classes))
    info = {
        "batchnorm_folded": request.folded_model is not None,
        "compile_config": {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision]},
    }
    return ExportedArtifact(
        file, "openvino", precision.value, path, inputs, outputs, None, {**info, **extra}, [path.with_suffix(".bin")]
    )


def _source(request: ExportRequest) -> Any:
    return request.folded_model if request.folded_model is not None else request.loaded.model


# Each module's conversion, kept while the module lives: the fp32, bf16 and int8 files of one export (and the
# int8 presets tried) start from copies of one conversion instead of converting the module up to four times.
_CONVERTED: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _converted(request: ExportRequest) -> Any:
    """A fresh copy of the OpenVINO model of the request's module (converted on first use)."""
    module = _source(request)
    model = _CONVERTED.get(module)
    if model is None:
        model = _CONVERTED[module] = convert(module)
    return model.clone()


def export(request: ExportRequest) -> list[ExportedArtifact]:
    """model.xml + model.bin: float32, any H x W."""
    request.say("converting to OpenVINO IR")
    return [_artifact(request, OPENVINO_FILE, Precision.FP32, _converted(request), {})]


def export_variants(request: ExportRequest) -> list[ExportedArtifact]:
    """model_bf16.xml (the bf16 precision hint) and/or model_int8.xml (NNCF, within the mIoU budget)."""
    artifacts = []
    if Precision.BF16 in request.precisions:
        artifact = _artifact(request, BF16_OPENVINO_FILE, Precision.BF16, _converted(request), {})
        if request.budget is not None:  # its mIoU drop against the budget, as int8's
            tool = "OpenVINO INFERENCE_PRECISION_HINT bf16 (weights stored in float32)"
            quantization = request.budget.check(artifact.path, Precision.BF16, tool=tool)
            artifact.extra = {**(artifact.extra or {}), "quantization": quantization}
        artifacts.append(artifact)
    if Precision.INT8 in request.precisions:
        artifacts.append(_export_int8(request))
    return artifacts


def _export_int8(request: ExportRequest) -> ExportedArtifact:
    """NNCF post-training quantisation (8-bit weights and activations), performance preset first and the
    mixed preset (asymmetric activations) when that misses the mIoU budget."""
    budget = request.require_budget(Precision.INT8)
    nncf = import_runtime("nncf", EXTRA)
    calibration = budget.calibration()
    dataset = nncf.Dataset(calibration, lambda image: image[None])
    attempts: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix=".openvino-int8-", dir=request.folder) as tmp:
        for preset in (nncf.QuantizationPreset.PERFORMANCE, nncf.QuantizationPreset.MIXED):
            request.say(f"quantising to int8 with NNCF ({preset.value} preset, {len(calibration)} training images)")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantized = nncf.quantize(_converted(request), dataset, preset=preset, subset_size=len(calibration))
            staged = save(
                quantized,
                Path(tmp) / f"{preset.value}.xml",
                artifact_metadata(request.loaded, Precision.INT8.value),
                Precision.INT8,
            )
            miou, reference, validation_images = budget.evaluate(staged)
            attempts.append(
                {"preset": preset.value, "miou_int8": miou, "miou_reference": reference, "miou_drop": reference - miou}
            )
            if budget.within(reference - miou):
                break
        best = min(attempts, key=lambda attempt: attempt["miou_drop"])
        quantization = budget.record(
            Precision.INT8,
            tool=f"nncf {nncf.__version__} quantize",
            miou=best["miou_int8"],
            reference=best["miou_reference"],
            validation_images=validation_images,
            preset=best["preset"],
            weights="int8, per channel, symmetric",
            activations="int8 symmetric" if best["preset"] == "performance" else "uint8 asymmetric",
            calibration=budget.calibration_record(),
            attempts=attempts,
        )
        model = _openvino().Core().read_model(str(Path(tmp) / f"{best['preset']}.xml"))
        return _artifact(request, INT8_OPENVINO_FILE, Precision.INT8, model, {"quantization": quantization})


class OpenVinoBackend(Backend):
    """An IR compiled for one OpenVINO device with the precision hint stored in it."""

    def __init__(self, compiled: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.compiled = compiled

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        return self.compiled(np.ascontiguousarray(images, dtype=np.float32))[0]

    def device_runner(self, images: np.ndarray) -> Callable[[], None]:
        request = self.compiled.create_infer_request()
        feed = np.ascontiguousarray(images, dtype=np.float32)
        return lambda: request.infer({0: feed}, share_inputs=True, share_outputs=True)

    def close(self) -> None:
        del self.compiled


def open_model(path: Path, provider: Provider, threads: int | None, entry: dict[str, Any] | None) -> Backend:
    """Read the IR (and the .bin beside it) and compile it for `provider`'s OpenVINO device, in the precision it asks
    for."""
    ov = _openvino()
    device = FORMAT.runtime_provider(path, provider)
    core = ov.Core()
    try:
        model = core.read_model(str(path))
        meta = {
            key: model.get_rt_info([METADATA_SECTION, key]).astype(str)
            for key in (*METADATA_KEYS, HINT_KEY)
            if model.has_rt_info([METADATA_SECTION, key])
        }
        config = {
            "INFERENCE_NUM_THREADS": threads or default_threads(),
            "INFERENCE_PRECISION_HINT": meta.get(HINT_KEY, "f32"),
        }
        compiled = core.compile_model(model, device, config)
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: OpenVINO cannot load it ({_last_line(exc)})") from None
    return OpenVinoBackend(compiled, **backend_fields(FORMAT.runtime, device, path, meta, entry))


# How a program loads this format with its runtime alone: the README's snippet, which deploy writes into EMBEDDING.md.
EMBEDDING = Snippet(
    "OpenVINO, with only openvino, numpy and Pillow",
    "import json\n\nimport numpy as np\nimport openvino as ov\nfrom PIL import Image",
    """\
core = ov.Core()
model = core.read_model("model.xml")  # model.bin beside it
meta = {key: json.loads(model.get_rt_info(["unet_edge", key]).astype(str)) for key in ("classes", "mean", "std")}
hint = model.get_rt_info(["unet_edge", "inference_precision_hint"]).astype(str)  # "f32"; "bf16" in model_bf16.xml
compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": 4})
image = np.asarray(Image.open("image.png").convert("RGB"))  # H x W x 3 uint8, any size
x = ((image / 255.0 - meta["mean"]) / meta["std"]).transpose(2, 0, 1)[None].astype(np.float32)  # 1 x 3 x H x W
mask = compiled(x)[0][0].argmax(0)  # H x W class indices
""",
    cpp=cpp_host("unet_openvino"),
)


FORMAT = Format(
    name="openvino",
    runtime="openvino",
    suffixes=(".xml",),
    file=OPENVINO_FILE,
    export=export,
    open=open_model,
    providers={Provider.CPU: "CPU"},
    unavailable=needs_runtime("openvino", EXTRA),
    precisions=(Precision.FP32, Precision.BF16, Precision.INT8),
    export_variants=export_variants,
    extra=EXTRA,
    embedding=EMBEDDING,
    export_seconds=3,
)
