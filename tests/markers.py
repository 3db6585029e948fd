"""Markers that tell the truth: a test that trains, exports or times must be marked `slow`, and only such a test.

The work is seen where every path goes through it: an optimizer step (training), torch's exporters (every
format's conversion), the bench timing functions, and a subprocess that starts a command doing one of these
(`unet-edge train|export|bench|deploy|search`, a search worker, a script under benchmarks/, or a C++ build), which
the hooks cannot see into. A fixture whose set-up did such work makes every test using it slow too (the session's
trained checkpoint and export). `MarkerCheck` (registered by conftest.py) turns a mismatch into a test failure
naming the work seen.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

HEAVY_COMMANDS = {"train", "export", "bench", "deploy", "search"}
BUILD_TOOLS = {"cmake", "make", "ninja", "g++", "c++", "gcc", "cc", "clang++"}

_seen: list[str] = []
heavy_fixtures: set[str] = set()


def note(what: str) -> None:
    _seen.append(what)


def take() -> list[str]:
    """The work seen since the last call, and forget it."""
    seen = sorted(set(_seen))
    _seen.clear()
    return seen


def _watch(owner: Any, name: str, what: str, when: Callable[[], bool] = lambda: True) -> None:
    """Replace `owner.name`, and every unet_edge module's reference to the same function, by a watched copy."""
    original: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(original)
    def watched(*args: Any, **kwargs: Any) -> Any:
        if when():
            note(what)
        return original(*args, **kwargs)

    setattr(owner, name, watched)
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("unet_edge") and module is not None:
            for attr, value in list(vars(module).items()):
                if value is original:
                    setattr(module, attr, watched)


@functools.cache
def search_worker_module() -> str:
    from unet_edge.search.study import WORKER_MODULE

    return WORKER_MODULE


def _command_work(argv: Any) -> str | None:
    """What a subprocess's command line starts, when it is heavy work."""
    if isinstance(argv, (str, bytes)):
        return None
    words = [str(word) for word in argv]
    for index, word in enumerate(words):
        if word.endswith(("unet_edge_cli.main", "unet-edge")):
            command = next((w for w in words[index + 1 :] if not w.startswith("-")), None)
            if command in HEAVY_COMMANDS:
                return f"starts `unet-edge {command}` in a subprocess"
        if "benchmarks/" in word and word.endswith((".py", ".sh")):
            return f"starts {word.split('benchmarks/', 1)[1]} (a benchmark script) in a subprocess"
        if word == search_worker_module():
            return "starts a search worker (it trains) in a subprocess"
    probes = {"--version", "-dumpversion", "-dumpmachine", "--help"}  # asking a compiler what it is builds nothing
    if words and Path(words[0]).name in BUILD_TOOLS and not probes & set(words[1:]):
        return f"builds C++ ({Path(words[0]).name})"
    return None


def install() -> None:
    """Watch the heavy entry points (once per process, before any test imports them)."""
    import torch
    import torch.export
    import torch.onnx
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    import unet_edge.bench.timing as timing

    register_optimizer_step_pre_hook(lambda *_: note("trains (an optimizer step)"))
    popen_init = subprocess.Popen.__init__

    def watched_popen(self: subprocess.Popen, args: Any, *rest: Any, **kwargs: Any) -> None:
        work = _command_work(args)
        if work is not None:
            note(work)
        popen_init(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = watched_popen  # type: ignore[method-assign]
    _watch(torch.onnx, "export", "exports (torch.onnx.export)")
    _watch(torch.export, "export", "exports (torch.export.export)")
    _watch(torch.jit, "trace", "exports (torch.jit.trace)")
    _watch(torch.jit, "script", "exports (torch.jit.script)")
    real_clock = time.perf_counter
    for name in dir(timing):
        if name.startswith("time_") and callable(getattr(timing, name)):
            # A test that swaps the clock for a virtual one times nothing.
            _watch(timing, name, f"times (bench.timing.{name})", when=lambda: time.perf_counter is real_clock)


def mismatch(marked_slow: bool, seen: list[str], fixtures: set[str]) -> str | None:
    """Why the test's `slow` marker is wrong, or None when it tells the truth."""
    heavy_via = sorted(fixtures & heavy_fixtures)
    if not marked_slow and (seen or heavy_via):
        work = ", ".join(seen + [f"uses fixture {name!r} that trains or exports" for name in heavy_via])
        return f"this test {work} but is not marked slow: add @pytest.mark.slow"
    if marked_slow and not seen and not heavy_via:
        return "this test is marked slow but neither trains, exports nor times: remove the slow marker"
    return None


class MarkerCheck:
    """Attributes the work seen to fixtures while they are set up and to tests while they run, and fails a passing
    test whose `slow` marker does not match."""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest):
        take()
        yield
        if take():
            heavy_fixtures.add(fixturedef.argname)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: pytest.Item):
        take()
        yield

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        outcome = yield
        report = outcome.get_result()
        if call.when != "call" or not report.passed:
            return
        problem = mismatch(item.get_closest_marker("slow") is not None, take(), set(item.fixturenames))
        if problem is not None:
            report.outcome = "failed"
            report.longrepr = f"{item.nodeid}: {problem}"
