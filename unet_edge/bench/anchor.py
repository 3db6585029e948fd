"""The anchor: one fixed reference model timed beside other work, so that figures timed minutes apart, while the
machine's speed drifts, can be read on one scale (a figure times the reference anchor p50 over the anchor p50 of
its own session). The search's latency table times it in every session; deploy times it when asked to read its
figures on a table's scale."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["anchor_runner"]


def anchor_runner(image_size: tuple[int, int], batch_size: int) -> Callable[[], Any]:
    """One call of the anchor: UNetStudent base 8, depth 3, 2 classes, seeded weights, in PyTorch eager on a seeded
    batch of `batch_size` images of `image_size`, on the threads torch is set to."""
    import torch

    from ..config import ModelConfig
    from ..model import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(ModelConfig(num_classes=2, base_channels=8, depth=3)).eval()
    images = torch.from_numpy(np.random.default_rng(1).standard_normal((batch_size, 3, *image_size), dtype=np.float32))

    def run() -> None:
        with torch.inference_mode():
            model(images)

    return run
