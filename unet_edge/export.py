"""The export pipeline: a checkpoint to every requested format and precision, a parity check, one manifest.

`run_export` loads the checkpoint once, checks the options before writing anything (datasets exist,
the BatchNorm fold is exact when asked for), lets each format of the registry write its artifacts
into a staging folder beside the export folder, derives the reduced-precision variants, measures parity
on validation images, then moves the files into the export folder and writes manifest.json once, with
each file's sha256 and its parity result, and EMBEDDING.md (how to embed each model, from the formats' snippets).

A failure (a full disk, a converter error) or a kill at any point leaves the previous export as it was,
and no manifest ever names a file that is missing or differs from its sha256: before the new files move
in, the manifest drops the entries they replace. Staging folders that a killed export left behind are
removed by the next export into the same parent folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .artifact import MANIFEST_FILE, ExportedArtifact, find_latest_export, read_manifest, write_manifest
from .cpuinfo import precision_skip_reason
from .errors import ArtifactError, OutputError, UNetEdgeError
from .formats import FORMATS, ExportRequest, Precision, Provider, QuantBudget, export_formats, export_options
from .formats.embedding import EMBEDDING_FILE, folder_embedding_markdown
from .io import atomic_write_text
from .progress import Progress, Steps
from .quiet import third_party_output

__all__ = ["ExportOptions", "ExportResult", "ExportSource", "export_source", "find_latest_export", "run_export"]


@dataclass
class ExportOptions:
    """What to export and how (the `unet-edge export` options)."""

    checkpoint: Path | None = None  # default: the newest runs_dir/*/best.pt
    out: Path = Path("exported")
    name: str | None = None  # export folder name; default: the run's folder name
    formats: tuple[str, ...] | None = None  # None: every registered format whose runtime is installed
    precisions: tuple[Precision, ...] = (Precision.FP32,)  # fp32 is always written; others where a format has them
    # The options formats declare (`FormatOption`: opset, image_size, max_batch, ...), by name; absent: their default.
    format_options: dict[str, Any] = field(default_factory=dict)
    fold: bool | None = (
        None  # formats with a conv graph; None: fold conv-bn-relu models, keep the seed's order as trained
    )
    data: Path | None = None  # parity and int8 validation set; default: the checkpoint's
    calib_data: Path | None = None  # int8 calibration set (its train split); default: `data`
    calib_images: int = 32
    max_miou_drop: float = 0.01
    parity_images: int = 8  # 0: skip the parity check
    runs_dir: Path = Path("runs")


@dataclass
class ExportResult:
    """The export folder, the artifacts written, their manifest and the parity report (None when skipped)."""

    checkpoint: Path
    folder: Path
    manifest: Path
    artifacts: list[ExportedArtifact]
    parity: dict[str, Any] | None = None
    quantization: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # format (or precision) -> why it was left out

    @property
    def passed(self) -> bool:
        return self.parity is None or bool(self.parity["passed"])


@dataclass(frozen=True)
class ExportSource:
    """A checkpoint loaded for export: the model, its BatchNorm-folded copy (None: not folded), the dataset of
    the parity check, and the budget its variants are calibrated on and held to (None: no variants). Built
    once, it serves any number of exports of the same checkpoint with the same data and budget: the
    checkpoint's own validation predictions are then computed once for all of them."""

    path: Path
    loaded: Any
    folded_model: Any
    data_root: Path | None
    budget: QuantBudget | None


def export_source(
    options: ExportOptions,
    progress: Callable[[str], None] | None = None,
    loaded: Any = None,
    predictions: Any = None,
) -> ExportSource:
    """Load `options.checkpoint` (default: the newest run; `loaded`: already loaded from it), fold it when asked
    and exact, and build the budget when `options.precisions` has variants (the calibration images are read here
    when int8 is asked for, so that a bad one stops the export before anything is converted; the checkpoint's
    validation predictions are computed on first use); `options.formats` must be set (it decides
    whether to fold). `progress` hears the budget's steps by label; `predictions` (`parity.Predictions`) gives
    the budget predictions its caller already holds."""
    from .checkpoint import find_latest_checkpoint, load_model
    from .evaluate import checkpoint_data_root
    from .fold import FoldError, fold_batchnorm
    from .parity import export_budget

    source = Path(options.checkpoint) if options.checkpoint is not None else find_latest_checkpoint(options.runs_dir)
    loaded = loaded if loaded is not None else load_model(source)
    fold = options.fold if options.fold is not None else loaded.config.block_order == "conv-bn-relu"
    folded_model = None
    if fold and any(FORMATS[name].folds_batchnorm for name in options.formats or ()):
        try:
            folded_model = fold_batchnorm(loaded.model)
        except FoldError as exc:
            raise ArtifactError(f"{source}: cannot fold BatchNorm exactly ({exc}); export without --fold") from None
    variants = any(p is not Precision.FP32 for p in options.precisions)
    data_root = checkpoint_data_root(loaded.state, options.data) if variants or options.parity_images else None
    budget = None
    if variants and data_root is not None:
        budget = export_budget(
            loaded,
            data_root,
            calib_data=options.calib_data,
            calib_images=options.calib_images,
            max_miou_drop=options.max_miou_drop,
            progress=progress,
            predictions=predictions,
        )
        if Precision.INT8 in options.precisions:  # a bad calibration image stops the export before it converts
            if progress is not None:
                progress("reading the calibration images")
            budget.calibration()
    return ExportSource(source, loaded, folded_model, data_root, budget)


def _check_options(options: ExportOptions) -> None:
    from .data import resolve_data

    formats = export_formats()
    names = options.formats or ()
    unknown = [name for name in names if name not in formats]
    if unknown:
        raise UNetEdgeError(f"unknown format {unknown[0]!r}: use {', '.join(formats)}")
    for wanted in options.precisions:
        if not any(wanted in formats[name].precisions for name in names):
            offering = ", ".join(name for name, fmt in formats.items() if wanted in fmt.precisions)
            raise UNetEdgeError(
                f"{', '.join(names)}: no {wanted.value} variant (formats with {wanted.value}: {offering})"
            )
    declared = export_options()
    for name in options.format_options:
        if name not in declared:
            raise UNetEdgeError(f"unknown export option {name!r}: the formats declare {', '.join(declared)}")
    for name in names:
        check = formats[name].check_options
        if check is not None:
            check(options.format_options)
        why = formats[name].unavailable(Provider.CPU) if options.parity_images else None
        if why is not None:  # refused before converting: the parity check at the end would need the runtime
            raise UNetEdgeError(f"{why}; needed to check {name}'s parity (--parity-images 0 exports without the check)")
    for folder in (options.data, options.calib_data):
        if folder is not None:
            resolve_data(folder)  # a missing dataset is an error before anything is written


def run_export(
    options: ExportOptions, progress: Progress | None = None, source: ExportSource | None = None
) -> ExportResult:
    """Export a checkpoint as `options` say; see the module docstring for the order of the steps. `source`, when
    given, is the checkpoint already loaded (with its fold and budget) by `export_source`: several exports of
    one checkpoint then share one load and one budget."""
    skipped: dict[str, str] = {}
    if options.formats is None:
        formats = export_formats()
        skipped = {name: why for name, fmt in formats.items() if (why := fmt.unavailable(Provider.CPU)) is not None}
        options = replace(options, formats=tuple(name for name in formats if name not in skipped))
    _check_options(options)
    if Precision.BF16 in options.precisions and (reason := precision_skip_reason("bf16")):
        # Its accuracy budget could not be measured here: OpenVINO runs a bf16 hint as fp32 on such a CPU.
        skipped["bf16"] = reason
        options = replace(options, precisions=tuple(p for p in options.precisions if p is not Precision.BF16))
    names = options.formats or ()
    steps = Steps(progress, total=len(names) + 2)
    if source is None:
        steps.say("loading the checkpoint")
        source = export_source(options, steps.label)
    steps.advance(label="checkpoint loaded")
    folder = Path(options.out) / (options.name or source.path.resolve().parent.name)
    new_parents = [p for p in (folder.parent, *folder.parent.parents) if not p.exists()]
    staging = _staging_folder(folder)
    try:
        return _export_staged(options, source, folder, staging, skipped, steps)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in new_parents:  # folders this export created, when it leaves nothing in them
            try:
                parent.rmdir()
            except OSError:
                break
        if isinstance(exc, (UNetEdgeError, OSError)):
            raise _named_for(exc, staging, folder) from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _named_for(exc: UNetEdgeError | OSError, staging: Path, folder: Path) -> UNetEdgeError:
    """The error of a failed export, naming the export folder rather than its staging folder, and saying so
    when the device is full (converters that write files themselves report it in their own words)."""
    if isinstance(exc, OSError):
        where = str(exc.filename or staging)
        message = f"{where}: cannot write ({exc.strerror or exc})"
        error: UNetEdgeError = OutputError(message)
    else:
        error = exc
    message = str(error).replace(str(staging), str(folder))
    try:
        full = shutil.disk_usage(folder.parent).free < 1 << 20
    except OSError:
        full = False
    if full and "device is full" not in message and "No space left" not in message:
        message += "; the device is full"
    error.args = (
        message.replace("; the previous file, if any, is unchanged", "")
        + "; the previous export, if any, is unchanged",
    )
    return error


def _export_staged(
    options: ExportOptions,
    source: ExportSource,
    folder: Path,
    staging: Path,
    skipped: dict[str, str],
    steps: Steps,
) -> ExportResult:
    from .parity import verify

    loaded, data_root = source.loaded, source.data_root
    variants = tuple(p for p in options.precisions if p is not Precision.FP32)
    request = ExportRequest(
        loaded=loaded,
        folder=staging,
        folded_model=source.folded_model,
        options=options.format_options,
        budget=source.budget,
        progress=steps.label,
    )
    artifacts: list[ExportedArtifact] = []
    for name in options.formats or ():
        fmt = FORMATS[name]
        if fmt.export is None:  # `_check_options` took only export formats; a read-only one has nothing to write
            raise UNetEdgeError(f"{name} is read-only: nothing exports to it")
        steps.say(f"exporting {name}")
        # The fold is decided per format: those that read a conv graph get the folded one when folding was asked for.
        own = replace(request, folded_model=source.folded_model if fmt.folds_batchnorm else None)
        with third_party_output(f"{name} export"):  # converters' step logs and warnings
            artifacts += fmt.export(own)
        wanted = tuple(p for p in variants if p in fmt.precisions)
        if wanted and fmt.export_variants is not None:
            steps.say(f"exporting {name} {', '.join(p.value for p in wanted)}")
            with third_party_output(f"{name} {'/'.join(p.value for p in wanted)} export"):
                artifacts += fmt.export_variants(replace(own, precisions=wanted))
        steps.advance()
    parity = None
    if options.parity_images:
        steps.say(f"parity check on {options.parity_images} validation images")
        entries = {a.file: {"precision": a.precision, **(a.extra or {})} for a in artifacts}
        parity = verify(
            [a.path for a in artifacts],
            checkpoint=source.path,
            data=data_root,
            num_images=options.parity_images,
            entries=entries,
        )
    results = {
        Path(r["path"]).name: {k: v for k, v in r.items() if k != "path"} for r in (parity or {}).get("artifacts", [])
    }
    artifacts = _move_in(staging, folder, artifacts)
    for row in (parity or {}).get("artifacts", []):  # the report names the files where they now are
        row["path"] = str(folder / Path(row["path"]).name)
    manifest = write_manifest(folder, loaded, artifacts, results)
    atomic_write_text(
        folder / EMBEDDING_FILE, folder_embedding_markdown((read_manifest(folder) or {}).get("artifacts", []))
    )
    quantization = [a.extra["quantization"] for a in artifacts if a.extra and "quantization" in a.extra]
    steps.done("exported")
    return ExportResult(source.path, folder, manifest, artifacts, parity, quantization, skipped)


_STAGING = re.compile(r"\.export-(\d+)-\w+\.tmp$")


def _staging_folder(folder: Path) -> Path:
    """A new hidden folder beside `folder` (same filesystem, so moving files from it is atomic), after removing
    the staging folders of `folder` whose export process is gone (killed, or the machine restarted)."""
    if folder.parent.exists() and not folder.parent.is_dir():
        raise OutputError(f"{folder}: cannot write here (Not a directory: {folder.parent} is a file)")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        for stale in folder.parent.glob(f".{folder.name}.export-*.tmp"):
            match = _STAGING.search(stale.name)
            if match and not _process_alive(int(match.group(1))):
                shutil.rmtree(stale, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=f".{folder.name}.export-{os.getpid()}-", suffix=".tmp", dir=folder.parent))
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write here ({exc.strerror or exc})") from None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_in(staging: Path, folder: Path, artifacts: list[ExportedArtifact]) -> list[ExportedArtifact]:
    """Move every file of `staging` into `folder`; first drop the manifest entries of the files they replace,
    so a kill between two moves leaves a manifest that names only files it describes."""
    incoming = sorted(p.name for p in staging.iterdir() if p.is_file() and not p.name.startswith("."))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        manifest = read_manifest(folder)
    except ArtifactError:
        manifest = None  # unreadable: write_manifest starts it afresh
    if manifest is not None:

        def replaced(entry: dict[str, Any]) -> bool:
            return any(
                name in incoming for name in (entry.get("file"), *(c.get("file") for c in entry.get("companions", [])))
            )

        kept = [entry for entry in manifest.get("artifacts", []) if not replaced(entry)]
        if len(kept) != len(manifest.get("artifacts", [])):
            atomic_write_text(folder / MANIFEST_FILE, json.dumps({**manifest, "artifacts": kept}, indent=2) + "\n")
    for stale in folder.glob(".*.tmp"):  # temporary files of exports killed before staging existed
        if stale.is_file():
            stale.unlink(missing_ok=True)
    for name in incoming:
        os.replace(staging / name, folder / name)
    return [
        replace(a, path=folder / a.path.name, companions=[folder / c.name for c in a.companions]) for a in artifacts
    ]
