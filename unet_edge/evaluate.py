"""Evaluation: the `evaluate` loop that training validates with, and `evaluate_checkpoint` (what
`unet-edge eval` runs). Both give mIoU from one confusion matrix over every pixel of a split."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import find_latest_checkpoint, load_model
from .data import DatasetInfo, ImageSegmentation, resolve_data, scan_dataset
from .device import place_model, prefers_channels_last, resolve_device
from .errors import DataError
from .loaders import make_loader
from .metrics import ConfusionMatrix
from .progress import Progress
from .transforms import BatchNormalize, SegmentationPresetEval

__all__ = ["EvalResult", "checkpoint_data_root", "evaluate", "evaluate_checkpoint"]


def _json_float(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


@dataclass
class EvalResult:
    """mIoU, per-class IoU (NaN for a class in neither prediction nor target), pixel accuracy, and the matrix."""

    miou: float
    per_class_iou: list[float]
    pixel_accuracy: float
    confusion: torch.Tensor

    def to_dict(self, classes: list[str]) -> dict[str, Any]:
        """The JSON-able record (NaN as null) that metrics.jsonl and `eval --json` hold."""
        return {
            "miou": _json_float(self.miou),
            "pixel_accuracy": _json_float(self.pixel_accuracy),
            "per_class_iou": {name: _json_float(v) for name, v in zip(classes, self.per_class_iou)},
        }


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    num_classes: int,
    ignore_index: int | None,
    device: torch.device,
    *,
    autocast: AbstractContextManager | None = None,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> EvalResult:
    """mIoU from one confusion matrix accumulated over every pixel of `loader`.

    Batches that are lists of samples (`make_loader(pad=False)`) run each image at its own size, images
    of one size together, so the result does not depend on the batch size or on which images share a
    batch. In a distributed run every process evaluates its shard and the matrices are summed;
    `normalize` prepares each batch on `device`, as in `train_one_epoch`.
    """
    model.eval()
    confusion = ConfusionMatrix(num_classes, ignore_index, device=device)
    for batch in loader:
        for images, masks in _same_size_groups(*batch):
            images = images.to(device)
            masks = masks.to(device)
            if normalize is not None:
                images = normalize(images)
            with autocast or nullcontext():
                logits = model(images)
            confusion.update(logits.argmax(1), masks)
    confusion.reduce_from_all_processes()
    per_class, miou = confusion.compute()
    return EvalResult(miou, per_class.tolist(), confusion.pixel_accuracy(), confusion.matrix.cpu())


def _same_size_groups(
    images: torch.Tensor | list[torch.Tensor], masks: torch.Tensor | list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A tensor batch as it is; a list of samples as stacked batches of equal-size images."""
    if isinstance(images, torch.Tensor) and isinstance(masks, torch.Tensor):
        return [(images, masks)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(index)
    return [
        (torch.stack([images[i] for i in group]), torch.stack([masks[i] for i in group]).long())
        for group in groups.values()
    ]


def checkpoint_data_root(state: dict[str, Any], data: str | os.PathLike[str] | None) -> Path:
    """The dataset to use: the one given, else the one the checkpoint was trained on, else the embedded set."""
    if data is not None:
        return resolve_data(data)
    trained_on = state.get("data_root")
    if isinstance(trained_on, str) and Path(trained_on).is_dir():
        return Path(trained_on)
    return resolve_data(None)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str] | None,
    *,
    data: str | os.PathLike[str] | None = None,
    split: str = "val",
    batch_size: int = 16,
    device: str = "auto",
    runs_dir: str | os.PathLike[str] = "runs",
    workers: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Per-class IoU and mIoU of a checkpoint over every pixel of a split, as a JSON-able dict.

    The split is scanned first (`scan_dataset`, reporting to `progress`): label values
    must be the checkpoint's class ids or its ignore index.
    """
    path = Path(checkpoint) if checkpoint is not None else find_latest_checkpoint(runs_dir)
    torch_device = resolve_device(device)
    loaded = load_model(path, torch_device)
    root = checkpoint_data_root(loaded.state, data)
    # The same input path as training's validation (uint8 batches normalised on the device, NHWC
    # where it is faster), so this mIoU equals the one `fit` logged for the same checkpoint.
    dataset = ImageSegmentation(root, split, SegmentationPresetEval(mean=loaded.mean, std=loaded.std, normalize=False))
    loaded.model = place_model(loaded.model, torch_device)
    if dataset.info is not None and len(dataset.info.classes) != len(loaded.classes):
        raise DataError(
            f"{root / 'dataset.json'}: {len(dataset.info.classes)} classes, but {path} was trained on "
            f"{len(loaded.classes)}"
        )
    scan_dataset(
        root,
        (split,),
        DatasetInfo(tuple(loaded.classes), loaded.ignore_index),
        info_source=str(path),
        progress=progress,
    )
    loader = make_loader(
        dataset, batch_size=batch_size, shuffle=False, workers=workers, ignore_index=loaded.ignore_index, pad=False
    )
    normalize = BatchNormalize(loaded.mean, loaded.std, channels_last=prefers_channels_last(torch_device))
    result = evaluate(loaded.model, loader, len(loaded.classes), loaded.ignore_index, torch_device, normalize=normalize)
    return {
        "checkpoint": str(path),
        "data": str(root),
        "split": split,
        "num_images": len(dataset),
        "classes": loaded.classes,
        **result.to_dict(loaded.classes),
    }
