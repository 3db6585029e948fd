"""The ONNX format's reduced-precision variants: INT8 (static, QDQ, per-channel) and FP16 that keep their IoU.

INT8 calibration runs on real training images preprocessed exactly as at evaluation. An accuracy
budget (maximum mIoU drop against the float checkpoint on the validation images) is enforced:
when the quantised model misses it, the convolutions whose int8 outputs depart most from float
(measured layer by layer, as the increase over their inputs' error) are kept in float, a few
more at a time, until the budget holds.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import ExportedArtifact, artifact_metadata, io_spec
from ..errors import ArtifactError
from .base import ExportRequest, FormatOption, Precision, within_budget
from .onnx_graph import (
    FP16_ONNX_FILE,
    INT8_ONNX_FILE,
    ONNX_FILE,
    OPSET,
    export_onnx,
    module_name,
    run_with_outputs,
    save_onnx,
    set_metadata,
)

__all__ = [
    "CALIB_METHOD",
    "FOLD_VARIANTS",
    "CalibMethod",
    "Int8Result",
    "convert_fp16",
    "export_precisions",
    "float_source",
    "layer_errors",
    "quantize_int8",
    "quantize_with_budget",
    "stamp_precision",
]


class CalibMethod(str, Enum):
    """How int8 activation ranges are calibrated (ONNX Runtime's methods)."""

    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"


# The ONNX variants' own options (the other formats' int8 tools have no such choices).
CALIB_METHOD = FormatOption(
    "calib_method", CalibMethod.MINMAX, "int8 activation-range calibration (ONNX Runtime's methods)."
)
FOLD_VARIANTS = FormatOption(
    "fold_variants",
    True,
    "Quantise/convert fp16 and int8 from the BatchNorm-folded graph when the fold is exact (else noted in the "
    "manifest).",
)


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
    method: CalibMethod | str = CalibMethod.MINMAX,
    exclude: tuple[str, ...] = (),
    workdir: Path | None = None,
) -> Path:
    """Static int8 quantisation in QDQ format: per-channel int8 weights, uint8 activations."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    try:
        method = CalibMethod(method)
    except ValueError:
        raise ArtifactError(
            f"unknown calibration method {method!r}: use {', '.join(m.value for m in CalibMethod)}"
        ) from None
    calibrate_method = {
        CalibMethod.MINMAX: CalibrationMethod.MinMax,
        CalibMethod.ENTROPY: CalibrationMethod.Entropy,
        CalibMethod.PERCENTILE: CalibrationMethod.Percentile,
    }[method]
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
            calibrate_method=calibrate_method,
            extra_options={"CalibTensorRangeSymmetric": False, "CalibMovingAverage": False},
        )
    return output


def _conv_nodes(model: Any) -> list[Any]:
    return [node for node in model.graph.node if node.op_type in ("Conv", "ConvTranspose")]


def layer_errors(float_model: Path, int8_model: Path, images: list[np.ndarray]) -> list[dict[str, Any]]:
    """Per convolution: relative output error of the int8 model against float, and how much of it
    the layer adds over the worst of its inputs (the sensitivity used to pick float fallbacks)."""
    import onnx

    float_proto = onnx.load(str(float_model))
    int8_proto = onnx.load(str(int8_model))
    int8_nodes = {node.name: node for node in _conv_nodes(int8_proto)}
    convs = [node for node in _conv_nodes(float_proto) if node.name in int8_nodes]
    names = [node.output[0] for node in convs]
    float_runs = run_with_outputs(float_proto, names, images)
    int8_runs = run_with_outputs(int8_proto, [int8_nodes[n.name].output[0] for n in convs], images)
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
                "layer": module_name(node) or node.name,
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
    method: CalibMethod | str = CalibMethod.MINMAX,
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
            ranking = sorted(
                layer_errors(float_model, attempt_path, calibration[:sensitivity_images]),
                key=lambda r: -r["added_error"],
            )
            counts, count = [], 1
            while count < len(ranking):
                counts.append(count)
                count *= 2
            counts.append(len(ranking))
            for count in counts:
                if reference - miou <= max_miou_drop:
                    break
                kept = ranking[:count]
                quantize_int8(
                    float_model,
                    attempt_path,
                    calibration,
                    method=method,
                    exclude=tuple(r["node"] for r in kept),
                    workdir=workdir,
                )
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
        within_budget=within_budget(reference - miou, max_miou_drop),
    )


def convert_fp16(float_model: Path, output: Path) -> Path:
    """Float16 weights and compute, float32 input and output (so callers feed the same tensors)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(float_model))
    half = convert_float_to_float16(model, keep_io_types=True)
    _topological_sort(half.graph)  # the converter appends its input casts after their consumers
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


def _int8_layout_note() -> str:
    from ..fold import (
        CHANNEL_ALIGNMENT,
        INPUT_CHANNEL_ALIGNMENT,
        MIN_OUTPUT_CHANNELS,
    )  # torch at import: not on --help's path

    return (
        f"channel counts aligned with zero channels (multiples of {CHANNEL_ALIGNMENT}, image to "
        f"{INPUT_CHANNEL_ALIGNMENT}, "
        f"head to at least {MIN_OUTPUT_CHANNELS}); transposed up-sampling as 1x1 conv + pixel shuffle"
    )


def float_source(
    loaded: Any, workdir: Path, fold: bool, opset: int = OPSET.default, *, int8_layout: bool = False
) -> tuple[Path, bool, str | None]:
    """A float ONNX model to derive variants from, in `workdir`: BatchNorm-folded when asked and exact,
    laid out for int8 kernels with `int8_layout` (see fold.py). Returns (path, folded, why the fold was
    skipped or None)."""
    from ..fold import FoldError, fold_batchnorm

    module, folded, reason = loaded.model, False, None
    if fold:
        try:
            module, folded = fold_batchnorm(loaded.model, int8_layout=int8_layout), True
        except FoldError as exc:
            reason = str(exc)
    path = workdir / ("float-source-int8.onnx" if folded and int8_layout else "float-source.onnx")
    export_onnx(module, path, artifact_metadata(loaded, Precision.FP32.value), opset=opset)
    return path, folded, reason


def _exact_fold(loaded: Any, fold: bool) -> tuple[bool, str | None]:
    """Whether the variants start from the BatchNorm-folded graph, and why not when the fold was asked for but is
    not exact."""
    from ..fold import FoldError, fold_batchnorm

    if not fold:
        return False, None
    try:
        fold_batchnorm(loaded.model)
    except FoldError as exc:
        return False, str(exc)
    return True, None


def stamp_precision(source: Path, target: Path, loaded: Any, precision: Precision | str) -> Path:
    """Write `source` to `target` atomically with the artifact metadata for `precision`."""
    import onnx

    model = onnx.load(str(source))
    set_metadata(model, artifact_metadata(loaded, Precision(precision).value))
    save_onnx(model, target)
    return target


def export_precisions(request: ExportRequest) -> list[ExportedArtifact]:
    """Write model_fp16.onnx and/or model_int8.onnx (calibrated, within the mIoU budget) into the request's
    folder, from a float model BatchNorm-folded when the request's fold_variants option says so and the fold is
    exact."""
    loaded, folder, opset = request.loaded, request.folder, request.option(OPSET)
    artifacts = []
    inputs, outputs = io_spec(len(loaded.classes))
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        workdir = Path(tmp)
        folded, fold_reason = _exact_fold(loaded, request.option(FOLD_VARIANTS))
        fold_info = {"batchnorm_folded": folded, **({"fold_skipped": fold_reason} if fold_reason else {})}
        # The plain float graph is exported only where a variant reads it: fp16, and int8 when it is not folded.
        # model.onnx, written by this export just before its variants, is that graph when it was folded alike.
        written = folder / ONNX_FILE
        same_fold = (request.folded_model is not None) == folded
        plain = functools.cache(
            lambda: written if written.is_file() and same_fold else float_source(loaded, workdir, folded, opset)[0]
        )
        if Precision.FP16 in request.precisions:
            request.say("converting to fp16")
            half = convert_fp16(plain(), workdir / FP16_ONNX_FILE)
            path = stamp_precision(half, folder / FP16_ONNX_FILE, loaded, Precision.FP16)
            artifacts.append(
                ExportedArtifact(FP16_ONNX_FILE, "onnx", "fp16", path, inputs, outputs, opset, dict(fold_info))
            )
        if Precision.INT8 in request.precisions:
            request.say("exporting the int8 source graph")
            int8_source = float_source(loaded, workdir, True, opset, int8_layout=True)[0] if folded else plain()
            path, quantization = _int8(request, int8_source, workdir, folded)
            artifacts.append(
                ExportedArtifact(
                    INT8_ONNX_FILE,
                    "onnx",
                    "int8",
                    path,
                    inputs,
                    outputs,
                    opset,
                    {**fold_info, "quantization": quantization},
                )
            )
    return artifacts


def _int8(request: ExportRequest, source: Path, workdir: Path, folded: bool) -> tuple[Path, dict[str, Any]]:
    """Calibrate and quantise `source` within the request's budget: (model_int8.onnx, its quantization record)."""
    import onnxruntime

    budget = request.require_budget(Precision.INT8)
    calibration = budget.calibration()
    method = CalibMethod(request.option(CALIB_METHOD))
    validation_images = [0]

    def evaluate(path: Path) -> tuple[float, float]:
        miou, reference, validation_images[0] = budget.evaluate(path)
        return miou, reference

    request.say(f"calibrating int8 on {len(calibration)} training images ({method.value})")
    result = quantize_with_budget(
        source, workdir / INT8_ONNX_FILE, calibration, evaluate, max_miou_drop=budget.max_miou_drop, method=method
    )
    path = stamp_precision(result.path, request.folder / INT8_ONNX_FILE, request.loaded, Precision.INT8)
    quantization = budget.record(
        Precision.INT8,
        tool=f"onnxruntime {onnxruntime.__version__} quantize_static",
        miou=result.miou_int8,
        reference=result.miou_reference,
        validation_images=validation_images[0],
        format="QDQ",
        weights="int8, per channel",
        activations="uint8, per tensor",
        layout=_int8_layout_note() if folded else "as exported (not folded)",
        calibration=budget.calibration_record(method=method.value),
        kept_float=result.kept_float,
        attempts=result.attempts,
    )
    return path, quantization
