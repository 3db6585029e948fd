"""`unet-edge predict` and the end-to-end ONNX model (uint8 RGB in, uint8 class mask out)."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from PIL import Image

from unet_edge.backends import open_backend
from unet_edge.errors import ArtifactError
from unet_edge.predict import class_palette, overlay_image
from unet_edge.synth import render_sample

CLASSES = ["background", "circle", "square", "triangle"]


@pytest.mark.slow
def test_end_to_end_model_interface_metadata_and_manifest(e2e_dir):
    model = onnx.load(str(e2e_dir / "model_e2e.onnx"))
    onnx.checker.check_model(model, full_check=True)
    (image,), outputs = model.graph.input, model.graph.output
    assert image.name == "image" and image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim] == ["batch", "height", "width", 3]
    assert [o.name for o in outputs] == ["mask"]
    assert outputs[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param for d in outputs[0].type.tensor_type.shape.dim] == ["batch", "height", "width"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["input_format"] == "nhwc-uint8" and json.loads(meta["classes"]) == CLASSES

    entry = next(
        e for e in json.loads((e2e_dir / "manifest.json").read_text())["artifacts"] if e["file"] == "model_e2e.onnx"
    )
    assert entry["input_format"] == "nhwc-uint8" and entry["inputs"][0]["dtype"] == "uint8"
    assert entry["parity"]["passed"] is True and entry["parity"]["pixel_agreement"] >= 0.999
    assert entry["parity"]["max_abs_diff"] is None  # masks only: the model gives no logits to compare


@pytest.mark.slow
def test_end_to_end_model_segments_like_the_checkpoint(e2e_dir, tiny_checkpoint, agreement):
    images = np.stack([render_sample(5, i, 160)[0][:97, :131] for i in range(3)])
    e2e = open_backend(e2e_dir / "model_e2e.onnx")
    masks = e2e.segment(images)
    reference = open_backend(tiny_checkpoint).segment(images)
    assert masks.dtype == np.uint8 and masks.shape == (3, 97, 131)
    assert len(np.unique(reference)) >= 2  # a mask of one class would make agreement trivial
    assert agreement(masks, reference) >= 0.999
    with pytest.raises(ArtifactError, match="not logits"):
        e2e.predict_logits(images)


@pytest.mark.slow
def test_probabilities_output(tiny_checkpoint, tmp_path):
    from unet_edge.checkpoint import load_model
    from unet_edge.formats.onnx import export_end_to_end

    artifact = export_end_to_end(load_model(tiny_checkpoint), tmp_path, probabilities=True)
    import onnxruntime as ort

    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["mask", "probabilities"]
    image = render_sample(5, 0, 160)[0][None, :33, :17]
    mask, probabilities = session.run(None, {"image": image})
    assert probabilities.shape == (1, 4, 33, 17) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    assert np.array_equal(probabilities.argmax(1), mask)


@pytest.mark.slow
def test_verify_checks_the_end_to_end_model(e2e_dir, tmp_path, cli):
    report_path = tmp_path / "verify.json"
    result = cli("verify", str(e2e_dir / "model_e2e.onnx"), "--json", str(report_path))
    assert result.returncode == 0, result.stdout + result.stderr
    (entry,) = json.loads(report_path.read_text())["artifacts"]
    assert entry["passed"] is True and entry["pixel_agreement"] >= 0.999 and entry["max_abs_diff"] is None


def read_mask(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "P"  # palette PNG: values are class indices
        return np.asarray(image)


@pytest.mark.slow
def test_predict_checkpoint_and_exported_models_agree(
    e2e_dir, tiny_checkpoint, tiny_data, odd_image, tmp_path, cli, agreement
):
    val = tiny_data / "val" / "images"
    masks = {}
    for model in (tiny_checkpoint, e2e_dir / "model_e2e.onnx"):  # model.onnx and the other formats: test_formats.py
        out = tmp_path / model.name
        result = cli("predict", str(model), str(val), str(odd_image), "--out", str(out), "--stats", "--batch-size", "4")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "wrote masks, overlays, stats for 7 images" in result.stdout
        masks[model.name] = {p.name: read_mask(p) for p in sorted(out.glob("*_mask.png"))}
        assert len(masks[model.name]) == 7

        mask = masks[model.name]["odd_mask.png"]
        assert mask.shape == (97, 131)  # the image's own (odd) size
        stats = json.loads((out / "odd_stats.json").read_text())
        assert (stats["width"], stats["height"]) == (131, 97)
        assert [c["pixels"] for c in stats["classes"].values()] == np.bincount(mask.ravel(), minlength=4).tolist()
        with Image.open(out / "odd_overlay.png") as overlay:
            assert overlay.width > 131 * 2 and overlay.height >= 97 * 2  # enlarged, with a legend beside it

    reference = np.concatenate([m.ravel() for m in masks[tiny_checkpoint.name].values()])
    assert len(np.unique(reference)) >= 2
    candidate = np.concatenate([m.ravel() for m in masks["model_e2e.onnx"].values()])
    assert agreement(candidate, reference) >= 0.999


def test_overlay_blends_the_mask_and_draws_a_legend():
    image = np.full((20, 30, 3), 200, dtype=np.uint8)
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[:, 15:] = 2
    palette = class_palette(4)
    assert palette[0].tolist() == [0, 0, 0] and len({tuple(c) for c in palette}) == 4
    overlay = np.asarray(overlay_image(image, mask, CLASSES, palette))
    scale = 256 // 30 + 1  # small images are enlarged for a readable legend
    assert overlay[0, 0].tolist() == [100, 100, 100]  # background: black at 50 %
    assert overlay[0, 15 * scale].tolist() == ((200 + palette[2].astype(int)) / 2).round().astype(int).tolist()
    legend = overlay[:, 30 * scale :].reshape(-1, 3)
    for colour in palette[1:]:  # every class has its swatch, present in the mask or not
        assert (legend == colour).all(1).any()


@pytest.mark.slow
def test_predict_options_mixed_sizes_and_limit(tiny_checkpoint, tiny_data, odd_image, tmp_path, cli):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in sorted((tiny_data / "val" / "images").iterdir())[:3]:
        (folder / name.name).write_bytes(name.read_bytes())
    (folder / "z_odd.png").write_bytes(odd_image.read_bytes())
    out = tmp_path / "out"
    result = cli("predict", str(tiny_checkpoint), str(folder), "--out", str(out), "--no-overlay", "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "00000_mask.png",
        "00001_mask.png",
        "00002_mask.png",
        "z_odd_mask.png",
    ]
    assert read_mask(out / "z_odd_mask.png").shape == (97, 131)

    limited = tmp_path / "limited"
    result = cli("predict", str(tiny_checkpoint), str(folder), "--out", str(limited), "--limit", "2")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in limited.iterdir()) == [
        "00000_mask.png",
        "00000_overlay.png",
        "00001_mask.png",
        "00001_overlay.png",
    ]


@pytest.mark.slow
def test_predict_errors_are_one_line(tiny_checkpoint, tmp_path, cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    broken_model = tmp_path / "broken.onnx"
    broken_model.write_bytes(b"\x08\x01garbage")
    cases = [
        ((str(tiny_checkpoint), str(tmp_path / "missing.png")), "missing.png: no such file or folder"),
        ((str(tiny_checkpoint), str(empty)), "empty: no images"),
        ((str(tiny_checkpoint), str(not_image)), "notes.png: not a readable image"),
        ((str(broken_model), str(not_image)), "broken.onnx"),
    ]
    for args, message in cases:
        result = cli("predict", *args, "--out", str(tmp_path / "out"))
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("error:") and message in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written


@pytest.mark.slow
def test_a_provider_the_runtime_lacks_is_refused_not_replaced(tiny_checkpoint, odd_image, tmp_path, cli):
    """TensorRT is an ONNX Runtime provider: a checkpoint asked to run there says so instead of running on CUDA."""
    out = tmp_path / "out"
    result = cli("predict", str(tiny_checkpoint), str(odd_image), "--provider", "tensorrt", "--out", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert "best.pt: checkpoint models do not run on provider 'tensorrt' (supported: cpu, cuda)" in result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_predicting_with_onnx_needs_no_torch(e2e_dir, odd_image, tmp_path):
    """`unet-edge predict model.onnx` runs on numpy, Pillow and ONNX Runtime alone (fast start, edge-friendly)."""
    code = (
        "import sys; from unet_edge.predict import predict; "
        f"predict({str(e2e_dir / 'model.onnx')!r}, [{str(odd_image)!r}], out={str(tmp_path / 'out')!r}); "
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_predict_takes_a_folder_whose_manifest_lists_one_model(e2e_dir, odd_image, tmp_path, cli, one_line_error):
    """deploy leaves its winner alone in a folder with its manifest: predict takes the folder itself."""
    import shutil

    listed = json.loads((e2e_dir / "manifest.json").read_text())["artifacts"]
    assert len(listed) > 1
    one_line_error(
        cli("predict", str(e2e_dir), str(odd_image), "--out", str(tmp_path / "many")),
        f"lists {len(listed)} model files",
        "pass one of them",
    )
    assert not (tmp_path / "many").exists()

    single = tmp_path / "single"
    shutil.copytree(e2e_dir, single)
    manifest = json.loads((single / "manifest.json").read_text())
    manifest["artifacts"] = [entry for entry in manifest["artifacts"] if entry["file"] == "model.onnx"]
    (single / "manifest.json").write_text(json.dumps(manifest))
    by_folder = cli("predict", str(single), str(odd_image), "--out", str(tmp_path / "folder"), "--no-overlay")
    assert by_folder.returncode == 0, by_folder.stderr
    by_file = cli(
        "predict", str(single / "model.onnx"), str(odd_image), "--out", str(tmp_path / "file"), "--no-overlay"
    )
    assert by_file.returncode == 0, by_file.stderr
    assert np.array_equal(
        read_mask(tmp_path / "folder" / "odd_mask.png"), read_mask(tmp_path / "file" / "odd_mask.png")
    )
