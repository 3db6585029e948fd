"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename over the target.

A crash at any moment leaves either the previous complete file or the new complete file, never a
half-written one. Append-only logs (JSON lines) are written one whole line per write, and a
partial last line left by a crash is skipped on read and cut off before the next append.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import OutputError

__all__ = [
    "append_jsonl",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_writable",
    "newest",
    "pyplot",
    "read_jsonl",
    "save_figure",
    "sha256_file",
    "write_failed",
]


def check_writable(target: str | os.PathLike[str] | None) -> None:
    """Fail early, before any work, when `target` could not be written later; creates nothing."""
    if target is None:
        return
    target = Path(target)
    if target.is_dir():
        raise OutputError(f"{target}: is a folder, expected a file path to write")
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{target}: cannot write here ({ancestor} is not a folder)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{target}: cannot write here (no write permission in {ancestor})")


def write_failed(target: str | os.PathLike[str], exc: BaseException) -> OutputError:
    """The one-line error for a write that a native library reported without an errno (OpenVINO's C++
    writer says "iostream error" on a full disk): its own words, plus the free space left where it wrote."""
    target = Path(target)
    detail = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else exc.__class__.__name__
    try:
        free = shutil.disk_usage(target.parent).free
        where = f"; {free / 1e6:.1f} MB free on that device" if free >= 1e5 else "; the device is full"
    except OSError:
        where = ""
    return OutputError(f"{target}: cannot write ({detail}{where}); the previous file, if any, is unchanged")


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` atomically."""
    target = Path(target)
    if target.is_dir():
        raise OutputError(f"{target}: is a folder, expected a file path to write")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write here ({exc.strerror})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write ({exc.strerror}); the previous file, if any, is unchanged") from None
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write(target: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        write(handle)


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    def write(handle: IO[bytes]) -> None:
        handle.write(data)

    _atomic_write(target, write)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a partial last line (a crash mid-append) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1].decode("utf-8")
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one record as one line with a single write, after cutting off any partial last line."""
    line = (json.dumps(record) + "\n").encode("utf-8")
    try:
        with open(path, "ab+") as handle:
            handle.seek(0)
            existing = handle.read()
            if existing and not existing.endswith(b"\n"):
                handle.truncate(existing.rfind(b"\n") + 1)
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise OutputError(f"{path}: cannot append ({exc.strerror})") from None


def newest(root: str | os.PathLike[str], pattern: str) -> Path | None:
    """The most recently modified path under `root` matching the glob `pattern` (None when there is none)."""
    root = Path(root)
    matches = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    return matches[-1] if matches else None


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 100) -> Path:
    """Write a matplotlib figure as a PNG atomically, then close it (figures hold memory until closed)."""
    target = Path(path)
    try:
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        pyplot().close(fig)
    return target
