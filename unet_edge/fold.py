"""Fold every BatchNorm of a `UNetStudent` into convolutions, exactly, so the deployed graph is
Conv -> ReLU units only (what int8 kernels fuse into one unbroken chain, and what fp32 runs fastest).

conv -> BN -> ReLU: the textbook fold (scale and shift into the convolution before it).

conv -> ReLU -> BN (the seed's order): with BN(y) = a*y + c per channel,
  * |a| commutes with ReLU (relu(|a| z) = |a| relu(z)), so it folds into the convolution before;
  * the sign of a moves into the input-channel weights of whatever consumes the tensor;
  * the shift c cannot simply become the next convolution's bias, because that convolution pads
    with zeros: at the borders it would add c where the original saw 0. So the producing
    convolution gets one extra output channel that is 1 everywhere inside the feature map
    (zero weights, bias 1, unchanged by ReLU and max-pooling), and the consumer gets one extra
    input channel whose weights are sum_c W[:, c] * c_c. Zero padding then treats the shift
    exactly as the original did, at every border, for any input size.
Max-pooling commutes with the shift and with positive scales only; a BatchNorm with a negative
scale feeding a max-pool cannot be folded, and `fold_batchnorm` says so (`FoldError`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UNetEdgeError
from .model import ConvBlockStudent, UNetStudent, _Up

__all__ = ["FoldError", "FoldedUNet", "fold_batchnorm"]


class FoldError(UNetEdgeError, ValueError):
    """The model cannot be folded exactly (the reason says which layer and why)."""


@dataclass
class Pending:
    """A per-channel transform x -> sign * x + shift still owed by a tensor's consumers, and whether
    the tensor carries a trailing constant-ones channel (needed to apply a shift exactly)."""

    sign: torch.Tensor
    shift: torch.Tensor
    ones: bool

    @classmethod
    def identity(cls, channels: int) -> "Pending":
        return cls(torch.ones(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64), False)

    @property
    def channels(self) -> int:
        return self.sign.numel()


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return scale, bn.bias.double() - scale * bn.running_mean.double()


def _absorb_input(weight: torch.Tensor, pending: Pending, channel_dim: int) -> torch.Tensor:
    """Apply the pending sign to the input-channel weights and append the ones-channel weights."""
    shape = [1] * weight.dim()
    shape[channel_dim] = -1
    signed = weight * pending.sign.view(shape)
    if not pending.ones:
        return signed
    shift_weights = (weight * pending.shift.view(shape)).sum(channel_dim, keepdim=True)
    return torch.cat([signed, shift_weights], dim=channel_dim)


def _folded_conv(conv: nn.Conv2d, pending: Pending, weight_scale: torch.Tensor, bias: torch.Tensor, add_ones: bool) -> nn.Conv2d:
    """A Conv2d computing weight_scale * conv(pending-corrected input) + bias, plus an optional ones channel."""
    weight = _absorb_input(conv.weight.double(), pending, 1) * weight_scale.view(-1, 1, 1, 1)
    if add_ones:
        weight = torch.cat([weight, torch.zeros_like(weight[:1])], 0)
        bias = torch.cat([bias, torch.ones(1, dtype=bias.dtype)])
    folded = nn.Conv2d(weight.shape[1], weight.shape[0], conv.kernel_size, conv.stride, conv.padding, bias=True)
    folded.weight.data.copy_(weight.float())
    folded.bias.data.copy_(bias.float())
    return folded


def _fold_block(block: ConvBlockStudent, pending: Pending, name: str) -> tuple[nn.Sequential, Pending]:
    layers: list[nn.Module] = []
    modules = list(block)
    index = 0
    if isinstance(modules[0], nn.MaxPool2d):
        if bool((pending.sign < 0).any()):
            raise FoldError(f"{name}: a BatchNorm with a negative scale feeds this max-pool; it cannot be folded exactly")
        layers.append(nn.MaxPool2d(2))
        index = 1
    while index < len(modules):
        conv, second, third = modules[index : index + 3]
        bias = conv.bias.double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64)
        if isinstance(second, nn.BatchNorm2d):  # conv -> BN -> ReLU
            scale, shift = _bn_affine(second)
            layers += [_folded_conv(conv, pending, scale, scale * bias + shift, add_ones=False), nn.ReLU(inplace=True)]
            pending = Pending.identity(conv.out_channels)
        else:  # conv -> ReLU -> BN
            scale, shift = _bn_affine(third)
            magnitude = scale.abs()
            layers += [_folded_conv(conv, pending, magnitude, magnitude * bias, add_ones=True), nn.ReLU(inplace=True)]
            pending = Pending(torch.where(scale < 0, -1.0, 1.0).double(), shift, True)
        index += 3
    return nn.Sequential(*layers), pending


def _fold_up(up: _Up, pending: Pending) -> nn.Module:
    if isinstance(up.up, nn.ConvTranspose2d):
        convt = up.up
        weight = _absorb_input(convt.weight.double(), pending, 0)
        folded = nn.ConvTranspose2d(weight.shape[0], weight.shape[1], convt.kernel_size, convt.stride, bias=True)
        folded.weight.data.copy_(weight.float())
        folded.bias.data.copy_(convt.bias.data)
        return folded
    upsample, conv = up.up  # bilinear resize commutes with a per-channel affine map (and keeps ones at 1)
    one = torch.ones(conv.out_channels, dtype=torch.float64)
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), _folded_conv(conv, pending, one, conv.bias.double(), False))


def _concat(left_channels: int, skip: Pending) -> Pending:
    return Pending(
        torch.cat([torch.ones(left_channels, dtype=torch.float64), skip.sign]),
        torch.cat([torch.zeros(left_channels, dtype=torch.float64), skip.shift]),
        skip.ones,
    )


class FoldedUNet(nn.Module):
    """The same function as the `UNetStudent` it was folded from, with no BatchNorm layers."""

    def __init__(self, source: UNetStudent) -> None:
        super().__init__()
        self.config = source.config
        self.depth = source.depth
        self.size_multiple = source.size_multiple
        source = source.eval()
        with torch.no_grad():
            self.stem, pending = _fold_block(source.stem, Pending.identity(source.config.in_channels), "stem")
            skips = [pending]
            encoder = []
            for i, block in enumerate(source.encoder):
                folded, pending = _fold_block(block, pending, f"encoder.{i}")
                encoder.append(folded)
                skips.append(pending)
            skips.pop()
            self.encoder = nn.ModuleList(encoder)
            ups, decoder = [], []
            for i, (up, block) in enumerate(zip(source.up, source.decoder)):
                ups.append(_fold_up(up, pending))
                out_channels = up.up.out_channels if isinstance(up.up, nn.ConvTranspose2d) else up.up[1].out_channels
                folded, pending = _fold_block(block, _concat(out_channels, skips.pop()), f"decoder.{i}")
                decoder.append(folded)
            self.up = nn.ModuleList(ups)
            self.decoder = nn.ModuleList(decoder)
            head = source.head
            one = torch.ones(head.out_channels, dtype=torch.float64)
            self.head = _folded_conv(head, pending, one, head.bias.double(), False)

    forward = UNetStudent.forward


def fold_batchnorm(model: UNetStudent) -> FoldedUNet:
    """An exactly equivalent, BatchNorm-free copy of `model` (raises `FoldError` when impossible)."""
    return FoldedUNet(model).eval()
