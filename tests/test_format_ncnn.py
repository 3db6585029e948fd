"""ncnn (read from the session's `--format all` export): pnnx export, the metadata sidecar, any-size runs through plain
ncnn, loose files without the sidecar or cut (verify, predict and damaged files with a manifest:
tests/test_formats.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("ncnn", reason="ncnn is an optional extra: pip install 'unet-edge[ncnn]'")

pytestmark = pytest.mark.slow  # exports and conversions: `make test` runs them, `make test-fast` does not


@pytest.fixture(scope="module")
def ncnn_dir(exported_all):
    """The session's export of every format: ncnn's fp32 files are the ones `--format ncnn` writes."""
    return exported_all[0]


def test_export_writes_param_bin_and_sidecar(ncnn_dir, tiny_checkpoint):
    from unet_edge.checkpoint import load_model

    (entry,) = [e for e in json.loads((ncnn_dir / "manifest.json").read_text())["artifacts"] if e["format"] == "ncnn"]
    assert entry["file"] == "model.ncnn.param" and entry["precision"] == "fp32"
    assert [c["file"] for c in entry["companions"]] == ["model.ncnn.bin", "model.ncnn.json"]
    assert entry["parity"]["passed"] is True and entry["parity"]["pixel_agreement"] == 1.0
    meta = json.loads((ncnn_dir / "model.ncnn.json").read_text())
    assert json.loads(meta["classes"]) == load_model(tiny_checkpoint).classes
    assert (meta["input_blob"], meta["output_blob"]) == ("in0", "out0")
    assert "pnnx." not in (ncnn_dir / "model.ncnn.param").read_text()  # only layers ncnn has


def test_plain_ncnn_runs_odd_sizes(ncnn_dir, tmp_path):
    """What an embedding app does: ncnn alone, one C x H x W image per extraction, at 97 x 131 and 33 x 17."""
    code = (
        "import sys, numpy as np, ncnn\n"
        "net = ncnn.Net()\n"
        "net.opt.num_threads = 1\n"
        f"net.load_param({str(ncnn_dir / 'model.ncnn.param')!r})\n"
        f"net.load_model({str(ncnn_dir / 'model.ncnn.bin')!r})\n"
        "for h, w in ((97, 131), (33, 17)):\n"
        "    ex = net.create_extractor()\n"
        "    ex.input('in0', ncnn.Mat(np.zeros((3, h, w), np.float32)))\n"
        "    status, out = ex.extract('out0')\n"
        "    print(status, np.array(out).shape)\n"
        "assert 'unet_edge' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["0 (4, 97, 131)", "0 (4, 33, 17)"]


def test_loose_files_truncated_or_without_sidecar_are_one_line(ncnn_dir, odd_image, tmp_path, cli, one_line_error):
    loose = tmp_path / "loose"
    loose.mkdir()
    for name in ("model.ncnn.param", "model.ncnn.bin"):
        shutil.copy(ncnn_dir / name, loose / name)
    param = loose / "model.ncnn.param"
    out = str(tmp_path / "out")
    one_line_error(cli("predict", str(param), str(odd_image), "--out", out), "model.ncnn.json is missing")
    shutil.copy(ncnn_dir / "model.ncnn.json", loose / "model.ncnn.json")
    weights = loose / "model.ncnn.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    one_line_error(
        cli("predict", str(param), str(odd_image), "--out", out), "model.ncnn.bin: ncnn cannot load the weights"
    )
