"""ExecuTorch: model.pte with bounded dynamic shapes, metadata method, plain-runtime runs on odd sizes, int8 budget,
the bounds, a truncated loose program, the thread pool (export, verify, predict and damaged files of the fp32 program,
the missing extra: tests/test_formats.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("executorch", reason="ExecuTorch is an optional extra: pip install 'unet-edge[executorch]'")

pytestmark = pytest.mark.slow  # exports and conversions: `make test` runs them, `make test-fast` does not


SMALL = {"batch": [1, 1], "height": [2, 96], "width": [2, 96]}  # the bounds pte_dir's programs are exported with


@pytest.fixture(scope="module")
def pte_dir(tiny_checkpoint, exported_all, tmp_path_factory, export):
    """fp32 and int8 programs exported with --max-batch 1 --max-size 96 into a copy of the shared `--format all`
    export (whose model.pte has the default bounds): the new model.pte's manifest entry replaces the earlier one,
    the other formats' entries stay as they were."""
    out = tmp_path_factory.mktemp("exported-executorch")
    shutil.copytree(exported_all[0], out / "tiny")
    return export(
        tiny_checkpoint,
        out,
        "--format",
        "executorch",
        "--precision",
        "int8",
        "--max-batch",
        "1",
        "--max-size",
        "96",
        "--parity-images",
        "2",
    )


def test_export_writes_fp32_and_int8_programs_with_metadata(pte_dir, exported_all):
    manifest = json.loads((pte_dir / "manifest.json").read_text())
    entries = {e["file"]: e for e in manifest["artifacts"]}
    earlier = {e["file"]: e for e in json.loads((exported_all[0] / "manifest.json").read_text())["artifacts"]}
    assert sorted(entries) == sorted({*earlier, "model_int8.pte"})
    assert all(entries[file] == entry for file, entry in earlier.items() if file != "model.pte")
    assert earlier["model.pte"]["size_contract"] == {"batch": [1, 8], "height": [2, 1024], "width": [2, 1024]}
    for file in ("model.pte", "model_int8.pte"):  # the bounds asked for, shared by both programs
        assert entries[file]["size_contract"] == SMALL
    assert entries["model.pte"]["parity"]["pixel_agreement"] == 1.0
    quantization = entries["model_int8.pte"]["quantization"]
    assert quantization["within_budget"] and quantization["miou_drop"] <= quantization["max_miou_drop"]
    assert entries["model_int8.pte"]["parity"]["passed"] is True
    assert entries["model_int8.pte"]["parity"]["max_abs_diff"] > 1e-3  # really quantised, not the float program again


def test_plain_executorch_runs_odd_sizes_and_reads_metadata(exported_all, tiny_checkpoint, tmp_path):
    """What an embedding app does: the ExecuTorch runtime alone, on a batch of two 97 x 131 images and a 33 x 17 one."""
    import torch

    from unet_edge.checkpoint import load_model

    code = (
        "import json, sys, torch\n"
        "from executorch.runtime import Runtime\n"
        f"program = Runtime.get().load_program({str(exported_all[0] / 'model.pte')!r})\n"
        "meta = json.loads(program.load_method('unet_edge_metadata').execute(())[0])\n"
        "forward = program.load_method('forward')\n"
        "torch.manual_seed(0)\n"
        "for shape in ((2, 3, 97, 131), (1, 3, 33, 17)):\n"
        "    x = torch.randn(*shape)\n"
        "    torch.save((x, forward.execute((x,))[0]), f'{shape[2]}.pt')\n"
        "print(meta['classes'])\n"
        "assert 'unet_edge' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = load_model(tiny_checkpoint)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == loaded.classes
    for height in (97, 33):
        x, logits = torch.load(tmp_path / f"{height}.pt")
        with torch.no_grad():
            expected = loaded.model(x)
        assert logits.shape == expected.shape
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_verify_passes_the_int8_program(pte_dir, cli):
    result = cli("verify", str(pte_dir / "model_int8.pte"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all artifacts pass" in result.stdout


def test_inputs_beyond_the_default_bounds_are_refused(exported_all):
    from unet_edge.backends import open_backend
    from unet_edge.errors import ArtifactError

    backend = open_backend(exported_all[0] / "model.pte")
    with pytest.raises(ArtifactError, match="outside the program's bounds"):
        backend.predict_logits(np.zeros((1, 3, 1025, 8), np.float32))
    with pytest.raises(ArtifactError, match="outside the program's bounds"):
        backend.device_runner(np.zeros((9, 3, 16, 16), np.float32))
    assert backend.predict_logits(np.zeros((9, 3, 16, 16), np.float32)).shape[0] == 9  # run as 8 + 1


def test_export_bounds_are_options_stored_in_the_program(pte_dir):
    """--max-batch/--max-size set the bounds ExecuTorch plans memory for; the manifest (above) and the program's
    own metadata record them, and the backend refuses by them (a batch of 1 exports without a batch dimension)."""
    from unet_edge.backends import open_backend
    from unet_edge.errors import ArtifactError

    backend = open_backend(pte_dir / "model.pte")
    assert json.loads(backend.meta["size_contract"]) == SMALL
    images = np.random.default_rng(0).standard_normal((3, 3, 96, 33), dtype=np.float32)
    logits = backend.predict_logits(images)  # three images, run one at a time
    assert logits.shape[:1] + logits.shape[2:] == (3, 96, 33)
    np.testing.assert_allclose(logits[2:], backend.predict_logits(images[2:]), rtol=0, atol=0)
    with pytest.raises(ArtifactError, match=r"outside the program's bounds \(batch <= 1, height 2..96"):
        backend.predict_logits(np.zeros((1, 3, 97, 16), np.float32))
    with pytest.raises(ArtifactError, match=r"outside the program's bounds \(batch <= 1"):
        backend.device_runner(np.zeros((2, 3, 16, 16), np.float32))  # timing a batch of 2 is refused


def test_truncated_program_without_manifest_is_one_line(pte_dir, odd_image, tmp_path, cli, one_line_error):
    loose = tmp_path / "loose"
    loose.mkdir()
    truncated = loose / "model.pte"
    truncated.write_bytes((pte_dir / "model.pte").read_bytes()[:4096])
    one_line_error(
        cli("predict", str(truncated), str(odd_image), "--out", str(tmp_path / "out")),
        "model.pte: ExecuTorch cannot load it",
    )


def test_opening_without_a_thread_count_keeps_the_pool_a_loaded_program_uses(pte_dir):
    """XNNPACK's pool is process-wide: after a program runs with 1 thread, opening another with no thread
    count (as verify and export's parity check do) uses that pool instead of refusing; an explicit other
    count is still refused in one line."""
    code = (
        "import sys\n"
        "from unet_edge.backends import open_backend\n"
        "from unet_edge.errors import ArtifactError\n"
        "first = open_backend(sys.argv[1], threads=1)\n"
        "second = open_backend(sys.argv[1])\n"
        "try:\n"
        "    open_backend(sys.argv[1], threads=2)\n"
        "except ArtifactError as exc:\n"
        "    print('refused:', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(pte_dir / "model.pte")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout and "cannot change to 2" in done.stdout
