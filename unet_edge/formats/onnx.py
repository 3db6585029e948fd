"""ONNX: export (float, and the end-to-end uint8-in, mask-out variant), graph helpers, and the ONNX Runtime backend.

The exporter is torch.export-based (`dynamo=True`), deliberately: it is PyTorch's maintained path, it
records the padding arithmetic symbolically (so any H x W works, odd sizes included) and yields a graph
with fewer leftover shape ops than the deprecated TorchScript-based exporter. Its per-node module
names are kept (`module_name`) so parity and quantisation can name layers. fp16 and int8 variants are
derived from the float model by `unet_edge.quantize`.
"""

from __future__ import annotations

import ast
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..artifact import E2E_ONNX_FILE, NHWC_UINT8, ONNX_FILE, ExportedArtifact, artifact_metadata, io_spec
from ..errors import ArtifactError
from .base import Backend, ExportRequest, Format, Precision, Provider, backend_fields, default_threads

__all__ = [
    "DEFAULT_OPSET",
    "FORMAT",
    "OnnxRuntimeBackend",
    "create_session",
    "export",
    "export_end_to_end",
    "export_onnx",
    "module_name",
    "ort_provider_status",
    "run_with_outputs",
    "save_onnx",
    "set_metadata",
    "tensorrt_options",
    "with_outputs",
]

DEFAULT_OPSET = 18
# ONNX Runtime's execution provider for each provider name users type.
ORT_PROVIDERS = {
    Provider.CPU: "CPUExecutionProvider",
    Provider.CUDA: "CUDAExecutionProvider",
    Provider.TENSORRT: "TensorrtExecutionProvider",
}
# Per-node metadata the exporter adds that would leak local source paths into a shipped model.
# `pkg.torch.onnx.name_scopes` is kept: it maps graph nodes to module names (`module_name`).
_DEBUG_KEYS = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "pkg.torch.onnx.class_hierarchy", "namespace")
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"


# --- graph helpers ---------------------------------------------------------------------------------


def strip_debug_metadata(model: Any) -> None:
    """Drop exporter debug metadata (stack traces with local file paths) from every node."""
    for node in model.graph.node:
        kept = [prop for prop in node.metadata_props if prop.key not in _DEBUG_KEYS]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


def set_metadata(model: Any, metadata: dict[str, str]) -> None:
    """Set (or replace) the model's metadata_props."""
    existing = {prop.key: prop for prop in model.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = value
        else:
            prop = model.metadata_props.add()
            prop.key, prop.value = key, value


def save_onnx(model: Any, path: Path) -> None:
    """Check (full check, with shape inference) and write an ONNX model atomically."""
    import onnx

    from ..io import atomic_path

    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ArtifactError(f"{path}: exported graph fails onnx.checker ({str(exc).splitlines()[0][:200]})") from None
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))


def module_name(node: Any) -> str | None:
    """The PyTorch module a graph node was exported from (e.g. `decoder.0.3`), from the exporter's name scopes."""
    scopes = next((p.value for p in node.metadata_props if p.key == _NAME_SCOPES), None)
    if not scopes:
        return None
    names = ast.literal_eval(scopes)
    return names[-2] if len(names) >= 2 and names[-2] else None


def with_outputs(model: Any, names: list[str]) -> Any:
    """A copy of `model` that also returns the intermediate tensors `names` (to compare layer by layer)."""
    import onnx

    copy = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in copy.graph.output}
    copy.graph.output.extend(onnx.ValueInfoProto(name=name) for name in dict.fromkeys(names) if name not in existing)
    return copy


def run_with_outputs(model: Any, names: list[str], images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The tensors `names` of `model` for each C x H x W image, run on CPU without graph optimisation
    (so intermediate tensors are the exported ones, not fused away)."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        with_outputs(model, names).SerializeToString(), session_options(optimize=False), providers=[ORT_PROVIDERS[Provider.CPU]]
    )
    input_name = session.get_inputs()[0].name
    return [dict(zip(names, session.run(names, {input_name: image[None]}))) for image in images]


# --- export ----------------------------------------------------------------------------------------


def export_onnx(
    module: Any,
    path: str | os.PathLike[str],
    metadata: dict[str, str],
    *,
    opset: int = DEFAULT_OPSET,
    sample: Any = None,
    input_names: tuple[str, ...] = ("image",),
    output_names: tuple[str, ...] = ("logits",),
    output_shapes: list[list[str | int]] | None = None,
) -> Path:
    """Export `module` with dynamic batch, height and width (N x 3 x H x W float32 in by default; a uint8
    N x H x W x 3 `sample` exports an NHWC uint8 input). `output_shapes` names the outputs' dims (the
    exporter writes the padding arithmetic, e.g. `Min(height, 4*(...))`, where a reader wants `height`)."""
    import torch
    from torch.export import Dim

    path = Path(path)
    module = module.eval()
    if sample is None:
        sample = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    batch, height, width = Dim("batch", min=1, max=4096), Dim("height", min=1, max=16384), Dim("width", min=1, max=16384)
    nhwc = sample.shape[-1] == 3 and sample.dtype == torch.uint8
    dims = {0: batch, 1: height, 2: width} if nhwc else {0: batch, 2: height, 3: width}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module,
                (sample,),
                dynamo=True,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes=(dims,),
                opset_version=opset,
                optimize=True,
                external_data=False,
                verbose=False,
                report=False,
            )
        except Exception as exc:  # the exporter raises many error types; the first line says what failed
            raise ArtifactError(f"{path}: ONNX export failed ({str(exc).strip().splitlines()[0][:200]})") from None
    model = program.model_proto
    for output, shape in zip(model.graph.output, output_shapes or []):
        for dim, value in zip(output.type.tensor_type.shape.dim, shape):
            if isinstance(value, str):
                dim.dim_param = value
            else:
                dim.dim_value = value
    strip_debug_metadata(model)
    set_metadata(model, metadata)
    model.producer_name = "unet-edge"
    model.producer_version = __version__
    model.doc_string = "UNetStudent semantic segmentation model exported by unet-edge"
    save_onnx(model, path)
    return path


def export_end_to_end(loaded: Any, folder: Path, *, opset: int = DEFAULT_OPSET, probabilities: bool = False) -> ExportedArtifact:
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
    path = export_onnx(
        request.folded_model if folded else loaded.model,
        request.folder / ONNX_FILE,
        artifact_metadata(loaded, Precision.FP32.value),
        opset=request.opset,
        output_shapes=[o["shape"] for o in outputs],
    )
    artifacts = [ExportedArtifact(ONNX_FILE, "onnx", "fp32", path, inputs, outputs, request.opset, {"batchnorm_folded": folded})]
    if request.end_to_end:
        artifacts.append(export_end_to_end(loaded, request.folder, opset=request.opset, probabilities=request.probabilities))
    return artifacts


def export_variants(request: ExportRequest) -> list[ExportedArtifact]:
    """model_fp16.onnx and/or model_int8.onnx (calibrated, within the mIoU budget): see unet_edge.quantize."""
    from ..quantize import export_precisions

    return export_precisions(request)


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


def session_options(threads: int | None = None, optimize: bool = True) -> Any:
    """Sequential execution with `threads` intra-op threads (default: one per core); full graph
    optimisation unless `optimize` is off (to keep intermediate tensors as exported)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    return options


def _metadata(path: Path) -> dict[str, str]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for damaged files
        raise ArtifactError(f"{path}: not a readable ONNX model ({exc.__class__.__name__})") from None
    return {prop.key: prop.value for prop in model.metadata_props}


def open_model(path: Path, provider: Provider, threads: int | None, entry: dict[str, Any] | None) -> Backend:
    """An ONNX Runtime session for `path` on `provider` (CPU kept as the fallback for unsupported nodes)."""
    import onnxruntime as ort

    ep = FORMAT.runtime_provider(path, provider)
    ok, reason = ort_provider_status(provider)
    if not ok:
        raise ArtifactError(f"{path}: {reason}")
    fields = backend_fields(FORMAT.runtime, ep, path, _metadata(path), entry)
    return OnnxRuntimeBackend(create_session(path, provider, threads, nhwc=fields["input_format"] == NHWC_UINT8), **fields)


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
    export_variants=export_variants,
)
