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

`int8_layout=True` shapes the same function for ONNX Runtime's int8 convolution kernels, which take
their fast path (the symmetric "indirect" convolution) only when input channels are a multiple of 4 and
output channels a multiple of 8 (at least 16); any other count runs through im2col and a generic GEMM,
which made the seed order's C+1 channels cost about 1.5x. So the ones channel is followed by zero
channels up to a multiple of `CHANNEL_ALIGNMENT`, the image gets zero channels up to a multiple of 4,
the head computes zero logits up to `MIN_OUTPUT_CHANNELS` and drops them, and each 2x2 stride-2
transposed convolution becomes the 1x1 convolution and pixel shuffle it equals, which ONNX Runtime
quantises (it runs ConvTranspose in float, between a DequantizeLinear and a QuantizeLinear). All of
it is exact: zero channels add zeros, and the shuffle only moves values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UNetEdgeError
from .model import ConvBlockStudent, UNetStudent, _Up

__all__ = ["CHANNEL_ALIGNMENT", "MIN_OUTPUT_CHANNELS", "FoldError", "FoldedUNet", "fold_batchnorm"]

# Channel counts ONNX Runtime's symmetric int8 convolution needs on x86 (AVX2, AVX-VNNI and AVX-512 alike).
CHANNEL_ALIGNMENT = 8
INPUT_CHANNEL_ALIGNMENT = 4
MIN_OUTPUT_CHANNELS = 16


class FoldError(UNetEdgeError, ValueError):
    """The model cannot be folded exactly (the reason says which layer and why)."""


@dataclass
class Pending:
    """A per-channel transform x -> sign * x + shift still owed by a tensor's consumers, and how many
    trailing channels the tensor carries beyond them: a constant-ones channel (needed to apply a shift
    exactly) followed by zero channels that only align the count (0 when there is no ones channel)."""

    sign: torch.Tensor
    shift: torch.Tensor
    extra: int

    @classmethod
    def identity(cls, channels: int) -> Pending:
        return cls(torch.ones(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64), 0)

    @property
    def channels(self) -> int:
        return self.sign.numel()


def _present(tensor: torch.Tensor | None) -> torch.Tensor:
    """A parameter or buffer the model's layers always create (torch types them as optional)."""
    if tensor is None:
        raise FoldError("a layer lacks a parameter or running statistic that folding needs")
    return tensor


def _conv_bias(conv: nn.Conv2d | nn.ConvTranspose2d) -> torch.Tensor:
    return _present(conv.bias).data


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = _present(bn.weight).double() / torch.sqrt(_present(bn.running_var).double() + bn.eps)
    return scale, _present(bn.bias).double() - scale * _present(bn.running_mean).double()


def _new_conv(weight: torch.Tensor, like: nn.Conv2d) -> nn.Conv2d:
    """A Conv2d with `like`'s kernel, stride and padding, shaped for `weight` (out, in, kh, kw), with a bias."""
    kernel = cast(tuple[int, int], like.kernel_size)
    stride = cast(tuple[int, int], like.stride)
    padding = cast("str | tuple[int, int]", like.padding)
    return nn.Conv2d(weight.shape[1], weight.shape[0], kernel, stride, padding, bias=True)


def _zero_pad(tensor: torch.Tensor, count: int, dim: int) -> torch.Tensor:
    """`tensor` with `count` zero slices appended along `dim`."""
    shape = list(tensor.shape)
    shape[dim] = count
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


def _absorb_input(weight: torch.Tensor, pending: Pending, channel_dim: int) -> torch.Tensor:
    """Apply the pending sign to the input-channel weights and append the ones-channel weights
    (and zero weights for the alignment channels after it)."""
    shape = [1] * weight.dim()
    shape[channel_dim] = -1
    signed = weight * pending.sign.view(shape)
    if not pending.extra:
        return signed
    shift_weights = (weight * pending.shift.view(shape)).sum(channel_dim, keepdim=True)
    return _zero_pad(torch.cat([signed, shift_weights], dim=channel_dim), pending.extra - 1, channel_dim)


def _extra_channels(channels: int, alignment: int) -> int:
    """The ones channel plus the zero channels that bring `channels` + 1 up to a multiple of `alignment`."""
    return 1 + (-(channels + 1)) % alignment


def _folded_conv(
    conv: nn.Conv2d, pending: Pending, weight_scale: torch.Tensor, bias: torch.Tensor, extra: int = 0
) -> nn.Conv2d:
    """A Conv2d computing weight_scale * conv(pending-corrected input) + bias, plus `extra` trailing
    output channels: a ones channel (zero weights, bias 1) and zero channels after it."""
    weight = _absorb_input(conv.weight.double(), pending, 1) * weight_scale.view(-1, 1, 1, 1)
    if extra:
        weight = _zero_pad(weight, extra, 0)
        bias = torch.cat([bias, torch.ones(1, dtype=bias.dtype), bias.new_zeros(extra - 1)])
    folded = _new_conv(weight, conv)
    folded.weight.data.copy_(weight.float())
    _conv_bias(folded).copy_(bias.float())
    return folded


def _fold_block(block: ConvBlockStudent, pending: Pending, name: str, alignment: int) -> tuple[nn.Sequential, Pending]:
    layers: list[nn.Module] = []
    modules = list(block)
    index = 0
    if isinstance(modules[0], nn.MaxPool2d):
        if bool((pending.sign < 0).any()):
            raise FoldError(
                f"{name}: a BatchNorm with a negative scale feeds this max-pool; it cannot be folded exactly"
            )
        layers.append(nn.MaxPool2d(2))
        index = 1
    while index < len(modules):
        conv = cast(nn.Conv2d, modules[index])
        second, third = modules[index + 1 : index + 3]
        bias = conv.bias.double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64)
        if isinstance(second, nn.BatchNorm2d):  # conv -> BN -> ReLU
            scale, shift = _bn_affine(second)
            layers += [_folded_conv(conv, pending, scale, scale * bias + shift), nn.ReLU(inplace=True)]
            pending = Pending.identity(conv.out_channels)
        else:  # conv -> ReLU -> BN
            scale, shift = _bn_affine(cast(nn.BatchNorm2d, third))
            magnitude = scale.abs()
            extra = _extra_channels(conv.out_channels, alignment)
            layers += [_folded_conv(conv, pending, magnitude, magnitude * bias, extra), nn.ReLU(inplace=True)]
            pending = Pending(torch.where(scale < 0, -1.0, 1.0).double(), shift, extra)
        index += 3
    return nn.Sequential(*layers), pending


def _fold_up(up: _Up, pending: Pending, pixel_shuffle: bool) -> nn.Module:
    if isinstance(up.up, nn.ConvTranspose2d):
        convt = up.up
        weight = _absorb_input(convt.weight.double(), pending, 0)  # in, out, 2, 2
        if pixel_shuffle:  # output channel o*4 + 2*i + j of the 1x1 conv is pixel (i, j) of o's 2x2 block
            inputs, outputs = weight.shape[:2]
            conv = nn.Conv2d(inputs, outputs * 4, 1)
            conv.weight.data.copy_(weight.permute(1, 2, 3, 0).reshape(outputs * 4, inputs, 1, 1).float())
            _conv_bias(conv).copy_(_conv_bias(convt).repeat_interleave(4))
            return nn.Sequential(conv, nn.PixelShuffle(2))
        kernel = cast(tuple[int, int], convt.kernel_size)
        stride = cast(tuple[int, int], convt.stride)
        folded = nn.ConvTranspose2d(weight.shape[0], weight.shape[1], kernel, stride, bias=True)
        folded.weight.data.copy_(weight.float())
        _conv_bias(folded).copy_(_conv_bias(convt))
        return folded
    conv = cast(
        nn.Conv2d, cast(nn.Sequential, up.up)[1]
    )  # bilinear resize commutes with a per-channel affine map (and keeps ones at 1)
    one = torch.ones(conv.out_channels, dtype=torch.float64)
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        _folded_conv(conv, pending, one, _conv_bias(conv).double()),
    )


def _concat(left_channels: int, skip: Pending) -> Pending:
    return Pending(
        torch.cat([torch.ones(left_channels, dtype=torch.float64), skip.sign]),
        torch.cat([torch.zeros(left_channels, dtype=torch.float64), skip.shift]),
        skip.extra,
    )


def _pad_conv(conv: nn.Conv2d, inputs: int = 0, outputs: int = 0) -> nn.Conv2d:
    """`conv` with `inputs` zero input channels and `outputs` zero output channels appended."""
    weight = _zero_pad(_zero_pad(conv.weight.data, inputs, 1), outputs, 0)
    padded = _new_conv(weight, conv)
    padded.weight.data.copy_(weight)
    _conv_bias(padded).copy_(_zero_pad(_conv_bias(conv), outputs, 0))
    return padded


class FoldedUNet(nn.Module):
    """The same function as the `UNetStudent` it was folded from, with no BatchNorm layers
    (laid out for int8 kernels with `int8_layout`; see the module docstring)."""

    def __init__(self, source: UNetStudent, int8_layout: bool = False) -> None:
        super().__init__()
        self.config = source.config
        self.depth = source.depth
        self.size_multiple = source.size_multiple
        self.num_classes = source.head.out_channels
        alignment = CHANNEL_ALIGNMENT if int8_layout else 1
        source = source.eval()
        with torch.no_grad():
            self.stem, pending = _fold_block(
                source.stem, Pending.identity(source.config.in_channels), "stem", alignment
            )
            skips = [pending]
            encoder = []
            for i, block in enumerate(source.encoder):
                folded, pending = _fold_block(cast(ConvBlockStudent, block), pending, f"encoder.{i}", alignment)
                encoder.append(folded)
                skips.append(pending)
            skips.pop()
            self.encoder = nn.ModuleList(encoder)
            ups, decoder = [], []
            for i, (up, block) in enumerate(zip(source.up, source.decoder, strict=True)):
                up = cast(_Up, up)
                ups.append(_fold_up(up, pending, pixel_shuffle=int8_layout))
                up_conv = up.up if isinstance(up.up, nn.ConvTranspose2d) else cast(nn.Sequential, up.up)[1]
                skip = _concat(cast(nn.Conv2d, up_conv).out_channels, skips.pop())
                folded, pending = _fold_block(cast(ConvBlockStudent, block), skip, f"decoder.{i}", alignment)
                decoder.append(folded)
            self.up = nn.ModuleList(ups)
            self.decoder = nn.ModuleList(decoder)
            head = source.head
            one = torch.ones(head.out_channels, dtype=torch.float64)
            self.head = _folded_conv(head, pending, one, _conv_bias(head).double())
            # Zero image channels (fed by the size padding below) and zero logits (sliced off).
            self.input_padding = (-source.config.in_channels) % INPUT_CHANNEL_ALIGNMENT if int8_layout else 0
            if int8_layout:
                self.stem[0] = _pad_conv(cast(nn.Conv2d, self.stem[0]), inputs=self.input_padding)
                self.head = _pad_conv(self.head, outputs=max(MIN_OUTPUT_CHANNELS, self.num_classes) - self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_padding:
            x = F.pad(x, (0, 0, 0, 0, 0, self.input_padding))
        # The folded layers keep UNetStudent's attribute names, so its forward runs them unchanged.
        logits = UNetStudent.forward(self, x)  # type: ignore[arg-type]  # duck-typed: same attributes, not a subclass
        return logits[:, : self.num_classes] if logits.shape[1] != self.num_classes else logits


def fold_batchnorm(model: UNetStudent, *, int8_layout: bool = False) -> FoldedUNet:
    """An exactly equivalent, BatchNorm-free copy of `model` (raises `FoldError` when impossible);
    `int8_layout` aligns channel counts and makes transposed up-sampling a pixel shuffle (still exact)."""
    return FoldedUNet(model, int8_layout).eval()
