"""Latency and throughput of every backend and provider, measured so that the figures can be trusted.

Warm-up runs are excluded; CUDA work is synchronised before the clock is read; ONNX Runtime on
CUDA uses IO binding so host<->device copies are not counted (a separate end-to-end figure
includes them); PyTorch and ONNX Runtime get the same thread count. Each row also reports the
model's GFLOP per image and the fraction of this machine's measured dense-matmul rate achieved.

The package by job: `timing` (the clocks), `machine` (matmul references, FLOP counts, machine facts),
`plan` (settings, targets, rows), `render` (tables and plot); `run_bench` here ties them together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import artifact_bytes
from ..backends import open_backend, provider_unavailable
from ..cpuinfo import cpu_int8_bf16_flags, precision_skip_reason
from ..formats import Backend, Provider, default_threads
from ..formats.torch_backend import TorchBackend, TorchDtype
from ..progress import Progress, Steps, tell
from .machine import count_gflops, cuda_fp32_matmul, machine_info, measure_matmul_gflops, reference_kernel
from .plan import BenchRow, BenchSpec, Target, bench_paths, not_measured, plan_targets
from .render import COLUMNS, backend_label, plot, to_markdown
from .timing import latency_stats, time_interleaved

__all__ = [
    "COLUMNS",
    "BenchRow",
    "BenchSpec",
    "Target",
    "backend_label",
    "bench_paths",
    "count_gflops",
    "cpu_int8_bf16_flags",
    "latency_stats",
    "machine_info",
    "measure_matmul_gflops",
    "plan_targets",
    "plot",
    "reference_kernel",
    "run_bench",
    "time_interleaved",
    "to_markdown",
]


@dataclass
class _Opened:
    """A target opened for timing, with its GFLOP per image, the matmul rate it is compared with, and its
    rows (one per batch size, appended as each batch size is timed)."""

    target: Target
    backend: Backend
    gflops: float
    peak_gflops_per_s: float
    rows: list[BenchRow] = field(default_factory=list)


class _References:
    """GFLOP per image of each model config and the matmul rate of each (device, precision), each measured once."""

    def __init__(self, spec: BenchSpec, threads: int, progress: Progress | None) -> None:
        self.spec, self.threads, self.progress = spec, threads, progress
        self.gflops_by_config: dict[str, float] = {}
        self.rates: dict[tuple[str, str], float] = {}

    def gflops(self, config: dict[str, Any]) -> float:
        key = repr(sorted(config.items()))
        if key not in self.gflops_by_config:
            self.gflops_by_config[key] = count_gflops(config, self.spec.height, self.spec.width)
        return self.gflops_by_config[key]

    def peak(self, device: str, precision: str) -> float:
        if (device, precision) not in self.rates:
            if self.progress:
                tell(self.progress, 0, len(self.spec.batch_sizes), f"measuring {device} {precision} matmul rate")
            self.rates[(device, precision)] = measure_matmul_gflops(device, precision, threads=self.threads)
        return self.rates[(device, precision)]


def run_bench(
    paths: list[Path],
    spec: BenchSpec,
    providers: Iterable[Provider | str] = tuple(Provider),
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Measure every (model, provider, batch size) combination; unavailable ones become rows with
    the reason, never errors. All backends of one batch size are timed interleaved."""
    import torch

    threads = spec.threads or default_threads()
    torch.set_num_threads(threads)
    references = _References(spec, threads, progress)
    # One slot per target, in plan order: its row when it cannot be measured, else the opened target.
    slots = [
        _open(target, spec, threads, references)
        for target in plan_targets(paths, providers, spec.torch_variants, spec.dtypes)
    ]
    opened = [slot for slot in slots if isinstance(slot, _Opened)]
    rng = np.random.default_rng(0)
    steps = Steps(progress, len(spec.batch_sizes))
    for batch in spec.batch_sizes:
        images = rng.standard_normal((batch, 3, spec.height, spec.width), dtype=np.float32)
        _time_batch(opened, spec, images, steps.part(1, f"batch {batch}: "))
        steps.advance()
    steps.done()
    for slot in opened:
        slot.backend.close()
    rows = [row for slot in slots for row in (slot.rows if isinstance(slot, _Opened) else [slot])]
    return {
        "machine": {
            **machine_info(threads),
            "matmul_gflops_per_s": {f"{d}/{p}": v for (d, p), v in references.rates.items()},
        },
        "settings": _settings(spec, threads),
        "results": [row.to_dict() for row in rows],
    }


def _open(target: Target, spec: BenchSpec, threads: int, references: _References) -> BenchRow | _Opened:
    """The target opened for timing with its references measured, or its row saying why it cannot be measured."""
    reason = provider_unavailable(target.kind, target.provider)
    if reason:
        return not_measured(target, spec.height, spec.width, f"unavailable: {reason}")
    backend = open_backend(target.path, target.provider, threads)
    reason = _cannot_time(backend, target)
    if reason:
        backend.close()
        return not_measured(target, spec.height, spec.width, f"unavailable: {reason}")
    device = target.provider.torch_device
    precision = reference_kernel(
        device, backend.precision if backend.precision in ("fp16", "bf16", "int8") else "fp32"
    )[1]
    return _Opened(target, backend, references.gflops(backend.model_config), references.peak(device, precision))


def _cannot_time(backend: Backend, target: Target) -> str | None:
    """Why an opened backend is not timed here (None: it is); a PyTorch backend is switched to the target's variant."""
    if backend.input_format != "nchw-float32":
        return "end-to-end (uint8) model: measured through predict, not bench"
    if isinstance(backend, TorchBackend) and target.variant is not None:
        reason = backend.use_variant(target.variant, target.dtype or TorchDtype.FP32.value)
        if reason:
            return reason
    if backend.precision == "bf16" and target.provider is Provider.CPU:
        return precision_skip_reason("bf16")
    return None


def _time_batch(opened: list[_Opened], spec: BenchSpec, images: np.ndarray, progress: Progress) -> None:
    """Time every opened target on `images` (one batch), interleaved, appending each one's row."""
    batch = len(images)
    progress(0, 1, f"{len(opened)} backends interleaved")
    first_runs = [_first_run(slot.backend, images) for slot in opened]
    runners = [run for run in first_runs if not isinstance(run, str)]

    def on_round(fraction: float, total: float | None, label: str) -> None:
        progress(fraction, 1, f"{len(runners)} backends interleaved, {fraction:.0%} timed")

    latencies = iter(
        time_interleaved(
            runners,
            warmup=spec.warmup,
            iters=spec.iters,
            seconds=spec.seconds,
            min_iters=spec.min_iters,
            progress=on_round,
        )
    )
    for slot, run in zip(opened, first_runs):
        if isinstance(run, str):
            slot.rows.append(not_measured(slot.target, spec.height, spec.width, run, batch))
        else:
            slot.rows.append(_measured_row(slot, spec, images, next(latencies)))


def _first_run(backend: Backend, images: np.ndarray) -> Callable[[], Any] | str:
    """The backend's runner for `images`, called once, or the status of a row whose variant failed on first use
    (torch.compile without a compiler, a capture error, ...)."""
    try:
        run = backend.device_runner(images)
        run()
        return run
    except Exception as exc:
        return f"failed: {exc.__class__.__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"


def _measured_row(slot: _Opened, spec: BenchSpec, images: np.ndarray, latencies: list[float]) -> BenchRow:
    """The row of a timed target: latency statistics, throughput from the median, and the roofline figures."""
    stats = latency_stats(latencies)
    e2e = None
    if slot.target.provider is not Provider.CPU:
        e2e = latency_stats(
            time_interleaved(
                [lambda: slot.backend.predict_logits(images)],
                warmup=spec.warmup,
                iters=spec.iters,
                seconds=spec.seconds,
                min_iters=spec.min_iters,
            )[0]
        )
    batch = len(images)
    throughput = batch / (stats["p50"] / 1000.0)  # median-based: robust to noisy neighbours
    return BenchRow(
        path=str(slot.target.path),
        backend=slot.backend.backend,
        variant=slot.target.variant,
        provider=slot.backend.provider,
        precision=slot.backend.precision,
        batch_size=batch,
        height=spec.height,
        width=spec.width,
        latency_ms=stats,
        e2e_latency_ms=e2e,
        iterations=len(latencies),
        throughput_ips=throughput,
        gflops_per_image=slot.gflops,
        gflops_per_s=slot.gflops * throughput,
        roofline_fraction=slot.gflops * throughput / slot.peak_gflops_per_s,
        roofline_gflops_per_s=slot.peak_gflops_per_s,
        file_mb=artifact_bytes(slot.target.path) / 1e6,
        status="ok",
    )


def _settings(spec: BenchSpec, threads: int) -> dict[str, Any]:
    return {
        "batch_sizes": list(spec.batch_sizes),
        "height": spec.height,
        "width": spec.width,
        "threads": threads,
        "warmup": spec.warmup,
        "iters": spec.iters,
        "seconds": spec.seconds,
        "timing": "interleaved round-robin across backends; throughput = batch / p50",
        "torch_variants": list(spec.torch_variants),
        "dtypes": list(spec.dtypes),
        "cuda_fp32_matmul": cuda_fp32_matmul(),
    }
