"""Training's progress callbacks, torch-free so the CLI can subclass them without importing torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["TrainHooks"]


class TrainHooks:
    """Progress callbacks; the default does nothing. Override what you want to show."""

    def on_scan(self, done: int, total: int) -> None: ...

    def on_note(self, message: str) -> None:
        """Something the user should know about the run, such as classes assumed for lack of a dataset.json."""

    def on_start(self, run_dir: Path, epochs: int, steps_per_epoch: int, start_epoch: int, device: str) -> None: ...

    def on_step(self, epoch: int, step: int, loss: float) -> None: ...

    def on_epoch_end(self, record: dict[str, Any]) -> None: ...
