"""Default joint image+mask transforms (torchvision.transforms.v2 presets over `(image, mask)`).

Labels are wrapped as `tv_tensors.Mask` so flips and crops move them with the image, and padding
fills masks with the ignore index, never with a class id.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SegmentationPresetEval", "SegmentationPresetTrain"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _finish(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


class SegmentationPresetTrain:
    """Random horizontal flip and random crop (padding masks with `ignore_index`), then normalisation."""

    def __init__(
        self,
        *,
        crop_size: int,
        hflip_prob: float = 0.5,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        ignore_index: int = 255,
    ) -> None:
        self.transforms = v2.Compose(
            [
                v2.RandomHorizontalFlip(hflip_prob),
                v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Mask: ignore_index, "others": 0}),
                *_finish(mean, std),
            ]
        )

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transforms(image, mask)


class SegmentationPresetEval:
    """Normalisation only: evaluation runs on the full image, whatever its size."""

    def __init__(self, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.transforms = v2.Compose(_finish(mean, std))

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transforms(image, mask)
