"""Planning and rows: the settings of a bench, the (model file, provider) pairs it measures, and the
row each pair yields per batch size, measured or with the reason it was not."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..artifact import artifact_bytes, export_artifacts, find_latest_export, manifest_checkpoint
from ..backends import artifact_format, runtime_of, supports
from ..errors import UNetEdgeError
from ..formats import FORMATS, Provider
from ..formats.torch_backend import TorchDtype, TorchVariant
from .timing import WARMUP

__all__ = ["BenchRow", "BenchSpec", "Target", "bench_paths", "not_measured", "plan_targets"]


@dataclass
class BenchSpec:
    batch_sizes: tuple[int, ...] = (1, 8)
    height: int = 256
    width: int = 256
    threads: int | None = None
    warmup: int = WARMUP
    iters: int | None = None
    seconds: float = 2.0  # of timed calls per row (model, provider, batch size) when iters is None
    min_iters: int = 5
    # PyTorch rows (checkpoints and TorchScript): one per variant x dtype that applies.
    torch_variants: tuple[str, ...] = (TorchVariant.EAGER.value,)
    dtypes: tuple[str, ...] = (TorchDtype.FP32.value,)


@dataclass
class Target:
    """One (model file, provider) pair to measure."""

    path: Path
    kind: str
    provider: Provider
    variant: str | None = None  # PyTorch rows only: a TorchVariant and a TorchDtype
    dtype: str | None = None


@dataclass(kw_only=True)
class BenchRow:
    """One row of a bench report: a model file on a provider at one batch size (None: not measured), its
    latency statistics (ms), throughput and roofline figures, or None for each with `status` saying why."""

    path: str
    backend: str
    variant: str | None
    provider: str
    precision: str | None
    batch_size: int | None
    height: int
    width: int
    latency_ms: dict[str, float] | None = None
    e2e_latency_ms: dict[str, float] | None = None  # including host<->device copies; non-CPU providers only
    iterations: int | None = None
    throughput_ips: float | None = None
    gflops_per_image: float | None = None
    gflops_per_s: float | None = None
    roofline_fraction: float | None = None
    roofline_gflops_per_s: float | None = None
    file_mb: float
    status: str

    # Keys that only measured rows carry in the JSON (the others are there, null, in every row).
    MEASURED_ONLY = ("iterations", "roofline_gflops_per_s")

    def to_dict(self) -> dict[str, Any]:
        """The row as the report's JSON holds it."""
        return {key: value for key, value in asdict(self).items() if value is not None or key not in self.MEASURED_ONLY}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> BenchRow:
        """A row read back from a report's JSON."""
        return cls(**row)


def not_measured(target: Target, height: int, width: int, status: str, batch_size: int | None = None) -> BenchRow:
    """The row of a target that could not be measured (at `batch_size`, or at all), `status` saying why."""
    backend, provider = runtime_of(target.kind, target.provider)
    return BenchRow(
        path=str(target.path),
        backend=backend,
        variant=target.variant,
        provider=provider,
        precision=target.dtype,
        batch_size=batch_size,
        height=height,
        width=width,
        file_mb=artifact_bytes(target.path) / 1e6,
        status=status,
    )


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
            # Formats run by PyTorch get a row per variant x dtype; the others one row.
            targets += (
                [Target(path, kind, provider, v, d) for v, d in variants]
                if FORMATS[kind].torch_variants
                else [Target(path, kind, provider)]
            )
    return targets


def bench_paths(
    artifacts: list[Path] | None, checkpoint: Path | None = None, exported_dir: str | os.PathLike[str] = "exported"
) -> list[Path]:
    """The model files to measure: those given, else every artifact of the newest export and the checkpoint
    its manifest names; `checkpoint` (PyTorch eager) first when given."""
    paths = list(artifacts or [])
    if not paths:
        folder = find_latest_export(exported_dir)
        paths = export_artifacts(folder)
        checkpoint = checkpoint or manifest_checkpoint(folder)
    return [checkpoint, *paths] if checkpoint is not None else paths
