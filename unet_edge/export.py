"""Export a checkpoint to ONNX and TorchScript, with metadata and a manifest.json of what was written.

Every artifact is written to a temporary file and renamed, so a crash never leaves a half-written
model behind, and the manifest records each file's sha256 so that later commands can refuse a
tampered or truncated one.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .checkpoint import LoadedModel, load_model
from .errors import ArtifactError
from .io import atomic_path, atomic_write_text, sha256_file

__all__ = [
    "DEFAULT_OPSET",
    "EndToEndSegmenter",
    "ExportedArtifact",
    "artifact_metadata",
    "export_onnx",
    "export_torchscript",
    "export_artifacts",
    "export_checkpoint",
    "export_end_to_end",
    "find_latest_export",
    "strip_debug_metadata",
    "update_manifest",
]

DEFAULT_OPSET = 18
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.ts"
E2E_ONNX_FILE = "model_e2e.onnx"
# Per-node metadata the exporter adds that would leak local source paths into a shipped model.
# `pkg.torch.onnx.name_scopes` is kept: it maps graph nodes to module names for `verify --explain`.
_DEBUG_KEYS = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "pkg.torch.onnx.class_hierarchy", "namespace")


@dataclass
class ExportedArtifact:
    file: str
    format: str
    precision: str
    path: Path
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    opset: int | None = None
    extra: dict[str, Any] | None = None


def artifact_metadata(loaded: LoadedModel, precision: str, input_format: str = "nchw-float32") -> dict[str, str]:
    """Metadata every artifact carries, as strings (ONNX metadata_props are string pairs)."""
    return {
        "producer": f"unet-edge {__version__}",
        "classes": json.dumps(loaded.classes),
        "num_classes": str(len(loaded.classes)),
        "mean": json.dumps(list(loaded.mean)),
        "std": json.dumps(list(loaded.std)),
        "ignore_index": json.dumps(loaded.ignore_index),
        "precision": precision,
        "input_format": input_format,
        "input_layout": "NCHW float32, RGB, (pixel / 255 - mean) / std"
        if input_format == "nchw-float32"
        else "NHWC uint8 RGB (0-255, no scaling); output mask N x H x W uint8 class indices",
        "model_config": json.dumps(loaded.config.to_dict()),
    }


def _io_spec(num_classes: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    inputs = [{"name": "image", "dtype": "float32", "shape": ["batch", 3, "height", "width"], "layout": "NCHW"}]
    outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", num_classes, "height", "width"], "layout": "NCHW"}]
    return inputs, outputs


class EndToEndSegmenter(nn.Module):
    """uint8 RGB N x H x W x 3 in, uint8 class mask N x H x W out (and optionally softmax probabilities
    N x K x H x W): the scaling, normalisation and argmax a host program would otherwise rewrite."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], probabilities: bool = False) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.probabilities = probabilities

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # The same float32 operations, in the same order, as `backends.preprocess`.
        scaled = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        logits = self.model((scaled - self.mean) / self.std)
        mask = logits.argmax(1).to(torch.uint8)
        return (mask, logits.softmax(1)) if self.probabilities else mask


def _e2e_io_spec(num_classes: int, probabilities: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    inputs = [{"name": "image", "dtype": "uint8", "shape": ["batch", "height", "width", 3], "layout": "NHWC RGB"}]
    outputs = [{"name": "mask", "dtype": "uint8", "shape": ["batch", "height", "width"], "layout": "NHW class index"}]
    if probabilities:
        outputs.append({"name": "probabilities", "dtype": "float32", "shape": ["batch", num_classes, "height", "width"], "layout": "NCHW softmax"})
    return inputs, outputs


def export_end_to_end(loaded: LoadedModel, folder: Path, *, opset: int = DEFAULT_OPSET, probabilities: bool = False) -> ExportedArtifact:
    """Export `folder/model_e2e.onnx`: `EndToEndSegmenter` around the checkpoint's model, dynamic N, H, W."""
    module = EndToEndSegmenter(loaded.model, loaded.mean, loaded.std, probabilities).eval()
    sample = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    inputs, outputs = _e2e_io_spec(len(loaded.classes), probabilities)
    path = export_onnx(
        module,
        folder / E2E_ONNX_FILE,
        artifact_metadata(loaded, "fp32", "nhwc-uint8"),
        opset=opset,
        sample=sample,
        output_names=tuple(o["name"] for o in outputs),
        output_shapes=[o["shape"] for o in outputs],
    )
    return ExportedArtifact(E2E_ONNX_FILE, "onnx", "fp32", path, inputs, outputs, opset, {"input_format": "nhwc-uint8"})


def strip_debug_metadata(model: Any) -> None:
    """Drop exporter debug metadata (stack traces with local file paths) from every node."""
    for node in model.graph.node:
        kept = [prop for prop in node.metadata_props if prop.key not in _DEBUG_KEYS]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


def set_metadata(model: Any, metadata: dict[str, str]) -> None:
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

    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ArtifactError(f"{path}: exported graph fails onnx.checker ({str(exc).splitlines()[0][:200]})") from None
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))


def export_onnx(
    module: nn.Module,
    path: str | os.PathLike[str],
    metadata: dict[str, str],
    *,
    opset: int = DEFAULT_OPSET,
    sample_size: tuple[int, int] = (64, 64),
    input_names: tuple[str, ...] = ("image",),
    output_names: tuple[str, ...] = ("logits",),
    sample: torch.Tensor | None = None,
    output_shapes: list[list[str | int]] | None = None,
) -> Path:
    """Export `module` (N x 3 x H x W float32 in) with dynamic batch, height and width.

    The exporter is torch.export-based (`dynamo=True`), deliberately: it is PyTorch's maintained
    path, it records the padding arithmetic symbolically (so any H x W works, odd sizes included)
    and yields a graph with fewer leftover shape ops than the TorchScript-based exporter, which is
    deprecated. Its per-node module names are kept for `verify --explain`. `output_shapes` renames
    the outputs' dims (the exporter writes the padding arithmetic, e.g. `Min(height, 4*(...))`, where a
    reader wants `height`).
    """
    from torch.export import Dim

    path = Path(path)
    module = module.eval()
    if sample is None:
        sample = torch.randn(2, 3, *sample_size)
    dims = {0: Dim("batch", min=1, max=4096), 1: None, 2: Dim("height", min=1, max=16384), 3: Dim("width", min=1, max=16384)}
    if sample.shape[-1] == 3 and sample.dtype == torch.uint8:  # NHWC uint8 input
        dims = {0: dims[0], 1: dims[2], 2: dims[3], 3: None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module,
                (sample,),
                dynamo=True,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes=({k: v for k, v in dims.items() if v is not None},),
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


def export_torchscript(module: nn.Module, path: str | os.PathLike[str], metadata: dict[str, str]) -> Path:
    """Script (not trace) the model, so the padding logic stays shape-generic; metadata rides along
    as the archive's extra file `unet_edge.json`."""
    path = Path(path)
    with warnings.catch_warnings(), atomic_path(path) as tmp:
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still the format C++ (LibTorch) loads
        scripted = torch.jit.script(module.eval())
        torch.jit.save(scripted, str(tmp), _extra_files={"unet_edge.json": json.dumps(metadata)})
    return path


def artifact_entry(artifact: ExportedArtifact) -> dict[str, Any]:
    entry = {
        "file": artifact.file,
        "format": artifact.format,
        "precision": artifact.precision,
        "sha256": sha256_file(artifact.path),
        "size_bytes": artifact.path.stat().st_size,
        "opset": artifact.opset,
        "inputs": artifact.inputs,
        "outputs": artifact.outputs,
    }
    if artifact.extra:
        entry.update(artifact.extra)
    return entry


def update_manifest(
    folder: Path, loaded: LoadedModel, artifacts: list[ExportedArtifact], parity: dict[str, dict[str, Any]] | None = None
) -> Path:
    """Write (or merge into) folder/manifest.json: entries for `artifacts` replace same-named ones."""
    path = folder / "manifest.json"
    manifest: dict[str, Any] = {}
    if path.is_file():
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            manifest = {}
    checkpoint = {
        "path": str(loaded.path.resolve()),
        "sha256": sha256_file(loaded.path),
        "epoch": loaded.state.get("epoch"),
        "val_miou": (loaded.state.get("metrics") or {}).get("miou"),
    }
    if manifest.get("checkpoint", {}).get("sha256") not in (None, checkpoint["sha256"]):
        manifest["artifacts"] = []  # artifacts of another checkpoint would be mixed in: start afresh
    entries = {e["file"]: e for e in manifest.get("artifacts", []) if (folder / e["file"]).is_file()}
    for artifact in artifacts:
        entries[artifact.file] = artifact_entry(artifact)
    for file, result in (parity or {}).items():
        if file in entries:
            entries[file]["parity"] = result
    manifest.update(
        {
            "producer": f"unet-edge {__version__}",
            "torch_version": torch.__version__,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "checkpoint": checkpoint,
            "classes": loaded.classes,
            "ignore_index": loaded.ignore_index,
            "normalisation": {"mean": list(loaded.mean), "std": list(loaded.std), "scale": "pixel / 255"},
            "model_config": loaded.config.to_dict(),
            "artifacts": sorted(entries.values(), key=lambda e: e["file"]),
        }
    )
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    return path


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    formats: tuple[str, ...] = ("onnx", "torchscript"),
    opset: int = DEFAULT_OPSET,
    end_to_end: bool = False,
    probabilities: bool = False,
    fold: bool = False,
) -> tuple[LoadedModel, Path, list[ExportedArtifact]]:
    """Export fp32 ONNX and/or TorchScript of a checkpoint into `out_dir` (no manifest yet); with
    `end_to_end`, also the uint8-in, mask-out ONNX model (with a `probabilities` output if asked).
    With `fold`, the ONNX graph has its BatchNorms folded into convolutions (exactly; see fold.py)."""
    loaded = load_model(checkpoint)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = artifact_metadata(loaded, "fp32")
    inputs, outputs = _io_spec(len(loaded.classes))
    artifacts: list[ExportedArtifact] = []
    if "onnx" in formats:
        from .fold import fold_batchnorm

        module = fold_batchnorm(loaded.model) if fold else loaded.model
        path = export_onnx(module, folder / ONNX_FILE, metadata, opset=opset, output_shapes=[o["shape"] for o in outputs])
        artifacts.append(ExportedArtifact(ONNX_FILE, "onnx", "fp32", path, inputs, outputs, opset, {"batchnorm_folded": fold}))
    if "torchscript" in formats:
        path = export_torchscript(loaded.model, folder / TORCHSCRIPT_FILE, metadata)
        artifacts.append(ExportedArtifact(TORCHSCRIPT_FILE, "torchscript", "fp32", path, inputs, outputs))
    if end_to_end:
        artifacts.append(export_end_to_end(loaded, folder, opset=opset, probabilities=probabilities))
    return loaded, folder, artifacts


def find_latest_export(out_dir: str | os.PathLike[str] = "exported") -> Path:
    """The newest export folder (the one whose manifest.json changed last)."""
    root = Path(out_dir)
    manifests = sorted(root.glob("*/manifest.json"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not manifests:
        raise ArtifactError(f"{root}: no export found; run `unet-edge export` first or pass model files")
    return manifests[-1].parent


def export_artifacts(folder: str | os.PathLike[str]) -> list[Path]:
    """The model files listed in a folder's manifest.json, in manifest order."""
    from .backends import read_manifest

    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise ArtifactError(f"{folder}: no manifest.json")
    return [folder / entry["file"] for entry in manifest.get("artifacts", [])]
