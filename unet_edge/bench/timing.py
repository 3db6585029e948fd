"""Timing: the one protocol every command and benchmark script times with (`time_interleaved`), and its statistics."""

from __future__ import annotations

import time
from collections.abc import Callable
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
    seconds: float,
    min_iters: int = 5,
    block_s: float = 0.5,
    progress: Progress | None = None,
) -> list[list[float]]:
    """Latencies (ms) of several runners measured in rounds: each round gives every runner still short of
    its budget a block of calls about `block_s` long (after one untimed call that lets the other
    runtime's thread pool go idle), so a noisy neighbour slows every backend alike and their ratios stay
    meaningful. The budget is per runner: `iters` timed calls, or `seconds` of timed calls (and at least
    `min_iters`), so measuring N runners takes about N x `seconds`. `progress(fraction, 1, "timed")` hears
    after each round how much of the whole budget is done."""
    if iters is None:
        block_s = min(block_s, seconds / 4)  # several rounds even for a short budget
    block_calls = []
    for run in runners:
        for _ in range(max(warmup - 1, 0)):
            run()
        start = time.perf_counter()
        run()
        block_calls.append(max(1, int(block_s / max(time.perf_counter() - start, 1e-6))))
    latencies: list[list[float]] = [[] for _ in runners]

    def calls_left(samples: list[float], block: int) -> int:
        if iters is not None:
            return min(block, iters - len(samples))
        return block if len(samples) < min_iters or sum(samples) < seconds * 1000.0 else 0

    def done(samples: list[float]) -> float:
        if iters is not None:
            return min(1.0, len(samples) / max(iters, 1))
        return min(1.0, len(samples) / max(min_iters, 1), sum(samples) / max(seconds * 1000.0, 1e-9))

    while any(calls_left(samples, block) for samples, block in zip(latencies, block_calls)):
        for run, samples, block in zip(runners, latencies, block_calls):
            count = calls_left(samples, block)
            if not count:
                continue
            run()
            for _ in range(count):
                start = time.perf_counter()
                run()
                samples.append((time.perf_counter() - start) * 1000.0)
        if progress is not None and latencies:
            progress(sum(done(samples) for samples in latencies) / len(latencies), 1.0, "timed")
    return latencies
