"""Evaluate a checkpoint on a dataset split (what `unet-edge eval` runs)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .checkpoint import find_latest_checkpoint, load_model
from .data import DatasetInfo, ImageSegmentation, scan_dataset
from .errors import DataError
from .train import evaluate, make_loader, prefers_channels_last, resolve_data, resolve_device
from .transforms import BatchNormalize, SegmentationPresetEval

__all__ = ["checkpoint_data_root", "evaluate_checkpoint"]


def checkpoint_data_root(state: dict[str, Any], data: str | os.PathLike[str] | None) -> Path:
    """The dataset to use: the one given, else the one the checkpoint was trained on, else the embedded set."""
    if data is not None:
        return resolve_data(str(data))
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
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Per-class IoU and mIoU of a checkpoint over every pixel of a split, as a JSON-able dict.

    The split is scanned first (`scan_dataset`, reporting `progress(done, total)`): label values
    must be the checkpoint's class ids or its ignore index.
    """
    path = Path(checkpoint) if checkpoint is not None else find_latest_checkpoint(runs_dir)
    torch_device = resolve_device(device)
    loaded = load_model(path, torch_device)
    root = checkpoint_data_root(loaded.state, data)
    # The same input path as training's validation (uint8 batches normalised on the device, NHWC
    # where it is faster), so this mIoU equals the one `fit` logged for the same checkpoint.
    dataset = ImageSegmentation(root, split, SegmentationPresetEval(mean=loaded.mean, std=loaded.std, normalize=False))
    channels_last = prefers_channels_last(torch_device)
    if channels_last:
        loaded.model.to(memory_format=torch.channels_last)
    if dataset.info is not None and len(dataset.info.classes) != len(loaded.classes):
        raise DataError(
            f"{root / 'dataset.json'}: {len(dataset.info.classes)} classes, but {path} was trained on {len(loaded.classes)}"
        )
    scan_dataset(root, (split,), DatasetInfo(tuple(loaded.classes), loaded.ignore_index), info_source=str(path), progress=progress)
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, workers=workers, ignore_index=loaded.ignore_index)
    normalize = BatchNormalize(loaded.mean, loaded.std, channels_last=channels_last)
    result = evaluate(loaded.model, loader, len(loaded.classes), loaded.ignore_index, torch_device, normalize=normalize)
    return {
        "checkpoint": str(path),
        "data": str(root),
        "split": split,
        "num_images": len(dataset),
        "classes": loaded.classes,
        **result.to_dict(loaded.classes),
    }
