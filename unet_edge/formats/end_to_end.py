"""The end-to-end wrapper formats export beside the float model: uint8 RGB images in, class masks out,
so an embedding program needs no pre- or post-processing code of its own."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EndToEndSegmenter"]


class EndToEndSegmenter(nn.Module):
    """uint8 RGB N x H x W x 3 in, uint8 class mask N x H x W out (and optionally softmax probabilities
    N x K x H x W): the scaling, normalisation and argmax a host program would otherwise rewrite."""

    def __init__(
        self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], probabilities: bool = False
    ) -> None:
        super().__init__()
        self.model = model
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.probabilities = probabilities

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # The same float32 operations, in the same order, as `formats.base.preprocess`.
        scaled = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        logits = self.model((scaled - self.mean) / self.std)
        mask = logits.argmax(1).to(torch.uint8)
        return (mask, logits.softmax(1)) if self.probabilities else mask
