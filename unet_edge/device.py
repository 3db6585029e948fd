"""Device policy, decided once per run: which device, mixed precision, and memory layout.

Training, evaluation and the throughput benchmark all ask here, so they run the same way.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from .cpuinfo import precision_skip_reason
from .errors import TrainingError

__all__ = [
    "Precision",
    "autocast_context",
    "environment_change",
    "mixed_precision",
    "native_bf16",
    "place_model",
    "prefers_channels_last",
    "resolve_device",
    "run_environment",
    "run_environments",
]


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then the CPU; an explicit device that is absent is an error."""
    mps = getattr(torch.backends, "mps", None)
    mps_available = mps is not None and mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} requested but CUDA is not available on this machine")
    if name == "mps" and not mps_available:
        raise TrainingError("device 'mps' requested but Apple MPS is not available on this machine")
    if name != "cpu" and not name.startswith(("cuda", "mps")):
        raise TrainingError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return torch.device(name)


def autocast_context(device: torch.device, enabled: bool) -> tuple[AbstractContextManager, torch.dtype | None]:
    """Mixed precision on CUDA only: bf16 where supported, otherwise fp16 (which needs a grad scaler)."""
    if not enabled or device.type != "cuda":
        return nullcontext(), None
    dtype = torch.bfloat16 if native_bf16(device) else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype), dtype


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware: on CUDA Ampere and later (PyTorch's default check also counts
    emulation, under which a V100 or T4 would train in slow emulated bf16 instead of fp16 with a scaler); on
    the CPU avx512_bf16 or AMX (elsewhere bf16 is emulated, hundreds of times slower than fp32)."""
    if device.type == "cpu":
        return precision_skip_reason("bf16") is None
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


@dataclass
class Precision:
    """The autocast context of training steps, and the grad scaler that fp16 (only) needs."""

    autocast: AbstractContextManager
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None


def mixed_precision(device: torch.device, enabled: bool) -> Precision:
    """`autocast_context` plus a grad scaler when the chosen dtype is float16."""
    autocast, dtype = autocast_context(device, enabled)
    return Precision(autocast, dtype, torch.amp.GradScaler("cuda") if dtype == torch.float16 else None)


def prefers_channels_last(device: torch.device, training: bool = False) -> bool:
    """Whether to run UNetStudent in the NHWC memory layout on `device`.

    cuDNN (tensor cores) and oneDNN run its convolutions faster in NHWC, but on the CPU only for inference:
    PyTorch's CPU BatchNorm in training mode is about 1000x less accurate in channels_last (relative error
    5e-5 against float64, 5e-8 in NCHW; torch 2.14.1), which put 5-8 % errors into the conv bias gradients
    of a depth-3 UNetStudent and cost val mIoU (digit scenes, seed 0: 0.844 in NHWC, 0.865 in NCHW). So CPU
    training stays NCHW; evaluation, which uses the running statistics, may use NHWC.
    """
    if device.type == "cuda":
        return True
    return device.type == "cpu" and not training


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def place_model(model: ModuleT, device: torch.device, training: bool = False) -> ModuleT:
    """Move `model` to `device`, in the memory layout that device runs best for `training` or inference
    (and on CUDA let cuDNN pick the fastest convolution algorithm per shape, which it does only when asked)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if prefers_channels_last(device, training) else model


def run_environment(device: torch.device) -> dict[str, Any]:
    """What decides whether a seeded run repeats to the last digit: the PyTorch version, and the GPU, or the CPU's
    vector instruction set (whose kernels sum in another order: one seed of a benchmark student reached 0.9739 on an
    AVX2 CPU and 0.972 on an AVX-512 one, benchmarks/README.md) and the thread count."""
    facts: dict[str, Any] = {"torch": str(torch.__version__), "device": device.type}
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        facts["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        facts["threads"] = torch.get_num_threads()
    return facts


# What `environment_change` names, by the keys of `run_environment`.
_ENVIRONMENT_LABELS = {
    "torch": "PyTorch",
    "device": "device",
    "gpu": "GPU",
    "cpu_capability": "CPU kernels",
    "threads": "threads",
}


def environment_change(before: dict[str, Any], now: dict[str, Any]) -> str | None:
    """How `now` differs from `before` (both `run_environment` records), or None where a seeded run repeats."""
    changes = [
        f"{label} {before.get(key)} -> {now.get(key)}"
        for key, label in _ENVIRONMENT_LABELS.items()
        if (key in before or key in now) and before.get(key) != now.get(key)
    ]
    return ", ".join(changes) or None


def run_environments(
    earlier: list[dict[str, Any]], start_epoch: int, device: torch.device
) -> tuple[list[dict[str, Any]], str | None]:
    """A run's record of where its epochs were computed (`run_environment`, one entry per change, each with the
    epoch it began at), continued from `earlier` (a resumed checkpoint's) at `start_epoch` on `device`; and what
    changed since the last entry (None: nothing, or no earlier entry)."""
    now = run_environment(device)
    sessions = [dict(entry) for entry in earlier]
    last = {k: v for k, v in sessions[-1].items() if k != "from_epoch"} if sessions else None
    change = environment_change(last, now) if last is not None else None
    if last is None or change is not None:
        sessions.append({"from_epoch": start_epoch, **now})
    return sessions, change
