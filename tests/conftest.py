"""Shared fixtures: a tiny synthetic dataset and a tiny trained checkpoint, built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "unet_edge_cli.main"]


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


def train_tiny(data: Path, out: Path, *, name: str = "tiny", epochs: int = 2, seed: int = 0, **overrides):
    from unet_edge.train import TrainConfig, fit

    config = TrainConfig(
        data=str(data), epochs=epochs, batch_size=8, image_size=32, base_channels=4, depth=2,
        out=str(out), name=name, seed=seed, **{"device": "cpu", **overrides},
    )
    return fit(config)


@pytest.fixture(scope="session")
def tiny_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """A 2-epoch run of a 4-channel, depth-2 UNetStudent on the tiny set."""
    return train_tiny(tiny_data, tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run) -> Path:
    return tiny_run.run_dir / "best.pt"


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the CLI as a real subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*CLI, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def e2e_dir(tiny_checkpoint, tmp_path_factory):
    """An export of the tiny checkpoint with model.onnx and model_e2e.onnx (parity checked by export)."""
    out = tmp_path_factory.mktemp("exported-e2e")
    result = run_cli("export", str(tiny_checkpoint), "--format", "onnx", "--end-to-end", "--out", str(out), "--name", "tiny")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "model_e2e.onnx" in result.stdout
    return out / "tiny"


@pytest.fixture(scope="session")
def odd_image(tmp_path_factory):
    """A 131 x 97 (odd-size) picture of the synthetic kind, saved as PNG."""
    path = tmp_path_factory.mktemp("odd") / "odd.png"
    from unet_edge.synth import render_sample

    Image.fromarray(render_sample(3, 7, 160)[0][:97, :131]).save(path)
    return path
