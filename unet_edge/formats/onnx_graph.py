"""ONNX graph helpers shared by the ONNX format's export and its variants: the exporter, metadata, checked
atomic saves, module names of graph nodes, and running a graph with its intermediate tensors as outputs.

The exporter is torch.export-based (`dynamo=True`), deliberately: it is PyTorch's maintained path, it
records the padding arithmetic symbolically (so any H x W works, odd sizes included) and yields a graph
with fewer leftover shape ops than the deprecated TorchScript-based exporter. Its per-node module
names are kept (`module_name`) so parity and quantisation can name layers.
"""

from __future__ import annotations

import ast
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import ArtifactError
from .base import FormatOption, Provider, default_threads

__all__ = [
    "DEFAULT_OPSET",
    "E2E_ONNX_FILE",
    "FP16_ONNX_FILE",
    "INT8_ONNX_FILE",
    "ONNX_FILE",
    "OPSET",
    "ORT_PROVIDERS",
    "export_onnx",
    "module_name",
    "run_with_outputs",
    "save_onnx",
    "session_options",
    "set_metadata",
    "with_outputs",
]

ONNX_FILE = "model.onnx"
E2E_ONNX_FILE = "model_e2e.onnx"
FP16_ONNX_FILE = "model_fp16.onnx"
INT8_ONNX_FILE = "model_int8.onnx"
DEFAULT_OPSET = 18
OPSET = FormatOption("opset", DEFAULT_OPSET, "ONNX opset.", min=17)
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
        with_outputs(model, names).SerializeToString(),
        session_options(optimize=False),
        providers=[ORT_PROVIDERS[Provider.CPU]],
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
    batch, height, width = (
        Dim("batch", min=1, max=4096),
        Dim("height", min=1, max=16384),
        Dim("width", min=1, max=16384),
    )
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
    if program is None:  # torch.onnx.export returns None only when writing to a file itself
        raise ArtifactError(f"{path}: ONNX export returned no program")
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


def session_options(threads: int | None = None, optimize: bool = True) -> Any:
    """Sequential execution with `threads` intra-op threads (default: one per core); full graph
    optimisation unless `optimize` is off (to keep intermediate tensors as exported)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    return options
