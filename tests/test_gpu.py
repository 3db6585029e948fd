"""The GPU paths, run for real where a CUDA GPU is present; on a CPU-only machine each test skips and says why."""

import json

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.gpu  # skipped with the reason on a machine without CUDA (conftest.py)
ORT_CUDA = "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.slow
def test_cuda_amp_training_logs_the_miou_of_fp32_eval(tiny_data, tmp_path, cli, trainer):
    """AMP (bf16 or fp16 + grad scaler), channels_last and pinned memory on CUDA; the checkpoint is plain CPU data."""
    run = trainer(tiny_data, tmp_path, name="cuda", epochs=2, device="cuda", amp=True, workers=2)
    assert all(np.isfinite(r["train_loss"]) for r in run.history)
    state = torch.load(
        run.run_dir / "best.pt", weights_only=True
    )  # no map_location: tensors load where they were saved
    assert all(t.device.type == "cpu" for t in state["model"].values())
    out = tmp_path / "eval.json"
    result = cli("eval", str(run.run_dir / "best.pt"), "--data", str(tiny_data), "--device", "cuda", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["miou"] == pytest.approx(run.history[run.best_epoch - 1]["miou"], abs=1e-4)


@pytest.mark.slow
def test_fp16_autocast_with_grad_scaler_trains():
    """The fp16 branch (GPUs without bf16): the scaler steps and the weights move, with finite loss."""
    from unet_edge.model import ModelConfig, build_model
    from unet_edge.train import train_one_epoch
    from unet_edge.transforms import BatchNormalize

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = (
        build_model(ModelConfig(num_classes=3, base_channels=4, depth=2))
        .to(device)
        .to(memory_format=torch.channels_last)
    )
    before = [p.detach().clone() for p in model.parameters()]
    batches = [
        (torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 3, (4, 32, 32))) for _ in range(3)
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    stats = train_one_epoch(
        model,
        batches,
        optimizer,
        scheduler,
        nn.CrossEntropyLoss(),
        device,
        autocast=torch.autocast("cuda", dtype=torch.float16),
        scaler=torch.amp.GradScaler("cuda"),
        normalize=BatchNormalize(channels_last=True),
    )
    assert stats.images == 12 and np.isfinite(stats.loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_confusion_matrix_stays_on_the_gpu_of_its_inputs():
    from unet_edge.metrics import ConfusionMatrix

    confusion = ConfusionMatrix(3)
    pred = torch.tensor([[0, 1, 2]], device="cuda")
    confusion.update(pred, pred)
    assert confusion.matrix.device.type == "cuda" and int(confusion.matrix.trace()) == 3


@pytest.mark.slow
@pytest.mark.skipif(not ORT_CUDA, reason="this onnxruntime build has no CUDA provider (onnxruntime-gpu not installed)")
def test_onnx_runtime_cuda_provider_matches_cpu(e2e_dir, odd_image):
    from unet_edge.backends import open_backend
    from unet_edge.data import load_image

    image = load_image(odd_image)[None]
    cpu = open_backend(e2e_dir / "model.onnx", "cpu").segment(image)
    backend = open_backend(e2e_dir / "model.onnx", "cuda")
    assert backend.provider == "CUDAExecutionProvider"
    assert backend.session.get_providers()[0] == "CUDAExecutionProvider"  # what really runs, not what was asked
    assert (cpu == backend.segment(image)).mean() >= 0.999


@pytest.mark.slow
def test_every_pytorch_variant_and_dtype_runs_on_cuda(tiny_checkpoint):
    """eager, channels-last, torch.compile and CUDA graphs in fp32, bf16 and fp16: each row measured."""
    from unet_edge.bench import BenchSpec, run_bench

    spec = BenchSpec(
        batch_sizes=(2,),
        height=64,
        width=64,
        warmup=1,
        iters=3,
        torch_variants=("eager", "channels-last", "compile", "cudagraphs"),
        dtypes=("fp32", "bf16", "fp16"),
    )
    rows = run_bench([tiny_checkpoint], spec, ("cuda",))["results"]
    assert len(rows) == 4 * 3
    assert [r for r in rows if r["status"] != "ok"] == []
    assert {(r["variant"], r["precision"]) for r in rows} == {(v, d) for v in spec.torch_variants for d in spec.dtypes}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "int8"])
def test_cuda_gemm_reference_is_measured_for_every_precision(precision):
    from unet_edge.bench import measure_matmul_gflops

    assert measure_matmul_gflops("cuda", precision, size=2048, seconds=0.2) > 100.0


@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="fewer than 2 CUDA GPUs: NCCL distributed training is not exercised"
)
@pytest.mark.slow
def test_two_gpu_nccl_epoch_logs_the_miou_of_single_process_eval(tiny_data, tmp_path, cli):
    result = cli(
        "train",
        "--nproc-per-node",
        "2",
        "--data",
        str(tiny_data),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--image-size",
        "32",
        "--base-channels",
        "4",
        "--depth",
        "2",
        "--device",
        "cuda",
        "--out",
        str(tmp_path),
        "--name",
        "nccl",
        in_process=False,
    )
    assert result.returncode == 0, result.stderr
    run = tmp_path / "nccl"
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    out = tmp_path / "eval.json"
    evaluated = cli("eval", str(run / "best.pt"), "--data", str(tiny_data), "--device", "cuda", "--json", str(out))
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(out.read_text())["miou"] == pytest.approx(record["miou"], abs=1e-4)


def test_cuda_training_layout_gives_float64_gradients(monkeypatch):
    """The layout `fit` trains in on CUDA (channels_last) gives the gradients float64 gives on the CPU, as
    the CPU test does for NCHW (CPU channels_last BatchNorm did not: see `prefers_channels_last`)."""
    import copy

    from unet_edge.config import ModelConfig
    from unet_edge.device import place_model, prefers_channels_last
    from unet_edge.model import build_model
    from unet_edge.transforms import BatchNormalize

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 convolutions differ by ~1e-3 by design
    torch.manual_seed(0)
    model = build_model(ModelConfig(base_channels=8, depth=3, num_classes=5)).train()
    images = torch.randint(0, 256, (4, 3, 48, 48), dtype=torch.uint8)
    masks = torch.randint(0, 5, (4, 48, 48))
    cuda = torch.device("cuda")
    trained = place_model(copy.deepcopy(model), cuda, training=True)
    x = BatchNormalize(channels_last=prefers_channels_last(cuda, training=True))(images.to(cuda))
    nn.functional.cross_entropy(trained(x), masks.to(cuda)).backward()
    reference = copy.deepcopy(model).double()
    nn.functional.cross_entropy(reference(BatchNormalize()(images).double()), masks).backward()
    got = dict(trained.named_parameters())
    worst = max(
        ((got[n].grad.double().cpu() - p.grad).norm() / p.grad.norm().clamp_min(1e-12)).item()
        for n, p in reference.named_parameters()
    )
    assert worst < 1e-3, worst
