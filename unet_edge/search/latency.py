"""The latency table: every architecture of the space, built with random weights, exported to the formats and
precisions this CPU runs natively (deploy's plan) and timed with bench's one protocol at the deploy size and
batch. Latency depends on the architecture, format and precision, not on trained weights, so it is measured
once, before any training, and kept in a JSON file keyed by the machine (CPU model and flags, threads, runtime
versions): a rerun, or another search on this machine, reuses it; a table measured on the target device can be
handed to a search that trains elsewhere.

Each architecture is timed in its own session, minutes apart, and a machine's speed drifts over minutes (here the
same row came out up to 25 % apart in two tables). So every session also times one fixed reference model, the
anchor, interleaved with its rows; a row keeps its session's anchor p50, and the table reads each row scaled by
the table's reference anchor over that session's: rows timed in a slow minute and in a fast one become comparable.
The reference is the median anchor of the first measurement at a size and batch, stored in the table, so a row
reads the same however many sessions are added after it; deploy, handed it, reads its own figures on that scale."""

from __future__ import annotations

import contextlib
import json
import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..bench.anchor import anchor_runner
from ..bench.timing import WARMUP, latency_stats, time_interleaved
from ..cpuinfo import cpu_flags
from ..deploy.cache import content_key
from ..errors import UNetEdgeError
from ..formats.base import available_cores
from ..io import atomic_write_text
from ..progress import Progress, Steps
from .space import Architecture

__all__ = [
    "RUNTIME_PACKAGES",
    "LatencyTable",
    "SearchError",
    "TableSettings",
    "machine_facts",
    "measure_table",
    "reference_key",
    "row_key",
    "table_anchor",
    "teacher_latency",
]

# The packages whose version changes what a format's artifact costs here: a new one invalidates the table.
RUNTIME_PACKAGES = ("torch", "onnxruntime", "onnx", "openvino", "executorch", "ai-edge-litert", "ncnn", "pnnx")
TABLE_VERSION = 2  # 2: every row carries its session's anchor p50


class SearchError(UNetEdgeError):
    """The search cannot start or go on: a budget nothing meets, a table without the rows needed, a study of
    other settings."""


@dataclass(frozen=True)
class TableSettings:
    """What a latency row is measured at: the deploy size and batch, the formats and precisions, the protocol."""

    image_size: tuple[int, int] = (256, 256)
    batch_size: int = 1
    threads: int = 1
    formats: tuple[str, ...] | None = ("onnx", "openvino")  # None: every installed format
    precisions: tuple[Any, ...] | None = None  # None: every precision a format offers and this CPU runs natively
    seconds: float = 0.5  # timed seconds per artifact
    min_calls: int = 10
    calib_images: int = 8


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_facts(threads: int) -> dict[str, Any]:
    """What a latency figure depends on besides the model: the CPU model, all its flags, the thread count and the
    runtimes' versions. Its digest is the table's machine key."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "cpu_flags": sorted(cpu_flags()),
        "threads": threads,
        "unet_edge": __version__,
        "versions": {name: _version(name) for name in RUNTIME_PACKAGES},
    }


def row_key(arch: Architecture, fmt: str, precision: str, num_classes: int, settings: TableSettings) -> str:
    """A row's key in the table: what it was measured at (a row measured otherwise is another row)."""
    return content_key(
        architecture=arch.name,
        format=fmt,
        precision=precision,
        num_classes=num_classes,
        image_size=list(settings.image_size),
        batch=settings.batch_size,
        seconds=settings.seconds,
        min_calls=settings.min_calls,
    )


@dataclass
class LatencyTable:
    """The table file: the machine it was measured on (`machine`, its key) and rows by content key, each one
    architecture x format x precision with its latency statistics (ms) or why exporting or timing failed.
    `foreign` marks a table measured on another machine: it is read, never measured into or rewritten."""

    path: Path
    machine: dict[str, Any]
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    foreign: bool = False
    measured: int = 0  # rows this process measured (the rest came from the file)
    # The reference anchor p50 (ms) by size and batch (`reference_key`): the scale every row is read on.
    references: dict[str, float] = field(default_factory=dict)

    @property
    def machine_key(self) -> str:
        return content_key(**self.machine)

    @classmethod
    def open(cls, path: Path, machine: dict[str, Any], *, given: bool) -> LatencyTable:
        """The table at `path`: its rows when it was measured on this machine; when it was measured on another,
        `given` (the user named the file: it describes the target device) keeps it as it is, otherwise it is
        started afresh (this machine's figures replace it)."""
        key = content_key(**machine)
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, json.JSONDecodeError) as exc:
            if given:
                raise SearchError(f"{path}: not a readable latency table ({exc.__class__.__name__})") from None
            data = None
        if data is not None and (not isinstance(data, dict) or data.get("version") != TABLE_VERSION):
            if given:
                raise SearchError(f"{path}: not a unet-edge latency table (version {TABLE_VERSION})")
            data = None
        if data is None:
            return cls(path, machine)
        rows, references = dict(data.get("rows", {})), {k: float(v) for k, v in data.get("references", {}).items()}
        if data.get("machine_key") == key:
            return cls(path, machine, rows, references=references)
        if given:
            return cls(path, dict(data.get("machine", {})), rows, foreign=True, references=references)
        return cls(path, machine)

    def save(self) -> None:
        if self.foreign:
            return
        payload = {
            "version": TABLE_VERSION,
            "machine_key": self.machine_key,
            "machine": self.machine,
            "rows": self.rows,
            "references": self.references,
        }
        atomic_write_text(self.path, json.dumps(payload, indent=1, sort_keys=True, allow_nan=False) + "\n")

    def anchor_reference(self, image_size: Any, batch_size: int) -> float | None:
        """The reference anchor p50 at this size and batch: the one stored in the table (`fix_references`), else
        the median anchor over the rows measured so far (None: no row has one)."""
        stored = self.references.get(reference_key(image_size, batch_size))
        if stored is not None:
            return stored
        values = [
            float(row["anchor_ms"])
            for row in self.rows.values()
            if row.get("anchor_ms")
            and tuple(row["image_size"]) == tuple(image_size)
            and row["batch_size"] == batch_size
        ]
        return float(np.median(values)) if values else None

    def fix_references(self) -> bool:
        """Store the reference anchor of every size and batch that has anchored rows and no reference yet (the
        median of their anchors), so that later sessions do not move it; whether any was stored."""
        added = False
        for row in self.rows.values():
            key = reference_key(row["image_size"], row["batch_size"])
            reference = None
            if row.get("anchor_ms") and key not in self.references:
                reference = self.anchor_reference(row["image_size"], row["batch_size"])  # this row's anchor counts
            if reference is not None:
                self.references[key] = reference
                added = True
        return added

    def anchored(self, row: dict[str, Any]) -> dict[str, Any]:
        """`row` with its latency figures scaled by the table's reference anchor over its session's anchor (the figures
        as timed stay under `measured_latency_ms`); a row without figures or without an anchor as it is."""
        anchor = row.get("anchor_ms")
        reference = self.anchor_reference(row["image_size"], row["batch_size"]) if anchor else None
        if not row.get("latency_ms") or not anchor or reference is None:
            return row
        scale = reference / float(anchor)
        scaled = {name: value * scale for name, value in row["latency_ms"].items()}
        return {**row, "latency_ms": scaled, "measured_latency_ms": row["latency_ms"], "anchor_scale": scale}

    def rows_of(self, arch: Architecture, num_classes: int, settings: TableSettings) -> list[dict[str, Any]]:
        """The rows measured for `arch` at these settings (any format and precision the table holds)."""
        return [
            row
            for row in self.rows.values()
            if row.get("architecture") == arch.name
            and row["num_classes"] == num_classes
            and tuple(row["image_size"]) == tuple(settings.image_size)
            and row["batch_size"] == settings.batch_size
        ]

    def best(self, arch: Architecture, num_classes: int, settings: TableSettings) -> dict[str, Any] | None:
        """The fastest artifact of `arch` (lowest anchored p50, see `anchored`) among the formats and precisions
        asked for, or None."""
        timed = [
            self.anchored(row)
            for row in self.rows_of(arch, num_classes, settings)
            if row.get("latency_ms")
            and (settings.formats is None or row["format"] in settings.formats)
            and (
                settings.precisions is None or row["precision"] in {getattr(p, "value", p) for p in settings.precisions}
            )
        ]
        return min(timed, key=lambda row: row["latency_ms"]["p50"], default=None)


def table_anchor(path: Path, threads: int, image_size: tuple[int, int], batch_size: int) -> float:
    """The reference anchor p50 (ms) of the latency table at `path`, for deploy to read its figures on that table's
    scale: the table must be this machine's, at these threads, and hold anchored rows at this size and batch."""
    if not path.is_file():
        raise SearchError(f"{path}: no such latency table")
    table = LatencyTable.open(path, machine_facts(threads), given=True)
    if table.foreign:
        raise SearchError(
            f"{path}: measured on another machine or thread count ({table.machine.get('cpu', '?')}, "
            f"{table.machine.get('threads', '?')} threads); deploy times this one at {threads} threads"
        )
    reference = table.anchor_reference(image_size, batch_size)
    if reference is None:
        size = "x".join(map(str, image_size))
        raise SearchError(f"{path}: no row timed with the anchor at {size} batch {batch_size}")
    return reference


def reference_key(image_size: Any, batch_size: int) -> str:
    """Where a table keeps the reference anchor of a size and batch."""
    height, width = image_size
    return f"{height}x{width}-b{batch_size}"


def _time_with_anchor(runners: list[Callable[[], Any]], settings: TableSettings) -> tuple[list[list[float]], float]:
    """Each runner's latencies (ms), timed interleaved with the anchor by bench's protocol at the table's seconds and
    calls, and the anchor's p50 in that session."""
    *latencies, anchor = time_interleaved(
        [*runners, anchor_runner(settings.image_size, settings.batch_size)],
        warmup=WARMUP,
        iters=None,
        seconds=settings.seconds,
        min_iters=settings.min_calls,
    )
    return latencies, float(np.percentile(anchor, 50))


def _classes(root: Path) -> tuple[list[str], int | None]:
    from ..data import scan_dataset

    info = scan_dataset(root, splits=("val",)).info
    return list(info.classes), info.ignore_index


def measure_table(
    space: tuple[Architecture, ...],
    table: LatencyTable,
    settings: TableSettings,
    data_root: Path,
    progress: Progress | None = None,
    jobs: int | None = None,
) -> tuple[LatencyTable, int]:
    """`table` with a row for every architecture x planned format x precision (those it lacks are measured
    here and saved after each architecture, so an interrupted run keeps what was timed), and the number of
    classes the rows are for. A foreign table is only read: a row it lacks is an error naming the first."""
    from ..deploy.plan import plan_candidates

    classes, ignore_index = _classes(data_root)
    plan = plan_candidates(settings.formats, settings.precisions)
    if not plan.formats:
        why = "; ".join(f"{s.format} {s.precision or ''}: {s.reason}" for s in plan.skipped)
        raise SearchError(f"no format to time the architectures with ({why or 'none offers the precisions asked'})")
    wanted = [
        (arch, name, precision)
        for arch in space
        for name, precisions in plan.formats
        for precision in precisions
        if row_key(arch, name, precision.value, len(classes), settings) not in table.rows
    ]
    if wanted and table.foreign:
        arch, name, precision = wanted[0]
        raise SearchError(
            f"{table.path}: measured on {table.machine.get('cpu', 'another machine')}, it has no row for {arch.name} "
            f"{name} {precision.value} at {'x'.join(map(str, settings.image_size))} batch {settings.batch_size} "
            f"({len(wanted)} missing); measure them on that machine with `unet-edge search --latency-only`"
        )
    todo = list(dict.fromkeys(arch for arch, _, _ in wanted))
    steps = Steps(progress, total=max(len(todo), 1))
    jobs = max(1, min(jobs or available_cores(), len(todo)))
    # The exports (single-threaded conversions) of a batch of architectures run side by side in `jobs` worker
    # processes; then each architecture is timed alone, with the machine to itself, and saved, so an interrupted
    # run loses at most one batch's exports.
    size = 2 * jobs if jobs > 1 else 1
    with (
        tempfile.TemporaryDirectory(prefix="unet-edge-latency-") as tmp,
        _Exporters(jobs, settings, classes, ignore_index, data_root, Path(tmp)) as exporters,
    ):
        for first in range(0, len(todo), size):
            batch = todo[first : first + size]
            missing = {arch: {(name, precision) for a, name, precision in wanted if a == arch} for arch in batch}
            names = ", ".join(arch.name for arch in batch)
            steps.say(f"exporting {names}" + (f" in {jobs} processes" if jobs > 1 and len(batch) > 1 else ""))
            exported = exporters.export(missing)
            for arch in batch:
                steps.say(f"timing {arch.name}")
                files, rows = exported[arch]
                rows.update(_time_architecture(arch, files, len(classes), settings))
                for (fmt, precision_name), row in rows.items():
                    table.rows[row_key(arch, fmt, precision_name, len(classes), settings)] = row
                    table.measured += 1
                table.save()
                steps.advance()
    if not table.foreign and table.fix_references():  # the first measurement at a size and batch sets its scale
        table.save()
    steps.done()
    return table, len(classes)


Exported = tuple[dict[tuple[str, str], Path], dict[tuple[str, str], dict[str, Any]]]


class _Exporters:
    """Where a batch of architectures is exported into `folder`: `jobs` worker processes (one thread each) kept for
    the whole table, since a new process pays the converters' imports and first calls again (an ONNX export took
    twice as long in a fresh process), or this process with one job. An export whose worker died is done again
    here, and the next batch gets new workers."""

    def __init__(
        self,
        jobs: int,
        settings: TableSettings,
        classes: list[str],
        ignore_index: int | None,
        data_root: Path,
        folder: Path,
    ) -> None:
        self.jobs, self.settings = jobs, settings
        self.common: dict[str, Any] = {
            "classes": classes,
            "ignore_index": ignore_index,
            "settings": settings,
            "data_root": data_root,
            "folder": folder,
        }
        self.pool: Any = None  # a ProcessPoolExecutor once the first batch needs it

    def __enter__(self) -> _Exporters:
        return self

    def __exit__(self, kind: Any, *rest: Any) -> None:
        from ..processes import stop_pool

        if self.pool is not None:
            stop_pool(self.pool) if kind is not None else self.pool.shutdown(wait=True)

    def export(self, missing: dict[Architecture, set[tuple[str, Any]]]) -> dict[Architecture, Exported]:
        """Each architecture's files and failed rows, for the (format, precision) pairs `missing` names."""
        from ..processes import worker_pool

        done: dict[Architecture, Exported] = {}
        if self.jobs > 1 and len(missing) > 1:
            if self.pool is None:
                self.pool = worker_pool(self.jobs)
            futures = {
                arch: self.pool.submit(_export_architecture, arch, pairs, **self.common)
                for arch, pairs in missing.items()
            }
            for arch, future in futures.items():
                with contextlib.suppress(Exception):  # the worker died (a converter's crash): done again below
                    done[arch] = future.result()
            if len(done) < len(missing):
                self.pool.shutdown(wait=False, cancel_futures=True)
                self.pool = None
        for arch, pairs in missing.items():
            if arch not in done:
                done[arch] = _export_architecture(arch, pairs, **self.common, threads=self.settings.threads)
        return done


def _row_base(arch: Architecture, num_classes: int, settings: TableSettings) -> dict[str, Any]:
    return {
        "architecture": arch.name,
        "num_classes": num_classes,
        "image_size": list(settings.image_size),
        "batch_size": settings.batch_size,
    }


def _export_architecture(
    arch: Architecture,
    missing: set[tuple[str, Any]],
    classes: list[str],
    ignore_index: int | None,
    settings: TableSettings,
    data_root: Path,
    folder: Path,
    threads: int | None = None,
) -> Exported:
    """One architecture with random weights (seed 0), exported per format (fp32 and the variants asked for) into
    FOLDER/ARCH: the files to time, and a row with the reason for each one that could not be written."""
    import torch

    from ..checkpoint import save_checkpoint
    from ..deploy.measure import one_line
    from ..export import ExportOptions, run_export
    from ..formats import FORMATS, DeployTarget, Precision
    from ..model import build_model

    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        config = arch.model_config(len(classes))
        model = build_model(config).eval()
        target = DeployTarget(image_size=settings.image_size, batch_size=settings.batch_size)
        base = _row_base(arch, len(classes), settings)
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        files: dict[tuple[str, str], Path] = {}
        formats = list(dict.fromkeys(name for name, _ in sorted(missing, key=lambda pair: (pair[0], pair[1].value))))
        out = folder / arch.name
        out.mkdir(parents=True, exist_ok=True)
        checkpoint = out / "random.pt"
        save_checkpoint(
            checkpoint,
            {
                "model": model.state_dict(),
                "config": config.to_dict(),
                "classes": classes,
                "mean": [0.5, 0.5, 0.5],
                "std": [0.25, 0.25, 0.25],
                "ignore_index": ignore_index,
                "data_root": str(data_root),
            },
        )
        for name in formats:
            precisions = tuple(p for n, p in missing if n == name)
            try:
                result = run_export(
                    ExportOptions(
                        checkpoint=checkpoint,
                        out=out,
                        name=name,
                        formats=(name,),
                        precisions=tuple(dict.fromkeys((Precision.FP32, *precisions))),
                        data=data_root,
                        calib_images=settings.calib_images,
                        max_miou_drop=1.0,  # random weights: the variants' accuracy means nothing here
                        parity_images=0,
                        format_options=FORMATS[name].options_for(target),
                    )
                )
            except Exception as exc:
                for precision in precisions:
                    rows[(name, precision.value)] = {
                        **base,
                        "format": name,
                        "precision": precision.value,
                        "failed": f"export failed: {one_line(exc)}",
                    }
                continue
            written = {a.precision: a.path for a in result.artifacts}
            for precision in precisions:
                if precision.value in written:
                    files[(name, precision.value)] = written[precision.value]
                else:
                    reason = result.skipped.get(precision.value, "no file written")
                    rows[(name, precision.value)] = {
                        **base,
                        "format": name,
                        "precision": precision.value,
                        "failed": f"export failed: {reason}",
                    }
        return files, rows
    finally:
        torch.set_num_threads(saved_threads)


def _time_architecture(
    arch: Architecture, files: dict[tuple[str, str], Path], num_classes: int, settings: TableSettings
) -> dict[tuple[str, str], dict[str, Any]]:
    """Every file of one architecture opened and timed interleaved with the others and the anchor; each row
    carries its statistics or why it failed."""
    import torch

    from ..backends import open_backend
    from ..deploy.measure import one_line
    from ..formats import FORMATS, Provider

    saved_threads, threads = torch.get_num_threads(), settings.threads
    torch.set_num_threads(threads)
    base = _row_base(arch, num_classes, settings)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    images = np.random.default_rng(0).standard_normal((settings.batch_size, 3, *settings.image_size), dtype=np.float32)
    backends, runners = {}, {}
    try:
        for pair, path in files.items():
            try:
                backends[pair] = open_backend(path, Provider.CPU, threads)
                runners[pair] = backends[pair].device_runner(images)
                runners[pair]()
            except Exception as exc:
                rows[pair] = {
                    **base,
                    "format": pair[0],
                    "precision": pair[1],
                    "failed": f"timing failed: {one_line(exc)}",
                }
                runners.pop(pair, None)
        order = list(runners)
        latencies, anchor_ms = _time_with_anchor([runners[pair] for pair in order], settings)
    finally:
        for backend in backends.values():
            backend.close()
        torch.set_num_threads(saved_threads)
    for pair, samples in zip(order, latencies, strict=True):
        rows[pair] = {
            **base,
            "format": pair[0],
            "precision": pair[1],
            "runtime": FORMATS[pair[0]].runtime,
            "latency_ms": latency_stats(samples),
            "calls": len(samples),
            "anchor_ms": anchor_ms,
        }
    return rows


def teacher_latency(teacher: Path, table: LatencyTable, settings: TableSettings) -> float:
    """The teacher's PyTorch eager p50 (ms) at the deploy size and batch, timed with the same protocol and anchor
    (kept in the table, keyed by the file's sha256), anchored as the architectures' rows are."""
    import torch

    from ..backends import open_backend
    from ..formats import Provider
    from ..io import sha256_file

    key = "teacher:" + content_key(
        sha256=sha256_file(teacher),
        image_size=list(settings.image_size),
        batch=settings.batch_size,
        seconds=settings.seconds,
        min_calls=settings.min_calls,
    )
    row = table.rows.get(key)
    if row is None:
        if table.foreign:
            raise SearchError(
                f"{table.path}: has no eager latency of the teacher {teacher}; measure it on the target machine "
                "with `unet-edge search --latency-only --teacher ...`"
            )
        threads = torch.get_num_threads()
        torch.set_num_threads(settings.threads)
        images = np.random.default_rng(0).standard_normal(
            (settings.batch_size, 3, *settings.image_size), dtype=np.float32
        )
        backend = open_backend(teacher, Provider.CPU, settings.threads)
        try:
            (samples,), anchor_ms = _time_with_anchor([backend.device_runner(images)], settings)
        finally:
            backend.close()
            torch.set_num_threads(threads)
        row = {
            "teacher": str(teacher),
            "format": "pytorch eager",
            "precision": "fp32",
            "image_size": list(settings.image_size),
            "batch_size": settings.batch_size,
            "latency_ms": latency_stats(samples),
            "calls": len(samples),
            "anchor_ms": anchor_ms,
        }
        table.rows[key] = row
        table.save()
    return float(table.anchored(row)["latency_ms"]["p50"])
