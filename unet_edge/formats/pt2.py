"""torch.export + AOTInductor package (model.pt2): the model compiled ahead of time to a shared library for the CPU,
what PyTorch offers in place of TorchScript for running a model without Python (libtorch's
`torch::inductor::AOTIModelPackageLoader` in C++, `torch._inductor.aoti_load_package` in Python).

Exported with dynamic batch, height and width, unbounded as in the ONNX file (`Dim.DYNAMIC`: named dims fail on
the model's pad-to-a-multiple-of-2^depth arithmetic, and AOTInductor plans no memory for an upper bound).
Compiled with Inductor's freezing (BatchNorm folded into the convolutions, weights pre-packed) for the
instruction set of the exporting CPU, which the package records (`AOTI_CPU_ISA`): a package built where
AVX-512 exists needs it to run. The artifact metadata rides in the package as AOTInductor metadata
(`get_metadata()` in Python and C++). Exporting needs a C++ compiler (g++ or clang++, or $CXX); loading does not.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import ExportedArtifact, artifact_metadata, io_spec
from ..cpuinfo import cpu_flags
from ..errors import ArtifactError
from ..io import atomic_write_bytes
from .base import Backend, ExportRequest, Format, Precision, Provider, Snippet, backend_fields, cpp_host
from .pt2e import convert_pt2e, exported_once
from .torchscript import torch_device

__all__ = ["FORMAT", "AotiBackend", "export", "export_variants", "open_model"]

PT2_FILE = "model.pt2"
INT8_PT2_FILE = "model_int8.pt2"
# Inductor settings of the compiled package: freezing folds BatchNorm and pre-packs the weights; one compile
# worker, because a U-Net has few kernels and a pool of compile processes costs more to start than it saves.
INDUCTOR_CONFIGS = {"freezing": True, "compile_threads": 1}
# AOTInductor's own metadata key for the instruction set the kernels were compiled for.
ISA_KEY = "AOTI_CPU_ISA"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]


def compiler_unavailable(provider: Provider) -> str | None:
    """Why pt2 cannot be made or run here (None: it can): it runs on the CPU and compiling needs a C++ compiler."""
    if provider is not Provider.CPU:
        return f"{provider.value}: unet-edge compiles pt2 packages for the CPU only"
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as exc:  # Inductor raises its own error when no compiler is found
        return f"pt2 needs a C++ compiler to compile the model (g++ or clang++, or $CXX): {_first_line(exc)}"
    return None


def _exported(module: Any) -> Any:
    """torch.export of `module` with dynamic batch, height and width (a sample batch of 2: one would specialise it)."""
    import torch

    sample = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(
            module, (sample,), dynamic_shapes={"x": {axis: torch.export.Dim.DYNAMIC for axis in (0, 2, 3)}}
        )


def _source(request: ExportRequest) -> Any:
    return (request.folded_model if request.folded_model is not None else request.loaded.model).eval()


def _program(request: ExportRequest, module: Any, *, shared: bool = True) -> Any:
    """`module`'s program with dynamic sizes; `shared`: traced once for model.pt2 and the int8 variant's
    calibration."""
    try:
        return exported_once(module, "pt2", _exported) if shared else _exported(module)
    except Exception as exc:  # torch.export raises many error types
        raise ArtifactError(f"{request.loaded.path}: torch.export failed for pt2 ({_first_line(exc)})") from None


def _package(
    request: ExportRequest, program: Any, file: str, precision: Precision, extra: dict[str, Any]
) -> ExportedArtifact:
    """Compile `program` with AOTInductor into `file` (written atomically), the artifact metadata inside."""
    import torch

    configs = {**INDUCTOR_CONFIGS, "aot_inductor.metadata": artifact_metadata(request.loaded, precision.value)}
    request.say(f"compiling {precision.value} with AOTInductor (C++ compiler)")
    buffer = io.BytesIO()  # in memory first, then written atomically
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch._inductor.aoti_compile_and_package(program, package_path=buffer, inductor_configs=configs)
    except Exception as exc:  # compiler failures surface as several error types
        raise ArtifactError(
            f"{request.loaded.path}: AOTInductor could not compile the model ({_first_line(exc)})"
        ) from None
    path = request.folder / file
    atomic_write_bytes(path, buffer.getvalue())
    inputs, outputs = io_spec(len(request.loaded.classes))
    isa = torch._inductor.aoti_load_package(str(path)).get_metadata().get(ISA_KEY, "")
    info = {
        "batchnorm_folded": request.folded_model is not None,
        "compile_config": {"freezing": True, "cpu_isa": isa},
    }
    return ExportedArtifact(file, "pt2", precision.value, path, inputs, outputs, None, {**info, **extra})


def export(request: ExportRequest) -> list[ExportedArtifact]:
    """model.pt2: float32, any batch and H x W, compiled by AOTInductor for this CPU."""
    request.say("exporting to a pt2 package (torch.export, AOTInductor)")
    return [_package(request, _program(request, _source(request)), PT2_FILE, Precision.FP32, {})]


def export_variants(request: ExportRequest) -> list[ExportedArtifact]:
    """model_int8.pt2: PT2E static int8 with the X86 Inductor quantizer (per-channel int8 weights, uint8
    activations calibrated on training images), compiled by AOTInductor and checked against the mIoU budget."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    budget = request.require_budget(Precision.INT8)
    calibration = budget.calibration()
    request.say(f"quantising to int8 with the X86 Inductor quantizer ({len(calibration)} training images)")
    # uint8 activations use 0..127 on CPUs without VNNI, whose int8 dot products can saturate (the quantizer's advice).
    reduce_range = not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_flags())
    quantizer = X86InductorQuantizer().set_global(
        get_default_x86_inductor_quantization_config(reduce_range=reduce_range)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(_program(request, _source(request)).module(), quantizer)
        with torch.no_grad():
            for image in calibration:
                prepared(torch.from_numpy(image)[None])
        converted = convert_pt2e(prepared)
    artifact = _package(request, _program(request, converted, shared=False), INT8_PT2_FILE, Precision.INT8, {})
    artifact.extra = {
        **(artifact.extra or {}),
        "quantization": budget.check(
            artifact.path,
            Precision.INT8,
            tool="torchao X86InductorQuantizer (pt2e prepare/convert), AOTInductor",
            weights="int8, per channel, symmetric",
            activations="uint8, per tensor, asymmetric" + (", 0..127 (no VNNI)" if reduce_range else ""),
            calibration=budget.calibration_record(),
        ),
    }
    return [artifact]


class AotiBackend(Backend):
    """A pt2 package's compiled model (AOTInductor's runner) on the CPU."""

    def __init__(self, runner: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        import torch

        self._torch = torch
        self.runner = runner

    def _input(self, images: np.ndarray) -> Any:
        return self._torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))

    def _run(self, x: Any) -> Any:
        try:
            with self._torch.inference_mode():
                return self.runner(x)
        except RuntimeError as exc:  # an input the compiled model cannot take (a wrong channel count, ...)
            raise ArtifactError(f"{self.path}: the pt2 package refused the input ({_first_line(exc)})") from None

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        return self._run(self._input(images)).numpy()

    def device_runner(self, images: np.ndarray) -> Callable[[], None]:
        x = self._input(images)
        return lambda: self._run(x)

    def close(self) -> None:
        del self.runner


def _missing_isa(isa: str) -> str | None:
    """The first instruction set the package was compiled for that this CPU lacks (None: it has them all)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    if "AVX512" in isa.split() and capability != "AVX512":
        return "AVX512"
    if "AVX2" in isa.split() and capability not in ("AVX2", "AVX512"):
        return "AVX2"
    return None


def open_model(path: Path, provider: Provider, threads: int | None, entry: dict[str, Any] | None) -> Backend:
    """Load the package (its compiled library and the metadata stored in it) on the CPU with `threads` threads."""
    import torch

    device = torch_device(FORMAT, path, provider, threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runner = torch._inductor.aoti_load_package(str(path))
        meta = dict(runner.get_metadata())
    except Exception as exc:  # a damaged archive surfaces as RuntimeError or ValueError from the loader
        raise ArtifactError(f"{path}: not a loadable pt2 package ({_first_line(exc)})") from None
    if "classes" not in meta:
        raise ArtifactError(f"{path}: not a unet-edge pt2 package (no classes in its metadata)")
    missing = _missing_isa(meta.get(ISA_KEY, ""))
    if missing:
        raise ArtifactError(f"{path}: compiled for {meta[ISA_KEY]}, and this CPU has no {missing}: export it here")
    return AotiBackend(runner, **backend_fields(FORMAT.runtime, device, path, meta, entry))


# How a program loads this format with its runtime alone: the README's snippet, which deploy writes into EMBEDDING.md.
EMBEDDING = Snippet(
    "A pt2 package (AOTInductor), with only torch, numpy and Pillow (libtorch's `AOTIModelPackageLoader` reads "
    "the same file in C++: examples/cpp)",
    "import json\n\nimport numpy as np\nimport torch\nfrom PIL import Image",
    """\
torch.set_num_threads(4)
model = torch._inductor.aoti_load_package("model.pt2")  # compiled for the CPU it was exported on
meta = model.get_metadata()  # the metadata rides in the package
mean, std = (np.array(json.loads(meta[key]), np.float32) for key in ("mean", "std"))
image = np.asarray(Image.open("image.png").convert("RGB"))  # H x W x 3 uint8, any size
x = np.ascontiguousarray(((image / 255.0 - mean) / std).transpose(2, 0, 1)[None], np.float32)  # 1 x 3 x H x W
with torch.inference_mode():
    mask = model(torch.from_numpy(x))[0].argmax(0).numpy()  # H x W class indices
""",
    cpp=cpp_host("unet_aoti"),
)


FORMAT = Format(
    name="pt2",
    runtime="aotinductor",
    suffixes=(".pt2",),
    file=PT2_FILE,
    export=export,
    open=open_model,
    providers={Provider.CPU: "cpu"},
    unavailable=compiler_unavailable,
    precisions=(Precision.FP32, Precision.INT8),
    export_variants=export_variants,
    embedding=EMBEDDING,
    export_seconds=20,
)
