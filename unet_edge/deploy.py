"""Deploy: the fastest artifact that keeps the accuracy, chosen by measurement on this machine.

Every checkpoint given x every installed format of the registry x each precision the format offers and
this CPU computes natively is a candidate. Each is exported by `run_export` (one format at a time, int8
calibrated as export does), measured on the whole validation set against the reference checkpoint (the
most accurate one given): val mIoU, its drop and pixel agreement; those within the mIoU budget are then
timed with one protocol (bench's interleaved timing, same threads, warm-up excluded, at least `min_calls`
timed calls, at the deploy size and batch; a second figure from uint8 images through preprocessing and
the argmax, as an application pays). The decision (`decide`) is a pure function of the records.

Work is cached by content in OUT/deploy-cache.json (keys: the checkpoint's sha256 and the options), written
atomically after each export, each measurement and each timing round, so a rerun after Ctrl-C or kill -9
does only what is missing. This module knows no format: it iterates the registry's export formats and their precisions.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .artifact import MANIFEST_FILE, artifact_bytes, read_manifest
from .cpuinfo import cpu_bf16_skip_reason, cpu_flags
from .errors import ArtifactError, UNetEdgeError
from .formats import FORMATS, CalibMethod, Precision, Provider, default_threads, export_formats
from .io import atomic_path, atomic_write_text, check_writable, sha256_file

__all__ = [
    "BUDGET_TOLERANCE",
    "CACHE_FILE",
    "Candidate",
    "Decision",
    "DeployCache",
    "DeployError",
    "DeployOptions",
    "DeployResult",
    "decide",
    "pareto_front",
    "plan_candidates",
    "run_deploy",
    "within_budget",
]

CACHE_FILE = "deploy-cache.json"
REPORT_FILE = "deploy.json"
PLOT_FILE = "deploy.png"
EMBEDDING_FILE = "EMBEDDING.md"
# A drop equal to the budget passes; float noise in the last bits must not turn it into a failure.
BUDGET_TOLERANCE = 1e-12
# CPU flags of fp16 arithmetic units (x86 AVX512-FP16 and AMX-FP16, ARM half-precision SIMD).
FP16_NATIVE_FLAGS = ("avx512_fp16", "amx_fp16", "asimdhp", "fphp")

Progress = Callable[[float, float, str], None]


class DeployError(UNetEdgeError):
    """No candidate keeps the accuracy, or the checkpoints cannot compete (different classes)."""


@dataclass
class DeployOptions:
    """What `unet-edge deploy` compares and how it measures."""

    checkpoints: tuple[Path, ...] = ()  # empty: the newest runs_dir/*/best.pt
    reference: Path | None = None  # default: the most accurate checkpoint given (it competes too)
    max_miou_drop: float = 0.01
    image_size: tuple[int, int] = (256, 256)
    batch_size: int = 1
    threads: int | None = None  # default: one per core, the same for every runtime
    formats: tuple[str, ...] | None = None  # None: every registered format whose runtime is installed
    precisions: tuple[Precision, ...] | None = None  # None: every precision a format offers
    seconds: float = 2.0  # timed seconds per candidate and column
    min_calls: int = 30  # timed calls per candidate and column, at least
    warmup: int = 3
    rounds: int = 3  # timing is split in rounds, each cached, so an interrupted run resumes between rounds
    out: Path = Path("deployed")
    data: Path | None = None  # validation and calibration set; default: the checkpoints'
    calib_images: int = 32
    calib_method: CalibMethod = CalibMethod.MINMAX
    runs_dir: Path = Path("runs")


@dataclass
class Candidate:
    """One model x format x precision: where its files are, how accurate and how fast it is, and why it
    was rejected (None: it was not)."""

    model: str  # the checkpoint's name in reports (its run folder)
    checkpoint: str
    checkpoint_sha256: str
    format: str
    precision: str
    runtime: str = ""
    architecture: str = ""
    path: str | None = None  # the model file
    files: list[dict[str, Any]] = field(
        default_factory=list
    )  # the model file and its companions: file, sha256, size_bytes
    size_mb: float | None = None
    miou: float | None = None  # val mIoU against the ground truth
    miou_drop: float | None = None  # the reference checkpoint's val mIoU minus this one's
    pixel_agreement: float | None = None  # with the reference checkpoint's masks
    latency_ms: dict[str, float] | None = None  # the model call on prepared input (p50, p90, p99, mean, min)
    app_latency_ms: dict[str, float] | None = None  # from uint8 images: preprocessing, the call and the argmax
    calls: int | None = None  # timed calls of the model column
    rejected: str | None = None
    key: str = ""

    @property
    def label(self) -> str:
        return f"{self.model} {self.format} {self.precision}"

    @property
    def p50(self) -> float | None:
        return None if self.latency_ms is None else self.latency_ms["p50"]


@dataclass
class Decision:
    """The candidates in report order (timed ones by p50, then the others by drop), the Pareto front of
    latency against mIoU, the winner (None: nothing passes) and, when nothing passes, the closest."""

    ranked: list[Candidate]
    front: list[Candidate]
    winner: Candidate | None
    closest: Candidate | None
    max_miou_drop: float

    def require_winner(self) -> Candidate:
        """The winner, or a `DeployError` naming the closest candidate and its drop."""
        if self.winner is not None:
            return self.winner
        if self.closest is None:
            raise DeployError("no candidate could be exported and measured (see the table for each one's reason)")
        raise DeployError(
            f"{self.closest.path or self.closest.checkpoint}: no candidate keeps the accuracy; the closest, {self.closest.label}, "
            f"drops val mIoU by {self.closest.miou_drop:.4f} (budget {self.max_miou_drop:.4f})"
        )


def within_budget(candidate: Candidate, max_miou_drop: float) -> bool:
    """Measured, not rejected for another reason, and its mIoU drop at most the budget."""
    if candidate.miou_drop is None or candidate.rejected is not None:
        return False
    return candidate.miou_drop <= max_miou_drop + BUDGET_TOLERANCE


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """The timed candidates no other one beats on both latency (p50) and val mIoU, fastest first."""
    timed = [c for c in candidates if c.p50 is not None and c.miou is not None]

    def dominated(c: Candidate) -> bool:
        return any(
            d.p50 <= c.p50 and d.miou >= c.miou and (d.p50 < c.p50 or d.miou > c.miou)  # type: ignore[operator]
            for d in timed
        )

    return sorted((c for c in timed if not dominated(c)), key=lambda c: (c.p50, -c.miou))  # type: ignore[operator]


def decide(candidates: list[Candidate], max_miou_drop: float) -> Decision:
    """The winner is the lowest p50 among timed candidates within the budget (ties: higher mIoU, then the
    smaller file); the front is over those same candidates. Pure: nothing is measured or changed."""
    eligible = [c for c in candidates if within_budget(c, max_miou_drop) and c.p50 is not None]
    front = pareto_front(eligible)
    winner = min(eligible, key=lambda c: (c.p50, -(c.miou or 0.0), c.size_mb or 0.0), default=None)
    measured = [c for c in candidates if c.miou_drop is not None]
    closest = None if winner is not None else min(measured, key=lambda c: c.miou_drop, default=None)  # type: ignore[arg-type,return-value]
    timed = sorted((c for c in candidates if c.p50 is not None), key=lambda c: c.p50)  # type: ignore[arg-type,return-value]
    rest = sorted((c for c in candidates if c.p50 is None), key=lambda c: (c.miou_drop is None, c.miou_drop or 0.0))
    return Decision(timed + rest, front, winner, closest, max_miou_drop)


# --- the cache ---------------------------------------------------------------------------------------


def content_key(**parts: Any) -> str:
    """A short stable digest of JSON-able parts (the checkpoint's sha256 and the options that change a result)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


class DeployCache:
    """OUT/deploy-cache.json: finished work by content key, rewritten atomically after each step. A file that
    cannot be read (a crash cannot leave half of one, but a person can) is started afresh."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.entries: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            self.entries = {}
        if not isinstance(self.entries, dict):
            self.entries = {}

    def get(self, key: str) -> Any:
        return self.entries.get(key)

    def put(self, key: str, value: Any) -> None:
        self.entries[key] = value
        atomic_write_text(self.path, json.dumps(self.entries, indent=1, allow_nan=False) + "\n")


# --- planning ----------------------------------------------------------------------------------------


def precision_skip_reason(precision: Precision) -> str | None:
    """Why this CPU does not compute `precision` natively (None: it does); fp32 and int8 always run."""
    if precision is Precision.BF16:
        return cpu_bf16_skip_reason()
    if precision is Precision.FP16:
        if not any(flag in cpu_flags() for flag in FP16_NATIVE_FLAGS):
            return "this CPU has no fp16 arithmetic (avx512_fp16, amx_fp16 or ARM fp16 SIMD): an fp16 model would compute through conversions to fp32"
    return None


def plan_candidates(
    formats: tuple[str, ...] | None, precisions: tuple[Precision, ...] | None
) -> tuple[list[tuple[str, tuple[Precision, ...]]], list[dict[str, Any]]]:
    """([(format, precisions to deploy)], [skipped format/precision with the reason]) from the registry:
    formats whose runtime is installed, precisions each declares and this CPU computes natively."""
    exportable = export_formats()
    names = tuple(exportable) if formats is None else formats
    unknown = [name for name in names if name not in exportable]
    if unknown:
        raise UNetEdgeError(f"unknown format {unknown[0]!r}: use {', '.join(exportable)}")
    plan, skipped = [], []
    for name in names:
        fmt = exportable[name]
        offered = tuple(p for p in fmt.precisions if precisions is None or p in precisions)
        if not offered:
            continue
        why = fmt.unavailable(Provider.CPU)
        if why is not None:
            skipped.append({"format": name, "precision": None, "reason": why})
            continue
        kept = []
        for precision in offered:
            reason = precision_skip_reason(precision)
            if reason is None:
                kept.append(precision)
            else:
                skipped.append({"format": name, "precision": precision.value, "reason": reason})
        if kept:
            plan.append((name, tuple(kept)))
    return plan, skipped


# --- measuring ---------------------------------------------------------------------------------------


@dataclass
class _Checkpoint:
    path: Path
    sha256: str
    name: str
    architecture: str
    loaded: Any
    miou: float = math.nan
    export_budget: float = 0.0


@dataclass
class DeployResult:
    """Everything `run_deploy` measured and decided, and the files it wrote."""

    candidates: list[Candidate]
    decision: Decision
    reference: dict[str, Any]
    baseline: dict[str, Any]
    skipped: list[dict[str, Any]]
    machine: dict[str, Any]
    settings: dict[str, Any]
    out: Path
    report: Path
    plot: Path | None
    winner_files: list[Path] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        front = {c.key for c in self.decision.front}
        rows = [
            {**asdict(c), "pareto": c.key in front, "winner": c is self.decision.winner} for c in self.decision.ranked
        ]
        return {
            "producer": f"unet-edge {__version__}",
            "machine": self.machine,
            "settings": self.settings,
            "reference": self.reference,
            "baseline": self.baseline,
            "skipped": self.skipped,
            "candidates": rows,
            "winner": None if self.decision.winner is None else self.decision.winner.key,
            "closest": None if self.decision.closest is None else self.decision.closest.key,
        }


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{exc.__class__.__name__}: {text.splitlines()[0][:240]}" if text else exc.__class__.__name__


def _files(path: Path) -> list[dict[str, Any]]:
    """The model file and the companions its manifest entry lists, each with its sha256 and size."""
    manifest = read_manifest(path.parent) or {}
    entry = next((e for e in manifest.get("artifacts", []) if e.get("file") == path.name), {})
    paths = [path, *(path.parent / c["file"] for c in entry.get("companions", []))]
    return [{"file": str(p), "sha256": sha256_file(p), "size_bytes": p.stat().st_size} for p in paths]


def _files_intact(files: list[dict[str, Any]]) -> bool:
    return all(Path(f["file"]).is_file() and sha256_file(f["file"]) == f["sha256"] for f in files)


def _unique_names(paths: list[Path]) -> list[str]:
    """Each checkpoint's run folder name, made unique with its file name where two share one."""
    names = [p.resolve().parent.name or p.stem for p in paths]
    return [f"{n}/{p.stem}" if names.count(n) > 1 else n for n, p in zip(names, paths)]


def _load_checkpoints(options: DeployOptions) -> list[_Checkpoint]:
    from .checkpoint import find_latest_checkpoint, load_model

    paths = [Path(p) for p in options.checkpoints] or [find_latest_checkpoint(options.runs_dir)]
    if options.reference is not None:
        paths.append(Path(options.reference))
    by_sha: dict[str, Path] = {}
    for path in paths:
        by_sha.setdefault(sha256_file(path) if path.is_file() else str(path), path)
    unique = list(by_sha.values())
    checkpoints = []
    for path, name in zip(unique, _unique_names(unique)):
        loaded = load_model(path)
        config = loaded.config
        architecture = f"base {config.base_channels}, depth {config.depth}"
        checkpoints.append(_Checkpoint(path, sha256_file(path), name, architecture, loaded))
    first = checkpoints[0]
    for other in checkpoints[1:]:
        if other.loaded.classes != first.loaded.classes:
            raise DeployError(
                f"{other.path}: classes {other.loaded.classes} differ from {first.path}'s {first.loaded.classes}: they cannot compete"
            )
    return checkpoints


class _Images:
    """The validation set, normalised once per (mean, std)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_norm: dict[tuple[tuple[float, ...], tuple[float, ...]], Any] = {}

    def get(self, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
        from .data import load_eval_images

        key = (tuple(mean), tuple(std))
        if key not in self._by_norm:
            self._by_norm[key] = load_eval_images(self.root, mean, std, split="val", num_images=0)
        return self._by_norm[key]


def run_deploy(options: DeployOptions, progress: Progress | None = None) -> DeployResult:
    """Export, measure and time every candidate (what the cache holds is not done again), decide, and
    write deploy.json, deploy.png and the winner into `options.out`. Nothing passing is not an error
    here: the result's decision has no winner (`Decision.require_winner` raises). PyTorch's thread
    count, which the runtimes set while measuring, is restored at the end."""
    import torch

    threads = torch.get_num_threads()
    try:
        return _deploy(options, progress)
    finally:
        torch.set_num_threads(threads)


def _deploy(options: DeployOptions, progress: Progress | None) -> DeployResult:
    from .bench import machine_info
    from .evaluate import checkpoint_data_root
    from .parity import compare, run_backend

    say = progress or (lambda done, total, status: None)
    out = Path(options.out)
    check_writable(out / REPORT_FILE)
    threads = options.threads or default_threads()
    plan, skipped = plan_candidates(options.formats, options.precisions)
    if not plan:
        why = (
            "; ".join(f"{s['format']} {s['precision'] or ''}: {s['reason']}".replace("  ", " ") for s in skipped)
            or "no format offers the precisions asked for"
        )
        raise DeployError(f"{out}: nothing to deploy ({why})")
    say(0, 1, "loading checkpoints")
    checkpoints = _load_checkpoints(options)
    root = checkpoint_data_root(checkpoints[0].loaded.state, options.data)
    images = _Images(root)
    cache = DeployCache(out / CACHE_FILE)
    total_candidates = len(checkpoints) * sum(len(precisions) for _, precisions in plan)
    total = float(len(checkpoints) + 2 * total_candidates)
    done = 0.0

    # 1. every checkpoint's own val mIoU (eager); the most accurate, or --reference, is the reference.
    from .backends import open_backend

    outputs: dict[str, Any] = {}
    for checkpoint in checkpoints:
        say(done, total, f"val mIoU of {checkpoint.name}")
        key = "eval:" + content_key(checkpoint=checkpoint.sha256, data=str(root.resolve()))
        cached = cache.get(key)
        if cached is None:
            backend = open_backend(checkpoint.path, Provider.CPU, threads)
            val = images.get(backend.mean, backend.std)
            outputs[checkpoint.sha256] = run_backend(backend, val)
            backend.close()
            figures = compare(
                outputs[checkpoint.sha256],
                outputs[checkpoint.sha256],
                val.masks,
                backend.num_classes,
                backend.ignore_index,
            )
            cached = {"miou": figures["miou_gt"], "images": len(val.raw)}
            cache.put(key, cached)
        checkpoint.miou = cached["miou"]
        done += 1
    if options.reference is not None:
        wanted = sha256_file(options.reference)
        reference = next(c for c in checkpoints if c.sha256 == wanted)
    else:
        reference = max(checkpoints, key=lambda c: c.miou)
    val = images.get(reference.loaded.mean, reference.loaded.std)

    def reference_out() -> Any:
        """The reference checkpoint's predictions on the validation set, computed once when first needed."""
        if reference.sha256 not in outputs:
            backend = open_backend(reference.path, Provider.CPU, threads)
            outputs[reference.sha256] = run_backend(backend, images.get(backend.mean, backend.std))
            backend.close()
        return outputs[reference.sha256]

    max_side = max([*options.image_size, *(max(image.shape[:2]) for image in val.raw)])
    for checkpoint in checkpoints:
        # The int8 exporters hold their variant to what this checkpoint has left of the budget.
        left = options.max_miou_drop - (reference.miou - checkpoint.miou)
        checkpoint.export_budget = math.floor(left * 1e4) / 1e4 if left >= 0 else options.max_miou_drop

    # 2. export and measure each candidate.
    candidates: list[Candidate] = []
    for checkpoint in checkpoints:
        for name, precisions in plan:
            export_key = content_key(
                step="export",
                checkpoint=checkpoint.sha256,
                format=name,
                precisions=[p.value for p in precisions],
                image_size=list(options.image_size),
                batch=options.batch_size,
                max_size=max_side,
                data=str(root.resolve()),
                calib_images=options.calib_images,
                calib_method=CalibMethod(options.calib_method).value,
                budget=checkpoint.export_budget if precisions != (Precision.FP32,) else None,
                version=__version__,
            )
            say(done, total, f"exporting {checkpoint.name} {name} ({', '.join(p.value for p in precisions)})")
            exported = _export(checkpoint, name, precisions, export_key, options, root, max_side, cache)
            for precision in precisions:
                candidate = Candidate(
                    model=checkpoint.name,
                    checkpoint=str(checkpoint.path),
                    checkpoint_sha256=checkpoint.sha256,
                    format=name,
                    precision=precision.value,
                    runtime=FORMATS[name].runtime,
                    architecture=checkpoint.architecture,
                )
                record = exported["artifacts"].get(precision.value)
                if record is None:
                    candidate.rejected = f"export failed: {exported['failed'].get(precision.value, 'no file written')}"
                    candidate.key = content_key(export=export_key, precision=precision.value)
                    candidates.append(candidate)
                    done += 2
                    continue
                candidate.path, candidate.files, candidate.size_mb = record["path"], record["files"], record["size_mb"]
                candidate.key = content_key(
                    export=export_key,
                    precision=precision.value,
                    files=[f["sha256"] for f in record["files"]],
                    reference=reference.sha256,
                )
                say(done, total, f"val mIoU of {candidate.label}")
                measured = cache.get(f"measure:{candidate.key}")
                if measured is None:
                    measured = _measure(candidate, threads, images, reference_out, reference.miou)
                    cache.put(f"measure:{candidate.key}", measured)
                for attribute in ("miou", "miou_drop", "pixel_agreement"):
                    setattr(candidate, attribute, measured.get(attribute))
                candidate.rejected = measured.get("failed")
                if candidate.rejected is None and not within_budget(candidate, options.max_miou_drop):
                    candidate.rejected = (
                        f"over budget: val mIoU drop {candidate.miou_drop:.4f} > {options.max_miou_drop:.4f}"
                    )
                candidates.append(candidate)
                done += 1
                if candidate.rejected is not None:
                    done += 1  # not timed

    # 3. time every candidate within the budget, and the reference checkpoint in PyTorch eager, interleaved.
    timed = [c for c in candidates if c.rejected is None]
    baseline = _time(timed, reference, options, threads, cache, lambda step, status: say(done + step, total, status))
    done += len(timed)
    say(done, total, "deciding")
    decision = decide(candidates, options.max_miou_drop)
    settings = {
        "checkpoints": [str(c.path) for c in checkpoints],
        "max_miou_drop": options.max_miou_drop,
        "image_size": list(options.image_size),
        "batch_size": options.batch_size,
        "threads": threads,
        "seconds": options.seconds,
        "min_calls": options.min_calls,
        "warmup": options.warmup,
        "rounds": options.rounds,
        "data": str(root),
        "validation_images": len(val.raw),
        "timing": "interleaved rounds across candidates and the eager baseline; warm-up excluded; "
        "app column: uint8 images, preprocessing, the model call and the argmax",
    }
    machine = {**machine_info(threads), "cpu_flags_override": os.environ.get("UNET_EDGE_CPU_FLAGS")}
    reference_info = {
        "checkpoint": str(reference.path),
        "sha256": reference.sha256,
        "model": reference.name,
        "architecture": reference.architecture,
        "miou": reference.miou,
        "chosen_by": "--reference" if options.reference else "highest val mIoU",
        "checkpoints": {
            c.name: {"path": str(c.path), "miou": c.miou, "architecture": c.architecture} for c in checkpoints
        },
    }
    result = DeployResult(
        candidates, decision, reference_info, baseline, skipped, machine, settings, out, out / REPORT_FILE, None
    )
    atomic_write_text(result.report, json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n")
    if any(c.p50 is not None for c in candidates):
        result.plot = plot(result, out / PLOT_FILE)
    if decision.winner is not None:
        result.winner_files = _copy_winner(decision.winner, out, result)
    say(total, total, "done")
    return result


def _export(
    checkpoint: _Checkpoint,
    name: str,
    precisions: tuple[Precision, ...],
    key: str,
    options: DeployOptions,
    root: Path,
    max_side: int,
    cache: DeployCache,
) -> dict[str, Any]:
    """{"artifacts": {precision: {path, files, size_mb}}, "failed": {precision: reason}} of one format of one
    checkpoint, from the cache when its files are still there unchanged; an export that fails with the
    variants is tried once more with fp32 alone, so one precision's failure does not cost the others."""
    from .export import ExportOptions, run_export

    cached = cache.get(f"export:{key}")
    if cached is not None and all(_files_intact(a["files"]) for a in cached["artifacts"].values()):
        return cached
    export_options = ExportOptions(
        checkpoint=checkpoint.path,
        out=Path(options.out) / "candidates" / f"{checkpoint.name.replace('/', '-')}-{checkpoint.sha256[:8]}",
        name=f"{name}-{key[:8]}",
        formats=(name,),
        precisions=tuple(dict.fromkeys((Precision.FP32, *precisions))),
        data=root,
        calib_images=options.calib_images,
        max_miou_drop=checkpoint.export_budget,
        parity_images=0,
        format_options={
            "calib_method": options.calib_method,
            "image_size": options.image_size,
            "max_batch": options.batch_size,
            "max_size": max_side,
        },
    )
    failed: dict[str, str] = {}
    try:
        result = run_export(export_options)
    except Exception as exc:
        failed = {p.value: _one_line(exc) for p in precisions}
        result = None
        if any(p is not Precision.FP32 for p in precisions) and Precision.FP32 in precisions:
            try:
                result = run_export(replace(export_options, precisions=(Precision.FP32,)))
                del failed[Precision.FP32.value]
            except Exception as retry:
                failed[Precision.FP32.value] = _one_line(retry)
    artifacts = {}
    for artifact in result.artifacts if result is not None else []:
        if artifact.precision in (p.value for p in precisions) and artifact.precision not in artifacts:
            artifacts[artifact.precision] = {
                "path": str(artifact.path),
                "files": _files(artifact.path),
                "size_mb": artifact_bytes(artifact.path) / 1e6,
            }
    record = {"artifacts": artifacts, "failed": failed}
    if (
        artifacts
    ):  # an export that wrote nothing is tried again by the next run (a runtime may have been installed since)
        cache.put(f"export:{key}", record)
    return record


def _measure(
    candidate: Candidate, threads: int, images: _Images, reference_out: Callable[[], Any], reference_miou: float
) -> dict[str, Any]:
    """The candidate's val mIoU, its drop against the reference checkpoint and its pixel agreement with it."""
    from .backends import open_backend
    from .parity import compare, run_backend

    reference = reference_out()
    try:
        backend = open_backend(candidate.path, Provider.CPU, threads)
        try:
            val = images.get(backend.mean, backend.std)
            figures = compare(
                reference, run_backend(backend, val), val.masks, backend.num_classes, backend.ignore_index
            )
        finally:
            backend.close()
    except Exception as exc:
        return {"failed": f"measuring failed: {_one_line(exc)}"}
    return {
        "miou": figures["miou_gt"],
        "miou_drop": reference_miou - figures["miou_gt"],
        "pixel_agreement": figures["pixel_agreement"],
    }


def _time(
    timed: list[Candidate],
    reference: _Checkpoint,
    options: DeployOptions,
    threads: int,
    cache: DeployCache,
    progress: Callable[[float, str], None],
) -> dict[str, Any]:
    """Time the candidates and the reference checkpoint's PyTorch eager with one protocol (bench's
    `time_interleaved`): per round, each gets `seconds / rounds` of timed calls (and its share of
    `min_calls`) on its model call and on the application path; samples are cached after each round.
    Fills each candidate's latency figures; returns the baseline's."""
    import torch

    from .backends import open_backend
    from .bench import latency_stats, time_interleaved

    torch.set_num_threads(threads)
    height, width = options.image_size
    rng = np.random.default_rng(0)
    normalised = rng.standard_normal((options.batch_size, 3, height, width), dtype=np.float32)
    raw = rng.integers(0, 256, (options.batch_size, height, width, 3), dtype=np.uint8)
    baseline_key = f"eager:{reference.sha256}"
    names = [baseline_key, *(c.key for c in timed)]
    key = "timing:" + content_key(
        runners=names,
        image_size=list(options.image_size),
        batch=options.batch_size,
        threads=threads,
        seconds=options.seconds,
        min_calls=options.min_calls,
        warmup=options.warmup,
        rounds=options.rounds,
    )
    state = cache.get(key) or {"rounds": 0, "samples": {name: {"model": [], "app": []} for name in names}, "failed": {}}
    backends: dict[str, Any] = {}
    runners: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {}
    if state["rounds"] < options.rounds:
        for name, path in [(baseline_key, reference.path), *((c.key, c.path) for c in timed)]:
            if name in state["failed"]:
                continue
            try:
                backend = open_backend(path, Provider.CPU, threads)
                backends[name] = backend
                runners[name] = (backend.device_runner(normalised), lambda b=backend: b.segment(raw))
                runners[name][0]()
            except Exception as exc:
                state["failed"][name] = f"timing failed: {_one_line(exc)}"
                runners.pop(name, None)
    per_round_calls = max(1, math.ceil(options.min_calls / options.rounds))
    try:
        while state["rounds"] < options.rounds:
            progress(
                len(timed) * state["rounds"] / options.rounds,
                f"timing {len(runners)} models, round {state['rounds'] + 1} of {options.rounds}",
            )
            order = list(runners)
            flat = [run for name in order for run in runners[name]]
            latencies = time_interleaved(
                flat,
                warmup=options.warmup if state["rounds"] == 0 else 1,
                iters=None,
                seconds=options.seconds / options.rounds,
                min_iters=per_round_calls,
            )
            for index, name in enumerate(order):
                state["samples"][name]["model"] += latencies[2 * index]
                state["samples"][name]["app"] += latencies[2 * index + 1]
            state["rounds"] += 1
            cache.put(key, state)
    finally:
        for backend in backends.values():
            backend.close()
    for candidate in timed:
        if candidate.key in state["failed"]:
            candidate.rejected = state["failed"][candidate.key]
            continue
        samples = state["samples"][candidate.key]
        candidate.latency_ms, candidate.app_latency_ms = latency_stats(samples["model"]), latency_stats(samples["app"])
        candidate.calls = len(samples["model"])
    if baseline_key in state["failed"]:
        return {"model": reference.name, "runtime": "pytorch eager", "failed": state["failed"][baseline_key]}
    samples = state["samples"][baseline_key]
    return {
        "model": reference.name,
        "checkpoint": str(reference.path),
        "runtime": "pytorch eager",
        "precision": "fp32",
        "latency_ms": latency_stats(samples["model"]),
        "app_latency_ms": latency_stats(samples["app"]),
        "calls": len(samples["model"]),
    }


# --- outputs -----------------------------------------------------------------------------------------


def _copy_winner(winner: Candidate, out: Path, result: DeployResult) -> list[Path]:
    """Copy the winner's files into OUT with a manifest.json holding its entry alone (so verify, bench and
    predict check its sha256 there) and EMBEDDING.md, the README's snippet for its runtime. Files of an
    earlier winner listed in OUT's manifest are removed first."""
    from .formats.embedding import embedding_markdown

    source = Path(winner.path)  # type: ignore[arg-type]
    manifest = read_manifest(source.parent)
    if manifest is None:
        raise ArtifactError(f"{source.parent}: no {MANIFEST_FILE} beside the winner")
    entry = next(e for e in manifest["artifacts"] if e["file"] == source.name)
    try:
        previous = read_manifest(out) or {}
    except ArtifactError:
        previous = {}
    for old in previous.get("artifacts", []):
        for record in (old, *old.get("companions", [])):
            (out / Path(record["file"]).name).unlink(missing_ok=True)
    copied = []
    for record in winner.files:
        target = out / Path(record["file"]).name
        with atomic_path(target) as staged:
            shutil.copyfile(record["file"], staged)
        copied.append(target)
    ratio = None
    if result.baseline.get("latency_ms") and winner.p50 is not None:
        ratio = winner.p50 / result.baseline["latency_ms"]["p50"]
    deploy_record = {
        "model": winner.model,
        "format": winner.format,
        "precision": winner.precision,
        "runtime": winner.runtime,
        "miou": winner.miou,
        "miou_drop": winner.miou_drop,
        "max_miou_drop": result.decision.max_miou_drop,
        "pixel_agreement": winner.pixel_agreement,
        "latency_ms": winner.latency_ms,
        "app_latency_ms": winner.app_latency_ms,
        "eager_ratio": ratio,
        "reference": result.reference["checkpoint"],
        "machine": result.machine["cpu"],
        "cpu_int8_bf16": result.machine.get("cpu_int8_bf16"),
        "settings": result.settings,
    }
    atomic_write_text(
        out / MANIFEST_FILE, json.dumps({**manifest, "artifacts": [entry], "deploy": deploy_record}, indent=2) + "\n"
    )
    atomic_write_text(
        out / EMBEDDING_FILE,
        embedding_markdown(
            FORMATS[winner.format], source.name, [Path(f["file"]).name for f in winner.files[1:]], winner.precision
        ),
    )
    return [*copied, out / MANIFEST_FILE, out / EMBEDDING_FILE]


def plot(result: DeployResult, path: Path) -> Path:
    """Latency (p50, log scale) against val mIoU: every timed candidate, the Pareto front, the winner, the
    reference checkpoint's eager point and mIoU, and the budget line."""
    from .io import pyplot, save_figure

    decision = result.decision
    timed = [c for c in decision.ranked if c.p50 is not None]
    fig, ax = pyplot().subplots(figsize=(9, 5.5))
    models = sorted({c.model for c in timed})
    for index, model in enumerate(models):
        points = [c for c in timed if c.model == model]
        ax.scatter(
            [c.p50 for c in points], [c.miou for c in points], color=f"C{index}", label=model, alpha=0.7, zorder=2
        )
    front = decision.front
    if front:
        ax.step(
            [c.p50 for c in front],
            [c.miou for c in front],
            where="post",
            color="black",
            linewidth=1,
            label="Pareto front",
            zorder=1,
        )
        for c in front:
            ax.annotate(
                f"{c.format} {c.precision}", (c.p50, c.miou), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
    if decision.winner is not None:
        ax.scatter(
            [decision.winner.p50],
            [decision.winner.miou],
            marker="*",
            s=260,
            color="gold",
            edgecolor="black",
            label="winner",
            zorder=3,
        )
    reference_miou = result.reference["miou"]
    ax.axhline(
        reference_miou, color="grey", linestyle=":", linewidth=1, label=f"reference mIoU ({result.reference['model']})"
    )
    ax.axhline(
        reference_miou - decision.max_miou_drop,
        color="red",
        linestyle="--",
        linewidth=1,
        label=f"budget (drop {decision.max_miou_drop:g})",
    )
    if result.baseline.get("latency_ms"):
        ax.scatter(
            [result.baseline["latency_ms"]["p50"]],
            [reference_miou],
            marker="s",
            color="grey",
            label="reference, PyTorch eager",
            zorder=3,
        )
    ax.set_xscale("log")
    size = "×".join(str(v) for v in result.settings["image_size"])
    ax.set(
        xlabel=f"p50 latency, ms (batch {result.settings['batch_size']}, {size}, {result.settings['threads']} threads, log scale)",
        ylabel="val mIoU",
        title=f"deploy on {result.machine['cpu']} ({', '.join(result.machine.get('cpu_int8_bf16') or []) or 'no int8/bf16 instructions'})",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)
