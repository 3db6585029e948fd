"""U-Net for semantic segmentation built from `ConvBlockStudent` blocks.

`UNetStudent` accepts any input height and width: it pads the input to a multiple of
``2**depth`` inside the forward pass and crops the logits back, so exported graphs work on
odd sizes such as 97x131 without the caller resizing anything. It returns one tensor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import BlockOrder, Downsample, ModelConfig, Upsample

__all__ = [
    "BLOCK_ORDERS",
    "DOWNSAMPLE_MODES",
    "UPSAMPLE_MODES",
    "ConvBlockStudent",
    "ModelConfig",
    "UNetStudent",
    "build_model",
]

BLOCK_ORDERS: tuple[str, ...] = tuple(BlockOrder)
DOWNSAMPLE_MODES: tuple[str, ...] = ("none", *Downsample)
UPSAMPLE_MODES: tuple[str, ...] = tuple(Upsample)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


class ConvBlockStudent(nn.Sequential):
    """`num_convs` times (3x3 conv, ReLU, BatchNorm), optionally downsampling first.

    ``block_order="conv-relu-bn"`` is the seed's order; ``"conv-bn-relu"`` lets BatchNorm fold
    into the convolution at export, which int8 deployments prefer. ``downsample`` halves the
    resolution with a 2x2 max-pool before the convolutions, or with a stride-2 first convolution.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_convs: int = 2,
        downsample: str = "none",
        *,
        block_order: str = "conv-relu-bn",
    ) -> None:
        _check_choice("downsample", downsample, DOWNSAMPLE_MODES)
        _check_choice("block_order", block_order, BLOCK_ORDERS)
        if num_convs < 1:
            raise ValueError(f"num_convs must be at least 1, got {num_convs}")
        layers: list[nn.Module] = []
        if downsample == "maxpool":
            layers.append(nn.MaxPool2d(2))
        channels = in_channels
        for index in range(num_convs):
            stride = 2 if (downsample == "strided" and index == 0) else 1
            conv = nn.Conv2d(channels, out_channels, 3, stride=stride, padding=1, bias=True)
            norm = nn.BatchNorm2d(out_channels)
            act = nn.ReLU(inplace=True)
            layers += [conv, act, norm] if block_order == "conv-relu-bn" else [conv, norm, act]
            channels = out_channels
        super().__init__(*layers)


class _Up(nn.Module):
    """Doubles the resolution and halves the channels: transposed conv, or bilinear + 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, mode: str) -> None:
        super().__init__()
        _check_choice("upsample", mode, UPSAMPLE_MODES)
        if mode == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, out_channels, 1),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


class UNetStudent(nn.Module):
    """Encoder/decoder with concatenated skips and a 3x3 output convolution.

    Input N x in_channels x H x W (any H, W), output N x num_classes x H x W logits.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 4,
        base_channels: int = 32,
        depth: int = 4,
        num_convs: int = 2,
        upsample: str = "transpose",
        *,
        downsample: str = "maxpool",
        block_order: str = "conv-relu-bn",
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if downsample == "none":
            raise ValueError("UNetStudent needs a downsampling mode: maxpool or strided")
        self.config = ModelConfig(
            num_classes=num_classes,
            in_channels=in_channels,
            base_channels=base_channels,
            depth=depth,
            num_convs=num_convs,
            upsample=upsample,
            downsample=downsample,
            block_order=block_order,
        )
        self.depth = depth
        self.size_multiple = 2**depth
        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.stem = ConvBlockStudent(in_channels, widths[0], num_convs, block_order=block_order)
        self.encoder = nn.ModuleList(
            ConvBlockStudent(widths[i], widths[i + 1], num_convs, downsample, block_order=block_order)
            for i in range(depth)
        )
        self.up = nn.ModuleList(_Up(widths[i + 1], widths[i], upsample) for i in reversed(range(depth)))
        self.decoder = nn.ModuleList(
            ConvBlockStudent(2 * widths[i], widths[i], num_convs, block_order=block_order)
            for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        multiple = self.size_multiple
        # Pad bottom/right so every pooling level halves evenly and the skips line up: a constant pad cropped to
        # the next multiple, which converters without shape arithmetic in their pad ops (pnnx/ncnn) keep any-size.
        x = F.pad(x, (0, multiple - 1, 0, multiple - 1))
        x = x[:, :, : (height + multiple - 1) // multiple * multiple, : (width + multiple - 1) // multiple * multiple]
        x = self.stem(x)
        skips = [x]
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        skips.pop()
        for up, block in zip(self.up, self.decoder):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)[:, :, :height, :width]


def build_model(config: ModelConfig | dict[str, Any]) -> UNetStudent:
    """Build a `UNetStudent` from a `ModelConfig` or its dict form (as stored in checkpoints)."""
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    if config.num_classes is None:
        raise ValueError("num_classes must be set to build a model")
    return UNetStudent(
        config.in_channels,
        config.num_classes,
        config.base_channels,
        config.depth,
        config.num_convs,
        config.upsample,
        downsample=config.downsample,
        block_order=config.block_order,
    )
