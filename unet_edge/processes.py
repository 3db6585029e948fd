"""What the worker processes unet-edge starts have in common (deploy's export workers, the search's trial workers):
a worker ends with the process that started it, rather than work on for nobody."""

from __future__ import annotations

import os
import threading
import time

__all__ = ["exit_when_gone", "watch_parent"]


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
