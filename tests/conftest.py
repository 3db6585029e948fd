"""Shared fixtures: a tiny synthetic dataset and a tiny trained checkpoint, built once per session."""

from __future__ import annotations

import fcntl
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import markers
import numpy as np
import onnx_memo
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: each gets one intra-op thread (its subprocesses too), PyTorch's and every
    # runtime's (UNET_EDGE_THREADS), or the workers' thread pools oversubscribe the cores and spin
    # (tests/test_train.py: 52.7 s of CPU with two threads per worker, 22.6 s with one, on 2 cores; ONNX Runtime,
    # OpenVINO and XNNPACK spin too). Tests that ask for a thread count still get it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("UNET_EDGE_THREADS", "1")
CLI = [sys.executable, "-m", "unet_edge_cli.main"]


NO_CUDA = "no CUDA GPU on this machine: the CUDA training and inference paths are not exercised"


def pytest_configure(config: pytest.Config) -> None:
    markers.install()
    if os.environ.get("UNET_EDGE_TEST_TRACE_EVERY_ONNX") != "1":
        onnx_memo.install()  # each distinct ONNX graph traced once per test process (tests/onnx_memo.py)
    # Registered as a plugin, not as conftest hooks: a conftest below the rootdir does not see session-scoped
    # fixtures being set up.
    config.pluginmanager.register(markers.MarkerCheck(), "unet-edge-marker-check")


# The files `make test` starts first, in this order (pytest-xdist's `loadfile` with `--no-loadscope-reorder`: each
# file runs whole on one worker, files go to workers in the order their first test appears, the next one to the first
# worker close to done). The first builds the shared `--format all` export (`exported_all`, about 50 s), the second
# keeps the other worker busy for longer than that without it, so no worker waits for the export; then the rest of
# the heaviest files, longest first (figures: `pytest --durations=0`, summed per file, on a 2-core AVX-512 EPYC,
# 2026-12-06).
# Files not listed follow, slow ones first.
FIRST_FILES = (
    "test_formats.py",  # 57 s, builds exported_all (46 s)
    "test_gpu_check.py",  # 58 s, no exported_all
    "test_format_executorch.py",  # 50 s, its own programs
    "test_bench.py",  # 44 s
    "test_cpp.py",  # 42 s
    "test_distributed.py",  # 42 s
    "test_search.py",  # 42 s
    "test_faults.py",  # 39 s
    "test_deploy.py",  # 37 s
    "test_format_pt2.py",  # 33 s
    "test_format_litert.py",  # 25 s
    "test_train.py",  # 15 s
    "test_export.py",  # 15 s
    "test_reliability.py",  # 14 s
    "test_format_openvino.py",  # 14 s
    "test_cuda_paths.py",  # 10 s
    "test_quantize.py",  # 10 s
    "test_predict.py",  # 10 s
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(pytest.mark.skip(reason=NO_CUDA))
    # The order above, then the files with a slow test, then the rest (a stable sort: each file keeps its order).
    slow_files = {_file(item) for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> tuple[int, int]:
        name = Path(_file(item)).name
        listed = FIRST_FILES.index(name) if name in FIRST_FILES else len(FIRST_FILES)
        return listed, _file(item) not in slow_files

    items.sort(key=rank)


def _file(item: pytest.Item) -> str:
    return item.nodeid.split("::")[0]


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep the embedded-data cache out of the user's home folder."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    os.environ["UNET_EDGE_PROGRESS"] = "0"
    return cache


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unet_edge.synth import SynthSpec, write_synth

    return write_synth(tmp_path_factory.mktemp("data") / "tiny", SynthSpec(num_train=24, num_val=6, size=48, seed=3))


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Any]) -> Any:
    """`build(folder)` once for the whole test session, however many pytest-xdist workers ask for it.

    The pytest-xdist pattern for session fixtures: the workers' temporary folders share a parent, where the first
    worker to ask builds into `shared-NAME/` under a file lock and leaves a marker (the pickled result); the
    others wait on the lock and reuse that result. Without xdist it simply builds. What is built must be read only
    (tests copy it before changing anything). A reuse is noted as the work it stands for, so the `slow` markers
    of the tests that use it are checked as on the worker that built it.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent
    done, folder = shared / f"shared-{name}.pickle", shared / f"shared-{name}"
    with open(shared / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the build fails
        if done.is_file():
            markers.note(f"reuses {name!r}, which another worker built (it trains or exports)")
            return pickle.loads(done.read_bytes())
        shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
        folder.mkdir()
        value = build(folder)
        done.write_bytes(pickle.dumps(value))
        return value


def pixel_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels where two masks of the same shape agree."""
    assert a.shape == b.shape
    return float((a == b).mean())


def train_tiny(data: Path, out: Path, *, name: str = "tiny", epochs: int = 2, seed: int = 0, hooks=None, **overrides):
    from unet_edge.config import ModelConfig, TrainConfig
    from unet_edge.train import fit

    config = TrainConfig(
        data=str(data),
        epochs=epochs,
        batch_size=8,
        image_size=32,
        model=ModelConfig(base_channels=4, depth=2),
        out=str(out),
        name=name,
        seed=seed,
        **{"device": "cpu", **overrides},
    )
    return fit(config, hooks)


@pytest.fixture
def interrupted_run():
    """Factory: `make(data, out, epochs=..., stop_in_epoch=...)` trains a tiny run in the library and stops it
    with Ctrl-C in `stop_in_epoch`, so OUT/run/last.pt holds the epoch before with its schedule unfinished."""
    from unet_edge.errors import TrainingInterrupted
    from unet_edge.train import TrainHooks

    class CtrlC(TrainHooks):
        def __init__(self, stop_in_epoch: int) -> None:
            self.stop_in_epoch = stop_in_epoch

        def on_step(self, epoch: int, step: int, loss: float) -> None:
            if epoch + 1 == self.stop_in_epoch:
                raise KeyboardInterrupt

    def make(data: Path, out: Path, *, epochs: int, stop_in_epoch: int, **settings) -> Path:
        with pytest.raises(TrainingInterrupted):
            train_tiny(data, out, name="run", epochs=epochs, hooks=CtrlC(stop_in_epoch), **settings)
        return out / "run"

    return make


@pytest.fixture(scope="session")
def tiny_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """A 2-epoch run of a 4-channel, depth-2 UNetStudent on the tiny set (one for all workers: the exports of it
    that other fixtures share must come from the checkpoint every worker tests)."""
    return built_once(tmp_path_factory, "tiny-run", lambda folder: train_tiny(tiny_data, folder))


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run) -> Path:
    return tiny_run.run_dir / "best.pt"


@pytest.fixture(scope="session")
def other_checkpoint(tiny_data, tmp_path_factory) -> Path:
    """Another tiny checkpoint of the same shape (seed 7, one epoch), one for all workers."""
    run = built_once(
        tmp_path_factory, "other-run", lambda out: train_tiny(tiny_data, out, name="other", seed=7, epochs=1)
    )
    return run.run_dir / "best.pt"


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600, in_process: bool | None = None
) -> subprocess.CompletedProcess:
    """Run `unet-edge ARGS` and return its exit code, stdout and stderr.

    By default the Typer app runs in this process (the same command, error handler and exit codes, without
    paying torch's import once per call); `in_process=False`, or UNET_EDGE_TEST_SUBPROCESS=1 for the whole
    suite, starts a real subprocess as a user would. Tests of signals, worker processes and the installed
    entry point always use subprocesses.
    """
    if in_process is None:
        in_process = os.environ.get("UNET_EDGE_TEST_SUBPROCESS") != "1"
    if not in_process:
        full_env = {**os.environ, **(env or {})}
        return subprocess.run([*CLI, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    return _run_in_process(list(args), cwd, env)


def _run_in_process(args: list[str], cwd: Path | None, env: dict | None) -> subprocess.CompletedProcess:
    import traceback

    import torch
    from typer.testing import CliRunner

    from unet_edge_cli.main import app

    saved_env, saved_cwd, saved_threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    try:
        if cwd is not None:
            os.chdir(cwd)
        result = CliRunner().invoke(app, args, env=env, catch_exceptions=True)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(saved_threads)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # What a subprocess would have printed for an uncaught exception.
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess([*CLI, *args], result.exit_code, result.stdout, stderr)


@pytest.fixture(scope="session")
def cli():
    """`cli(*args, cwd=..., env=..., in_process=...)`: run `unet-edge ARGS` as `run_cli` does."""
    return run_cli


def export_tiny(
    checkpoint: Path, out: Path, *options: str, name: str = "tiny", **run: Any
) -> tuple[Path, subprocess.CompletedProcess]:
    """`unet-edge export CHECKPOINT OPTIONS --out OUT --name NAME` (`run`: `run_cli`'s keywords), which must
    succeed: the export folder and the completed command."""
    result = run_cli("export", str(checkpoint), *options, "--out", str(out), "--name", name, **run)
    assert result.returncode == 0, result.stdout + result.stderr
    return out / name, result


@pytest.fixture(scope="session")
def export():
    """`export(checkpoint, out, *options, name="tiny")`: the folder of an `unet-edge export` that must succeed."""
    return lambda *args, **kwargs: export_tiny(*args, **kwargs)[0]


@pytest.fixture(scope="session")
def agreement():
    """`agreement(a, b)`: the fraction of pixels where two masks of the same shape agree."""
    return pixel_agreement


@pytest.fixture(scope="session")
def trainer():
    """`trainer(data, out, name=..., epochs=..., **settings)`: a tiny library training run, as `train_tiny` does."""
    return train_tiny


@pytest.fixture(scope="session")
def exported_all(tiny_checkpoint, tmp_path_factory):
    """`unet-edge export --format all` of the tiny checkpoint, once per session and in a real process (tests read
    its output): fixed-size formats (LiteRT) at the tiny validation images' size, so their parity is exact.
    Returns (export folder, the completed process); tests copy the folder before changing anything in it. One
    export for all workers."""

    def export_all(out: Path) -> tuple[Path, subprocess.CompletedProcess]:
        return export_tiny(tiny_checkpoint, out, "--format", "all", "--image-size", "48", in_process=False)

    return built_once(tmp_path_factory, "exported-all", export_all)


@pytest.fixture(scope="session")
def e2e_dir(tiny_checkpoint, tmp_path_factory):
    """An export of the tiny checkpoint with model.onnx and model_e2e.onnx (parity checked by export), one for all
    workers."""

    def export_e2e(out: Path) -> Path:
        folder, result = export_tiny(tiny_checkpoint, out, "--format", "onnx", "--end-to-end")
        assert "model_e2e.onnx" in result.stdout
        return folder

    return built_once(tmp_path_factory, "exported-e2e", export_e2e)


@pytest.fixture(scope="session")
def odd_image(tmp_path_factory):
    """A 131 x 97 (odd-size) picture of the synthetic kind, saved as PNG."""
    path = tmp_path_factory.mktemp("odd") / "odd.png"
    from unet_edge.synth import render_sample

    Image.fromarray(render_sample(3, 7, 160)[0][:97, :131]).save(path)
    return path


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str, code: int = 1) -> str:
    """Exit `code`, exactly one `error:` line on stderr (the last one), no traceback; returns that line."""
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="session")
def one_line_error():
    """`one_line_error(result, *fragments)`: the command failed with one `error:` line holding the fragments, no
    traceback."""
    return assert_one_line_error


def copy_damaged(folder: Path, file: str, dest: Path, how: str = "tampered") -> Path:
    """A copy of export `folder` at `dest` whose `file` is damaged (the manifest is the original's): `tampered` flips
    its middle byte, `truncated` keeps its first half, `missing` deletes it. Returns the damaged file's path."""
    shutil.copytree(folder, dest)
    target = dest / file
    data = bytearray(target.read_bytes())
    if how == "missing":
        target.unlink()
    elif how == "truncated":
        target.write_bytes(bytes(data[: len(data) // 2]))
    else:
        assert how == "tampered", how
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    return target


@pytest.fixture(scope="session")
def damaged_copy():
    """`damaged_copy(folder, file, dest, how="tampered")`: copy `folder` to `dest` and damage `file` there
    (`tampered`, `truncated` or `missing`); returns its path."""
    return copy_damaged


@pytest.fixture(scope="session")
def predicted_masks(tiny_data, odd_image, tmp_path_factory):
    """`predicted_masks(model)`: {file name: mask} from `unet-edge predict MODEL` on the tiny set's validation
    images and the odd-size image (the masks are read back from the PNGs predict writes)."""

    def predict(model: Path) -> dict[str, np.ndarray]:
        out = tmp_path_factory.mktemp("predicted")
        result = run_cli(
            "predict", str(model), str(tiny_data / "val" / "images"), str(odd_image), "--out", str(out), "--no-overlay"
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return {path.name: np.array(Image.open(path)) for path in sorted(out.glob("*_mask.png"))}

    return predict
