"""INT8 (static, QDQ, per-channel) and FP16 ONNX variants that keep their IoU.

INT8 calibration runs on real training images preprocessed exactly as at evaluation. An accuracy
budget (maximum mIoU drop against the float checkpoint on the validation images) is enforced:
when the quantised model misses it, the convolutions whose int8 outputs depart most from float
(measured layer by layer, as the increase over their inputs' error) are kept in float, a few
more at a time, until the budget holds.
"""

from __future__ import annotations

import ast
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError

__all__ = ["CALIBRATION_METHODS", "Int8Result", "convert_fp16", "layer_errors", "quantize_int8", "quantize_with_budget"]

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


class _Reader:
    """Feeds calibration images one at a time (the ONNX Runtime CalibrationDataReader protocol)."""

    def __init__(self, input_name: str, images: list[np.ndarray]) -> None:
        self.input_name = input_name
        self.images = images
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.images):
            return None
        self.index += 1
        return {self.input_name: self.images[self.index - 1][None]}

    def rewind(self) -> None:
        self.index = 0


def _preprocessed(float_model: Path, workdir: Path) -> Path:
    """quant_pre_process (graph optimisation + ONNX shape inference). Symbolic shape inference is
    skipped: it fails on the dynamic height/width these models have."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = workdir / "preprocessed.onnx"
    quant_pre_process(str(float_model), str(out), skip_symbolic_shape=True)
    return out


def quantize_int8(
    float_model: Path,
    output: Path,
    calibration: list[np.ndarray],
    *,
    method: str = "minmax",
    exclude: tuple[str, ...] = (),
    workdir: Path | None = None,
) -> Path:
    """Static int8 quantisation in QDQ format: per-channel int8 weights, uint8 activations."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIBRATION_METHODS:
        raise ArtifactError(f"unknown calibration method {method!r}: use {', '.join(CALIBRATION_METHODS)}")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        prepared = _preprocessed(float_model, Path(tmp))
        input_name = onnx.load(str(prepared), load_external_data=False).graph.input[0].name
        quantize_static(
            str(prepared),
            str(output),
            _Reader(input_name, calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude),
            calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[method],
            extra_options={"CalibTensorRangeSymmetric": False, "CalibMovingAverage": False},
        )
    return output


def _conv_nodes(model: Any) -> list[Any]:
    return [node for node in model.graph.node if node.op_type in ("Conv", "ConvTranspose")]


def _scope(node: Any) -> str:
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
    if not scopes:
        return node.name
    names = ast.literal_eval(scopes)
    return names[-2] if len(names) >= 2 and names[-2] else node.name


def _run_with_outputs(model: Any, outputs: list[str], images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    import onnx
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in model.graph.output}
    for name in outputs:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return [dict(zip(outputs, session.run(outputs, {input_name: image[None]}))) for image in images]


def layer_errors(float_model: Path, int8_model: Path, images: list[np.ndarray]) -> list[dict[str, Any]]:
    """Per convolution: relative output error of the int8 model against float, and how much of it
    the layer adds over the worst of its inputs (the sensitivity used to pick float fallbacks)."""
    import onnx

    float_proto = onnx.load(str(float_model))
    int8_proto = onnx.load(str(int8_model))
    int8_nodes = {node.name: node for node in _conv_nodes(int8_proto)}
    convs = [node for node in _conv_nodes(float_proto) if node.name in int8_nodes]
    names = [node.output[0] for node in convs]
    float_runs = _run_with_outputs(float_proto, names, images)
    int8_runs = _run_with_outputs(int8_proto, [int8_nodes[n.name].output[0] for n in convs], images)
    errors: dict[str, float] = {}
    for node in convs:
        int8_name = int8_nodes[node.name].output[0]
        num = sum(float(np.abs(f[node.output[0]] - q[int8_name]).mean()) for f, q in zip(float_runs, int8_runs))
        den = sum(float(np.abs(f[node.output[0]]).mean()) for f in float_runs) or 1.0
        errors[node.output[0]] = num / den
    producer = {out: node for node in float_proto.graph.node for out in node.output}

    def upstream_error(tensor: str, seen: set[str]) -> float:
        """The error of the nearest convolutions feeding `tensor`."""
        if tensor in errors:
            return errors[tensor]
        node = producer.get(tensor)
        if node is None or tensor in seen:
            return 0.0
        seen.add(tensor)
        return max((upstream_error(i, seen) for i in node.input if i), default=0.0)

    rows = []
    for node in convs:
        inherited = upstream_error(node.input[0], set())
        rows.append(
            {
                "node": node.name,
                "layer": _scope(node),
                "rel_error": errors[node.output[0]],
                "added_error": errors[node.output[0]] - inherited,
            }
        )
    return rows


@dataclass
class Int8Result:
    path: Path
    miou_drop: float
    miou_int8: float
    miou_reference: float
    kept_float: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    within_budget: bool = True


def quantize_with_budget(
    float_model: Path,
    output: Path,
    calibration: list[np.ndarray],
    evaluate: Callable[[Path], tuple[float, float]],
    *,
    max_miou_drop: float = 0.01,
    method: str = "minmax",
    sensitivity_images: int = 4,
) -> Int8Result:
    """Quantise, then keep the most sensitive convolutions in float until `evaluate(path)` — which
    returns (int8 mIoU, reference mIoU) on validation images — shows a drop within budget."""
    workdir = output.parent
    attempt_path = Path(tempfile.mkstemp(prefix=".int8-", suffix=".onnx", dir=workdir)[1])
    try:
        quantize_int8(float_model, attempt_path, calibration, method=method, workdir=workdir)
        miou, reference = evaluate(attempt_path)
        attempts = [{"kept_float": 0, "miou_drop": reference - miou}]
        kept: list[dict[str, Any]] = []
        if reference - miou > max_miou_drop:
            ranking = sorted(layer_errors(float_model, attempt_path, calibration[:sensitivity_images]), key=lambda r: -r["added_error"])
            counts, count = [], 1
            while count < len(ranking):
                counts.append(count)
                count *= 2
            counts.append(len(ranking))
            for count in counts:
                if reference - miou <= max_miou_drop:
                    break
                kept = ranking[:count]
                quantize_int8(float_model, attempt_path, calibration, method=method, exclude=tuple(r["node"] for r in kept), workdir=workdir)
                miou, reference = evaluate(attempt_path)
                attempts.append({"kept_float": count, "miou_drop": reference - miou})
        os.replace(attempt_path, output)
    finally:
        attempt_path.unlink(missing_ok=True)
    return Int8Result(
        path=output,
        miou_drop=reference - miou,
        miou_int8=miou,
        miou_reference=reference,
        kept_float=kept,
        attempts=attempts,
        within_budget=reference - miou <= max_miou_drop + 1e-12,
    )


def convert_fp16(float_model: Path, output: Path) -> Path:
    """Float16 weights and compute, float32 input and output (so callers feed the same tensors)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(float_model))
    half = convert_float_to_float16(model, keep_io_types=True)
    _topological_sort(half.graph)  # the converter appends its input casts after their consumers
    from .export import save_onnx

    save_onnx(half, output)
    return output


def _topological_sort(graph: Any) -> None:
    """Reorder graph nodes so every node comes after the producers of its inputs (Kahn's order,
    stable with respect to the original order)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        remaining = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):
            raise ArtifactError("fp16 conversion produced a graph with a cycle or a missing input")
        pending = remaining
    copies = [type(node)() for node in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


INT8_ONNX_FILE = "model_int8.onnx"
FP16_ONNX_FILE = "model_fp16.onnx"


@dataclass
class Int8Options:
    calib_data: Path | None = None
    calib_images: int = 32
    calib_method: str = "minmax"
    max_miou_drop: float = 0.01
    fold: bool = True


def _float_source(loaded: Any, workdir: Path, fold: bool, opset: int) -> tuple[Path, bool, str | None]:
    """A float ONNX model to derive variants from: BatchNorm-folded when asked and possible."""
    from .export import artifact_metadata, export_onnx
    from .fold import FoldError, fold_batchnorm

    module, folded, reason = loaded.model, False, None
    if fold:
        try:
            module, folded = fold_batchnorm(loaded.model), True
        except FoldError as exc:
            reason = str(exc)
    path = workdir / "float-source.onnx"
    export_onnx(module, path, artifact_metadata(loaded, "fp32"), opset=opset)
    return path, folded, reason


def _finish(source: Path, target: Path, loaded: Any, precision: str) -> Path:
    """Stamp the artifact metadata (precision included) and write it atomically."""
    import onnx

    from .export import artifact_metadata, save_onnx, set_metadata

    model = onnx.load(str(source))
    set_metadata(model, artifact_metadata(loaded, precision))
    save_onnx(model, target)
    return target


def export_precisions(
    loaded: Any,
    folder: Path,
    precisions: tuple[str, ...],
    *,
    data_root: Path,
    options: Int8Options,
    opset: int = 18,
    progress: Callable[[str], None] | None = None,
) -> list[Any]:
    """Write model_fp16.onnx and/or model_int8.onnx (calibrated, within the mIoU budget) into `folder`."""
    from .backends import TorchBackend
    from .export import ExportedArtifact, _io_spec
    from .parity import compare, load_eval_images, run_backend

    artifacts = []
    inputs, outputs = _io_spec(len(loaded.classes))
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        workdir = Path(tmp)
        source, folded, fold_reason = _float_source(loaded, workdir, options.fold, opset)
        if "fp16" in precisions:
            if progress:
                progress("converting to fp16")
            half = convert_fp16(source, workdir / FP16_ONNX_FILE)
            path = _finish(half, folder / FP16_ONNX_FILE, loaded, "fp16")
            artifacts.append(ExportedArtifact(FP16_ONNX_FILE, "onnx", "fp16", path, inputs, outputs, opset, {"batchnorm_folded": folded}))
        if "int8" in precisions:
            calib_root = Path(options.calib_data) if options.calib_data else data_root
            calibration = load_eval_images(calib_root, loaded.mean, loaded.std, split="train", num_images=options.calib_images).normalised
            val = load_eval_images(data_root, loaded.mean, loaded.std, split="val", num_images=0)
            reference = TorchBackend(
                loaded.model, device="cpu", backend="pytorch", provider="cpu", precision="fp32", path=loaded.path,
                classes=loaded.classes, mean=loaded.mean, std=loaded.std, ignore_index=loaded.ignore_index,
            )
            reference_out = run_backend(reference, val)

            def evaluate(path: Path) -> tuple[float, float]:
                from .backends import open_backend

                if progress:
                    progress(f"checking int8 mIoU on {len(val.raw)} validation images")
                figures = compare(reference_out, run_backend(open_backend(path), val), val.masks, len(loaded.classes), loaded.ignore_index)
                return figures["miou_gt"], figures["miou_gt_reference"]

            if progress:
                progress(f"calibrating int8 on {len(calibration)} training images ({options.calib_method})")
            result = quantize_with_budget(
                source, workdir / INT8_ONNX_FILE, calibration, evaluate, max_miou_drop=options.max_miou_drop, method=options.calib_method
            )
            path = _finish(result.path, folder / INT8_ONNX_FILE, loaded, "int8")
            quantization = {
                "format": "QDQ",
                "weights": "int8, per channel",
                "activations": "uint8, per tensor",
                "calibration": {"method": options.calib_method, "images": len(calibration), "data": str(calib_root), "split": "train"},
                "max_miou_drop": options.max_miou_drop,
                "miou_drop": result.miou_drop,
                "miou_int8": result.miou_int8,
                "miou_reference": result.miou_reference,
                "validation_images": len(val.raw),
                "within_budget": result.within_budget,
                "kept_float": result.kept_float,
                "attempts": result.attempts,
            }
            extra = {"batchnorm_folded": folded, "quantization": quantization}
            if fold_reason:
                extra["fold_skipped"] = fold_reason
            artifacts.append(ExportedArtifact(INT8_ONNX_FILE, "onnx", "int8", path, inputs, outputs, opset, extra))
    return artifacts
