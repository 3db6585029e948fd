"""The records deploy measures and decides over: frozen, typed, built once per stage and never changed in place."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bench.timing import WARMUP
from ..errors import UNetEdgeError
from ..formats import Precision

__all__ = [
    "Baseline",
    "Candidate",
    "DeployError",
    "DeployOptions",
    "Machine",
    "Reference",
    "Settings",
    "Skipped",
]


class DeployError(UNetEdgeError):
    """No candidate keeps the accuracy, or the checkpoints cannot compete (different classes)."""


@dataclass(frozen=True)
class DeployOptions:
    """What `unet-edge deploy` compares and how it measures."""

    checkpoints: tuple[Path, ...] = ()  # empty: the newest runs_dir/*/best.pt
    reference: Path | None = None  # default: the most accurate checkpoint given (it competes too)
    max_miou_drop: float = 0.01
    # With a latency budget (p50 ms), the winner is the most accurate candidate within it and the mIoU budget.
    max_latency_ms: float | None = None
    image_size: tuple[int, int] = (256, 256)
    batch_size: int = 1
    threads: int | None = None  # default: one per core, the same for every runtime
    formats: tuple[str, ...] | None = None  # None: every registered format whose runtime is installed
    precisions: tuple[Precision, ...] | None = None  # None: every precision a format offers
    seconds: float = 2.0  # timed seconds per candidate and column
    min_calls: int = 30  # timed calls per candidate and column, at least
    warmup: int = WARMUP  # untimed calls per candidate before the first round (1 before each later one)
    rounds: int = 3  # timing is split in rounds, each cached, so an interrupted run resumes between rounds
    out: Path = Path("deployed")
    data: Path | None = None  # validation and calibration set; default: the checkpoints'
    calib_images: int = 32
    calibration: str | None = None  # the int8 calibration method; None: each format's default
    runs_dir: Path = Path("runs")
    jobs: int | None = None  # exports at once, each in a worker process; None: one per core; 1: all in this process
    # A latency table's reference anchor p50 (ms) at this size and batch: the anchor model is timed with the
    # candidates and every figure is read on the table's scale (the search hands it, so that deploy's verdict on
    # the budget and the table's agree however the machine's speed drifted in between). None: figures as timed.
    anchor_ms: float | None = None


@dataclass(frozen=True)
class Skipped:
    """A format (precision None: all of it) or one of its precisions left out before exporting, and why."""

    format: str
    precision: str | None
    reason: str


@dataclass(frozen=True)
class Candidate:
    """One model x format x precision: where its files are, how accurate and how fast it is, and what failed
    while exporting, measuring or timing it (`rejected`; the budget's verdict is `decide`'s, not a field)."""

    model: str  # the checkpoint's name in reports (its run folder)
    checkpoint: str
    checkpoint_sha256: str
    format: str
    precision: str
    runtime: str = ""
    architecture: str = ""
    path: str | None = None  # the model file
    files: tuple[dict[str, Any], ...] = ()  # the model file and its companions: file, sha256, size_bytes
    size_mb: float | None = None
    miou: float | None = None  # val mIoU against the ground truth
    miou_drop: float | None = None  # the reference checkpoint's val mIoU minus this one's
    pixel_agreement: float | None = None  # with the reference checkpoint's masks
    latency_ms: dict[str, float] | None = None  # the model call on prepared input (p50, p90, p99, mean, min)
    app_latency_ms: dict[str, float] | None = None  # from uint8 images: preprocessing, the call and the argmax
    calls: int | None = None  # timed calls of the model column
    rejected: str | None = None  # export, measuring or timing failed: the one-line reason
    key: str = ""

    @property
    def label(self) -> str:
        return f"{self.model} {self.format} {self.precision}"

    @property
    def p50(self) -> float | None:
        return None if self.latency_ms is None else self.latency_ms["p50"]


@dataclass(frozen=True)
class Reference:
    """The checkpoint the budget is measured against, and every competing checkpoint's own val mIoU."""

    checkpoint: str
    sha256: str
    model: str
    architecture: str
    miou: float
    chosen_by: str
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> path, miou, architecture


@dataclass(frozen=True)
class Baseline:
    """The reference checkpoint in PyTorch eager, timed interleaved with the candidates (`failed`: why not)."""

    model: str
    checkpoint: str
    runtime: str = "pytorch eager"
    precision: str = "fp32"
    latency_ms: dict[str, float] | None = None
    app_latency_ms: dict[str, float] | None = None
    calls: int | None = None
    failed: str | None = None
    # With a reference anchor: the anchor's p50 timed here, and the factor (reference / it) that every latency
    # figure of this run, the baseline's and the candidates', was multiplied by.
    anchor_p50_ms: float | None = None
    scale: float = 1.0

    @property
    def p50(self) -> float | None:
        return None if self.latency_ms is None else self.latency_ms["p50"]


@dataclass(frozen=True)
class Machine:
    """Where the figures were measured: the CPU, its int8/bf16 instructions, and bench's other facts."""

    cpu: str
    cpu_int8_bf16: tuple[str, ...] = ()
    facts: dict[str, Any] = field(default_factory=dict)  # cores, threads, versions (bench's machine_info)
    cpu_flags_override: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            **self.facts,
            "cpu": self.cpu,
            "cpu_int8_bf16": list(self.cpu_int8_bf16),
            "cpu_flags_override": self.cpu_flags_override,
        }


@dataclass(frozen=True)
class Settings:
    """How the candidates were measured, as the report states it."""

    checkpoints: tuple[str, ...]
    max_miou_drop: float
    max_latency_ms: float | None
    image_size: tuple[int, int]
    batch_size: int
    threads: int
    seconds: float
    min_calls: int
    warmup: int
    rounds: int
    data: str = ""
    validation_images: int = 0
    anchor_ms: float | None = None  # the latency table's reference anchor the figures are read against
    timing: str = ""  # the timing protocol in words (`timing.PROTOCOL`)
