"""Exports in worker processes: each (checkpoint, format) export and the accuracy of its candidates is a task;
up to `jobs` tasks run at once, each in a process of its own (`processes.worker_pool`: from a fork server, one
thread each, ending with this process). The conversions are mostly single-threaded (tracing, lowering passes, a
C++ compiler), so two cores export two formats at once. Timing is not done here: the pool is shut down before it
starts.

A worker loads each checkpoint it is given once and builds its budget once, from the validation masks the
parent computed (so the budget compares against the same predictions whichever process checks a variant). It
reads the deploy cache as it was when the task was sent and returns what it adds; only the parent writes the
cache, as each task finishes, so Ctrl-C loses at most the tasks under way. A worker that dies (a converter's
crash) costs only its tasks: they run again in the parent, one by one.
"""

from __future__ import annotations

import queue as queue_module
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..processes import pool_context, stop_pool, worker_pool
from .cache import DeployCache
from .records import Candidate, DeployOptions

__all__ = ["Task", "TaskResult", "run_tasks"]


@dataclass(frozen=True)
class Task:
    """One format of one checkpoint to export and measure; the checkpoints travel without their loaded model."""

    index: int
    job: Any  # measure.ExportJob, its checkpoint with loaded=None
    reference: Any  # measure.Checkpoint, loaded=None
    options: DeployOptions
    formats: tuple[str, ...]  # every format deploy exports (the export source decides its BatchNorm fold by them)
    root: Path
    masks: dict[str, list[Any]]  # sha256 -> validation masks, for the checkpoint and the reference
    cache: dict[str, Any]  # the deploy cache's entries when the task was sent

    @property
    def label(self) -> str:
        return str(self.job.label)


@dataclass(frozen=True)
class TaskResult:
    index: int
    candidates: list[Candidate]
    added: dict[str, Any]  # cache entries the task put


PRELOAD = (__name__,)  # what the fork server imports for these workers

# A worker's state: its progress queue, and what it loaded (by sha256) and built (by validation root).
_WORKER: dict[str, Any] = {}


def _init_worker(progress: Any) -> None:
    """A worker's state, empty (`processes.worker_pool` has given it one thread and tied it to this process)."""
    _WORKER.update(progress=progress, loaded={}, validation={}, sources={})


def _loaded(checkpoint: Any) -> Any:
    from ..checkpoint import load_model

    models = _WORKER["loaded"]
    if checkpoint.sha256 not in models:
        models[checkpoint.sha256] = load_model(checkpoint.path)
    return replace(checkpoint, loaded=models[checkpoint.sha256])


def run_task(task: Task) -> TaskResult:
    """A task in a worker (or, given a fresh `_WORKER`, anywhere): the same `export_and_measure` as the parent's."""
    from . import measure

    job, reference = replace(task.job, checkpoint=_loaded(task.job.checkpoint)), _loaded(task.reference)
    key = str(task.root.resolve())
    if key not in _WORKER["validation"]:
        _WORKER["validation"][key] = measure.Validation(task.root, 1)
        _WORKER["sources"][key] = measure.Sources(task.options, _WORKER["validation"][key], task.formats)
    validation, sources = _WORKER["validation"][key], _WORKER["sources"][key]
    for sha256, masks in task.masks.items():
        validation.seed(sha256, masks)
    sink = _WORKER.get("progress")

    def progress(done: float, total: float | None, label: str) -> None:
        if sink is not None:
            sink.put((task.index, label))

    cache = DeployCache(None, task.cache)
    candidates = measure.export_and_measure(job, sources, validation, reference, cache, progress)
    # The loaded model stays in this process: the parent's Candidate records name files, not models.
    return TaskResult(task.index, candidates, cache.added)


def run_tasks(
    tasks: list[Task],
    jobs: int,
    on_done: Callable[[TaskResult], None],
    on_label: Callable[[str], None],
) -> list[Task]:
    """Run `tasks` in `jobs` worker processes; `on_done` hears each result as its task finishes (in the order
    they finish), `on_label` what the tasks under way are doing. Returns the tasks whose worker died."""
    labels = pool_context(PRELOAD).Queue()
    pool = worker_pool(jobs, _init_worker, (labels,), PRELOAD)
    lost: list[Task] = []
    by_index = {task.index: task for task in tasks}
    try:
        futures: dict[Future[TaskResult], Task] = {pool.submit(run_task, task): task for task in tasks}
        under_way: dict[int, str] = {}
        ended: set[int] = set()  # a task's last labels may arrive after its result
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            while True:
                try:
                    index, label = labels.get_nowait()
                except queue_module.Empty:
                    break
                if index not in ended:
                    under_way[index] = f"{by_index[index].label}: {label}"
            for future in finished:
                task = futures[future]
                ended.add(task.index)
                under_way.pop(task.index, None)
                try:
                    result = future.result()
                except Exception:  # the worker died (BrokenProcessPool) or its task could not be pickled
                    lost.append(task)
                    continue
                on_done(result)
            if under_way:
                on_label("; ".join(under_way[index] for index in sorted(under_way)))
    except BaseException:
        stop_pool(pool)
        raise
    pool.shutdown(wait=True)
    labels.close()
    return lost
