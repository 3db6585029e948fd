import json

import numpy as np
import onnx
import pytest
import torch

from unet_edge.fold import FoldError, fold_batchnorm
from unet_edge.formats.onnx_quantize import quantize_with_budget
from unet_edge.model import UNetStudent


def _randomise_batchnorm(model, negative_in_decoder=True):
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
            module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.2)
            module.bias.data.copy_(torch.rand(n, generator=generator) * 2 - 1)
    if negative_in_decoder:
        for module in model.decoder.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.data[::2] *= -1
    return model.eval()


@pytest.mark.parametrize("int8_layout", [False, True], ids=["plain", "int8-layout"])
@pytest.mark.parametrize("block_order", ["conv-relu-bn", "conv-bn-relu"])
@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
@pytest.mark.parametrize("downsample", ["maxpool", "strided"])
def test_fold_is_exact_at_every_border_and_size(block_order, upsample, downsample, int8_layout):
    model = _randomise_batchnorm(
        UNetStudent(
            num_classes=3, base_channels=4, depth=3, block_order=block_order, upsample=upsample, downsample=downsample
        )
    )
    folded = fold_batchnorm(model, int8_layout=int8_layout)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    for size in [(37, 29), (16, 16), (5, 70)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_order", ["conv-relu-bn", "conv-bn-relu"])
def test_int8_layout_gives_every_convolution_channel_counts_the_int8_kernels_take(block_order):
    from unet_edge.fold import CHANNEL_ALIGNMENT, INPUT_CHANNEL_ALIGNMENT, MIN_OUTPUT_CHANNELS

    model = _randomise_batchnorm(
        UNetStudent(num_classes=3, base_channels=16, depth=2, block_order=block_order), negative_in_decoder=False
    )
    convs = [m for m in fold_batchnorm(model, int8_layout=True).modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.in_channels % INPUT_CHANNEL_ALIGNMENT == 0 for c in convs)
    assert all(c.out_channels % CHANNEL_ALIGNMENT == 0 and c.out_channels >= MIN_OUTPUT_CHANNELS for c in convs)
    layout = fold_batchnorm(model, int8_layout=True)
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in layout.modules())
    plain = [m for m in fold_batchnorm(model).modules() if isinstance(m, torch.nn.Conv2d)]
    if block_order == "conv-relu-bn":  # the plain fold's ones channel makes C + 1
        assert any(c.out_channels % CHANNEL_ALIGNMENT for c in plain)


def test_fold_refuses_negative_scale_before_max_pool():
    model = _randomise_batchnorm(UNetStudent(num_classes=2, base_channels=4, depth=2), negative_in_decoder=False)
    model.stem[5].weight.data[1] = -0.5  # the stem's last BatchNorm feeds the first max-pool
    with pytest.raises(FoldError, match=r"encoder\.0"):
        fold_batchnorm(model)
    model.stem[2].weight.data[1] = -0.5  # feeds a convolution: the sign moves into its weights
    model.stem[5].weight.data[1] = 0.5
    with torch.no_grad():
        x = torch.randn(1, 3, 21, 19)
        torch.testing.assert_close(fold_batchnorm(model)(x), model(x), rtol=1e-5, atol=1e-5)


def _quantised_convs(path):
    model = onnx.load(str(path))
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    return sum(1 for n in convs if n.input[1] in dq_outputs), len(convs)


@pytest.mark.slow
def test_budget_keeps_just_enough_layers_in_float(tiny_checkpoint, tmp_path):
    from unet_edge.checkpoint import load_model
    from unet_edge.formats.onnx_quantize import float_source

    loaded = load_model(tiny_checkpoint)
    source, folded, _ = float_source(loaded, tmp_path, True, 18)
    assert folded
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((3, 32, 32), dtype=np.float32) for _ in range(4)]
    _, total = _quantised_convs(source)

    def evaluate(path):  # a stand-in accuracy: each quantised convolution costs 0.01 mIoU
        quantised, _ = _quantised_convs(path)
        return 0.9 - 0.01 * quantised, 0.9

    budget = 0.01 * (total - 3) + 1e-6  # needs at least 3 convolutions in float
    result = quantize_with_budget(source, tmp_path / "int8.onnx", calibration, evaluate, max_miou_drop=budget)
    assert result.within_budget and result.miou_drop <= budget
    assert [a["kept_float"] for a in result.attempts] == [0, 1, 2, 4]
    assert len(result.kept_float) == 4 and len({k["node"] for k in result.kept_float}) == 4
    assert _quantised_convs(result.path)[0] == total - 4
    impossible = quantize_with_budget(
        source, tmp_path / "int8b.onnx", calibration, lambda p: (0.5, 0.9), max_miou_drop=0.0
    )
    assert not impossible.within_budget and len(impossible.kept_float) == total


@pytest.mark.slow
def test_int8_and_fp16_export_pass_verify(tiny_checkpoint, tmp_path, cli):
    result = cli(
        "export",
        str(tiny_checkpoint),
        "--format",
        "onnx",
        "--precision",
        "fp16,int8",
        "--out",
        str(tmp_path),
        "--name",
        "q",
        "--calib-images",
        "8",
        "--parity-images",
        "6",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    folder = tmp_path / "q"
    manifest = json.loads((folder / "manifest.json").read_text())
    entries = {e["file"]: e for e in manifest["artifacts"]}
    assert {"model.onnx", "model_fp16.onnx", "model_int8.onnx"} <= set(entries)
    quant = entries["model_int8.onnx"]["quantization"]
    assert quant["within_budget"] and quant["miou_drop"] <= 0.01 and quant["calibration"]["images"] == 8
    assert entries["model_int8.onnx"]["batchnorm_folded"] is True
    assert (
        entries["model_int8.onnx"]["size_bytes"] < entries["model.onnx"]["size_bytes"]
    )  # 4x on real sizes; QDQ scales dominate a 4-channel net
    meta = {p.key: p.value for p in onnx.load(str(folder / "model_int8.onnx")).metadata_props}
    assert meta["precision"] == "int8"
    report_path = tmp_path / "verify.json"
    verify = cli("verify", str(folder / "model_fp16.onnx"), str(folder / "model_int8.onnx"), "--json", str(report_path))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    report = {r["precision"]: r for r in json.loads(report_path.read_text())["artifacts"]}
    assert report["fp16"]["pixel_agreement"] >= 0.995 and report["fp16"]["thresholds"]["min_pixel_agreement"] == 0.995
    assert report["int8"]["miou_drop"] <= 0.01 and report["int8"]["thresholds"]["max_miou_drop"] == 0.01


@pytest.mark.slow
def test_the_export_budget_runs_the_checkpoint_once_however_many_files_it_checks(
    tiny_checkpoint, tiny_data, tmp_path, monkeypatch
):
    """The budget an export hands to every format computes the checkpoint's validation predictions (and loads the
    images) once; each file checked costs one run of that file only."""
    from unet_edge import parity
    from unet_edge.checkpoint import load_model
    from unet_edge.export import ExportOptions, run_export
    from unet_edge.formats import Precision

    folder = run_export(
        ExportOptions(
            checkpoint=tiny_checkpoint, out=tmp_path, name="e", formats=("onnx", "torchscript"), parity_images=0
        )
    ).folder
    runs = []
    real_run_backend = parity.run_backend
    monkeypatch.setattr(
        parity, "run_backend", lambda backend, images: runs.append(backend.backend) or real_run_backend(backend, images)
    )
    budget = parity.export_budget(load_model(tiny_checkpoint), tiny_data, max_miou_drop=0.01)
    records = [
        budget.check(folder / name, Precision.INT8, tool="test") for name in ("model.onnx", "model.ts", "model.onnx")
    ]
    assert runs == ["pytorch", "onnxruntime", "torchscript", "onnxruntime"]
    assert all(
        r["miou_drop"] == pytest.approx(0.0, abs=1e-9) and r["within_budget"] and r["validation_images"] > 0
        for r in records
    )
    assert (
        records[0]["miou_reference"] == records[1]["miou_reference"]
        and records[0]["precision"] == "int8"
        and records[0]["tool"] == "test"
    )
