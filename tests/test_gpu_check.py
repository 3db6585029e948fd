"""benchmarks/gpu_check.sh, the one-go check of the CUDA paths, run in its --cpu-smoke mode so that it
cannot rot between the rare GPU loans: every step runs on the CPU with tiny sizes, CUDA-only ones say why not."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unet_edge.cpuinfo import precision_skip_reason

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_step_and_writes_its_reports(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [
        "bench_48.json",
        "gpu_check.json",
        "gpu_check.log",
        "gpu_check.md",
        "train_metrics.jsonl",
    ]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "cpu-smoke" and report["passed"] is True
    status = {step["step"]: (step["status"], step["detail"]) for step in report["steps"]}
    expected = [
        "install",
        "versions",
        "gpu-tests",
        "data",
        "train",
        "train-check",
        "train-sweep",
        "export-onnx",
        "export-torchscript",
        "verify-cpu",
        "bench-48",
    ]
    assert all(status[name][0] == "ok" for name in expected), status
    assert status["verify-cuda"] == ("skipped", "CUDA step: --cpu-smoke verifies TorchScript on the CPU instead")
    assert (
        status["bench-48-compile"][0] == "skipped"
        and "torch.compile takes about a minute" in status["bench-48-compile"][1]
    )
    assert report["versions"]["cuda_available"] is False
    bench = {(row["model"], row["variant"], row["precision"], row["batch"]): row for row in report["bench"]}
    bf16_skipped = precision_skip_reason("bf16")  # bf16 is timed only where the CPU computes it natively
    if bf16_skipped is None:
        assert bench[("best.pt", "channels-last", "bf16", 2)]["status"] == "ok"
    else:
        assert bench[("best.pt", "channels-last", "bf16", None)]["status"] == f"unavailable: {bf16_skipped}"
    assert bench[("best.pt", "channels-last", "fp32", 1)]["vs_eager_fp32"] > 0
    assert bench[("best.pt", "cudagraphs", "fp32", None)]["status"] == "unavailable: CUDA graphs need a CUDA device"
    assert [a["passed"] for a in report["verify"]["verify_cpu"]] == [True, True]
    assert "gpu check (cpu-smoke): all steps passed" in (out / "gpu_check.log").read_text()
    assert "| train-sweep | ok |" in (out / "gpu_check.md").read_text()
    assert not list(tmp_path.glob("unet-edge-gpu-check.*")), "the work folder is removed"


@pytest.mark.slow
def test_gpu_check_without_a_gpu_and_without_cpu_smoke_fails_at_the_versions_step(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the full check would run")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "TMPDIR": str(tmp_path), "BUDGET_S": "60"}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    report = json.loads((out / "gpu_check.json").read_text())
    status = {step["step"]: (step["status"], step["detail"]) for step in report["steps"]}
    assert status["versions"] == ("failed", "exit code 1")
    assert status["train"] == ("skipped", "needs step versions, which failed")
    assert "error: PyTorch sees no CUDA GPU: run with --cpu-smoke" in done.stdout
