"""Latency and throughput of every backend and provider, measured so that the figures can be trusted.

Warm-up runs are excluded; CUDA work is synchronised before the clock is read; ONNX Runtime on
CUDA uses IO binding so host<->device copies are not counted (a separate end-to-end figure
includes them); PyTorch and ONNX Runtime get the same thread count. Each row also reports the
model's GFLOP per image and the fraction of this machine's measured dense-matmul rate achieved.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import artifact_bytes, export_artifacts, find_latest_export, manifest_checkpoint
from .backends import artifact_format, open_backend, provider_unavailable, runtime_of, supports
from .cpuinfo import INT8_BF16_FLAGS, cpu_bf16_skip_reason, cpu_flags, cpu_int8_bf16_flags
from .errors import UNetEdgeError
from .formats import Backend, Provider, default_threads
from .formats.torchscript import TorchBackend, TorchDtype, TorchVariant

__all__ = [
    "BenchSpec",
    "backend_label",
    "bench_paths",
    "count_gflops",
    "cpu_int8_bf16_flags",
    "latency_stats",
    "machine_info",
    "measure_matmul_gflops",
    "print_progress",
    "reference_kernel",
    "run_bench",
    "time_runner",
]


@dataclass
class BenchSpec:
    batch_sizes: tuple[int, ...] = (1, 8)
    height: int = 256
    width: int = 256
    threads: int | None = None
    warmup: int = 3
    iters: int | None = None
    seconds: float = 2.0  # of timed calls per row (model, provider, batch size) when iters is None
    min_iters: int = 5
    # PyTorch rows (checkpoints and TorchScript): one per variant x dtype that applies.
    torch_variants: tuple[str, ...] = (TorchVariant.EAGER.value,)
    dtypes: tuple[str, ...] = (TorchDtype.FP32.value,)


def latency_stats(latencies_ms: list[float]) -> dict[str, float]:
    values = np.asarray(latencies_ms, dtype=np.float64)
    return {
        "p50": float(np.percentile(values, 50)),
        "p90": float(np.percentile(values, 90)),
        "p99": float(np.percentile(values, 99)),
        "mean": float(values.mean()),
        "min": float(values.min()),
    }


def time_runner(run: Callable[[], Any], *, warmup: int, iters: int | None, seconds: float, min_iters: int = 5) -> list[float]:
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


def measure_matmul_gflops(
    device: str = "cpu", precision: str = "fp32", size: int | None = None, seconds: float = 1.0, threads: int | None = None
) -> float:
    """This machine's measured dense matmul (GEMM) rate, GFLOP/s, for a device and precision, with
    `threads` CPU threads (default: one per core): the reference the "roofline" fraction divides by.
    A measured rate, not the hardware's peak: well-blocked convolutions can exceed it.

    `reference_kernel` names the GEMM measured. On the CPU the fp32 figure is the best of PyTorch's
    `torch.mm` and ONNX Runtime's MatMul (their BLAS libraries differ by CPU vendor); the fastest call
    counts, so a busy neighbour lowers it less. On CUDA, 8192² products are timed with CUDA events over
    blocks of back-to-back calls (fp32 runs as TF32 when PyTorch allows it: the report says which).
    """
    library, kind = reference_kernel(device, precision)
    size = size or (8192 if device.startswith("cuda") else 2048)
    if library == "onnxruntime":
        return _ort_matmul_gflops(size, seconds, kind, threads)
    if library == "best":
        return max(_ort_matmul_gflops(size, seconds, kind, threads), _torch_matmul_gflops(device, kind, size, seconds))
    return _torch_matmul_gflops(device, kind, size, seconds)


def reference_kernel(device: str, precision: str) -> tuple[str, str]:
    """(library, dtype) of the GEMM whose rate bounds a model of `precision` on `device`: quantised
    models run int8 kernels (ONNX Runtime's MatMulInteger family on the CPU, `torch._int_mm` on CUDA);
    fp16 models compute in fp32 on CPUs (no fp16 matmul units there)."""
    if precision not in ("fp32", "fp16", "bf16", "int8"):
        raise UNetEdgeError(f"no matmul reference for precision {precision!r}: use fp32, fp16, bf16 or int8")
    if device == "cpu":
        if precision == "int8":
            return "onnxruntime", "int8"
        return ("torch", "bf16") if precision == "bf16" else ("best", "fp32")
    return "torch", precision


def _torch_matmul_gflops(device: str, precision: str, size: int, seconds: float) -> float:
    import torch

    generator = torch.Generator().manual_seed(0)
    if precision == "int8":
        a, b = (torch.randint(-127, 127, (size, size), dtype=torch.int8, generator=generator).to(device) for _ in range(2))
        matmul = torch._int_mm  # int8 x int8 -> int32, the tensor-core path quantised layers use
    else:
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        a, b = (torch.randn(size, size, generator=generator).to(device=device, dtype=dtype) for _ in range(2))
        matmul = torch.mm
    flop = 2.0 * size**3
    if device.startswith("cuda"):
        return _cuda_rate(lambda: matmul(a, b), flop, seconds)
    latencies = time_runner(lambda: matmul(a, b), warmup=2, iters=None, seconds=seconds, min_iters=3)
    return flop / (min(latencies) / 1000.0) / 1e9


def _cuda_fp32_matmul() -> str | None:
    """How CUDA runs fp32 matmuls and convolutions here (TF32 tensor cores or full fp32); None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    matmul = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    conv = "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    return f"matmul {matmul}, convolutions {conv}"


def _cuda_rate(run: Callable[[], Any], flop: float, seconds: float, calls: int = 20) -> float:
    """GFLOP/s of `run` on the GPU: the best block of `calls` back-to-back calls timed with CUDA events
    (a host clock around each call would add launch and synchronisation time to every one)."""
    import torch

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            run()
        end.record()
        end.synchronize()
        best = max(best, flop * calls / (start.elapsed_time(end) / 1000.0) / 1e9)
        if time.perf_counter() >= deadline:
            return best


def _ort_matmul_gflops(size: int, seconds: float, precision: str, threads: int | None = None) -> float:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    if precision == "int8":
        op, a_type, b_type, c_type = "MatMulInteger", TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32
        feed = {"a": rng.integers(0, 255, (size, size), dtype=np.uint8), "b": rng.integers(-127, 127, (size, size), dtype=np.int8)}
    else:
        op, a_type, b_type, c_type = "MatMul", TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT
        feed = {"a": rng.standard_normal((size, size), dtype=np.float32), "b": rng.standard_normal((size, size), dtype=np.float32)}
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["c"])],
        f"{precision}_matmul",
        [helper.make_tensor_value_info("a", a_type, [size, size]), helper.make_tensor_value_info("b", b_type, [size, size])],
        [helper.make_tensor_value_info("c", c_type, [size, size])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    latencies = time_runner(lambda: session.run(None, feed), warmup=2, iters=None, seconds=seconds, min_iters=3)
    return 2.0 * size**3 / (min(latencies) / 1000.0) / 1e9


def count_gflops(model_config: dict[str, Any], height: int, width: int) -> float:
    """GFLOP (2 x multiply-accumulates) of one forward pass on one H x W image, counted by
    torch.utils.flop_counter on the float model (quantised variants do the same arithmetic)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .model import build_model

    model = build_model(model_config).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, model.config.in_channels, height, width))
    return counter.get_total_flops() / 1e9


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, its int8/bf16 instruction sets, cores, threads, GPU and library versions: what a reader
    needs to compare figures (int8 beats fp32 on a CPU only with int8 dot-product instructions)."""
    cpu = platform.processor() or platform.machine()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), cpu)
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_int8_bf16": [flag for flag in INT8_BF16_FLAGS if flag in cpu_flags()],
        "cores": default_threads(),
        "threads": threads,
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    import onnxruntime
    import torch

    info.update(
        {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "onnxruntime_providers": onnxruntime.get_available_providers(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        }
    )
    return info


@dataclass
class Target:
    """One (model file, provider) pair to measure."""

    path: Path
    kind: str
    provider: Provider
    variant: str | None = None  # PyTorch rows only: a TorchVariant and a TorchDtype
    dtype: str | None = None


def plan_targets(
    paths: Iterable[Path],
    providers: Iterable[Provider | str],
    torch_variants: Iterable[str] = (TorchVariant.EAGER.value,),
    dtypes: Iterable[str] = (TorchDtype.FP32.value,),
) -> list[Target]:
    """Every (model, provider) pair whose runtime supports the provider (TensorRT applies to ONNX only);
    PyTorch models (checkpoints, TorchScript) once per variant and dtype."""
    variants = [(TorchVariant(v).value, TorchDtype(d).value) for v in torch_variants for d in dtypes]
    try:
        wanted = [Provider(p) for p in providers]
    except ValueError as exc:
        raise UNetEdgeError(f"unknown provider: {exc}; use {', '.join(p.value for p in Provider)}") from None
    targets = []
    for path in paths:
        kind = artifact_format(path)
        for provider in (p for p in wanted if supports(kind, p)):
            pytorch = runtime_of(kind, provider)[0] in ("pytorch", "torchscript")
            targets += [Target(path, kind, provider, v, d) for v, d in variants] if pytorch else [Target(path, kind, provider)]
    return targets


def _unavailable_row(target: Target, reason: str, spec: BenchSpec) -> dict[str, Any]:
    backend, provider = runtime_of(target.kind, target.provider)
    return {
        "path": str(target.path),
        "backend": backend,
        "variant": target.variant,
        "provider": provider,
        "precision": target.dtype,
        "batch_size": None,
        "height": spec.height,
        "width": spec.width,
        "latency_ms": None,
        "e2e_latency_ms": None,
        "throughput_ips": None,
        "gflops_per_image": None,
        "gflops_per_s": None,
        "roofline_fraction": None,
        "file_mb": artifact_bytes(target.path) / 1e6,
        "status": f"unavailable: {reason}",
    }


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


def bench_paths(artifacts: list[Path] | None, checkpoint: Path | None = None, exported_dir: str | os.PathLike[str] = "exported") -> list[Path]:
    """The model files to measure: those given, else every artifact of the newest export and the checkpoint
    its manifest names; `checkpoint` (PyTorch eager) first when given."""
    paths = list(artifacts or [])
    if not paths:
        folder = find_latest_export(exported_dir)
        paths = export_artifacts(folder)
        checkpoint = checkpoint or manifest_checkpoint(folder)
    return [checkpoint, *paths] if checkpoint is not None else paths


def run_bench(
    paths: list[Path],
    spec: BenchSpec,
    providers: Iterable[Provider | str] = tuple(Provider),
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Measure every (model, provider, batch size) combination; unavailable ones become rows with
    the reason, never errors. All backends of one batch size are timed interleaved."""
    import torch

    threads = spec.threads or default_threads()
    torch.set_num_threads(threads)
    targets = plan_targets(paths, providers, spec.torch_variants, spec.dtypes)
    rooflines: dict[tuple[str, str], float] = {}
    gflops_cache: dict[str, float] = {}
    rows: list[dict[str, Any] | None] = []
    measured: list[tuple[int, Target, Backend, float, float]] = []  # row slot, target, backend, GFLOP, peak
    for target in targets:
        reason = provider_unavailable(target.kind, target.provider)
        if reason:
            rows.append(_unavailable_row(target, reason, spec))
            continue
        backend = open_backend(target.path, target.provider, threads)
        if backend.input_format != "nchw-float32":
            backend.close()
            rows.append(_unavailable_row(target, "end-to-end (uint8) model: measured through predict, not bench", spec))
            continue
        if isinstance(backend, TorchBackend) and target.variant is not None:
            reason = backend.use_variant(target.variant, target.dtype or TorchDtype.FP32.value)
            if reason:
                backend.close()
                rows.append(_unavailable_row(target, reason, spec))
                continue
        if backend.precision == "bf16" and target.provider is Provider.CPU and (reason := cpu_bf16_skip_reason()):
            backend.close()
            rows.append(_unavailable_row(target, reason, spec))
            continue
        config = backend.model_config
        key = repr(sorted(config.items()))
        if key not in gflops_cache:
            gflops_cache[key] = count_gflops(config, spec.height, spec.width)
        device = target.provider.torch_device
        precision = reference_kernel(device, backend.precision if backend.precision in ("fp16", "bf16", "int8") else "fp32")[1]
        if (device, precision) not in rooflines:
            if progress:
                progress(f"measuring {device} {precision} matmul rate", 0, len(spec.batch_sizes))
            rooflines[(device, precision)] = measure_matmul_gflops(device, precision, threads=threads)
        measured.append((len(rows), target, backend, gflops_cache[key], rooflines[(device, precision)]))
        rows.append(None)

    per_batch: dict[int, list[dict[str, Any]]] = {}
    rng = np.random.default_rng(0)
    for step, batch in enumerate(spec.batch_sizes):
        if progress:
            progress(f"batch {batch}: {len(measured)} backends interleaved", step, len(spec.batch_sizes))
        images = rng.standard_normal((batch, 3, spec.height, spec.width), dtype=np.float32)
        runners, failures = [], {}
        for index, (_, target, backend, _, _) in enumerate(measured):
            try:  # a variant can fail on first use (torch.compile without a compiler, a capture error, ...)
                run = backend.device_runner(images)
                run()
                runners.append(run)
            except Exception as exc:  # noqa: BLE001 - reported in the row, as for an unavailable provider
                failures[index] = f"failed: {exc.__class__.__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        def on_round(fraction: float, step: int = step, batch: int = batch, count: int = len(runners)) -> None:
            if progress:
                progress(f"batch {batch}: {count} backends interleaved, {fraction:.0%} timed", step, len(spec.batch_sizes))

        all_latencies = iter(
            time_interleaved(runners, warmup=spec.warmup, iters=spec.iters, seconds=spec.seconds, min_iters=spec.min_iters, on_round=on_round)
        )
        results = []
        for index, (_, target, backend, gflops, peak) in enumerate(measured):
            if index in failures:
                results.append({**_unavailable_row(target, "", spec), "batch_size": batch, "status": failures[index]})
                continue
            latencies = next(all_latencies)
            stats = latency_stats(latencies)
            e2e = None
            if target.provider is not Provider.CPU:
                e2e = latency_stats(
                    time_runner(lambda: backend.predict_logits(images), warmup=spec.warmup, iters=spec.iters, seconds=spec.seconds, min_iters=spec.min_iters)
                )
            throughput = batch / (stats["p50"] / 1000.0)  # median-based: robust to noisy neighbours
            results.append(
                {
                    "path": str(target.path),
                    "backend": backend.backend,
                    "variant": target.variant,
                    "provider": backend.provider,
                    "precision": backend.precision,
                    "batch_size": batch,
                    "height": spec.height,
                    "width": spec.width,
                    "latency_ms": stats,
                    "e2e_latency_ms": e2e,
                    "iterations": len(latencies),
                    "throughput_ips": throughput,
                    "gflops_per_image": gflops,
                    "gflops_per_s": gflops * throughput,
                    "roofline_fraction": gflops * throughput / peak,
                    "roofline_gflops_per_s": peak,
                    "file_mb": artifact_bytes(target.path) / 1e6,
                    "status": "ok",
                }
            )
        per_batch[batch] = results
    if progress:
        progress("done", len(spec.batch_sizes), len(spec.batch_sizes))
    for _, _, backend, _, _ in measured:
        backend.close()
    ordered: list[dict[str, Any]] = []
    for index, row in enumerate(rows):
        if row is not None:
            ordered.append(row)
            continue
        slot = [m[0] for m in measured].index(index)
        ordered.extend(per_batch[batch][slot] for batch in spec.batch_sizes)
    return {
        "machine": {**machine_info(threads), "matmul_gflops_per_s": {f"{d}/{p}": v for (d, p), v in rooflines.items()}},
        "settings": {
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
            "cuda_fp32_matmul": _cuda_fp32_matmul(),
        },
        "results": ordered,
    }


def print_progress(min_interval_s: float = 5.0) -> Callable[[str, int, int], None]:
    """A `run_bench` progress callback for scripts: one line on stderr with the elapsed time, at most every
    `min_interval_s` seconds (and whenever the step changes), so a long timing run shows it is alive."""
    import sys

    started = time.perf_counter()
    last = {"at": -math.inf, "step": -1}

    def show(label: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == last["step"] and now - last["at"] < min_interval_s:
            return
        last.update(at=now, step=done)
        print(f"[{now - started:6.0f} s] bench {done}/{total}: {label}", file=sys.stderr, flush=True)

    return show


def backend_label(row: dict[str, Any]) -> str:
    """The runtime, and for PyTorch rows the variant that ran ("pytorch channels-last")."""
    return f"{row['backend']} {row['variant']}" if row.get("variant") else row["backend"]


def to_markdown(report: dict[str, Any]) -> str:
    """The results as a Markdown table (what benchmarks/README.md and `bench --markdown` contain)."""
    header = "| model | backend | provider | precision | batch | H×W | p50 ms | p90 ms | p99 ms | mean ms | min ms | img/s | GFLOP/img | GFLOP/s | roofline | MB | status |"
    lines = [header, "|" + "---|" * 17]
    for r in report["results"]:
        lat = r["latency_ms"] or {}

        def num(value: Any, digits: int = 1) -> str:
            return "-" if value is None else f"{value:.{digits}f}"

        model = "/".join(Path(r["path"]).parts[-2:])
        lines.append(
            f"| {model} | {backend_label(r)} | {r['provider']} | {r['precision'] or '-'} | {r['batch_size'] or '-'} | {r['height']}×{r['width']} | "
            f"{num(lat.get('p50'))} | {num(lat.get('p90'))} | {num(lat.get('p99'))} | {num(lat.get('mean'))} | {num(lat.get('min'))} | "
            f"{num(r['throughput_ips'])} | {num(r['gflops_per_image'], 2)} | {num(r['gflops_per_s'])} | {num(r['roofline_fraction'], 2)} | "
            f"{num(r['file_mb'], 2)} | {r['status']} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Latency per backend (smallest batch) and throughput against batch size, as one PNG."""
    from .io import pyplot, save_figure

    rows = [r for r in report["results"] if r["status"] == "ok"]
    if not rows:
        raise UNetEdgeError("nothing to plot: no backend could be measured")
    smallest = min(r["batch_size"] for r in rows)
    fig, (ax_lat, ax_tp) = pyplot().subplots(1, 2, figsize=(12, 4.5))
    first = [r for r in rows if r["batch_size"] == smallest]
    labels = [f"{backend_label(r)}\n{r['provider'].replace('ExecutionProvider', '')}\n{r['precision']}" for r in first]
    ax_lat.bar(range(len(first)), [r["latency_ms"]["p50"] for r in first], color="C0")
    ax_lat.errorbar(
        range(len(first)),
        [r["latency_ms"]["p50"] for r in first],
        yerr=[[0] * len(first), [r["latency_ms"]["p90"] - r["latency_ms"]["p50"] for r in first]],
        fmt="none",
        color="black",
        capsize=3,
    )
    ax_lat.set_xticks(range(len(first)), labels, fontsize=8)
    ax_lat.set(ylabel="latency ms (p50, bar to p90)", title=f"Latency, batch {smallest}, {rows[0]['height']}×{rows[0]['width']}")
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        series.setdefault(f"{backend_label(r)} {r['provider'].replace('ExecutionProvider', '')} {r['precision']}", []).append(
            (r["batch_size"], r["throughput_ips"])
        )
    for name, points in series.items():
        points.sort()
        ax_tp.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax_tp.set(xlabel="batch size", ylabel="images/s", title="Throughput against batch size")
    ax_tp.legend(fontsize=8)
    for ax in (ax_lat, ax_tp):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
