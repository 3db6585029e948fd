"""Timing: the candidates and the reference checkpoint's PyTorch eager, with bench's one protocol (interleaved,
warm-up excluded, at least `min_calls` timed calls), in rounds cached one by one. Handed a reference anchor p50
(`DeployOptions.anchor_ms`, a latency table's), the anchor model is timed beside them and every figure is read on
the table's scale: multiplied by the reference over the anchor's p50 here."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from ..formats import Provider
from ..progress import Progress
from .cache import DeployCache, content_key
from .measure import Checkpoint, one_line
from .records import Baseline, Candidate, DeployOptions

__all__ = ["ANCHOR", "CONTENTION_MARGIN", "PROTOCOL", "SCREEN_SHARE", "contenders", "round_seconds", "time_candidates"]

ANCHOR = "anchor"  # the anchor model's column, timed (model call only) when a reference anchor is given


def _in_round(progress: Progress, done: int, rounds: int, label: str) -> Progress:
    """`progress` told how far round `done` is, out of `rounds`."""

    def report(fraction: float, total: float | None, _: str) -> None:
        progress(done + fraction, rounds, label)

    return report


# After the first round, a candidate whose 25th-percentile call is slower than this factor times the leader's
# 75th percentile (and, with a latency budget, than this factor times the budget) cannot win: later rounds do not
# time it, and its figures are the first round's.
CONTENTION_MARGIN = 1.2


# The first round screens: each candidate gets this share of `seconds` (and its share of `min_calls`, which is what
# binds for any candidate slower than 10 ms at the defaults), enough for `contenders` to tell which cannot win; the
# contenders and the eager baseline get the rest over the later rounds. With 27 candidates the screen's floor was
# 11 s of 25 s at a tenth (two columns each).
SCREEN_SHARE = 0.05


# The protocol in words, as deploy.json states it.
PROTOCOL = (
    "interleaved rounds across candidates and the eager baseline; warm-up excluded; the first round screens every "
    f"candidate ({SCREEN_SHARE:.0%} of the seconds, min_calls / rounds calls), then a candidate whose "
    f"25th-percentile call is over {CONTENTION_MARGIN}x the leader's 75th percentile (and the latency budget's "
    f"{CONTENTION_MARGIN}x) keeps those figures, the others get the rest of the seconds and min_calls; app column: "
    "uint8 images, preprocessing, the model call and the argmax"
)


def round_seconds(options: DeployOptions, done: int, baseline: bool) -> float:
    """Timed seconds per column in round `done` (0-based) for a contender, or for the eager baseline (which is
    not screened: its figure is the reference of every ratio). With one round there is nothing to screen for."""
    if options.rounds <= 1 or baseline:
        return options.seconds / options.rounds
    if done == 0:
        return options.seconds * SCREEN_SHARE
    return options.seconds * (1.0 - SCREEN_SHARE) / (options.rounds - 1)


def contenders(samples: dict[str, list[float]], max_latency_ms: float | None = None) -> set[str]:
    """The names (of those with samples) still in contention, by their model-call samples: for the lowest p50, and
    with a latency budget also each that may run within it (the most accurate of those wins, not the fastest)."""
    timed = {name: np.asarray(values) for name, values in samples.items() if values}
    if not timed:
        return set(samples)
    leader = min(timed, key=lambda name: float(np.percentile(timed[name], 50)))
    bar = CONTENTION_MARGIN * float(np.percentile(timed[leader], 75))
    if max_latency_ms is not None:
        bar = max(bar, CONTENTION_MARGIN * max_latency_ms)
    return {name for name, values in timed.items() if float(np.percentile(values, 25)) <= bar}


def time_candidates(
    timed: list[Candidate],
    reference: Checkpoint,
    options: DeployOptions,
    threads: int,
    cache: DeployCache,
    progress: Progress,
) -> tuple[list[Candidate], Baseline]:
    """The candidates with their latency figures (or the reason timing failed), and the eager baseline's.

    Each is timed on its model call and on the application path (uint8 images, preprocessing, the call and the
    argmax), its share of `min_calls` and the timed seconds of `round_seconds` per round: the first round screens
    every candidate briefly, the later ones time only the contenders (`contenders`), to `seconds` and `min_calls`
    in all; a candidate that cannot win keeps the first round's calls. The samples are cached after each round,
    so an interrupted run resumes between rounds."""
    import torch

    from ..backends import open_backend
    from ..bench import latency_stats, time_interleaved

    torch.set_num_threads(threads)
    height, width = options.image_size
    rng = np.random.default_rng(0)
    normalised = rng.standard_normal((options.batch_size, 3, height, width), dtype=np.float32)
    raw = rng.integers(0, 256, (options.batch_size, height, width, 3), dtype=np.uint8)
    baseline_key = f"eager:{reference.sha256}"
    names = [baseline_key, *(c.key for c in timed)]
    unscreened = {baseline_key, ANCHOR}  # timed in every round, to their full seconds
    key = "timing:" + content_key(
        runners=names,
        image_size=list(options.image_size),
        batch=options.batch_size,
        threads=threads,
        seconds=options.seconds,
        min_calls=options.min_calls,
        warmup=options.warmup,
        rounds=options.rounds,
        max_latency_ms=options.max_latency_ms,
        **({} if options.anchor_ms is None else {"anchor_ms": options.anchor_ms}),  # the keys of earlier runs hold
    )
    columns = [*names, *([ANCHOR] if options.anchor_ms is not None else [])]
    state = cache.get(key) or {"rounds": 0, "samples": {n: {"model": [], "app": []} for n in columns}, "failed": {}}
    backends: dict[str, Any] = {}
    runners: dict[str, tuple[Callable[[], Any], ...]] = {}
    if state["rounds"] < options.rounds:
        paths = [(baseline_key, str(reference.path)), *((c.key, c.path or "") for c in timed)]
        for index, (name, path) in enumerate(paths):
            if name in state["failed"]:
                continue
            progress(0, options.rounds, f"opening {index + 1} of {len(names)} models for timing")
            try:
                backend = open_backend(path, Provider.CPU, threads)
                backends[name] = backend
                runners[name] = (backend.device_runner(normalised), functools.partial(backend.segment, raw))
                runners[name][0]()
            except Exception as exc:
                state["failed"][name] = f"timing failed: {one_line(exc)}"
                runners.pop(name, None)
        if options.anchor_ms is not None:
            from ..bench.anchor import anchor_runner

            runners[ANCHOR] = (anchor_runner(options.image_size, options.batch_size),)  # its model call alone
    per_round_calls = max(1, math.ceil(options.min_calls / options.rounds))
    try:
        while state["rounds"] < options.rounds:
            done = state["rounds"]
            order = list(runners)
            if done:  # from the second round on, only what can still win (and the baseline) is timed
                budget = options.max_latency_ms  # on the table's scale: as timed, it is the budget over the scale
                if budget is not None:
                    budget /= _scale(options.anchor_ms, state["samples"].get(ANCHOR, {}).get("model"))
                racing = contenders({n: state["samples"][n]["model"] for n in order if n not in unscreened}, budget)
                order = [name for name in order if name in unscreened or name in racing]
                count = sum(name not in unscreened for name in order)
                label = f"timing {count} contenders and the eager baseline, round {done + 1} of {options.rounds}"
            else:
                verb = "screening" if options.rounds > 1 else "timing"  # one round: nothing to screen for
                label = f"{verb} {sum(name != ANCHOR for name in order)} models, round 1 of {options.rounds}"
            progress(done, options.rounds, label)
            cells = [(name, column) for name in order for column in ("model", "app")[: len(runners[name])]]
            latencies = time_interleaved(
                [run for name in order for run in runners[name]],
                warmup=options.warmup if done == 0 else 1,
                iters=None,
                seconds=[round_seconds(options, done, name in unscreened) for name, _ in cells],
                min_iters=per_round_calls,
                progress=_in_round(progress, done, options.rounds, label),
            )
            for (name, column), samples in zip(cells, latencies, strict=True):
                state["samples"][name][column] += samples
            state["rounds"] += 1
            cache.put(key, state)
    finally:
        for backend in backends.values():
            backend.close()
    scale = _scale(options.anchor_ms, state["samples"].get(ANCHOR, {}).get("model"))

    def stats(samples: list[float]) -> dict[str, float]:
        return latency_stats([value * scale for value in samples])

    figures = []
    for candidate in timed:
        if candidate.key in state["failed"]:
            figures.append(replace(candidate, rejected=state["failed"][candidate.key]))
            continue
        samples = state["samples"][candidate.key]
        figures.append(
            replace(
                candidate,
                latency_ms=stats(samples["model"]),
                app_latency_ms=stats(samples["app"]),
                calls=len(samples["model"]),
            )
        )
    anchor = state["samples"].get(ANCHOR, {}).get("model")
    anchor_p50 = float(np.percentile(anchor, 50)) if anchor else None
    if baseline_key in state["failed"]:
        failed = state["failed"][baseline_key]
        return figures, Baseline(
            reference.name, str(reference.path), failed=failed, anchor_p50_ms=anchor_p50, scale=scale
        )
    samples = state["samples"][baseline_key]
    baseline = Baseline(
        model=reference.name,
        checkpoint=str(reference.path),
        latency_ms=stats(samples["model"]),
        app_latency_ms=stats(samples["app"]),
        calls=len(samples["model"]),
        anchor_p50_ms=anchor_p50,
        scale=scale,
    )
    return figures, baseline


def _scale(anchor_ms: float | None, anchor: list[float] | None) -> float:
    """The factor that reads this run's figures on a latency table's scale: its reference anchor p50 over the
    anchor's p50 here (1 without a reference, or when the anchor was not timed)."""
    if anchor_ms is None or not anchor:
        return 1.0
    return anchor_ms / float(np.percentile(anchor, 50))
