"""Timing: latency statistics, one runner timed alone, several timed interleaved, and a progress line."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["latency_stats", "print_progress", "time_interleaved", "time_runner"]


def latency_stats(latencies_ms: list[float]) -> dict[str, float]:
    values = np.asarray(latencies_ms, dtype=np.float64)
    return {
        "p50": float(np.percentile(values, 50)),
        "p90": float(np.percentile(values, 90)),
        "p99": float(np.percentile(values, 99)),
        "mean": float(values.mean()),
        "min": float(values.min()),
    }


def time_runner(
    run: Callable[[], Any], *, warmup: int, iters: int | None, seconds: float, min_iters: int = 5
) -> list[float]:
    """Per-call latencies in ms after `warmup` untimed calls: `iters` calls, or as many as fit in
    `seconds` (at least `min_iters`)."""
    for _ in range(warmup):
        run()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        run()
        latencies.append((time.perf_counter() - start) * 1000.0)
        if iters is not None:
            if len(latencies) >= iters:
                break
        elif len(latencies) >= min_iters and time.perf_counter() >= deadline:
            break
    return latencies


def time_interleaved(
    runners: list[Callable[[], Any]],
    *,
    warmup: int,
    iters: int | None,
    seconds: float,
    min_iters: int = 5,
    block_s: float = 0.5,
    on_round: Callable[[float], None] | None = None,
) -> list[list[float]]:
    """Latencies (ms) of several runners measured in rounds: each round gives every runner still short of
    its budget a block of calls about `block_s` long (after one untimed call that lets the other
    runtime's thread pool go idle), so a noisy neighbour slows every backend alike and their ratios stay
    meaningful. The budget is per runner: `iters` timed calls, or `seconds` of timed calls (and at least
    `min_iters`), so measuring N runners takes about N x `seconds`. `on_round(fraction)` hears after each
    round how much of the whole budget is done (0..1), for a progress display."""
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
        if on_round is not None and latencies:
            on_round(sum(done(samples) for samples in latencies) / len(latencies))
    return latencies


def print_progress(min_interval_s: float = 5.0) -> Callable[[str, int, int], None]:
    """A `run_bench` progress callback for scripts: one line on stderr with the elapsed time, at most every
    `min_interval_s` seconds (and whenever the step changes), so a long timing run shows it is alive."""
    started = time.perf_counter()
    last = {"at": -math.inf, "step": -1}

    def show(label: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == last["step"] and now - last["at"] < min_interval_s:
            return
        last.update(at=now, step=done)
        print(f"[{now - started:6.0f} s] bench {done}/{total}: {label}", file=sys.stderr, flush=True)

    return show
