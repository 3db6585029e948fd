"""Measuring: the checkpoints (loaded once each), the reference, each format's export (one load and one budget
per checkpoint, shared by every format) and each candidate's accuracy against the reference."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import __version__
from ..artifact import artifact_bytes, read_manifest
from ..formats import FORMATS, DeployTarget, Precision, Provider
from ..io import sha256_file
from ..progress import Progress, Steps
from .cache import DeployCache, content_key
from .records import Candidate, DeployError, DeployOptions, Reference

__all__ = [
    "Checkpoint",
    "Exported",
    "Sources",
    "Validation",
    "budget_left",
    "candidates_of",
    "choose_reference",
    "export_and_measure",
    "export_format",
    "finished",
    "load_checkpoints",
    "measure_accuracy",
    "measure_checkpoints",
    "measured",
    "one_line",
]


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{exc.__class__.__name__}: {text.splitlines()[0][:240]}" if text else exc.__class__.__name__


@dataclass(frozen=True)
class Checkpoint:
    """A competing checkpoint, loaded once: its name in reports, its architecture and its own val mIoU."""

    path: Path
    sha256: str
    name: str
    architecture: str
    loaded: Any = field(compare=False, repr=False)
    miou: float = math.nan


def _unique_names(paths: list[Path]) -> list[str]:
    """Each checkpoint's run folder name, made unique with its file name where two share one."""
    names = [p.resolve().parent.name or p.stem for p in paths]
    return [f"{n}/{p.stem}" if names.count(n) > 1 else n for n, p in zip(names, paths)]


def load_checkpoints(options: DeployOptions) -> list[Checkpoint]:
    """The checkpoints given (default: the newest run) and --reference, each file once, of the same classes."""
    from ..checkpoint import find_latest_checkpoint, load_model

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
        architecture = f"base {loaded.config.base_channels}, depth {loaded.config.depth}"
        checkpoints.append(Checkpoint(path, sha256_file(path), name, architecture, loaded))
    first = checkpoints[0]
    for other in checkpoints[1:]:
        if other.loaded.classes != first.loaded.classes:
            raise DeployError(
                f"{other.path}: classes {other.loaded.classes} differ from {first.path}'s {first.loaded.classes}: "
                "they cannot compete"
            )
    return checkpoints


class Validation:
    """The validation set, normalised once per (mean, std), and each checkpoint's predictions on it, computed
    once when first needed (from the model already loaded) or handed over (`seed`: an export worker gets the
    masks its parent computed). Files run with `threads` threads (an export worker's: one)."""

    def __init__(self, root: Path, threads: int) -> None:
        self.root, self.threads = root, threads
        self._by_norm: dict[tuple[tuple[float, ...], tuple[float, ...]], Any] = {}
        self._outputs: dict[str, Any] = {}
        self._masks: dict[str, list[Any]] = {}

    def file_outputs(self, path: str | Path) -> tuple[list[Any], list[Any]]:
        """A model file's masks on the validation set (no logits: deploy compares masks), by its content: a file
        the export's budget already measured is not run again."""
        from ..backends import open_backend
        from ..parity import run_backend

        digest = sha256_file(path)
        if digest not in self._masks:
            # entry={}: a file just written by an export is measured before its manifest entry exists.
            backend = open_backend(path, Provider.CPU, self.threads, entry={})
            try:
                self._masks[digest] = run_backend(backend, self.images(backend.mean, backend.std))[1]
            finally:
                backend.close()
        masks = self._masks[digest]
        return [None] * len(masks), masks

    def predictions(self, checkpoint: Checkpoint) -> Any:
        """What an export budget of `checkpoint` compares, from this validation set (`parity.Predictions`)."""
        from ..parity import Predictions

        loaded = checkpoint.loaded
        return Predictions(
            images=lambda: self.images(loaded.mean, loaded.std),
            checkpoint=lambda: self.outputs(checkpoint),
            file=self.file_outputs,
        )

    def images(self, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
        from ..data import load_eval_images

        key = (tuple(mean), tuple(std))
        if key not in self._by_norm:
            self._by_norm[key] = load_eval_images(self.root, mean, std, split="val", num_images=0)
        return self._by_norm[key]

    def seed(self, sha256: str, masks: list[Any]) -> None:
        """A checkpoint's validation masks, computed elsewhere (deploy compares masks, not logits)."""
        self._outputs[sha256] = ([None] * len(masks), masks)

    def outputs(self, checkpoint: Checkpoint) -> Any:
        """The checkpoint's (logits, masks) on the validation set, in eager PyTorch."""
        from ..formats.torch_backend import TorchBackend
        from ..parity import run_backend

        if checkpoint.sha256 not in self._outputs:
            loaded = checkpoint.loaded
            backend = TorchBackend.of_loaded(loaded, threads=self.threads)
            self._outputs[checkpoint.sha256] = run_backend(backend, self.images(loaded.mean, loaded.std))
        return self._outputs[checkpoint.sha256]


def measure_checkpoints(
    checkpoints: list[Checkpoint], validation: Validation, cache: DeployCache, progress: Progress
) -> list[Checkpoint]:
    """Each checkpoint with its own val mIoU (eager PyTorch; cached by its sha256 and the dataset)."""
    from ..parity import compare

    measured = []
    for index, checkpoint in enumerate(checkpoints):
        progress(index, len(checkpoints), f"val mIoU of {checkpoint.name}")
        key = "eval:" + content_key(checkpoint=checkpoint.sha256, data=str(validation.root.resolve()))
        cached = cache.get(key)
        if cached is None:
            loaded = checkpoint.loaded
            out = validation.outputs(checkpoint)
            val = validation.images(loaded.mean, loaded.std)
            figures = compare(out, out, val.masks, len(loaded.classes), loaded.ignore_index)
            cached = {"miou": figures["miou_gt"], "images": len(val.raw)}
            cache.put(key, cached)
        measured.append(replace(checkpoint, miou=cached["miou"]))
    return measured


def choose_reference(checkpoints: list[Checkpoint], options: DeployOptions) -> tuple[Checkpoint, Reference]:
    """--reference, else the checkpoint with the highest val mIoU; and the report's record of it."""
    if options.reference is not None:
        wanted = sha256_file(options.reference)
        reference = next(c for c in checkpoints if c.sha256 == wanted)
    else:
        reference = max(checkpoints, key=lambda c: c.miou)
    record = Reference(
        checkpoint=str(reference.path),
        sha256=reference.sha256,
        model=reference.name,
        architecture=reference.architecture,
        miou=reference.miou,
        chosen_by="--reference" if options.reference else "highest val mIoU",
        checkpoints={
            c.name: {"path": str(c.path), "miou": c.miou, "architecture": c.architecture} for c in checkpoints
        },
    )
    return reference, record


def budget_left(checkpoint: Checkpoint, reference: Checkpoint, max_miou_drop: float) -> float:
    """What this checkpoint has left of the budget: its int8 exporters hold their variant to it."""
    left = max_miou_drop - (reference.miou - checkpoint.miou)
    return math.floor(left * 1e4) / 1e4 if left >= 0 else max_miou_drop


@dataclass(frozen=True)
class ExportJob:
    """One format of one checkpoint for deploy to export: the precisions asked, the accuracy budget the checkpoint
    has left (`budget_left`) and the deploy target, which the format maps onto its own options."""

    checkpoint: Checkpoint
    format: str
    precisions: tuple[Precision, ...]
    budget: float
    target: DeployTarget

    @property
    def label(self) -> str:
        return f"{self.checkpoint.name} {self.format}"

    def export_key(self, root: Path, options: DeployOptions) -> str:
        return _export_key(
            self.checkpoint,
            self.format,
            self.precisions,
            self.budget,
            FORMATS[self.format].options_for(self.target),
            root,
            options,
        )


@dataclass(frozen=True)
class Exported:
    """One format's export of one checkpoint: per precision its record (path, files, size_mb) or why it failed."""

    key: str
    artifacts: dict[str, dict[str, Any]]
    failed: dict[str, str]


def _files(path: Path) -> list[dict[str, Any]]:
    """The model file and the companions its manifest entry lists, each with its sha256 and size."""
    manifest = read_manifest(path.parent) or {}
    entry: dict[str, Any] = next((e for e in manifest.get("artifacts", []) if e.get("file") == path.name), {})
    paths = [path, *(path.parent / c["file"] for c in entry.get("companions", []))]
    return [{"file": str(p), "sha256": sha256_file(p), "size_bytes": p.stat().st_size} for p in paths]


def _files_intact(files: list[dict[str, Any]]) -> bool:
    return all(Path(f["file"]).is_file() and sha256_file(f["file"]) == f["sha256"] for f in files)


class Sources:
    """Each checkpoint's export source (the model loaded once, its fold and its budget), built on first use
    and shared by every format of that checkpoint."""

    def __init__(self, options: DeployOptions, validation: Validation, formats: tuple[str, ...]) -> None:
        self.options, self.validation, self.root, self.formats = options, validation, validation.root, formats
        self._sources: dict[str, Any] = {}
        self._progress: Progress | None = None

    def _say(self, label: str) -> None:
        """The budget's steps (a variant's mIoU check), told to the export under way, not to the first one."""
        if self._progress is not None:
            self._progress(0, None, label)

    def get(self, checkpoint: Checkpoint, budget: float, progress: Progress) -> Any:
        from ..export import ExportOptions, export_source

        self._progress = progress
        if checkpoint.sha256 not in self._sources:
            options = ExportOptions(
                checkpoint=checkpoint.path,
                formats=self.formats,
                precisions=(Precision.FP32, Precision.INT8),  # variants: the budget is built
                data=self.root,
                calib_images=self.options.calib_images,
                max_miou_drop=budget,
                parity_images=0,
            )
            self._sources[checkpoint.sha256] = export_source(
                options,
                self._say,
                loaded=checkpoint.loaded,
                predictions=self.validation.predictions(checkpoint),
            )
        return self._sources[checkpoint.sha256]


def _export_key(
    checkpoint: Checkpoint,
    name: str,
    precisions: tuple[Precision, ...],
    budget: float,
    format_options: dict[str, Any],
    root: Path,
    options: DeployOptions,
) -> str:
    return content_key(
        step="export",
        checkpoint=checkpoint.sha256,
        format=name,
        precisions=[p.value for p in precisions],
        options=format_options,
        data=str(root.resolve()),
        calib_images=options.calib_images,
        budget=budget if precisions != (Precision.FP32,) else None,
        version=__version__,
    )


def _cached_export(key: str, cache: DeployCache) -> Exported | None:
    """The export's record when it is cached and its files are still there unchanged."""
    cached = cache.get(f"export:{key}")
    if cached is not None and all(_files_intact(a["files"]) for a in cached["artifacts"].values()):
        return Exported(key, cached["artifacts"], cached["failed"])
    return None


def finished(job: ExportJob, root: Path, options: DeployOptions, reference: Checkpoint, cache: DeployCache) -> bool:
    """Whether the cache holds this format's export (its files unchanged) and every candidate's accuracy."""
    exported = _cached_export(job.export_key(root, options), cache)
    if exported is None:
        return False
    candidates = candidates_of(job, exported, reference)
    return all(c.rejected is not None or cache.get(f"measure:{c.key}") is not None for c in candidates)


def export_format(job: ExportJob, sources: Sources, cache: DeployCache, progress: Progress) -> Exported:
    """One format of one checkpoint, from the cache when its files are still there unchanged; an export that
    fails with the variants is tried once more with fp32 alone, so one precision's failure does not cost the
    others. The format maps the deploy target onto its own options (`Format.options_for`)."""
    from .. import export as export_module
    from ..export import ExportOptions

    checkpoint, name, precisions, budget = job.checkpoint, job.format, job.precisions, job.budget
    format_options = FORMATS[name].options_for(job.target)
    key = job.export_key(sources.root, sources.options)
    done = _cached_export(key, cache)
    if done is not None:
        return done
    out = Path(sources.options.out) / "candidates" / f"{checkpoint.name.replace('/', '-')}-{checkpoint.sha256[:8]}"
    export_options = ExportOptions(
        checkpoint=checkpoint.path,
        out=out,
        name=f"{name}-{key[:8]}",
        formats=(name,),
        precisions=tuple(dict.fromkeys((Precision.FP32, *precisions))),
        data=sources.root,
        calib_images=sources.options.calib_images,
        max_miou_drop=budget,
        parity_images=0,
        format_options=format_options,
    )
    source = sources.get(checkpoint, budget, progress)
    failed: dict[str, str] = {}
    try:
        result = export_module.run_export(export_options, progress, source)
    except Exception as exc:
        failed = {p.value: one_line(exc) for p in precisions}
        result = None
        if any(p is not Precision.FP32 for p in precisions) and Precision.FP32 in precisions:
            try:
                result = export_module.run_export(
                    replace(export_options, precisions=(Precision.FP32,)), progress, source
                )
                del failed[Precision.FP32.value]
            except Exception as retry:
                failed[Precision.FP32.value] = one_line(retry)
    artifacts = {}
    for artifact in result.artifacts if result is not None else []:
        if artifact.precision in (p.value for p in precisions) and artifact.precision not in artifacts:
            artifacts[artifact.precision] = {
                "path": str(artifact.path),
                "files": _files(artifact.path),
                "size_mb": artifact_bytes(artifact.path) / 1e6,
            }
    if artifacts:  # an export that wrote nothing is tried again by the next run (a runtime may have been installed)
        cache.put(f"export:{key}", {"artifacts": artifacts, "failed": failed})
    return Exported(key, artifacts, failed)


def _candidate(checkpoint: Checkpoint, name: str, precision: Precision) -> Candidate:
    return Candidate(
        model=checkpoint.name,
        checkpoint=str(checkpoint.path),
        checkpoint_sha256=checkpoint.sha256,
        format=name,
        precision=precision.value,
        runtime=FORMATS[name].runtime,
        architecture=checkpoint.architecture,
    )


def unexported(checkpoint: Checkpoint, name: str, precisions: tuple[Precision, ...], reason: str) -> list[Candidate]:
    """The candidates of a format not exported for `checkpoint`, each with `reason`."""
    return [
        replace(
            _candidate(checkpoint, name, precision),
            rejected=reason,
            key=content_key(unexported=checkpoint.sha256, format=name, precision=precision.value),
        )
        for precision in precisions
    ]


def candidates_of(job: ExportJob, exported: Exported, reference: Checkpoint) -> list[Candidate]:
    """The candidates of one format's export: where each file is, or why the export failed."""
    checkpoint, name, precisions = job.checkpoint, job.format, job.precisions
    rows = []
    for precision in precisions:
        record = exported.artifacts.get(precision.value)
        base = _candidate(checkpoint, name, precision)
        if record is None:
            reason = exported.failed.get(precision.value, "no file written")
            rows.append(
                replace(
                    base,
                    rejected=f"export failed: {reason}",
                    key=content_key(export=exported.key, precision=precision.value),
                )
            )
            continue
        key = content_key(
            export=exported.key,
            precision=precision.value,
            files=[f["sha256"] for f in record["files"]],
            reference=reference.sha256,
        )
        files = tuple(record["files"])
        rows.append(replace(base, path=record["path"], files=files, size_mb=record["size_mb"], key=key))
    return rows


def measure_accuracy(candidate: Candidate, threads: int, validation: Validation, reference: Checkpoint) -> Candidate:
    """The candidate with its val mIoU, its drop against the reference checkpoint and its pixel agreement with
    it, or with the one-line reason measuring failed."""
    from ..parity import compare

    reference_out = validation.outputs(reference)
    if candidate.path is None:
        return replace(candidate, rejected="measuring failed: no file")
    loaded = reference.loaded
    try:
        val = validation.images(loaded.mean, loaded.std)  # its ground truth; the file runs on its own normalisation
        figures = compare(
            reference_out, validation.file_outputs(candidate.path), val.masks, len(loaded.classes), loaded.ignore_index
        )
    except Exception as exc:
        return replace(candidate, rejected=f"measuring failed: {one_line(exc)}")
    return replace(
        candidate,
        miou=figures["miou_gt"],
        miou_drop=reference.miou - figures["miou_gt"],
        pixel_agreement=figures["pixel_agreement"],
    )


def measured(candidate: Candidate, validation: Validation, reference: Checkpoint, cache: DeployCache) -> Candidate:
    """The candidate's accuracy, from the cache or measured (and cached)."""
    fields = ("miou", "miou_drop", "pixel_agreement", "rejected")
    cached = cache.get(f"measure:{candidate.key}")
    if cached is None:
        result = measure_accuracy(candidate, validation.threads, validation, reference)
        cached = {name: getattr(result, name) for name in fields}
        cache.put(f"measure:{candidate.key}", cached)
    return replace(candidate, **{name: cached.get(name) for name in fields})


def export_and_measure(
    job: ExportJob,
    sources: Sources,
    validation: Validation,
    reference: Checkpoint,
    cache: DeployCache,
    progress: Progress,
) -> list[Candidate]:
    """One format of one checkpoint exported and each of its candidates measured against the reference, both
    through the cache; `progress` hears 2 units per precision (its export, then its accuracy). The same work
    in this process or in an export worker."""
    steps = Steps(progress, total=2 * len(job.precisions))
    exported = export_format(job, sources, cache, steps.part(len(job.precisions)))
    steps.advance(len(job.precisions))
    candidates = []
    for candidate in candidates_of(job, exported, reference):
        if candidate.rejected is None:
            steps.say(f"val mIoU of {candidate.label}")
            candidate = measured(candidate, validation, reference, cache)
        candidates.append(candidate)
        steps.advance()
    return candidates
