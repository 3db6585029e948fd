"""What this CPU computes natively (read from /proc/cpuinfo, no heavy imports): int8 dot-product and bf16 units.

bf16 work is offered, timed and used as a reference only where the CPU has bf16 instructions; elsewhere
PyTorch and oneDNN emulate it, hundreds of times slower than fp32.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

__all__ = [
    "BF16_NATIVE_FLAGS",
    "FP16_NATIVE_FLAGS",
    "INT8_BF16_FLAGS",
    "cpu_flags",
    "cpu_int8_bf16_flags",
    "precision_skip_reason",
]

# CPU flags (as /proc/cpuinfo names them) that decide int8 and bf16 speed: dot-product and matrix units.
INT8_BF16_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16", "amx_tile")
# Instruction sets that compute bf16 arithmetic natively; without one, PyTorch and oneDNN emulate bf16
# (measured on an AVX2-only EPYC: one bf16-autocast forward of the default model 61.6 s against 301 ms in fp32).
BF16_NATIVE_FLAGS = ("avx512_bf16", "amx_bf16")
# CPU flags of fp16 arithmetic units (x86 AVX512-FP16 and AMX-FP16, ARM half-precision SIMD).
FP16_NATIVE_FLAGS = ("avx512_fp16", "amx_fp16", "asimdhp", "fphp")


def _first_cpu_flags(cpuinfo: str) -> list[str]:
    return next(
        (line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith(("flags", "Features"))), []
    )


def cpu_int8_bf16_flags(cpuinfo: str) -> list[str]:
    """Which of `INT8_BF16_FLAGS` the first CPU in a /proc/cpuinfo text has (empty when it lists none)."""
    flags = _first_cpu_flags(cpuinfo)
    return [flag for flag in INT8_BF16_FLAGS if flag in flags]


@functools.cache
def _cpuinfo_flags() -> tuple[str, ...]:
    try:
        return tuple(_first_cpu_flags(Path("/proc/cpuinfo").read_text()))
    except OSError:
        return ()


def cpu_flags() -> tuple[str, ...]:
    """This CPU's instruction-set flags as /proc/cpuinfo lists them (empty where it cannot be read).

    UNET_EDGE_CPU_FLAGS (space- or comma-separated) replaces them, to reproduce the choices made on another
    CPU kind (for example `UNET_EDGE_CPU_FLAGS=avx2` on an AVX-512 machine: bf16 rows are then skipped).
    """
    override = os.environ.get("UNET_EDGE_CPU_FLAGS")
    if override is not None:
        return tuple(override.replace(",", " ").split())
    return _cpuinfo_flags()


def precision_skip_reason(precision: str) -> str | None:
    """Why this CPU does not compute `precision` ("fp32", "fp16", "bf16", "int8") natively, or None when it does:
    the one rule every command applies. fp32 and int8 always run; bf16 needs avx512_bf16 or AMX (elsewhere
    PyTorch and oneDNN emulate it, far slower than fp32); fp16 needs fp16 arithmetic units."""
    flags = cpu_flags()
    if precision == "bf16" and not any(flag in flags for flag in BF16_NATIVE_FLAGS):
        return (
            "this CPU has no bf16 instructions (avx512_bf16 or amx_bf16), so bf16 would be emulated, far slower "
            "than fp32"
        )
    if precision == "fp16" and not any(flag in flags for flag in FP16_NATIVE_FLAGS):
        return (
            "this CPU has no fp16 arithmetic (avx512_fp16, amx_fp16 or ARM fp16 SIMD): an fp16 model would compute "
            "through conversions to fp32"
        )
    return None
