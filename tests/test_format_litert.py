"""LiteRT: model.tflite at a fixed size with its metadata sidecar, plain-Interpreter runs, tiling of other sizes, int8
budget, loose files without the sidecar or cut (export, verify, predict and damaged files of the fp32 model, the
missing extra: tests/test_formats.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert", reason="LiteRT is an optional extra: pip install 'unet-edge[litert]'")


SIZE = (48, 48)  # the tiny validation images' size; the odd image (97 x 131) is tiled


@pytest.fixture(scope="module")
def tflite_dir(tiny_checkpoint, tmp_path_factory, export):
    out = tmp_path_factory.mktemp("exported-litert")
    return export(tiny_checkpoint, out, "--format", "litert", "--precision", "int8", "--image-size", "48")


@pytest.mark.slow
def test_export_writes_fixed_size_models_sidecars_and_budget(tflite_dir):
    manifest = json.loads((tflite_dir / "manifest.json").read_text())
    entries = {e["file"]: e for e in manifest["artifacts"]}
    assert sorted(entries) == ["model.tflite", "model_int8.tflite"]
    for file, entry in entries.items():
        assert entry["inputs"][0]["shape"] == [1, 3, *SIZE] and entry["size_contract"]["fixed"] == list(SIZE)
        assert [c["file"] for c in entry["companions"]] == [file.replace(".tflite", ".json")]
    assert entries["model.tflite"]["parity"]["pixel_agreement"] >= 0.999
    quantization = entries["model_int8.tflite"]["quantization"]
    assert quantization["within_budget"] and quantization["miou_drop"] <= quantization["max_miou_drop"]
    assert entries["model_int8.tflite"]["parity"]["passed"] is True
    assert json.loads((tflite_dir / "model.json").read_text())["input_size"] == list(SIZE)


@pytest.mark.slow
def test_plain_interpreter_matches_eager_at_the_export_size(tflite_dir, tiny_checkpoint, tmp_path):
    """What an embedding app does: the LiteRT Interpreter alone on one 1 x 3 x 48 x 48 image."""
    import torch

    from unet_edge.checkpoint import load_model

    code = (
        "import sys, numpy as np\n"
        "from ai_edge_litert.interpreter import Interpreter\n"
        f"interpreter = Interpreter(model_path={str(tflite_dir / 'model.tflite')!r}, num_threads=1)\n"
        "interpreter.allocate_tensors()\n"
        "x = np.random.default_rng(0).standard_normal((1, 3, 48, 48)).astype(np.float32)\n"
        "interpreter.set_tensor(interpreter.get_input_details()[0]['index'], x)\n"
        "interpreter.invoke()\n"
        "np.save('out.npy', interpreter.get_tensor(interpreter.get_output_details()[0]['index']))\n"
        "np.save('in.npy', x)\n"
        "assert 'unet_edge' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with torch.no_grad():
        expected = load_model(tiny_checkpoint).model(torch.from_numpy(np.load(tmp_path / "in.npy"))).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-4, atol=1e-4)


def test_tiles_cover_every_pixel_once():
    from unet_edge.formats.litert import tiles

    for height, width in ((97, 131), (48, 48), (7, 200)):
        covered = np.zeros((height, width), int)
        for rows, cols, keep_rows, keep_cols in tiles(height, width, SIZE):
            covered[rows, cols][keep_rows, keep_cols] += 1
        assert (covered == 1).all()


@pytest.mark.slow
def test_verify_passes_the_int8_model(tflite_dir, cli):
    result = cli("verify", str(tflite_dir / "model_int8.tflite"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all artifacts pass" in result.stdout


@pytest.mark.slow
def test_loose_files_truncated_or_without_sidecar_are_one_line(tflite_dir, odd_image, tmp_path, cli, one_line_error):
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(tflite_dir / "model.tflite", loose / "model.tflite")
    out = str(tmp_path / "out")
    one_line_error(cli("predict", str(loose / "model.tflite"), str(odd_image), "--out", out), "model.json is missing")
    shutil.copy(tflite_dir / "model.json", loose / "model.json")
    truncated = loose / "model.tflite"
    truncated.write_bytes(truncated.read_bytes()[:4096])
    one_line_error(cli("predict", str(truncated), str(odd_image), "--out", out), "model.tflite: LiteRT cannot load it")


@pytest.mark.slow
def test_export_size_defaults_to_the_training_crop_size(tiny_checkpoint, tmp_path, cli):
    """Without --image-size the fixed size is the one the model was trained at, so a checkpoint's own
    validation images run unpadded and untiled (a 256 default failed parity on 64 x 64 data)."""
    from unet_edge.checkpoint import load_checkpoint

    crop = load_checkpoint(tiny_checkpoint)["train_config"]["image_size"]
    result = cli("export", str(tiny_checkpoint), "--format", "litert", "--out", str(tmp_path), "--name", "crop")
    assert result.returncode == 0, result.stdout + result.stderr
    (entry,) = json.loads((tmp_path / "crop" / "manifest.json").read_text())["artifacts"]
    assert crop != 256 and entry["size_contract"]["fixed"] == [crop, crop]
    assert entry["parity"]["pixel_agreement"] >= 0.999
