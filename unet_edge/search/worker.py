"""A search worker process: `python -m unet_edge.search.worker SPEC_FILE INDEX`, started by `run_workers`.

Its own module (not `study`'s `__main__`), so that running it does not import `unet_edge.search.study` twice."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import UNetEdgeError
from .study import StudySpec, optimize


def main(argv: list[str]) -> int:
    """The spec file and the worker's index; a library error is one line on stderr and exit 1."""
    from ..processes import watch_parent

    watch_parent(os.getppid())  # a worker ends with the search that started it
    spec = StudySpec.from_json(json.loads(Path(argv[0]).read_text(encoding="utf-8")))
    try:
        optimize(spec, int(argv[1]))
    except UNetEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
