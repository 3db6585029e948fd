"""Third-party output kept off the user's terminal: converters' step logs, runtimes' INFO lines, C++ log lines
(cpuinfo's "Failed to open midr file", TFLite's "Created TensorFlow Lite XNNPACK delegate") and Python warnings
are captured at the file-descriptor level while a third-party step runs, so that what the user reads is the
project's own lines.

A step that fails keeps what it printed: the output goes to a log file named on stderr in one `note:` line (the
error itself stays one line). `unet-edge --verbose` (UNET_EDGE_VERBOSE=1) shows everything as it happens.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

__all__ = ["VERBOSE_ENV", "third_party_output", "verbose"]

VERBOSE_ENV = "UNET_EDGE_VERBOSE"


class _State:
    depth = 0


_state = _State()


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


@contextmanager
def third_party_output(step: str) -> Iterator[None]:
    """Capture what `step` (a third-party call) writes to stdout/stderr, and the Python warnings it raises.

    Nested uses capture once. On an exception the captured text is saved to a log file and one `note:` line
    names it; on success it is dropped.
    """
    if verbose() or _state.depth:
        yield
        return
    _flush()
    try:
        saved = (os.dup(1), os.dup(2))
    except OSError:  # no file descriptors 1/2 to redirect (an embedding host): nothing to capture
        yield
        return
    sink = tempfile.TemporaryFile()  # noqa: SIM115  # closed in the finally below, after a failure's copy is kept
    _state.depth = 1
    failed = False
    # Python-level writes go to the descriptors too, even where a progress display redirects sys.stdout/stderr.
    streams = (sys.stdout, sys.stderr)
    try:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        sys.stdout = sys.__stdout__ or sys.stdout
        sys.stderr = sys.__stderr__ or sys.stderr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except BaseException:
        failed = True
        raise
    finally:
        _flush()
        sys.stdout, sys.stderr = streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        _state.depth = 0
        if failed:
            _keep(sink, step)
        sink.close()


def _keep(sink: IO[bytes], step: str) -> None:
    sink.seek(0)
    text = sink.read()
    if not text.strip():
        return
    fd, path = tempfile.mkstemp(prefix=f"unet-edge-{step.replace(' ', '-')}-", suffix=".log")
    with os.fdopen(fd, "wb") as log:
        log.write(text)
    print(f"note: {step} failed; its own output is in {path}", file=sys.stderr, flush=True)
