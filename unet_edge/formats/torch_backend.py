"""`TorchBackend`: the PyTorch runtime, for training checkpoints (eager) and TorchScript files alike, with the
variants bench times (channels-last, torch.compile, CUDA graphs) and dtypes."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from ..cpuinfo import precision_skip_reason
from ..errors import ArtifactError
from .base import Backend, Format, Provider, requested_threads

__all__ = ["TORCH_PROVIDERS", "TorchBackend", "TorchDtype", "TorchVariant", "torch_device", "torch_unavailable"]

# PyTorch runs on CPU and CUDA; TensorRT is an ONNX Runtime provider and does not apply.
TORCH_PROVIDERS = {Provider.CPU: "cpu", Provider.CUDA: "cuda"}


class TorchVariant(str, Enum):
    """How bench runs a PyTorch module: as loaded (NCHW), with NHWC weights and inputs, through
    `torch.compile`, or replayed from a captured CUDA graph (the last two on NHWC too)."""

    EAGER = "eager"
    CHANNELS_LAST = "channels-last"
    COMPILE = "compile"
    CUDAGRAPHS = "cudagraphs"


class TorchDtype(str, Enum):
    """The dtype a PyTorch module's weights and inputs are cast to for a bench row."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class TorchBackend(Backend):
    """A PyTorch module (eager from a checkpoint, or TorchScript) on CPU or CUDA."""

    @classmethod
    def of_loaded(cls, loaded: Any, *, device: str = "cpu", threads: int | None = None) -> TorchBackend:
        """The eager model of a checkpoint already loaded (`checkpoint.load_model`), in fp32 on `device`."""
        threads = requested_threads(threads)
        if threads:
            import torch

            torch.set_num_threads(threads)
        return cls(
            loaded.model,
            device=device,
            channels_last=device == "cuda",
            backend="pytorch",
            provider=device,
            precision="fp32",
            path=loaded.path,
            classes=loaded.classes,
            mean=loaded.mean,
            std=loaded.std,
            ignore_index=loaded.ignore_index,
            meta={"checkpoint": loaded.state},
            model_config=dict(loaded.state["config"]),
        )

    def __init__(self, module: Any, *, device: str, channels_last: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        import torch

        self._torch = torch
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest algorithm per input shape
        self.module = module.to(self.device).eval()
        self.dtype = torch.float32
        self.variant = TorchVariant.EAGER
        self.channels_last = False
        if channels_last:
            self._use_channels_last()

    def _use_channels_last(self) -> None:
        """Weights and inputs both NHWC: an NHWC input to NCHW weights makes cuDNN convert at every layer."""
        self.module = self.module.to(memory_format=self._torch.channels_last)
        self.channels_last = True

    def use_variant(self, variant: TorchVariant | str, dtype: TorchDtype | str = TorchDtype.FP32) -> str | None:
        """Run as `variant` in `dtype` from now on; the reason when that does not apply here (None: it does)."""
        torch = self._torch
        variant, dtype = TorchVariant(variant), TorchDtype(dtype)
        if variant is TorchVariant.CUDAGRAPHS and self.device.type != "cuda":
            return "CUDA graphs need a CUDA device"
        if variant is TorchVariant.COMPILE and isinstance(self.module, torch.jit.ScriptModule):
            return "torch.compile takes eager modules, not TorchScript"
        if dtype is TorchDtype.BF16 and self.device.type == "cpu" and (reason := precision_skip_reason("bf16")):
            return reason
        self.dtype = {TorchDtype.FP32: torch.float32, TorchDtype.BF16: torch.bfloat16, TorchDtype.FP16: torch.float16}[
            dtype
        ]
        self.module = self.module.to(self.dtype)
        self.precision = dtype.value
        if variant is TorchVariant.EAGER:  # plain NCHW, whatever layout the backend was opened with
            self.module = self.module.to(memory_format=torch.contiguous_format)
            self.channels_last = False
        else:
            self._use_channels_last()
        if variant is TorchVariant.COMPILE:
            # One static-shape graph per (dtype, batch, size) of the same forward: above dynamo's default limit
            # of 8 it would fall back to eager silently and the row would measure eager under compile's name.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.module = torch.compile(self.module, dynamic=False)
        self.variant = variant
        return None

    def _to_device(self, images: np.ndarray) -> Any:
        x = self._torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device, self.dtype)
        return x.contiguous(memory_format=self._torch.channels_last) if self.channels_last else x

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.module(self._to_device(images)).float().cpu().numpy()

    def device_runner(self, images: np.ndarray) -> Callable[[], None]:
        torch = self._torch
        x = self._to_device(images)
        if self.variant is TorchVariant.CUDAGRAPHS:
            return self._graph_runner(x)
        cuda = self.device.type == "cuda"

        def run() -> None:
            with torch.inference_mode():
                self.module(x)
            if cuda:
                torch.cuda.synchronize(self.device)

        return run

    def _graph_runner(self, x: Any) -> Callable[[], None]:
        """Capture one forward pass on `x` as a CUDA graph (after warm-up on a side stream, as capture
        requires) and return its replay: one launch instead of one per kernel."""
        torch = self._torch
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode():
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self.module(x)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.module(x)

        def run() -> None:
            graph.replay()
            torch.cuda.synchronize(self.device)

        return run

    def close(self) -> None:
        del self.module
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()


def torch_unavailable(provider: Provider) -> str | None:
    """Why PyTorch cannot run on `provider` here (None: it can)."""
    if provider is not Provider.CUDA:
        return None
    import torch

    return None if torch.cuda.is_available() else "cuda: PyTorch sees no CUDA GPU"


def torch_device(fmt: Format, path: Path, provider: Provider, threads: int | None) -> str:
    """The PyTorch device a file of `fmt` runs on for `provider` (one line when it cannot), with `threads` set."""
    import torch

    device = fmt.runtime_provider(path, provider)
    reason = torch_unavailable(provider)
    if reason:
        raise ArtifactError(f"{path}: {reason}")
    threads = requested_threads(threads)
    if threads:
        torch.set_num_threads(threads)
    return device
