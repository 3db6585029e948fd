"""The CUDA code paths' decisions, checked on the CPU where the decision itself does not need a GPU:
loss and schedule bookkeeping, precision choice, loader workers, device naming under DDP, the GEMM
reference lookup, which ONNX Runtime provider really runs, and bench's PyTorch variants."""

import math

import numpy as np
import pytest
import torch

from unet_edge.config import ModelConfig
from unet_edge.model import build_model
from unet_edge.train import segmentation_loss, train_one_epoch
from unet_edge.transforms import BatchNormalize


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(num_classes=3, base_channels=4, depth=2))


def batches(masks_value: int | None = None, count: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=generator)
        masks = (
            torch.randint(0, 3, (2, 16, 16), generator=generator)
            if masks_value is None
            else torch.full((2, 16, 16), masks_value)
        )
        out.append((images, masks))
    return out


def epoch(model, data, optimizer, scheduler, criterion=segmentation_loss(255), **kwargs):
    return train_one_epoch(
        model, data, optimizer, scheduler, criterion, torch.device("cpu"), normalize=BatchNormalize(), **kwargs
    )


def test_segmentation_loss_equals_mean_cross_entropy_and_is_zero_when_every_pixel_is_ignored():
    logits = torch.randn(2, 3, 5, 5)
    masks = torch.randint(0, 3, (2, 5, 5))
    masks[0, 0] = 255
    expected = torch.nn.functional.cross_entropy(logits, masks, ignore_index=255)
    torch.testing.assert_close(segmentation_loss(255)(logits, masks), expected)
    assert segmentation_loss(255)(logits, torch.full_like(masks, 255)).item() == 0.0


@pytest.mark.slow
def test_a_batch_whose_pixels_are_all_ignored_does_not_stop_training():
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    stats = epoch(model, batches(255) + batches(), optimizer, scheduler)
    assert stats.images == 8 and math.isfinite(stats.loss) and stats.loss > 0


@pytest.mark.slow
def test_a_step_the_grad_scaler_skips_does_not_advance_the_schedule():
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    huge = lambda logits, masks: segmentation_loss(255)(logits, masks) * 1e30  # noqa: E731
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # the scaled loss overflows: the step is skipped
    epoch(model, batches(count=1), optimizer, scheduler, criterion=huge, scaler=scaler)
    assert scaler.get_scale() == 2.0**39
    assert scheduler.last_epoch == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    epoch(model, batches(count=1), optimizer, scheduler, scaler=scaler)
    assert scheduler.last_epoch == 1 and scaler.get_scale() == 2.0**39


def test_bf16_is_chosen_only_where_the_training_gpu_computes_it_natively(monkeypatch):
    """A GPU that emulates bf16 (V100, T4) trains in fp16 with a grad scaler; the check runs on the training device."""
    from unet_edge import device as device_policy

    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or __import__("contextlib").nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    precision = device_policy.mixed_precision(torch.device("cuda", 1), True)
    assert precision.dtype == torch.float16 and precision.scaler is not None
    assert entered == [torch.device("cuda", 1)]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert device_policy.mixed_precision(torch.device("cuda", 1), True).dtype == torch.bfloat16


def test_loader_workers_share_the_node_cores_among_ranks_and_validation_gets_fewer():
    from unet_edge.loaders import default_workers

    cuda = torch.device("cuda")
    assert default_workers(cuda, 1, cores=16) == (8, 4)
    assert default_workers(cuda, 8, cores=16) == (2, 1)
    assert default_workers(cuda, 4, cores=2) == (1, 1)
    assert default_workers(torch.device("cpu"), 1, cores=16) == (0, 0)


def test_an_indexed_cuda_device_under_distributed_training_is_an_error_not_silently_replaced():
    from unet_edge.distributed import _worker_device
    from unet_edge.errors import TrainingError

    with pytest.raises(TrainingError, match=r"--device cuda:1 names one GPU.*pass --device cuda"):
        _worker_device("cuda:1", 0)


@pytest.mark.slow
def test_onnx_runtime_asked_for_cuda_that_it_cannot_start_refuses_instead_of_reporting_cpu_as_cuda(e2e_dir):
    """This machine's onnxruntime has no CUDA provider: the session would silently run on the CPU."""
    import onnxruntime

    from unet_edge.errors import ArtifactError
    from unet_edge.formats import Provider
    from unet_edge.formats.onnx import create_session

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime build has the CUDA provider: the fallback cannot be provoked here")
    assert create_session(e2e_dir / "model.onnx", Provider.CPU).get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(
        ArtifactError, match="could not start CUDAExecutionProvider and would run on CPUExecutionProvider"
    ):
        create_session(e2e_dir / "model.onnx", Provider.CUDA)


def test_tensorrt_gets_a_shape_profile_spanning_bench_sizes_and_an_engine_cache(tmp_path):
    from unet_edge.formats.onnx import tensorrt_options

    options = tensorrt_options(tmp_path / "trt")
    assert options["trt_engine_cache_enable"] == "True" and options["trt_engine_cache_path"] == str(tmp_path / "trt")
    assert (tmp_path / "trt").is_dir()
    assert options["trt_profile_min_shapes"] == "image:1x3x32x32"
    assert options["trt_profile_max_shapes"] == "image:32x3x1024x1024"
    low, high = (
        tuple(int(d) for d in options[f"trt_profile_{k}_shapes"].split(":")[1].split("x")) for k in ("min", "max")
    )
    for batch, side in ((1, 256), (8, 256), (32, 512)):  # what gpu_check.sh benches
        assert all(lo <= dim <= hi for lo, dim, hi in zip(low, (batch, 3, side, side), high))
    assert tensorrt_options(tmp_path / "trt", nhwc=True)["trt_profile_max_shapes"] == "image:32x1024x1024x3"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "int8"])
def test_every_precision_bench_reports_has_a_gemm_reference_on_every_device(device, precision):
    from unet_edge.bench import reference_kernel

    library, dtype = reference_kernel(device, precision)
    assert library in ("torch", "onnxruntime", "best")
    assert dtype == ("fp32" if device == "cpu" and precision == "fp16" else precision)


@pytest.mark.slow
def test_the_int8_gemm_reference_pytorch_runs_on_cuda_measures_on_this_cpu():
    """torch._int_mm is the kernel the CUDA int8 reference times (the CUDA path used to raise KeyError)."""
    from unet_edge.bench.machine import _torch_matmul_gflops

    assert _torch_matmul_gflops("cpu", "int8", 128, 0.05) > 0


@pytest.mark.slow
def test_channels_last_variant_converts_the_weights_not_only_the_input(tiny_checkpoint):
    from unet_edge.backends import open_backend

    def conv_weights(backend):
        return [m.weight for m in backend.module.modules() if isinstance(m, torch.nn.Conv2d)]

    eager = open_backend(tiny_checkpoint, "cpu")
    eager._use_channels_last()  # as a CUDA backend opens: the eager variant goes back to NCHW
    assert eager.use_variant("eager", "fp32") is None and not eager.channels_last
    assert all(w.is_contiguous() for w in conv_weights(eager))
    nhwc = open_backend(tiny_checkpoint, "cpu")
    from unet_edge.cpuinfo import precision_skip_reason

    dtype = "fp32" if precision_skip_reason("bf16") else "bf16"  # bf16 only where the CPU computes it natively
    assert nhwc.use_variant("channels-last", dtype) is None
    expected = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    assert all(w.is_contiguous(memory_format=torch.channels_last) and w.dtype == expected for w in conv_weights(nhwc))
    images = np.random.default_rng(0).standard_normal((2, 3, 40, 40), dtype=np.float32)
    assert (eager.predict_logits(images).argmax(1) == nhwc.predict_logits(images).argmax(1)).mean() > 0.95
    nhwc.device_runner(images)()


@pytest.mark.slow
def test_variants_that_do_not_apply_say_why(tiny_checkpoint, tmp_path):
    from unet_edge.backends import open_backend

    assert open_backend(tiny_checkpoint, "cpu").use_variant("cudagraphs") == "CUDA graphs need a CUDA device"
    scripted = tmp_path / "model.ts"
    from unet_edge.checkpoint import load_model
    from unet_edge.formats.torchscript import export_torchscript

    export_torchscript(load_model(tiny_checkpoint).model, scripted, {"classes": '["a", "b", "c", "d"]'})
    assert open_backend(scripted, "cpu").use_variant("compile") == "torch.compile takes eager modules, not TorchScript"


@pytest.mark.slow
def test_torch_compile_variant_runs_on_the_cpu_and_agrees_with_eager(tiny_checkpoint):
    from unet_edge.backends import open_backend

    images = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    compiled = open_backend(tiny_checkpoint, "cpu")
    assert compiled.use_variant("compile", "fp32") is None
    np.testing.assert_allclose(
        compiled.predict_logits(images), open_backend(tiny_checkpoint, "cpu").predict_logits(images), atol=1e-4
    )
