"""Datasets and DataLoaders for training and evaluation, and the decode-cache policy.

Loaders hand over uint8 crops; `BatchNormalize` turns them into the model's input on the device
(NHWC where the device prefers it), so workers never ship float tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .config import TrainConfig, default_hflip
from .data import ImageSegmentation, ScanReport, pad_collate, resolve_data, scan_dataset
from .device import prefers_channels_last
from .transforms import IMAGENET_MEAN, IMAGENET_STD, BatchNormalize, SegmentationPresetEval, SegmentationPresetTrain

__all__ = [
    "PAD_INDEX",
    "TrainingData",
    "cache_budget",
    "default_workers",
    "list_collate",
    "make_loader",
    "pad_index",
    "training_data",
]

# What padded mask pixels hold when the dataset has no ignore index: CrossEntropyLoss's default
# ignore_index, outside every class id, so padding never counts as a class.
PAD_INDEX = -100


def pad_index(ignore_index: int | None) -> int:
    """The mask value of crop and batch padding, which the loss ignores: the dataset's ignore index, else
    `PAD_INDEX`."""
    return PAD_INDEX if ignore_index is None else ignore_index


def list_collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keep each sample at its own size (no padding): evaluation then does not depend on batch composition."""
    return [image.as_subclass(torch.Tensor) for image, _ in batch], [
        mask.as_subclass(torch.Tensor) for _, mask in batch
    ]


def cache_budget() -> int:
    """Bytes of decoded images `fit` keeps in memory unless told otherwise: a quarter of the memory
    available now, at most 4 GiB (1 GiB where the platform does not say)."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 1 << 30
    return min(available // 4, 4 << 30)


def default_workers(device: torch.device, processes_on_node: int = 1, cores: int | None = None) -> tuple[int, int]:
    """(train, val) loader workers when the user names none: none on the CPU (they would compete with the
    model); on CUDA up to 8 for training and half that for validation, sharing the node's cores among
    the `processes_on_node` ranks (each rank starts its own)."""
    if device.type != "cuda":
        return 0, 0
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    train = max(1, min(8, cores // max(processes_on_node, 1)))
    return train, max(1, train // 2)


def make_loader(
    dataset: Dataset[Any],
    *,
    batch_size: int,
    shuffle: bool,
    workers: int,
    ignore_index: int | None,
    pin_memory: bool = False,
    sampler: torch.utils.data.Sampler | None = None,
    seed: int = 0,
    drop_last: bool = False,
    pad: bool = True,
) -> torch.utils.data.DataLoader:
    """A DataLoader seeded for reproducible shuffles. With `pad`, odd-sized samples are padded into one
    tensor batch (`pad_collate`, masks with `pad_index(ignore_index)`); without, batches are lists of
    samples at their own sizes (`list_collate`), as evaluation wants them."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        collate_fn=partial(pad_collate, ignore_index=pad_index(ignore_index)) if pad else list_collate,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=workers > 0,
        generator=generator,
    )


@dataclass
class TrainingData:
    """What `fit` trains and validates on: the checked dataset, its loaders and the on-device normalisation."""

    root: Path
    scan: ScanReport
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    train_sampler: Any | None
    normalize: BatchNormalize
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    hflip: float = 0.0  # the flip probability the training loader applies (`default_hflip` unless one was given)

    @property
    def classes(self) -> list[str]:
        return list(self.scan.info.classes)

    @property
    def ignore_index(self) -> int | None:
        return self.scan.info.ignore_index

    def checkpoint_fields(self) -> dict[str, Any]:
        """What a checkpoint records about the data: classes, ignore index, normalisation and where it was."""
        return {
            "classes": self.classes,
            "ignore_index": self.ignore_index,
            "mean": list(self.mean),
            "std": list(self.std),
            "data_root": str(self.root),
        }


def training_data(
    config: TrainConfig,
    device: torch.device,
    distributed: Any | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TrainingData:
    """Scan `config.data` (or the embedded set), then build the train and val loaders.

    Decoded images stay in memory when they fit (by default only without loader workers, which would
    each hold a copy). `distributed` (a `DistContext`) shards both splits across processes.
    """
    root = resolve_data(config.data)
    # Training's hooks hear (done, total) (`TrainHooks.on_scan`); the scan speaks the progress protocol.
    scan = scan_dataset(
        root, ("train", "val"), progress=None if progress is None else lambda d, t, _: progress(int(d), int(t or 0))
    )
    ignore_index = scan.info.ignore_index
    on_node = distributed.local_world_size if distributed is not None else 1
    workers, val_workers = (
        (config.workers, config.workers) if config.workers is not None else default_workers(device, on_node)
    )
    processes = distributed.world_size if distributed is not None else 1
    cache_bytes = scan.decoded_bytes("train") + scan.decoded_bytes("val")
    cache = config.cache if config.cache is not None else workers == 0 and cache_bytes * processes <= cache_budget()
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    hflip = config.hflip if config.hflip is not None else default_hflip(scan.info.mirror_symmetric)
    train_preset = SegmentationPresetTrain(
        crop_size=config.image_size,
        hflip_prob=hflip,
        scale_range=config.scale_range,
        mean=mean,
        std=std,
        ignore_index=pad_index(ignore_index),
        normalize=False,
    )
    train_set = ImageSegmentation(root, "train", train_preset, cache=cache)
    val_set = ImageSegmentation(root, "val", SegmentationPresetEval(mean=mean, std=std, normalize=False), cache=cache)
    if cache and workers > 0:
        train_set.fill_cache()
        val_set.fill_cache()
    train_sampler = distributed.sampler(train_set, shuffle=True, seed=config.seed) if distributed is not None else None
    val_sampler = distributed.eval_sampler(val_set) if distributed is not None else None
    train_count = len(train_sampler) if train_sampler is not None else len(train_set)
    train_loader = make_loader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        workers=workers,
        ignore_index=ignore_index,
        pin_memory=device.type == "cuda",
        sampler=train_sampler,
        seed=config.seed + (distributed.rank if distributed is not None else 0),
        drop_last=train_count > config.batch_size,
    )
    val_loader = make_loader(
        val_set,
        batch_size=config.batch_size,
        shuffle=False,
        workers=val_workers,
        ignore_index=ignore_index,
        sampler=val_sampler,
        pad=False,
    )
    normalize = BatchNormalize(mean, std, channels_last=prefers_channels_last(device, training=True))
    return TrainingData(root, scan, train_loader, val_loader, train_sampler, normalize, tuple(mean), tuple(std), hflip)
