"""ONNX: export (float, and the end-to-end uint8-in, mask-out variant) and the ONNX Runtime backend.

The graph helpers and the exporter are in `onnx_graph`; fp16 and int8 variants are derived from the float
model by `onnx_quantize`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import NHWC_UINT8, ExportedArtifact, artifact_metadata, io_spec
from ..errors import ArtifactError, UNetEdgeError
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
)
from .onnx_graph import (
    DEFAULT_OPSET,
    E2E_ONNX_FILE,
    FP16_ONNX_FILE,
    INT8_ONNX_FILE,
    ONNX_FILE,
    OPSET,
    ORT_PROVIDERS,
    export_onnx,
    module_name,
    run_with_outputs,
    save_onnx,
    session_options,
    set_metadata,
    with_outputs,
)
from .onnx_quantize import CALIB_METHOD, FOLD_VARIANTS, CalibMethod, export_precisions

__all__ = [
    "DEFAULT_OPSET",
    "E2E_ONNX_FILE",
    "END_TO_END",
    "FORMAT",
    "FP16_ONNX_FILE",
    "INT8_ONNX_FILE",
    "ONNX_FILE",
    "PROBABILITIES",
    "OnnxRuntimeBackend",
    "create_session",
    "export",
    "export_end_to_end",
    "export_onnx",
    "layer_outputs",
    "module_name",
    "ort_provider_status",
    "run_with_outputs",
    "save_onnx",
    "session_options",
    "set_metadata",
    "tensorrt_options",
    "with_outputs",
]

END_TO_END = FormatOption(
    "end_to_end", False, "Also write model_e2e.onnx: uint8 RGB N x H x W x 3 in, uint8 class mask N x H x W out."
)
PROBABILITIES = FormatOption(
    "probabilities", False, "Give model_e2e.onnx a second output, softmax probabilities N x K x H x W."
)


def check_options(options: Mapping[str, Any]) -> None:
    if options.get("probabilities") and not options.get("end_to_end"):
        raise UNetEdgeError("--probabilities only applies to the end-to-end model: add --end-to-end")


def export_end_to_end(
    loaded: Any, folder: Path, *, opset: int = DEFAULT_OPSET, probabilities: bool = False
) -> ExportedArtifact:
    """Export `folder/model_e2e.onnx`: uint8 RGB N x H x W x 3 in, uint8 class mask N x H x W out (and
    softmax probabilities N x K x H x W with `probabilities`), dynamic N, H, W."""
    import torch

    from .end_to_end import EndToEndSegmenter

    module = EndToEndSegmenter(loaded.model, loaded.mean, loaded.std, probabilities).eval()
    sample = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    inputs, outputs = io_spec(len(loaded.classes), input_format=NHWC_UINT8, probabilities=probabilities)
    path = export_onnx(
        module,
        folder / E2E_ONNX_FILE,
        artifact_metadata(loaded, Precision.FP32.value, NHWC_UINT8),
        opset=opset,
        sample=sample,
        output_names=tuple(o["name"] for o in outputs),
        output_shapes=[o["shape"] for o in outputs],
    )
    return ExportedArtifact(E2E_ONNX_FILE, "onnx", "fp32", path, inputs, outputs, opset, {"input_format": NHWC_UINT8})


def export(request: ExportRequest) -> list[ExportedArtifact]:
    """model.onnx (BatchNorm-folded when the request carries a folded model) and, on request, model_e2e.onnx."""
    loaded = request.loaded
    inputs, outputs = io_spec(len(loaded.classes))
    folded = request.folded_model is not None
    opset = request.option(OPSET)
    path = export_onnx(
        request.folded_model if folded else loaded.model,
        request.folder / ONNX_FILE,
        artifact_metadata(loaded, Precision.FP32.value),
        opset=opset,
        output_shapes=[o["shape"] for o in outputs],
    )
    artifacts = [
        ExportedArtifact(ONNX_FILE, "onnx", "fp32", path, inputs, outputs, opset, {"batchnorm_folded": folded})
    ]
    if request.option(END_TO_END):
        artifacts.append(
            export_end_to_end(loaded, request.folder, opset=opset, probabilities=request.option(PROBABILITIES))
        )
    return artifacts


def layer_outputs(path: Path, image: np.ndarray) -> dict[str, np.ndarray]:
    """Module name -> the output of the last graph node exported from that module, for one C x H x W image."""
    import onnx

    model = onnx.load(str(path))
    by_module: dict[str, str] = {}
    for node in model.graph.node:
        name = module_name(node)
        if name and node.output:
            by_module[name] = node.output[0]
    if not by_module:
        return {}
    values = run_with_outputs(model, list(by_module.values()), [image])[0]
    return {name: values[output] for name, output in by_module.items()}


# --- runtime ---------------------------------------------------------------------------------------


class OnnxRuntimeBackend(Backend):
    """An ONNX model in an ONNX Runtime session with one execution provider (falling back to CPU)."""

    def __init__(self, session: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        if self.input_format == NHWC_UINT8:
            raise ArtifactError(f"{self.path}: an end-to-end model returns class masks, not logits")
        feed = np.ascontiguousarray(images, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: feed})[0].astype(np.float32, copy=False)

    def predict_masks(self, images: np.ndarray) -> np.ndarray:
        if self.input_format != NHWC_UINT8:
            return super().predict_masks(images)
        feed = np.ascontiguousarray(images, dtype=np.uint8)
        return self.session.run([self.output_name], {self.input_name: feed})[0]

    def device_runner(self, images: np.ndarray) -> Callable[[], None]:
        feed = np.ascontiguousarray(images, dtype=np.float32)
        if self.provider == ORT_PROVIDERS[Provider.CPU]:
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


def ort_provider_status(provider: Provider | str) -> tuple[bool, str]:
    """Whether an ONNX Runtime provider can run here, and why not when it cannot."""
    import onnxruntime as ort

    name = ORT_PROVIDERS[Provider(provider)]
    if name in ort.get_available_providers():
        if name != ORT_PROVIDERS[Provider.CPU]:
            try:
                import torch

                if not torch.cuda.is_available():
                    return False, f"{name}: no CUDA GPU visible"
            except ImportError:
                pass
        return True, ""
    package = "a build of onnxruntime with it" if name == ORT_PROVIDERS[Provider.CPU] else "onnxruntime-gpu"
    return False, f"{name}: not in this onnxruntime build ({package} not installed or no GPU)"


def _metadata(path: Path) -> dict[str, str]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for damaged files
        raise ArtifactError(f"{path}: not a readable ONNX model ({exc.__class__.__name__})") from None
    return {prop.key: prop.value for prop in model.metadata_props}


def open_model(path: Path, provider: Provider, threads: int | None, entry: dict[str, Any] | None) -> Backend:
    """An ONNX Runtime session for `path` on `provider` (CPU kept as the fallback for unsupported nodes)."""
    ep = FORMAT.runtime_provider(path, provider)
    ok, reason = ort_provider_status(provider)
    if not ok:
        raise ArtifactError(f"{path}: {reason}")
    fields = backend_fields(FORMAT.runtime, ep, path, _metadata(path), entry)
    return OnnxRuntimeBackend(
        create_session(path, provider, threads, nhwc=fields["input_format"] == NHWC_UINT8), **fields
    )


def create_session(path: Path, provider: Provider, threads: int | None = None, *, nhwc: bool = False) -> Any:
    """A session whose first provider is `provider`'s (CPU behind it for nodes it does not take).

    ONNX Runtime falls back to the CPU with only a warning when a GPU provider fails to start (missing
    CUDA libraries, for example); that is refused here, so a report never calls CPU figures CUDA's.
    """
    import onnxruntime as ort

    ep = ORT_PROVIDERS[provider]
    providers: list[Any] = [ep] if provider is Provider.CPU else [ep, ORT_PROVIDERS[Provider.CPU]]
    if provider is Provider.TENSORRT:
        providers = [(ep, tensorrt_options(nhwc=nhwc)), ORT_PROVIDERS[Provider.CUDA], ORT_PROVIDERS[Provider.CPU]]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the fallback warning: checked below instead
            session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]})") from None
    running = session.get_providers()
    if running[0] != ep:
        raise ArtifactError(f"{path}: ONNX Runtime could not start {ep} and would run on {', '.join(running)} instead")
    return session


# TensorRT builds one engine per optimisation profile: one that spans the shapes bench and predict feed
# (any batch up to 32, sides up to 1024), as (batch, side), avoids a rebuild for each new input shape.
TENSORRT_PROFILE = {"min": (1, 32), "opt": (8, 256), "max": (32, 1024)}


def tensorrt_options(cache_dir: Path | None = None, input_name: str = "image", *, nhwc: bool = False) -> dict[str, str]:
    """TensorRT provider options: the shape profile above for the N x 3 x H x W input (N x H x W x 3 with
    `nhwc`, the end-to-end model's), and engine and timing caches on disk (building an engine takes
    minutes; the cache makes every later session start in seconds)."""
    if cache_dir is None:
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unet-edge" / "tensorrt"
    cache_dir.mkdir(parents=True, exist_ok=True)

    def shape(batch_side: tuple[int, int]) -> str:
        batch, side = batch_side
        dims = (batch, side, side, 3) if nhwc else (batch, 3, side, side)
        return f"{input_name}:{'x'.join(str(d) for d in dims)}"

    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache_dir),
        "trt_profile_min_shapes": shape(TENSORRT_PROFILE["min"]),
        "trt_profile_opt_shapes": shape(TENSORRT_PROFILE["opt"]),
        "trt_profile_max_shapes": shape(TENSORRT_PROFILE["max"]),
    }


def _unavailable(provider: Provider) -> str | None:
    return ort_provider_status(provider)[1] or None


# How a program loads this format with its runtime alone: the README's snippet, which deploy writes into EMBEDDING.md.
EMBEDDING = Snippet(
    "ONNX Runtime, with only onnxruntime, numpy and Pillow (`model.onnx`, `model_fp16.onnx` and `model_int8.onnx` "
    "alike: float32 in and out)",
    "import json\n\nimport numpy as np\nimport onnxruntime as ort\nfrom PIL import Image",
    """\
options = ort.SessionOptions()
options.intra_op_num_threads = 4
session = ort.InferenceSession("model.onnx", options, providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
mean, std = (np.array(json.loads(meta[key]), np.float32) for key in ("mean", "std"))
image = np.asarray(Image.open("image.png").convert("RGB"))  # H x W x 3 uint8, any size
x = np.ascontiguousarray(((image / 255.0 - mean) / std).transpose(2, 0, 1)[None], np.float32)  # 1 x 3 x H x W
(logits,) = session.run(["logits"], {"image": x})
mask = logits[0].argmax(0)  # H x W class indices
""",
)


def deploy_options(target: DeployTarget) -> dict[str, Any]:
    """A deploy target's calibration method (any size and batch run: the graph is dynamic)."""
    return {} if target.calibration is None else {CALIB_METHOD.name: CalibMethod(target.calibration)}


FORMAT = Format(
    name="onnx",
    runtime="onnxruntime",
    suffixes=(".onnx",),
    file=ONNX_FILE,
    export=export,
    open=open_model,
    providers=ORT_PROVIDERS,
    unavailable=_unavailable,
    precisions=(Precision.FP32, Precision.FP16, Precision.INT8),
    export_variants=export_precisions,
    options=(OPSET, END_TO_END, PROBABILITIES, FOLD_VARIANTS, CALIB_METHOD),
    check_options=check_options,
    target_options=deploy_options,
    calibrations=tuple(method.value for method in CalibMethod),
    layer_outputs=layer_outputs,
    embedding=EMBEDDING,
    export_seconds=6,
)
