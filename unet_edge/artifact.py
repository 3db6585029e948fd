"""The artifact contract: the metadata every exported model carries, and manifest.json.

An export folder holds model files and one `manifest.json` listing each with its sha256, size,
format, precision and input/output spec, plus the source checkpoint, classes, normalisation and the
parity results measured at export. Later commands read the metadata back (`read_metadata`) and refuse
a file whose sha256 no longer matches the manifest (`check_manifest_sha256`). Torch-free: the
manifest can be read, and a model file checked, on a machine without PyTorch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import ArtifactError
from .io import atomic_write_text, newest, sha256_file

if TYPE_CHECKING:
    from .checkpoint import LoadedModel

__all__ = [
    "MANIFEST_FILE",
    "METADATA_KEYS",
    "ExportedArtifact",
    "ModelInfo",
    "artifact_bytes",
    "artifact_metadata",
    "artifacts_or_latest",
    "check_manifest_sha256",
    "export_artifacts",
    "find_latest_export",
    "io_spec",
    "manifest_checkpoint",
    "manifest_entry",
    "read_manifest",
    "read_metadata",
    "write_manifest",
]

MANIFEST_FILE = "manifest.json"

NCHW_FLOAT = "nchw-float32"
NHWC_UINT8 = "nhwc-uint8"
# Every key is a string (ONNX metadata_props are string pairs); lists and numbers are JSON-encoded.
METADATA_KEYS = (
    "producer",
    "classes",
    "num_classes",
    "mean",
    "std",
    "ignore_index",
    "precision",
    "input_format",
    "input_layout",
    "model_config",
)
_INPUT_LAYOUTS = {
    NCHW_FLOAT: "NCHW float32, RGB, (pixel / 255 - mean) / std",
    NHWC_UINT8: "NHWC uint8 RGB (0-255, no scaling); output mask N x H x W uint8 class indices",
}


@dataclass
class ExportedArtifact:
    """One model file just written, with what its manifest entry records. `extra` adds format-specific
    keys to the entry (e.g. `batchnorm_folded`, `quantization`, `input_format`); `companions` are further
    files the model needs beside it (weights next to a graph), each sha256-checked like the model."""

    file: str
    format: str
    precision: str
    path: Path
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    opset: int | None = None
    extra: dict[str, Any] | None = None
    companions: list[Path] = field(default_factory=list)


def artifact_metadata(loaded: LoadedModel, precision: str, input_format: str = NCHW_FLOAT) -> dict[str, str]:
    """The metadata every artifact carries (the keys of METADATA_KEYS), as strings."""
    return {
        "producer": f"unet-edge {__version__}",
        "classes": json.dumps(loaded.classes),
        "num_classes": str(len(loaded.classes)),
        "mean": json.dumps(list(loaded.mean)),
        "std": json.dumps(list(loaded.std)),
        "ignore_index": json.dumps(loaded.ignore_index),
        "precision": precision,
        "input_format": input_format,
        "input_layout": _INPUT_LAYOUTS[input_format],
        "model_config": json.dumps(loaded.config.to_dict()),
    }


@dataclass
class ModelInfo:
    """What a runtime needs to feed a model and name its outputs, read back from its metadata."""

    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    ignore_index: int | None
    precision: str
    input_format: str
    model_config: dict[str, Any]


def read_metadata(meta: dict[str, Any], path: str | os.PathLike[str]) -> ModelInfo:
    """Parse `artifact_metadata` back (values may be JSON strings or already decoded)."""

    def load(key: str, default: Any) -> Any:
        value = meta.get(key, default)
        return json.loads(value) if isinstance(value, str) else value

    classes = load("classes", None)
    if not classes:
        raise ArtifactError(f"{path}: model metadata has no class names: export it with unet-edge")
    return ModelInfo(
        classes=list(classes),
        mean=tuple(load("mean", [0.485, 0.456, 0.406])),
        std=tuple(load("std", [0.229, 0.224, 0.225])),
        ignore_index=load("ignore_index", None),
        precision=meta.get("precision", "fp32"),
        input_format=meta.get("input_format", NCHW_FLOAT),
        model_config=dict(load("model_config", {}) or {}),
    )


def io_spec(
    num_classes: int,
    *,
    input_format: str = NCHW_FLOAT,
    probabilities: bool = False,
    size: tuple[int, int] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The manifest's input and output spec: names, dtypes, layouts and shapes (symbolic `height`/`width`,
    or the fixed `size` for formats exported at one size)."""
    height, width = size or ("height", "width")
    if input_format == NCHW_FLOAT:
        inputs = [{"name": "image", "dtype": "float32", "shape": ["batch", 3, height, width], "layout": "NCHW"}]
        outputs = [
            {"name": "logits", "dtype": "float32", "shape": ["batch", num_classes, height, width], "layout": "NCHW"}
        ]
        return inputs, outputs
    inputs = [{"name": "image", "dtype": "uint8", "shape": ["batch", height, width, 3], "layout": "NHWC RGB"}]
    outputs = [{"name": "mask", "dtype": "uint8", "shape": ["batch", height, width], "layout": "NHW class index"}]
    if probabilities:
        outputs.append(
            {
                "name": "probabilities",
                "dtype": "float32",
                "shape": ["batch", num_classes, height, width],
                "layout": "NCHW softmax",
            }
        )
    return inputs, outputs


def _file_record(path: Path) -> dict[str, Any]:
    return {"file": path.name, "sha256": sha256_file(path), "size_bytes": path.stat().st_size}


def _entry(artifact: ExportedArtifact) -> dict[str, Any]:
    entry = {
        **_file_record(artifact.path),
        "format": artifact.format,
        "precision": artifact.precision,
        "opset": artifact.opset,
        "inputs": artifact.inputs,
        "outputs": artifact.outputs,
    }
    if artifact.companions:
        entry["companions"] = [_file_record(path) for path in artifact.companions]
    entry.update(artifact.extra or {})
    return entry


def write_manifest(
    folder: Path,
    loaded: LoadedModel,
    artifacts: list[ExportedArtifact],
    parity: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write folder/manifest.json once per export: entries for `artifacts` (with their `parity` results, by
    file name) replace same-named ones; entries of earlier exports of the same checkpoint whose files are
    still there are kept; a manifest of another checkpoint is started afresh."""
    import torch

    path = folder / MANIFEST_FILE
    try:
        manifest = read_manifest(folder) or {}
    except ArtifactError:
        manifest = {}  # an unreadable manifest is replaced, not merged
    checkpoint = {
        "path": str(loaded.path.resolve()),
        "sha256": sha256_file(loaded.path),
        "epoch": loaded.state.get("epoch"),
        "val_miou": (loaded.state.get("metrics") or {}).get("miou"),
    }
    if manifest.get("checkpoint", {}).get("sha256") not in (None, checkpoint["sha256"]):
        manifest["artifacts"] = []
    entries: dict[str, dict[str, Any]] = {
        e["file"]: e for e in manifest.get("artifacts", []) if (folder / e["file"]).is_file()
    }
    for artifact in artifacts:
        entries[artifact.file] = _entry(artifact)
    for file, result in (parity or {}).items():
        if file in entries:
            entries[file]["parity"] = result
    manifest.update(
        {
            "producer": f"unet-edge {__version__}",
            "torch_version": torch.__version__,
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
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


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """folder/manifest.json, or None when there is none."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not a valid manifest ({exc})") from None


def manifest_entry(path: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(manifest, the artifact's entry in it) for a file that sits beside a manifest.json."""
    path = Path(path)
    manifest = read_manifest(path.parent)
    if manifest is None:
        return None, None
    entry = next((e for e in manifest.get("artifacts", []) if e.get("file") == path.name), None)
    return manifest, entry


def artifact_bytes(path: str | os.PathLike[str]) -> int:
    """What a model takes on disk: its file plus the companions its manifest entry lists (OpenVINO's .bin,
    ncnn's .bin), so a format that splits graph and weights is not reported at the size of its graph."""
    path = Path(path)
    _, entry = manifest_entry(path)
    companions = [path.parent / c["file"] for c in (entry or {}).get("companions", [])]
    return path.stat().st_size + sum(c.stat().st_size for c in companions if c.is_file())


def _check_file(path: Path, record: dict[str, Any]) -> None:
    expected = record.get("sha256")
    if not path.is_file():
        raise ArtifactError(f"{path}: listed in {MANIFEST_FILE} but missing")
    actual = sha256_file(path)
    if expected and actual != expected:
        size = path.stat().st_size
        hint = (
            f"truncated: {size} of {record['size_bytes']} bytes" if size < record.get("size_bytes", 0) else "modified"
        )
        raise ArtifactError(
            f"{path}: sha256 {actual[:12]}... does not match {MANIFEST_FILE} ({expected[:12]}...): file was {hint}"
        )


def check_manifest_sha256(path: str | os.PathLike[str], entry: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Before anything runs a model file, its sha256 (and its companions') must match its manifest entry:
    `entry` when given, else the entry in the manifest.json beside it (None when it is not listed)."""
    path = Path(path)
    if entry is None:
        entry = manifest_entry(path)[1]
    if entry is None:
        return None
    _check_file(path, entry)
    for companion in entry.get("companions", []):
        _check_file(path.parent / companion["file"], companion)
    return entry


def find_latest_export(out_dir: str | os.PathLike[str] = "exported") -> Path:
    """The newest export folder (the one whose manifest.json changed last)."""
    manifest = newest(out_dir, f"*/{MANIFEST_FILE}")
    if manifest is None:
        raise ArtifactError(f"{out_dir}: no export found; run `unet-edge export` first or pass model files")
    return manifest.parent


def export_artifacts(folder: str | os.PathLike[str]) -> list[Path]:
    """The model files listed in a folder's manifest.json, in manifest order."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise ArtifactError(f"{folder}: no {MANIFEST_FILE}")
    return [folder / entry["file"] for entry in manifest.get("artifacts", [])]


def single_artifact(folder: str | os.PathLike[str]) -> Path:
    """The model file of a folder whose manifest lists exactly one (as `deploy` leaves its winner)."""
    files = export_artifacts(folder)
    if len(files) != 1:
        names = ", ".join(path.name for path in files) or "none"
        raise ArtifactError(f"{folder}: its {MANIFEST_FILE} lists {len(files)} model files ({names}); pass one of them")
    return files[0]


def artifacts_or_latest(paths: list[Path] | None, exported_dir: str | os.PathLike[str] = "exported") -> list[Path]:
    """The model files given, else every artifact of the newest export under `exported_dir`."""
    return list(paths) if paths else export_artifacts(find_latest_export(exported_dir))


def manifest_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    """The checkpoint an export folder was made from, when its manifest names one that still exists."""
    source = ((read_manifest(folder) or {}).get("checkpoint") or {}).get("path")
    return Path(source) if source and Path(source).is_file() else None
