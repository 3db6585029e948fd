"""Parity: does an exported model segment like the checkpoint it came from?

Both run on the same real validation images. Per artifact we report logit differences, pixel
agreement of the argmax masks, mIoU between the two predictions, each one's mIoU against the
ground truth and the drop. `explain_divergence` finds the first layer whose output departs from
PyTorch's, so a failed check names where accuracy is lost.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .artifact import NCHW_FLOAT, NHWC_UINT8, artifacts_or_latest, manifest_checkpoint, manifest_entry
from .backends import artifact_format, open_backend
from .checkpoint import find_latest_checkpoint
from .data import EvalImages, load_eval_images
from .errors import ArtifactError, CheckpointError
from .formats import FORMATS, Backend, Precision, Provider, QuantBudget, within_budget
from .metrics import ConfusionMatrix
from .progress import Progress, tell

__all__ = [
    "THRESHOLDS",
    "EvalImages",
    "Thresholds",
    "compare",
    "explain_divergence",
    "export_budget",
    "load_eval_images",
    "reference_checkpoint",
    "run_backend",
    "thresholds_for",
    "verify",
]


@dataclass(frozen=True)
class Thresholds:
    """A check passes when pixel agreement and mIoU drop are both within bounds (None: not checked)."""

    min_pixel_agreement: float | None = None
    max_miou_drop: float | None = None


THRESHOLDS = {
    Precision.FP32.value: Thresholds(min_pixel_agreement=0.999),
    Precision.FP16.value: Thresholds(min_pixel_agreement=0.995),
    Precision.BF16.value: Thresholds(max_miou_drop=0.01),  # 8 mantissa bits: held to the mIoU budget, as int8
    Precision.INT8.value: Thresholds(max_miou_drop=0.01),
}


def _batches(images: EvalImages, batch_size: int = 8) -> list[list[int]]:
    """Indices grouped by image size so each batch stacks without padding."""
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, image in enumerate(images.raw):
        by_size[image.shape[:2]].append(index)
    return [group[i : i + batch_size] for group in by_size.values() for i in range(0, len(group), batch_size)]


def run_backend(backend: Backend, images: EvalImages) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
    """(logits or None, masks) per image; end-to-end models give masks only."""
    logits: list[np.ndarray | None] = [None] * len(images.raw)
    masks: list[np.ndarray] = [np.empty(0)] * len(images.raw)
    for batch in _batches(images):
        if backend.input_format == NHWC_UINT8:
            out = backend.predict_masks(np.stack([images.raw[i] for i in batch]))
            for i, mask in zip(batch, out):
                masks[i] = mask
            continue
        out = backend.predict_logits(np.stack([images.normalised[i] for i in batch]))
        for i, item in zip(batch, out):
            logits[i] = item
            masks[i] = item.argmax(0)
    return logits, masks


def _miou(preds: list[np.ndarray], targets: list[np.ndarray], num_classes: int, ignore_index: int | None) -> float:
    matrix = ConfusionMatrix(num_classes, ignore_index)
    pairs = [(np.asarray(p, np.int64), np.asarray(t, np.int64)) for p, t in zip(preds, targets, strict=False)]
    for pred, target in pairs:
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    if pairs:  # one update over every pixel: the counts add up alike, and each call costs about a millisecond
        matrix.update(
            torch.from_numpy(np.concatenate([p.reshape(-1) for p, _ in pairs])),
            torch.from_numpy(np.concatenate([t.reshape(-1) for _, t in pairs])),
        )
    return matrix.compute()[1]


def compare(
    reference: tuple[list[np.ndarray | None], list[np.ndarray]],
    candidate: tuple[list[np.ndarray | None], list[np.ndarray]],
    ground_truth: list[np.ndarray],
    num_classes: int,
    ignore_index: int | None,
) -> dict[str, Any]:
    """The parity figures between two sets of predictions on the same images."""
    ref_logits, ref_masks = reference
    cand_logits, cand_masks = candidate
    max_abs = mean_abs = None
    if all(item is not None for item in cand_logits) and all(item is not None for item in ref_logits):
        diffs = [
            np.abs(c.astype(np.float64) - r) for c, r in zip(cand_logits, ref_logits) if c is not None and r is not None
        ]
        max_abs = float(max(d.max() for d in diffs))
        mean_abs = float(sum(d.sum() for d in diffs) / sum(d.size for d in diffs))
    agree = sum(int((c == r).sum()) for c, r in zip(cand_masks, ref_masks))
    total = sum(r.size for r in ref_masks)
    miou_gt = _miou(cand_masks, ground_truth, num_classes, ignore_index)
    miou_gt_reference = _miou(ref_masks, ground_truth, num_classes, ignore_index)
    return {
        "max_abs_diff": max_abs,
        "mean_abs_diff": mean_abs,
        "pixel_agreement": agree / total if total else math.nan,
        "miou_vs_reference": _miou(cand_masks, ref_masks, num_classes, None),
        "miou_gt": miou_gt,
        "miou_gt_reference": miou_gt_reference,
        "miou_drop": miou_gt_reference - miou_gt,
    }


def passes(result: dict[str, Any], thresholds: Thresholds) -> bool:
    ok = True
    if thresholds.min_pixel_agreement is not None:
        ok &= result["pixel_agreement"] >= thresholds.min_pixel_agreement
    if thresholds.max_miou_drop is not None:
        ok &= within_budget(result["miou_drop"], thresholds.max_miou_drop)
    return bool(ok)


def reference_checkpoint(
    artifacts: list[Path], checkpoint: str | os.PathLike[str] | None, runs_dir: str | os.PathLike[str] = "runs"
) -> Path:
    """The checkpoint to compare against: the one given, else the one the manifest names, else the newest run."""
    if checkpoint is not None:
        return Path(checkpoint)
    for artifact in artifacts:
        source = manifest_checkpoint(artifact.parent)
        if source is not None:
            return source
    try:
        return find_latest_checkpoint(runs_dir)
    except CheckpointError:
        if not artifacts:
            raise
        raise CheckpointError(
            f"{artifacts[0]}: no manifest.json beside it names the checkpoint it came from, and {runs_dir} has no "
            "run with a best.pt to compare against; pass --checkpoint"
        ) from None


def thresholds_for(precision: str, entry: dict[str, Any] | None, overrides: Thresholds | None) -> Thresholds:
    """The precision's thresholds, with the int8 budget the model was exported for (from its manifest
    entry), then any field `overrides` sets."""
    base = THRESHOLDS.get(precision, THRESHOLDS[Precision.FP32.value])
    budget = ((entry or {}).get("quantization") or {}).get("max_miou_drop")
    if budget is not None:
        base = Thresholds(base.min_pixel_agreement, float(budget))
    overrides = overrides or Thresholds()
    return Thresholds(
        min_pixel_agreement=base.min_pixel_agreement
        if overrides.min_pixel_agreement is None
        else overrides.min_pixel_agreement,
        max_miou_drop=base.max_miou_drop if overrides.max_miou_drop is None else overrides.max_miou_drop,
    )


def verify(
    artifacts: Sequence[str | os.PathLike[str]] | None = None,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    data: str | os.PathLike[str] | None = None,
    num_images: int = 16,
    provider: Provider | str = Provider.CPU,
    overrides: Thresholds | None = None,
    explain: bool = False,
    runs_dir: str | os.PathLike[str] = "runs",
    exported_dir: str | os.PathLike[str] = "exported",
    entries: dict[str, dict[str, Any]] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the checkpoint and each artifact (default: every artifact of the newest export) on the same
    validation images and judge each artifact.

    `overrides` replaces the per-precision thresholds where its fields are set. With `explain`, a
    failing ONNX artifact gets the first layer whose output diverges from PyTorch's. `entries` gives the
    artifacts' manifest entries by file name (an export passes those it is about to write); otherwise
    each is read from the manifest.json beside the file.
    """
    from .evaluate import checkpoint_data_root

    paths = artifacts_or_latest([Path(a) for a in artifacts or []], exported_dir)
    reference_path = reference_checkpoint(paths, checkpoint, runs_dir)
    reference = open_backend(reference_path, Provider.CPU)
    root = checkpoint_data_root(reference.meta["checkpoint"], data)
    images = load_eval_images(root, reference.mean, reference.std, num_images=num_images)
    reference_out = run_backend(reference, images)
    results = []
    for index, path in enumerate(paths):
        entry = entries[path.name] if entries is not None else manifest_entry(path)[1]
        kind = artifact_format(path)
        backend = open_backend(path, provider, entry=entry)
        if backend.classes != reference.classes:
            raise ArtifactError(
                f"{path}: classes {backend.classes} differ from the checkpoint's {reference.classes} ({reference_path})"
            )
        figures = compare(
            reference_out, run_backend(backend, images), images.masks, reference.num_classes, reference.ignore_index
        )
        thresholds = thresholds_for(backend.precision, entry, overrides)
        result = {
            "path": str(path),
            "format": kind if FORMATS[kind].exportable else FORMATS[kind].runtime,  # a checkpoint: "pytorch"
            "precision": backend.precision,
            "provider": backend.provider,
            **figures,
            "thresholds": {
                "min_pixel_agreement": thresholds.min_pixel_agreement,
                "max_miou_drop": thresholds.max_miou_drop,
            },
            "passed": passes(figures, thresholds),
        }
        if explain and not result["passed"]:
            result["explain"] = explain_divergence(reference, backend, images)
        backend.close()
        results.append(result)
        tell(progress, index + 1, len(paths), f"checked {path.name}")
    return {
        "checkpoint": str(reference_path),
        "data": str(root),
        "num_images": len(images.raw),
        "artifacts": results,
        "passed": all(r["passed"] for r in results),
    }


_TRACED_TYPES = (
    torch.nn.Conv2d,
    torch.nn.ConvTranspose2d,
    torch.nn.BatchNorm2d,
    torch.nn.ReLU,
    torch.nn.MaxPool2d,
    torch.nn.Upsample,
)


def _torch_activations(model: torch.nn.Module, image: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs of every leaf layer, by module name, for one normalised image."""
    captured: dict[str, np.ndarray] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, _TRACED_TYPES):
            hooks.append(
                module.register_forward_hook(
                    lambda m, i, o, n=name: captured.__setitem__(n, o.detach().float().cpu().numpy().copy())
                )
            )
    try:
        with torch.inference_mode():
            model(torch.from_numpy(image[None]))
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def explain_divergence(
    reference: Backend, candidate: Backend, images: EvalImages, rel_tolerance: float = 1e-3
) -> dict[str, Any]:
    """Compare every layer's output between PyTorch and a model file on the first image and name the first
    layer (in execution order) whose relative difference exceeds `rel_tolerance`, for the formats whose
    runtime exposes its layers' outputs (`Format.layer_outputs`)."""
    fmt = FORMATS[artifact_format(candidate.path)]
    if fmt.layer_outputs is None or candidate.input_format != NCHW_FLOAT:
        exposing = ", ".join(f.name for f in FORMATS.values() if f.layer_outputs is not None)
        return {
            "supported": False,
            "reason": "layer-wise comparison needs a float-input model of a format that exposes its layers "
            f"({exposing})",
        }
    module = getattr(reference, "module", None)  # the checkpoint's PyTorch module (a TorchBackend's)
    if module is None:
        return {"supported": False, "reason": f"the reference {reference.path} is not a PyTorch model"}
    activations = _torch_activations(module, images.normalised[0])
    values = fmt.layer_outputs(candidate.path, images.normalised[0])
    if not values:
        return {
            "supported": False,
            "reason": f"the {fmt.name} model carries no module names (not exported by unet-edge?)",
        }
    layers: list[dict[str, Any]] = []
    for layer, torch_out in activations.items():
        onnx_out = values.get(layer)
        if onnx_out is None or onnx_out.shape != torch_out.shape:
            continue
        scale = float(np.abs(torch_out).max()) or 1.0
        layers.append(
            {"layer": layer, "rel_diff": float(np.abs(onnx_out.astype(np.float64) - torch_out).max()) / scale}
        )
    first = next((layer for layer in layers if layer["rel_diff"] > rel_tolerance), None)
    return {
        "supported": True,
        "rel_tolerance": rel_tolerance,
        "layers_compared": len(layers),
        "first_divergent_layer": first["layer"] if first else None,
        "first_divergent_rel_diff": first["rel_diff"] if first else None,
        "worst_layers": sorted(layers, key=lambda layer: -layer["rel_diff"])[:5],
    }


@dataclass(frozen=True)
class Predictions:
    """Where a budget gets the validation images and the predictions it compares, when its caller already
    holds them (deploy measures every file on the same images): the images, the checkpoint's predictions on
    them, and a file's predictions (by content, so a file measured twice runs once)."""

    images: Callable[[], EvalImages]
    checkpoint: Callable[[], tuple[list[np.ndarray | None], list[np.ndarray]]]
    file: Callable[[Path], tuple[list[np.ndarray | None], list[np.ndarray]]]


def export_budget(
    loaded: Any,
    data_root: Path,
    *,
    calib_data: Path | None = None,
    calib_images: int = 32,
    max_miou_drop: float = 0.01,
    progress: Callable[[str], None] | None = None,
    predictions: Predictions | None = None,
) -> QuantBudget:
    """The `QuantBudget` an export hands to every format: calibration images from the train split of
    `calib_data` (default `data_root`), and an evaluator of any model file's val mIoU against the checkpoint's
    on every validation image of `data_root`. Images and the checkpoint's predictions are computed once, on
    first use, however many variants are checked."""
    from .formats.torch_backend import TorchBackend

    calib_root = Path(calib_data) if calib_data else Path(data_root)

    @cache
    def calibration() -> list[np.ndarray]:
        return load_eval_images(calib_root, loaded.mean, loaded.std, split="train", num_images=calib_images).normalised

    @cache
    def validation() -> tuple[EvalImages, tuple[list[np.ndarray | None], list[np.ndarray]]]:
        if predictions is not None:
            return predictions.images(), predictions.checkpoint()
        images = load_eval_images(data_root, loaded.mean, loaded.std, split="val", num_images=0)
        return images, run_backend(TorchBackend.of_loaded(loaded), images)

    def run_file(path: Path, images: EvalImages) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
        if predictions is not None:
            return predictions.file(path)
        # The file was just written by this export: a manifest.json left in the folder by an earlier export
        # describes the file it replaces, so it must not be checked against (the new manifest comes at the end).
        candidate = open_backend(path, entry={})
        try:
            return run_backend(candidate, images)
        finally:
            candidate.close()

    def evaluate(path: Path) -> tuple[float, float, int]:
        images, reference_out = validation()
        if progress is not None:
            progress(f"checking {path.suffix[1:]} model mIoU on {len(images.raw)} validation images")
        figures = compare(reference_out, run_file(path, images), images.masks, len(loaded.classes), loaded.ignore_index)
        return figures["miou_gt"], figures["miou_gt_reference"], len(images.raw)

    return QuantBudget(
        max_miou_drop=max_miou_drop, calibration_data=calib_root, calibration=calibration, evaluate=evaluate
    )
