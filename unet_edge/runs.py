"""The run folder of one training run: best.pt / last.pt bookkeeping, metrics.jsonl, curves.png, config.json.

`RunFolder` is the one place that decides what is saved when (as timm's `CheckpointSaver`): `fit`
hands it each finished epoch and gets back ``(best_metric, best_epoch)``. In a distributed run every
process keeps the same bookkeeping and only the main process writes.

The writing process holds a lock on RUN/.lock (an `flock`, which the kernel frees when the process ends,
kill -9 included) from the moment it claims the folder until training ends: two runs started in the same
instant with the same name get two folders, and resuming a run that a live process is still writing is
refused.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .checkpoint import save_checkpoint
from .errors import OutputError, TrainingError, TrainingInterrupted
from .io import append_jsonl, atomic_write_text, pyplot, read_jsonl, save_figure

__all__ = ["RunFolder", "deferred_interrupt", "read_metrics", "write_curves"]


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The per-epoch records of a run (a partial last line from a crash is skipped)."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def write_curves(run_dir: str | os.PathLike[str]) -> Path | None:
    """Plot train loss, and train and val mIoU, per epoch (all epochs, resumed ones included) to curves.png."""
    records = read_metrics(run_dir)
    if not records:
        return None
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_miou) = pyplot().subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [r["train_loss"] for r in records], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="Training loss")
    if any(r.get("train_miou") is not None for r in records):  # runs before the running train mIoU lack it
        train_miou = [r["train_miou"] if r.get("train_miou") is not None else float("nan") for r in records]
        ax_miou.plot(epochs, train_miou, marker=".", color="C0", label="train (running, on the crops)")
    ax_miou.plot(
        epochs,
        [r["miou"] if r["miou"] is not None else float("nan") for r in records],
        marker="o",
        color="C1",
        label="val",
    )
    ax_miou.set(xlabel="epoch", ylabel="mIoU", title="mIoU", ylim=(0, 1))
    ax_miou.legend(loc="lower right")
    for ax in (ax_loss, ax_miou):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, Path(run_dir) / "curves.png")


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then deliver it: the files an epoch writes, and the
    bookkeeping that names them, land together or not at all."""
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if not callable(previous):  # another thread, or SIGINT ignored or not set from Python: nothing to hold
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            previous(signal.SIGINT, None)


LOCK_FILE = ".lock"


def _lock(folder: Path, *, create: bool) -> int:
    """Open folder/.lock (`create`: only if no one has made it yet) and take its exclusive lock without
    waiting; the file descriptor holds it. FileExistsError when `create` finds the file made by another
    process; BlockingIOError when a live process holds the lock."""
    flags = os.O_RDWR | os.O_CREAT | (os.O_EXCL if create else 0)
    fd = os.open(folder / LOCK_FILE, flags, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _claim_new_run_dir(out: str | os.PathLike[str], name: str | None) -> tuple[Path, int]:
    """`out/name`, or `out/name-2`, `-3`, ... when that folder already holds something, claimed atomically:
    of several processes that try the same name at once, exactly one creates its lock file; the others
    move on to the next name. Returns the folder and the descriptor holding its lock."""
    stem = name or "unet"
    for index in range(1, 10_000):
        candidate = Path(out) / (stem if index == 1 else f"{stem}-{index}")
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            if any(candidate.iterdir()):
                continue
            return candidate, _lock(candidate, create=True)
        except (FileExistsError, BlockingIOError):
            continue
        except OSError as exc:
            raise OutputError(f"{candidate}: cannot create the run folder ({exc.strerror or exc})") from None
    raise OutputError(f"{out}: no free run folder name for {stem!r}")


def _lock_existing(folder: Path, checkpoint: str | os.PathLike[str]) -> int:
    try:
        return _lock(folder, create=False)
    except BlockingIOError:
        try:
            holder = (folder / LOCK_FILE).read_text().strip()
        except OSError:
            holder = "?"
        raise TrainingError(
            f"{checkpoint}: its run is being trained by another process (pid {holder}); wait for it to end, "
            "or stop it first (a run that was stopped or killed can be resumed)"
        ) from None
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise OutputError(f"{folder}: cannot write to the run folder ({exc.strerror})") from None
        raise


class RunFolder:
    """Saves each finished epoch: its record to metrics.jsonl, then best.pt when the metric improved, then last.pt.

    `saved_epoch` is the epoch last.pt holds (None before any was saved), so an interrupted or failed
    run can say what it kept.
    """

    def __init__(
        self,
        path: Path,
        *,
        writer: bool = True,
        best_metric: float = -1.0,
        best_epoch: int = -1,
        saved_epoch: int | None = None,
        lock_fd: int | None = None,
    ) -> None:
        self.path = path
        self.writer = writer
        self.best_metric = best_metric
        self.best_epoch = best_epoch
        self.saved_epoch = saved_epoch
        self._lock_fd = lock_fd

    @classmethod
    def create(cls, out: str | os.PathLike[str], name: str | None, *, writer: bool = True) -> RunFolder:
        """A new, empty run folder under `out`, locked until `release` (other processes of a distributed run get
        the name; the writer's choice is broadcast)."""
        if not writer:
            return cls(Path(out) / (name or "unet"), writer=False)
        path, lock_fd = _claim_new_run_dir(out, name)
        return cls(path, writer=True, lock_fd=lock_fd)

    @classmethod
    def resume(cls, checkpoint: str | os.PathLike[str], state: dict[str, Any], *, writer: bool = True) -> RunFolder:
        """The folder of `checkpoint`, with its bookkeeping; records and temporary files from after it are dropped."""
        epoch = int(state.get("epoch", 0))
        folder = Path(checkpoint).resolve().parent
        run = cls(
            folder,
            writer=writer,
            best_metric=float(state.get("best_miou", -1.0)),
            best_epoch=int(state.get("best_epoch", -1)),
            saved_epoch=epoch,
            lock_fd=_lock_existing(folder, checkpoint) if writer else None,
        )
        if writer:
            run._forget_after(epoch)
        return run

    def release(self) -> None:
        """Free the run's lock (training ended, stopped or was interrupted); the process ending frees it too."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def start_epoch(self) -> int:
        """The number of epochs already finished and saved."""
        return self.saved_epoch or 0

    def save(self, epoch: int, record: dict[str, Any], metric: float, state: dict[str, Any]) -> tuple[float, int]:
        """Record finished `epoch` (1-based) with its `metric` (higher is better); returns ``(best_metric,
        best_epoch)``.

        The record goes first: after a crash before last.pt is renamed, resuming drops it again. Ctrl-C
        waits until last.pt and `saved_epoch` agree.
        """
        with deferred_interrupt():
            if self.writer:
                append_jsonl(self.path / "metrics.jsonl", record)
            improved = metric > self.best_metric
            if improved:
                self.best_metric, self.best_epoch = metric, epoch
            if self.writer:
                checkpoint = {
                    **state,
                    "epoch": epoch,
                    "metrics": record,
                    "best_miou": self.best_metric,
                    "best_epoch": self.best_epoch,
                }
                if improved:
                    save_checkpoint(self.path / "best.pt", checkpoint)
                save_checkpoint(self.path / "last.pt", checkpoint)
            self.saved_epoch = epoch
        return self.best_metric, self.best_epoch

    def finish(self, settings: dict[str, Any]) -> None:
        """Write curves.png and the run's settings (config.json) once training ends."""
        if self.writer:
            write_curves(self.path)
            atomic_write_text(self.path / "config.json", json.dumps(settings, indent=2) + "\n")

    def stopped(self, epoch: int, reason: Exception) -> TrainingError:
        """The error for a failure in 0-based `epoch`, saying which checkpoint stays as it was."""
        last = self.path / "last.pt"
        kept = f"{last} (epoch {epoch}) is kept unchanged" if last.is_file() else "no checkpoint was written"
        return TrainingError(f"training stopped in epoch {epoch + 1}: {reason}; {kept}")

    def interrupted(self, epoch: int) -> TrainingInterrupted:
        """The message for Ctrl-C in 0-based `epoch`.

        last.pt already holds the last finished epoch; weights from part of an epoch would not match its
        learning-rate schedule, so the partial epoch is dropped rather than saved.
        """
        if self.saved_epoch is None:
            return TrainingInterrupted(
                f"interrupted in epoch {epoch + 1}, before any epoch finished: nothing was saved"
            )
        last = self.path / "last.pt"
        return TrainingInterrupted(
            f"interrupted in epoch {epoch + 1}: {last} holds epoch {self.saved_epoch}; continue with --resume {last}"
        )

    def _forget_after(self, epoch: int) -> None:
        """Drop records after `epoch` (written before a crash that lost their checkpoint) and temporary
        files that a killed writer left behind."""
        log = self.path / "metrics.jsonl"
        if log.is_file():
            kept = "".join(
                json.dumps(record) + "\n" for record in read_metrics(self.path) if record.get("epoch", 0) <= epoch
            )
            if kept.encode("utf-8") != log.read_bytes():
                atomic_write_text(log, kept)
        for stale in self.path.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
