"""Search: the most accurate student that meets a latency budget on this device, found by measurement and an
Optuna study.

The stages: `space` (the architectures), `latency` (each one timed here with random weights, by deploy's plan
of formats and precisions and bench's one timing protocol, cached per machine), the budget (architectures
over it are never trained), `study` (Optuna's loop over what fits and the training settings; each trial an
ordinary run folder under runs/search/NAME/trials/) and `report` (the accuracy-latency Pareto front as a
table, search.png and search.json, its checkpoints handed to `deploy`, whose winner is the artifact to ship).
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import BlockOrder, Upsample
from ..formats import Precision, default_threads
from ..io import check_writable
from ..progress import Progress, Steps, tell
from .latency import LatencyTable, SearchError, TableSettings, machine_facts, measure_table, teacher_latency
from .report import REPORT_FILE, SearchResult, TrialRecord, collect_trials, write_report
from .space import BASE_CHANNELS, DEPTHS, Architecture, architectures
from .study import (
    StudySpec,
    check_storage,
    enqueue_defaults,
    open_study,
    recover_stale_trials,
    run_workers,
    start_architecture,
)

__all__ = [
    "REPORT_FILE",
    "Architecture",
    "LatencyTable",
    "SearchError",
    "SearchOptions",
    "SearchResult",
    "TableSettings",
    "TrialRecord",
    "architectures",
    "default_table_path",
    "run_search",
]

TABLE_FILE = "latency-table.json"


@dataclass(frozen=True)
class SearchOptions:
    """What `unet-edge search` explores, within which budget, and how it measures and trains."""

    name: str = "search"
    runs_dir: Path = Path("runs")
    data: Path | None = None  # default: the embedded synthetic set
    teacher: Path | None = None  # a checkpoint or TorchScript file: trials may distil from it
    # The space.
    base_channels: tuple[int, ...] = BASE_CHANNELS
    depths: tuple[int, ...] = DEPTHS
    block_orders: tuple[str, ...] = tuple(BlockOrder)
    upsamples: tuple[str, ...] = tuple(Upsample)
    # The budget: p50 at the deploy size and batch, in ms or as a fraction of the teacher's eager p50.
    max_latency_ms: float | None = None
    max_latency_ratio: float | None = None
    # The latency table.
    image_size: tuple[int, int] = (256, 256)
    batch_size: int = 1
    threads: int | None = None  # default: one per core
    formats: tuple[str, ...] | None = ("onnx", "openvino")  # None: every installed format
    precisions: tuple[Precision, ...] | None = None  # None: each one a format offers and this CPU runs natively
    latency_table: Path | None = None  # default: runs_dir/search/latency-table.json, measured here
    latency_only: bool = False  # measure the table (and the teacher's latency) and stop
    table_seconds: float = 0.5
    table_min_calls: int = 10
    # The study.
    trials: int = 20
    timeout_s: float | None = None
    workers: int = 1
    storage: str | None = None  # default: sqlite:///runs_dir/search/NAME/study.db
    heartbeat_s: int = 20
    # Each trial's training.
    epochs: int | None = None  # default: `train`'s schedule for the training set at the start architecture's width
    train_batch_size: int = 16
    train_image_size: int = 64
    lr_range: tuple[float, float] = (3e-4, 1e-2)
    distill_weight_range: tuple[float, float] = (0.02, 1.0)
    seed: int = 0
    device: str = "auto"
    # The front handed to deploy.
    deploy: bool = True
    # Deploy's mIoU budget against the front's best. None: none with a latency budget (the most accurate artifact
    # within it wins), deploy's own default without one (the fastest artifact within it wins).
    max_miou_drop: float | None = None
    deploy_seconds: float = 2.0
    deploy_min_calls: int = 30

    @property
    def folder(self) -> Path:
        return Path(self.runs_dir) / "search" / self.name

    def table_settings(self, threads: int) -> TableSettings:
        return TableSettings(
            image_size=self.image_size,
            batch_size=self.batch_size,
            threads=threads,
            formats=self.formats,
            precisions=self.precisions,
            seconds=self.table_seconds,
            min_calls=self.table_min_calls,
        )


def default_table_path(runs_dir: Path) -> Path:
    """Where a search keeps this machine's latency table: one file for every search of the runs folder."""
    return Path(runs_dir) / "search" / TABLE_FILE


def _check(options: SearchOptions) -> None:
    if options.max_latency_ms is not None and options.max_latency_ratio is not None:
        raise SearchError("give --max-latency-ms or --max-latency-ratio, not both")
    if options.max_latency_ratio is not None and options.teacher is None:
        raise SearchError("--max-latency-ratio is a fraction of the teacher's eager latency: give --teacher")
    if options.teacher is not None and not Path(options.teacher).is_file():
        raise SearchError(f"{options.teacher}: teacher not found")
    if options.trials < 1 or options.workers < 1 or (options.epochs is not None and options.epochs < 1):
        raise SearchError("--trials, --workers and --epochs must be at least 1")
    if "/" in options.name or not options.name.strip():
        raise SearchError(f"--name {options.name!r}: a folder name, without '/'")


def _budget(
    options: SearchOptions, table: LatencyTable, settings: TableSettings, space: tuple[Architecture, ...], classes: int
) -> tuple[float | None, float | None, dict[str, dict[str, Any]]]:
    """(the budget in ms or None, the teacher's eager p50 or None, each architecture's fastest row)."""
    teacher_ms = teacher_latency(Path(options.teacher), table, settings) if options.teacher is not None else None
    budget = options.max_latency_ms
    if options.max_latency_ratio is not None and teacher_ms is not None:
        budget = options.max_latency_ratio * teacher_ms
    best = {arch.name: row for arch in space if (row := table.best(arch, classes, settings)) is not None}
    if not best:
        raise SearchError(f"no architecture could be timed with {', '.join(options.formats or ('any format',))}")
    return budget, teacher_ms, best


def _too_slow(budget: float, best: dict[str, dict[str, Any]], settings: TableSettings) -> SearchError:
    name, row = min(best.items(), key=lambda item: item[1]["latency_ms"]["p50"])
    size = "x".join(map(str, settings.image_size))
    return SearchError(
        f"no architecture meets the budget of {budget:.3f} ms (p50 at {size}, batch {settings.batch_size}, "
        f"{settings.threads} threads): the fastest is {name} at {row['latency_ms']['p50']:.3f} ms "
        f"({row['format']} {row['precision']})"
    )


def run_search(options: SearchOptions, progress: Progress | None = None) -> SearchResult:
    """Measure (or reuse) the latency table, apply the budget, run the study until `--trials` or `--timeout`,
    and write the front (search.json, search.png) with deploy's verdict on its checkpoints."""
    import torch

    from ..data import resolve_data

    _check(options)
    started = time.time()
    folder = options.folder
    check_writable(folder / REPORT_FILE)
    threads = options.threads or default_threads()
    saved_threads = torch.get_num_threads()
    settings = options.table_settings(threads)
    steps = Steps(progress, total=4)
    try:
        steps.say("data")
        data_root = resolve_data(options.data)
        if options.storage is not None and not options.latency_only:  # a wrong URL now, not after the table
            steps.say("study storage")
            check_storage(options.storage, options.heartbeat_s)
        table_path = Path(options.latency_table) if options.latency_table else default_table_path(options.runs_dir)
        table = LatencyTable.open(table_path, machine_facts(threads), given=options.latency_table is not None)
        space = architectures(options.base_channels, options.depths, options.block_orders, options.upsamples)
        steps.say(f"latency table: {len(space)} architectures")
        table, classes = measure_table(space, table, settings, data_root, steps.part(1, "latency table: "))
        budget, teacher_ms, best = _budget(options, table, settings, space, classes)
        steps.advance(1, "budget")
        feasible = tuple(a for a in space if a.name in best and (budget is None or _p50(best[a.name]) <= budget))
        if not feasible:
            raise _too_slow(float(budget or 0.0), best, settings)
        result = SearchResult(
            folder=folder,
            table=table,
            settings=settings,
            budget_ms=budget,
            teacher=str(options.teacher) if options.teacher else None,
            teacher_ms=teacher_ms,
            space=space,
            best_rows=best,
            feasible=feasible,
        )
        if options.latency_only:
            steps.done("latency table written")
            return result
        spec = _spec(options, feasible, best, data_root, threads, started)
        folder.mkdir(parents=True, exist_ok=True)
        with _StudyLock(folder / ".search.lock") as alone:
            study = open_study(spec)
            enqueue_defaults(study, spec)
            if alone and options.storage is None:
                recovered = recover_stale_trials(study)
                if recovered:
                    tell(progress, steps.count, steps.total, f"queued again {recovered} trial(s) left running")
            steps.say(f"study: {options.trials} trials, {options.workers} worker(s)")
            _watch(
                progress,
                steps,
                study,
                options.trials,
                lambda: run_workers(spec, options.workers, folder / ".workers.json"),
            )
            steps.advance(1, "the front")
            result = replace(result, trials=collect_trials(study), study_name=spec.study_name, storage=spec.storage)
        result = write_report(replace(result, wall_s=time.time() - started))  # the front, whatever deploy does
        if options.deploy and result.front:
            steps.say("deploying the front")
            result = replace(result, deploy=_deploy(options, result, data_root, threads, steps.part(1, "deploy: ")))
        result = write_report(replace(result, wall_s=time.time() - started))
        steps.done()
        return result
    finally:
        torch.set_num_threads(saved_threads)


def _p50(row: dict[str, Any]) -> float:
    return float(row["latency_ms"]["p50"])


def _spec(
    options: SearchOptions,
    feasible: tuple[Architecture, ...],
    best: dict[str, dict[str, Any]],
    data_root: Path,
    threads: int,
    started: float,
) -> StudySpec:
    folder = options.folder
    storage = options.storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    latency_ms = {a.name: _p50(best[a.name]) for a in feasible}
    start = start_architecture(feasible, latency_ms)
    return StudySpec(
        storage=storage,
        study_name=options.name,
        architectures=feasible,
        latency_ms=latency_ms,
        trials=options.trials,
        deadline=None if options.timeout_s is None else started + options.timeout_s,
        trials_dir=str(folder / "trials"),
        data=str(data_root),
        teacher=str(Path(options.teacher).resolve()) if options.teacher else None,
        epochs=options.epochs if options.epochs is not None else _schedule_epochs(data_root, start.base_channels),
        batch_size=options.train_batch_size,
        image_size=options.train_image_size,
        lr_range=options.lr_range,
        distill_weight_range=options.distill_weight_range,
        seed=options.seed,
        device=options.device,
        threads=max(1, threads // options.workers),
        heartbeat_s=options.heartbeat_s,
    )


def _schedule_epochs(data_root: Path, base_channels: int) -> int:
    """The epochs of every trial: those `train` runs by default on `data_root`'s training set for the start trials'
    width (`start_architecture`), so the start trials are `train`'s own runs and every trial trains as long."""
    from ..config import schedule_epochs
    from ..data import ImageSegmentation

    return schedule_epochs(len(ImageSegmentation(data_root, "train")), base_channels)


def _watch(progress: Progress | None, steps: Steps, study: Any, trials: int, work: Any) -> None:
    """Run `work` while a thread tells `progress` how many trials the study has finished."""
    import threading

    from optuna.trial import TrialState

    stop = threading.Event()
    part = steps.part(1, "study: ")

    def poll() -> None:
        while not stop.wait(2.0):
            try:
                done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
            except Exception:  # the storage busy: the next poll tells
                continue
            part(min(done, trials), trials, f"{done} of {trials} trials done")

    watcher = threading.Thread(target=poll, daemon=True)
    if progress is not None:
        watcher.start()
    try:
        work()
    finally:
        stop.set()


class _StudyLock:
    """An exclusive, non-blocking lock on the search folder: held, no other search of this machine works on the
    folder's own SQLite study, so a trial left RUNNING there was killed."""

    def __init__(self, path: Path) -> None:
        self.path, self.fd = path, -1

    def __enter__(self) -> bool:
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _deploy(options: SearchOptions, result: SearchResult, data_root: Path, threads: int, progress: Progress) -> Any:
    from ..deploy import DeployOptions, run_deploy

    # deploy reads its figures on the table's scale, so the budget means what it meant for the study (a table of
    # another machine describes a device deploy does not run on: its figures stay as timed here)
    table, settings = result.table, result.settings
    anchor_ms = None if table.foreign else table.anchor_reference(settings.image_size, settings.batch_size)
    drop = options.max_miou_drop
    if drop is None:
        drop = 1.0 if result.budget_ms is not None else DeployOptions().max_miou_drop
    return run_deploy(
        DeployOptions(
            checkpoints=tuple(Path(t.checkpoint) for t in result.front if t.checkpoint),
            max_miou_drop=drop,
            max_latency_ms=result.budget_ms,
            image_size=options.image_size,
            batch_size=options.batch_size,
            threads=threads,
            formats=options.formats,
            precisions=options.precisions,
            seconds=options.deploy_seconds,
            min_calls=options.deploy_min_calls,
            out=options.folder / "deploy",
            data=data_root,
            runs_dir=options.runs_dir,
            anchor_ms=anchor_ms,
        ),
        progress,
    )
