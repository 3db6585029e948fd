"""Default joint image+mask transforms (torchvision.transforms.v2 presets over `(image, mask)`).

Labels are wrapped as `tv_tensors.Mask` so flips and crops move them with the image, and padding
fills masks with the ignore index, never with a class id.

With ``normalize=False`` the presets keep images uint8 and leave dtype conversion and normalisation
to `BatchNormalize`, which runs once per batch on the training device (timm's prefetch-loader habit):
a quarter of the bytes cross to the GPU, and the CPU does one vectorised op per batch instead of one
per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BatchNormalize",
    "RandomScale",
    "SegmentationPresetEval",
    "SegmentationPresetTrain",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _finish(mean: Sequence[float], std: Sequence[float], normalize: bool) -> list[v2.Transform]:
    if not normalize:
        return [v2.ToPureTensor()]
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
        v2.ToPureTensor(),
    ]


class RandomScale(v2.Transform):
    """Resize image and mask by one random factor in ``[min_scale, max_scale]`` (masks by nearest neighbour).

    The scale jitter of torchvision's segmentation reference (its RandomResize over 0.5-2x the base
    size), relative to each image's own size so datasets of any image size get the same jitter.
    """

    def __init__(self, min_scale: float, max_scale: float) -> None:
        super().__init__()
        self.min_scale, self.max_scale = min_scale, max_scale

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        scale = self.min_scale + float(torch.rand(())) * (self.max_scale - self.min_scale)
        return {"size": [max(1, round(height * scale)), max(1, round(width * scale))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return v2.functional.resize(inpt, params["size"], antialias=True)


class SegmentationPresetTrain:
    """Optional scale jitter, random horizontal flip and random crop (padding masks with `ignore_index`),
    then normalisation.

    `hflip_prob` 0 turns the flip off: for classes that are not mirror-symmetric (characters, text,
    signs, left/right anatomy) a flipped sample teaches a shape that never occurs. `scale_range`
    (min, max) resizes each sample by a random factor before the crop; None leaves sizes as they are.
    With ``normalize=False`` the result is the uint8 crop and its mask, for `BatchNormalize`.
    """

    def __init__(
        self,
        *,
        crop_size: int,
        hflip_prob: float = 0.5,
        scale_range: tuple[float, float] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        ignore_index: int = 255,
        normalize: bool = True,
    ) -> None:
        steps: list[v2.Transform] = []
        if not 0 <= ignore_index <= 255:
            # A padding value outside uint8 (-100: no ignore index in the dataset) needs a wider mask.
            steps.append(v2.ToDtype({tv_tensors.Mask: torch.int64, "others": None}))
        if scale_range is not None:
            steps.append(RandomScale(*scale_range))
        if hflip_prob > 0:
            steps.append(v2.RandomHorizontalFlip(hflip_prob))
        steps.append(v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Mask: ignore_index, "others": 0}))
        self.transforms = v2.Compose([*steps, *_finish(mean, std, normalize)])

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask, *extras: Any) -> tuple[torch.Tensor, ...]:
        """The transformed pair; `extras` (tv_tensors such as per-pixel soft labels) move with it."""
        return self.transforms(image, mask, *extras)


class SegmentationPresetEval:
    """Normalisation only: evaluation runs on the full image, whatever its size.

    With ``normalize=False`` the image stays uint8, for `BatchNormalize`.
    """

    def __init__(
        self, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, normalize: bool = True
    ) -> None:
        self.transforms = v2.Compose(_finish(mean, std, normalize))

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transforms(image, mask)


class BatchNormalize:
    """uint8 N x 3 x H x W batch -> float32 ``(x / 255 - mean) / std``, on whatever device the batch is on.

    Floating-point batches are taken as already normalised and returned unchanged, so a loop can be
    fed by either kind of preset. ``channels_last`` returns the NHWC memory layout.
    """

    def __init__(
        self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, *, channels_last: bool = False
    ):
        self.mean = torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(1, -1, 1, 1)
        self.channels_last = channels_last
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            if images.device not in self._on:
                self._on[images.device] = (self.mean.to(images.device), self.std.to(images.device))
            mean, std = self._on[images.device]
            images = images.to(torch.float32).mul_(1.0 / 255.0).sub_(mean).div_(std)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images
