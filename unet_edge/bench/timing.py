"""Timing: the one protocol every command and benchmark script times with (`time_interleaved`), and its statistics."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..progress import Progress

__all__ = ["WARMUP", "latency_stats", "time_interleaved"]

# Untimed calls before timing (first-call allocations, kernel selection, thread-pool start): every command's default.
WARMUP = 3


def latency_stats(latencies_ms: list[float]) -> dict[str, float]:
    values = np.asarray(latencies_ms, dtype=np.float64)
    return {
        "p50": float(np.percentile(values, 50)),
        "p90": float(np.percentile(values, 90)),
        "p99": float(np.percentile(values, 99)),
        "mean": float(values.mean()),
        "min": float(values.min()),
    }


def time_interleaved(
    runners: list[Callable[[], Any]],
    *,
    warmup: int,
    iters: int | None,
    seconds: float | Sequence[float],
    min_iters: int = 5,
    block_s: float = 0.5,
    progress: Progress | None = None,
) -> list[list[float]]:
    """Latencies (ms) of several runners measured in rounds: each round gives every runner still short of
    its budget a block of calls about `block_s` long (after one untimed call that lets the other
    runtime's thread pool go idle), so a noisy neighbour slows every backend alike and their ratios stay
    meaningful. The budget is per runner: `iters` timed calls, or `seconds` of timed calls (and at least
    `min_iters`), so measuring N runners takes about N x `seconds`; `seconds` may also be one budget per
    runner. `progress(fraction, 1, "timed")` hears after each round how much of the whole budget is done."""
    budgets = [float(seconds)] * len(runners) if isinstance(seconds, (int, float)) else [float(s) for s in seconds]
    block_calls = []
    for run, budget in zip(runners, budgets, strict=True):
        for _ in range(max(warmup - 1, 0)):
            run()
        start = time.perf_counter()
        run()
        block = block_s if iters is not None else min(block_s, budget / 4)  # several rounds even for a short budget
        # at least half the minimum per block: each block starts with one untimed call, which must not double a
        # slow runner's cost when its budget is only the minimum (deploy's screening round)
        floor = 1 if iters is not None else math.ceil(min_iters / 2)
        block_calls.append(max(1, floor, int(block / max(time.perf_counter() - start, 1e-6))))
    latencies: list[list[float]] = [[] for _ in runners]

    def calls_left(samples: list[float], block: int, budget: float) -> int:
        if iters is not None:
            return min(block, iters - len(samples))
        if sum(samples) < budget * 1000.0:
            return block
        return max(0, min(block, min_iters - len(samples)))  # the minimum only: no call beyond it

    def done(samples: list[float], budget: float) -> float:
        if iters is not None:
            return min(1.0, len(samples) / max(iters, 1))
        return min(1.0, len(samples) / max(min_iters, 1), sum(samples) / max(budget * 1000.0, 1e-9))

    def left(index: int) -> int:
        return calls_left(latencies[index], block_calls[index], budgets[index])

    while any(left(index) for index in range(len(runners))):
        for index, run in enumerate(runners):
            count = left(index)
            samples = latencies[index]
            if not count:
                continue
            run()
            for _ in range(count):
                start = time.perf_counter()
                run()
                samples.append((time.perf_counter() - start) * 1000.0)
        if progress is not None and latencies:
            fractions = [done(samples, budget) for samples, budget in zip(latencies, budgets, strict=True)]
            progress(sum(fractions) / len(fractions), 1.0, "timed")
    return latencies
