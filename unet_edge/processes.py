"""What the worker processes unet-edge starts have in common (deploy's export workers, the search's table exporters
and trial workers): a worker ends with the process that started it, rather than work on for nobody; pools of
one-thread workers come from a fork server, and stop at once on Ctrl-C."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the executor (and multiprocessing) is imported when a pool starts, not with the CLI
    from concurrent.futures import ProcessPoolExecutor

__all__ = ["exit_when_gone", "pool_context", "stop_pool", "watch_parent", "worker_pool"]


def exit_when_gone(parent: int, every_s: float = 1.0) -> None:
    """End this process (exit code 1) once process `parent` no longer exists; checked every `every_s` seconds."""
    while True:
        time.sleep(every_s)
        try:
            os.kill(parent, 0)
        except (ProcessLookupError, PermissionError):  # gone, or its number taken by another user's process
            os._exit(1)


def watch_parent(parent: int) -> None:
    """End this process within about a second of `parent` being gone (killed, or stopped by a signal that skips
    its clean-up): a daemon thread running `exit_when_gone`."""
    threading.Thread(target=exit_when_gone, args=(parent,), daemon=True, name="watch-parent").start()


def _start_worker(parent: int, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    """One thread per worker (the workers share the cores between them), ending with `parent`; then the caller's
    `initializer`."""
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = "1"
    import torch

    torch.set_num_threads(1)
    watch_parent(parent)
    if initializer is not None:
        initializer(*initargs)


def worker_pool(
    jobs: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
    preload: Sequence[str] = (),
) -> ProcessPoolExecutor:
    """`jobs` worker processes from the fork server (`pool_context`, which also imports the modules `preload`
    names), one thread each, each ending when this process is gone; `initializer(*initargs)` runs in each (a
    module-level function: it travels by name)."""
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(
        jobs, mp_context=pool_context(preload), initializer=_start_worker, initargs=(os.getpid(), initializer, initargs)
    )


# What the resource tracker says when Ctrl-C stops a pool before its queues are collected: it removes their
# semaphores all the same, so "leaked semaphore objects to clean up at shutdown" is noise after "interrupted".
TRACKER_WARNING = "ignore:resource_tracker:UserWarning"


def _quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (a process of its own, started once) with its shutdown warning
    ignored; the environment is restored at once, so no other process inherits the filter."""
    from multiprocessing import resource_tracker

    saved = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (saved, TRACKER_WARNING)))
    try:
        resource_tracker.ensure_running()
    finally:
        if saved is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = saved


def pool_context(preload: Sequence[str] = ()) -> Any:
    """Workers forked from a fork server that has imported torch and the modules `preload` names, nothing else (not
    the program's `__main__`, whose import may start thread pools): each worker starts without importing torch
    again, and no runtime's threads are copied into it. Where there is no fork server (Windows), fresh
    interpreters."""
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        _quiet_resource_tracker()  # before the first queue or pool starts it (POSIX: where there is a fork server)
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__, "torch", *preload])
        return context
    return multiprocessing.get_context("spawn")


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Ctrl-C or an error in the parent: the workers stop now (what they finished is the caller's already)."""
    processes = list(getattr(pool, "_processes", {}).values())  # the executor offers no terminate before 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)
