"""One progress protocol for every long loop in the library: a callable told `(done, total, label)`.

`done` and `total` count the loop's units (images, steps, candidates; floats, so a unit can be reported in
parts); `total` is None while unknown. `label` names the step under way, so a display can say what takes
the time. The CLI renders it with one rich bar (`cli.common.progress_display`); scripts print it
(`print_progress`). Library code only calls it, and `None` means nobody listens.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

__all__ = ["Progress", "Steps", "print_progress", "tell"]

Progress = Callable[[float, "float | None", str], None]


def tell(progress: Progress | None, done: float, total: float | None, label: str) -> None:
    """`progress(done, total, label)` when someone listens."""
    if progress is not None:
        progress(done, total, label)


class Steps:
    """Counts a job's units for a `Progress`: `say` names the step under way, `advance` counts units done,
    `part` hands a sub-loop a `Progress` of its own that fills the next `span` units, and `label` serves
    code that only has a label to tell (a converter's phases). The count only moves forward."""

    def __init__(self, progress: Progress | None, total: float, done: float = 0.0) -> None:
        self.progress, self.total, self.count, self.current = progress, float(total), float(done), ""

    def say(self, label: str) -> None:
        self.current = label
        tell(self.progress, self.count, self.total, label)

    def label(self, label: str) -> None:
        """The step under way, refined (the count does not move)."""
        self.say(label)

    def advance(self, units: float = 1.0, label: str | None = None) -> None:
        self.count = min(self.total, self.count + units)
        self.say(self.current if label is None else label)

    def done(self, label: str = "done") -> None:
        self.count = self.total
        self.say(label)

    def part(self, span: float, prefix: str = "") -> Progress:
        """A `Progress` for a sub-loop: its (done, total) fill the next `span` units of this count (which it
        does not advance: call `advance(span)` after it), its labels follow `prefix`."""
        start, reached = self.count, [self.count]

        def report(done: float, total: float | None, label: str) -> None:
            fraction = min(1.0, done / total) if total else 0.0
            reached[0] = max(reached[0], self.count, start + span * fraction)  # a sub-loop that restarts stays put
            self.current = f"{prefix}{label}"
            tell(self.progress, reached[0], self.total, self.current)

        return report


def print_progress(what: str, min_interval_s: float = 5.0) -> Progress:
    """A `Progress` for scripts: one line on stderr with the elapsed time, at most every `min_interval_s`
    seconds (and whenever the label changes), so a long run shows it is alive."""
    started = time.perf_counter()
    last_at, last_label = [-math.inf], [""]

    def show(done: float, total: float | None, label: str) -> None:
        now = time.perf_counter()
        if label == last_label[0] and now - last_at[0] < min_interval_s:
            return
        last_at[0], last_label[0] = now, label
        if total and done != int(done):  # a step's fraction: 1.4/4 reads as 35%
            count = f"{done / total:.0%}"
        else:
            count = f"{done:g}/{total:g}" if total else f"{done:g}"
        print(f"[{now - started:6.0f} s] {what} {count}: {label}", file=sys.stderr, flush=True)

    return show
