"""What the benchmark scripts share: their folders, the one README-section writer, the one timing function (the
library's `time_interleaved`, re-exported with its statistics) and the progress line.

The scripts run as `python benchmarks/NAME.py`, so this folder is on `sys.path` and they import this module (and,
through it, each other's pieces) by name, with no path edits.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unet_edge.bench.timing import WARMUP, latency_stats, time_interleaved
from unet_edge.io import atomic_write_text
from unet_edge.progress import print_progress

__all__ = [
    "HERE",
    "OUT",
    "README",
    "WARMUP",
    "latency_stats",
    "machine",
    "median_ms",
    "print_progress",
    "time_interleaved",
    "write_section",
]

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
OUT = HERE / "out"


def write_section(readme: Path, name: str, body: str) -> None:
    """Rewrite only the text between `<!-- BEGIN name -->` and `<!-- END name -->` of `readme` (appended when
    absent), atomically."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else "# Benchmarks\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(readme, text)


def median_ms(
    runs: list[Callable[[], Any]],
    *,
    seconds: float,
    warmup: int = WARMUP,
    min_calls: int = 10,
    iters: int | None = None,
) -> list[float]:
    """The p50 latency (ms) of each of `runs`, timed interleaved by the one protocol every command uses."""
    return [
        latency_stats(samples)["p50"]
        for samples in time_interleaved(runs, warmup=warmup, iters=iters, seconds=seconds, min_iters=min_calls)
    ]


def machine() -> str:
    """The CPU model, logical CPUs, torch and its threads, Python and the OS: the line a section states."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} using {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )
