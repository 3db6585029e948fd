"""Machine facts and the roofline: this machine's measured dense-matmul rates, a model's GFLOP per image,
and the CPU, GPU and library versions a reader needs to compare figures."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..cpuinfo import INT8_BF16_FLAGS, cpu_flags
from ..errors import UNetEdgeError
from ..formats import available_cores, default_threads
from .timing import time_interleaved

__all__ = ["count_gflops", "cuda_fp32_matmul", "machine_info", "measure_matmul_gflops", "reference_kernel"]


def measure_matmul_gflops(
    device: str = "cpu",
    precision: str = "fp32",
    size: int | None = None,
    seconds: float = 1.0,
    threads: int | None = None,
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
        a, b = (
            torch.randint(-127, 127, (size, size), dtype=torch.int8, generator=generator).to(device) for _ in range(2)
        )
        matmul = torch._int_mm  # int8 x int8 -> int32, the tensor-core path quantised layers use
    else:
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        a, b = (torch.randn(size, size, generator=generator).to(device=device, dtype=dtype) for _ in range(2))
        matmul = torch.mm
    flop = 2.0 * size**3
    if device.startswith("cuda"):
        return _cuda_rate(lambda: matmul(a, b), flop, seconds)
    latencies = time_interleaved([lambda: matmul(a, b)], warmup=2, iters=None, seconds=seconds, min_iters=3)[0]
    return flop / (min(latencies) / 1000.0) / 1e9


def cuda_fp32_matmul() -> str | None:
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
        feed: dict[str, np.ndarray] = {
            "a": rng.integers(0, 255, (size, size), dtype=np.uint8),
            "b": rng.integers(-127, 127, (size, size), dtype=np.int8),
        }
    else:
        op, a_type, b_type, c_type = "MatMul", TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT
        feed = {
            "a": rng.standard_normal((size, size), dtype=np.float32),
            "b": rng.standard_normal((size, size), dtype=np.float32),
        }
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["c"])],
        f"{precision}_matmul",
        [
            helper.make_tensor_value_info("a", a_type, [size, size]),
            helper.make_tensor_value_info("b", b_type, [size, size]),
        ],
        [helper.make_tensor_value_info("c", c_type, [size, size])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    latencies = time_interleaved([lambda: session.run(None, feed)], warmup=2, iters=None, seconds=seconds, min_iters=3)[
        0
    ]
    return 2.0 * size**3 / (min(latencies) / 1000.0) / 1e9


def count_gflops(model_config: dict[str, Any], height: int, width: int) -> float:
    """GFLOP (2 x multiply-accumulates) of one forward pass on one H x W image, counted by
    torch.utils.flop_counter on the float model (quantised variants do the same arithmetic)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..model import build_model

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
        "cores": available_cores(),
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
