"""What the pt2 format (torch.export + AOTInductor) has beyond the shared test base: its embedding snippet runs as
written, a package compiled for a wider instruction set than the CPU's is refused, without a C++ compiler the format
is unavailable with one line, and model.pt2 and its int8 variant share one torch.export trace."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from unet_edge.backends import open_backend
from unet_edge.errors import ArtifactError
from unet_edge.formats import FORMATS, Provider

PT2 = FORMATS["pt2"]


@pytest.mark.slow
def test_the_embedding_snippet_runs_as_written(exported_all, odd_image, tmp_path, agreement):
    """torch, numpy and Pillow alone, on the 97 x 131 image: the mask `predict`'s backend gives."""
    folder = exported_all[0]
    snippet = PT2.embedding
    code = f"{snippet.imports}\n\n{snippet.code}\nnp.save('mask.npy', mask)\n"
    (tmp_path / "image.png").write_bytes(odd_image.read_bytes())
    (tmp_path / "model.pt2").write_bytes((folder / "model.pt2").read_bytes())
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    mask = np.load(tmp_path / "mask.npy")
    expected = open_backend(folder / "model.pt2").segment(np.asarray(Image.open(odd_image).convert("RGB"))[None])[0]
    assert mask.shape == (97, 131) and agreement(mask, expected) == 1.0


@pytest.mark.slow
def test_a_package_for_a_wider_instruction_set_is_refused(exported_all, monkeypatch):
    import torch

    path = exported_all[0] / "model.pt2"
    isa = torch._inductor.aoti_load_package(str(path)).get_metadata()["AOTI_CPU_ISA"].split()
    # the package's widest instruction set, and a CPU one step narrower (on AVX-512 and on AVX2-only machines alike)
    widest, narrower = ("AVX512", "AVX2") if "AVX512" in isa else ("AVX2", "DEFAULT")
    if widest not in isa:
        pytest.skip(f"the package was compiled for {' '.join(isa) or 'no vector ISA'}, neither AVX-512 nor AVX2")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: narrower)
    with pytest.raises(ArtifactError, match=f"this CPU has no {widest}: export it here"):
        open_backend(path)


def test_the_float_package_and_the_int8_calibration_share_one_trace_of_the_model(monkeypatch):
    import gc

    import torch

    from unet_edge.formats import pt2, pt2e

    traced = []

    def trace(module):
        traced.append(module)
        return object()

    monkeypatch.setattr(pt2, "_exported", trace)
    model, other = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(3, 4, 1)
    first = pt2._program(None, model)
    assert pt2._program(None, model) is first and traced == [model]  # model.pt2 and the int8 calibration
    assert pt2._program(None, other) is not first and traced == [model, other]  # another model: its own trace
    assert pt2._program(None, model, shared=False) is not first and len(traced) == 3  # the int8 graph: never kept
    # the key separates traces of one module with other settings, and a module's traces go with it
    assert pt2e.exported_once(model, "another contract", trace) is not first and len(traced) == 4
    del model, first
    traced.clear()
    gc.collect()
    assert len(pt2e._PROGRAMS) == 1  # `other`'s only


def test_without_a_compiler_the_format_is_unavailable_in_one_line(monkeypatch):
    from torch._inductor import cpp_builder

    def no_compiler() -> str:
        raise RuntimeError("Unsupported compiler: g++\nsecond line")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    reason = PT2.unavailable(Provider.CPU)
    assert (
        reason == "pt2 needs a C++ compiler to compile the model (g++ or clang++, or $CXX): Unsupported compiler: g++"
    )
    assert PT2.unavailable(Provider.CUDA) is not None


@pytest.mark.slow
def test_export_without_a_compiler_stops_in_one_line(tiny_checkpoint, tmp_path, monkeypatch, cli, one_line_error):
    from torch._inductor import cpp_builder

    def no_compiler() -> str:
        raise RuntimeError("Unsupported compiler: g++")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    out = tmp_path / "out"
    result = cli("export", str(tiny_checkpoint), "--format", "pt2", "--out", str(out))
    one_line_error(result, "pt2 needs a C++ compiler")
    assert not out.exists()


@pytest.mark.slow
def test_int8_is_quantised_and_held_to_the_budget(tiny_checkpoint, tiny_data, tmp_path):
    """model_int8.pt2 (X86 Inductor quantizer, calibrated on training images) from the format's own variant export
    (one compile instead of the CLI's two): within the mIoU budget, really int8, any size."""
    import torch

    from unet_edge.checkpoint import load_model
    from unet_edge.formats import ExportRequest, Precision
    from unet_edge.parity import export_budget

    loaded = load_model(tiny_checkpoint)
    budget = export_budget(loaded, tiny_data, calib_images=8)
    request = ExportRequest(loaded=loaded, folder=tmp_path, precisions=(Precision.INT8,), budget=budget)
    (artifact,) = PT2.export_variants(request)
    assert artifact.file == "model_int8.pt2" and artifact.precision == "int8"
    quantization = artifact.extra["quantization"]
    assert quantization["within_budget"] is True and quantization["miou_drop"] <= quantization["max_miou_drop"]
    backend = open_backend(artifact.path)
    assert backend.precision == "int8" and backend.classes == loaded.classes
    x = torch.randn(2, 3, 97, 131, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = loaded.model(x).numpy()
    logits = backend.predict_logits(x.numpy())
    assert logits.shape == expected.shape and np.abs(logits - expected).max() > 1e-3  # not the float model again
    assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.9
