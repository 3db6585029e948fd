"""The search space: the architectures a search may train, named so a table row and a trial say which one."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..config import BlockOrder, ModelConfig, Upsample

__all__ = ["BASE_CHANNELS", "DEPTHS", "Architecture", "architectures"]

BASE_CHANNELS: tuple[int, ...] = (4, 8, 12, 16, 24, 32)
DEPTHS: tuple[int, ...] = (2, 3, 4)


@dataclass(frozen=True, order=True)
class Architecture:
    """One `UNetStudent` shape of the space; its `name` (b8-d3-conv-bn-relu-bilinear) keys the latency table."""

    base_channels: int
    depth: int
    block_order: str = BlockOrder.CONV_BN_RELU.value
    upsample: str = Upsample.TRANSPOSE.value

    @property
    def name(self) -> str:
        return f"b{self.base_channels}-d{self.depth}-{self.block_order}-{self.upsample}"

    def model_config(self, num_classes: int | None = None) -> ModelConfig:
        return ModelConfig(
            num_classes=num_classes,
            base_channels=self.base_channels,
            depth=self.depth,
            block_order=self.block_order,
            upsample=self.upsample,
        )


def architectures(
    base_channels: tuple[int, ...] = BASE_CHANNELS,
    depths: tuple[int, ...] = DEPTHS,
    block_orders: tuple[str, ...] = tuple(BlockOrder),
    upsamples: tuple[str, ...] = tuple(Upsample),
) -> tuple[Architecture, ...]:
    """Every combination of the given widths, depths, block orders and up-sampling modes (checked), sorted."""
    if not base_channels or not depths or not block_orders or not upsamples:
        raise ValueError("the search space is empty: give at least one width, depth, block order and upsample mode")
    if any(b < 1 for b in base_channels) or any(d < 1 for d in depths):
        raise ValueError("widths and depths must be at least 1")
    combos = itertools.product(
        dict.fromkeys(base_channels),
        dict.fromkeys(depths),
        (BlockOrder(b).value for b in dict.fromkeys(block_orders)),
        (Upsample(u).value for u in dict.fromkeys(upsamples)),
    )
    return tuple(sorted(Architecture(*combo) for combo in combos))
