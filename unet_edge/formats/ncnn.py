"""ncnn (model.ncnn.param + model.ncnn.bin): converted by pnnx from a traced model, run with ncnn's Python API.

Any H x W runs: the model's pad is a constant pad cropped to the next multiple of 2**depth, which pnnx
turns into an ncnn Padding and a Crop with a shape expression (a pad computed from the input size would
need an operator ncnn does not have). ncnn has no batch dimension: one image per extraction, so a batch is
a loop. The .param format holds no metadata, so it sits in the sidecar model.ncnn.json, with the blob names.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import ExportedArtifact, artifact_metadata, io_spec
from ..errors import ArtifactError
from .base import (
    Backend,
    ExportRequest,
    Format,
    Precision,
    Provider,
    Snippet,
    backend_fields,
    default_threads,
    import_runtime,
    needs_runtime,
)

__all__ = ["FORMAT", "NcnnBackend", "export", "open_model"]

NCNN_FILE = "model.ncnn.param"
EXTRA = "ncnn"
INPUT_BLOB, OUTPUT_BLOB = "in0", "out0"
# pnnx traces at one shape and checks a second, odd one, so no size gets baked into the graph.
TRACE_SHAPES = ((1, 3, 64, 96), (1, 3, 47, 71))


def _paths(param: Path) -> tuple[Path, Path]:
    """The weights file and the metadata sidecar beside a .param file."""
    return param.with_suffix(".bin"), param.with_suffix(".json")


def _pnnx(traced: Path, workdir: Path) -> tuple[Path, Path]:
    """Run the pnnx converter on a TorchScript file; the .param and .bin it writes (fp32 weights)."""
    pnnx = import_runtime("pnnx", EXTRA)
    param, weights = workdir / "model.ncnn.param", workdir / "model.ncnn.bin"

    def shape(dims: tuple[int, ...]) -> str:
        return "[" + ",".join(str(d) for d in dims) + "]f32"

    command = [
        pnnx.EXEC_PATH,
        str(traced),
        f"inputshape={shape(TRACE_SHAPES[0])}",
        f"inputshape2={shape(TRACE_SHAPES[1])}",
        "fp16=0",
        f"ncnnparam={param}",
        f"ncnnbin={weights}",
    ]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if done.returncode != 0 or not param.is_file() or not weights.is_file():
        last = (done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}").splitlines()[-1]
        raise ArtifactError(f"{traced}: pnnx could not convert the model ({last[:200]})")
    if "pnnx." in param.read_text():
        raise ArtifactError(f"{traced}: pnnx left operators ncnn does not have in the graph")
    return param, weights


def export(request: ExportRequest) -> list[ExportedArtifact]:
    """model.ncnn.param + model.ncnn.bin (float32) + model.ncnn.json (metadata and blob names)."""
    import torch

    loaded = request.loaded
    module = (request.folded_model if request.folded_model is not None else loaded.model).eval()
    target = request.folder / NCNN_FILE
    weights_target, sidecar_target = _paths(target)
    request.say("converting to ncnn with pnnx")
    request.folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ncnn-", dir=request.folder) as tmp:
        workdir = Path(tmp).resolve()  # pnnx runs inside it: relative paths would resolve twice
        sample = torch.randn(*TRACE_SHAPES[0], generator=torch.Generator().manual_seed(0))
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic: pnnx keeps it symbolic
            buffer = io.BytesIO()  # in memory first: TorchScript's C++ archive writer aborts the process on a full disk
            try:
                torch.jit.save(torch.jit.trace(module, sample), buffer)
            except Exception as exc:  # the tracer raises many error types; the first line says what failed
                raise ArtifactError(
                    f"{target}: tracing the model for pnnx failed ({str(exc).strip().splitlines()[0][:200]})"
                ) from None
        (workdir / "model.pt").write_bytes(buffer.getvalue())
        param, weights = _pnnx(workdir / "model.pt", workdir)
        metadata = {
            **artifact_metadata(loaded, Precision.FP32.value),
            "input_blob": INPUT_BLOB,
            "output_blob": OUTPUT_BLOB,
        }
        sidecar = workdir / "model.ncnn.json"
        sidecar.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        for staged, final in ((weights, weights_target), (sidecar, sidecar_target), (param, target)):
            os.replace(staged, final)
    inputs, outputs = io_spec(len(loaded.classes))
    extra = {
        "batchnorm_folded": request.folded_model is not None,
        "blobs": {"input": INPUT_BLOB, "output": OUTPUT_BLOB},
        "batch": "one image per extraction",
    }
    return [
        ExportedArtifact(
            NCNN_FILE,
            "ncnn",
            Precision.FP32.value,
            target,
            inputs,
            outputs,
            None,
            extra,
            [weights_target, sidecar_target],
        )
    ]


class NcnnBackend(Backend):
    """An ncnn Net on the CPU; each image of a batch goes through its own extractor."""

    def __init__(self, net: Any, ncnn: Any, input_blob: str, output_blob: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net, self._ncnn = net, ncnn
        self.input_blob, self.output_blob = input_blob, output_blob

    def _run(self, image: np.ndarray) -> Any:
        extractor = self.net.create_extractor()
        extractor.input(self.input_blob, self._ncnn.Mat(image))
        status, out = extractor.extract(self.output_blob)
        if status != 0:
            raise ArtifactError(
                f"{self.path}: ncnn failed on a {image.shape[1]}x{image.shape[2]} image (status {status})"
            )
        return out

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        feed = np.ascontiguousarray(images, dtype=np.float32)
        return np.stack([np.array(self._run(image)) for image in feed])

    def device_runner(self, images: np.ndarray) -> Callable[[], None]:
        feed = [np.ascontiguousarray(image, dtype=np.float32) for image in images]

        def run() -> None:
            for image in feed:
                self._run(image)

        return run

    def close(self) -> None:
        self.net.clear()


def open_model(path: Path, provider: Provider, threads: int | None, entry: dict[str, Any] | None) -> Backend:
    """Load the .param and .bin into an ncnn Net with `threads` threads, metadata from the sidecar."""
    ncnn = import_runtime("ncnn", EXTRA)
    device = FORMAT.runtime_provider(path, provider)
    weights, sidecar = _paths(path)
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: metadata file {sidecar.name} is missing beside it") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{sidecar}: not valid metadata ({exc.__class__.__name__})") from None
    net = ncnn.Net()
    net.opt.num_threads = threads or default_threads()
    net.opt.use_vulkan_compute = False
    if net.load_param(str(path)) != 0:
        raise ArtifactError(f"{path}: ncnn cannot parse the .param file")
    if net.load_model(str(weights)) != 0:
        raise ArtifactError(f"{weights}: ncnn cannot load the weights (truncated or not this model's)")
    return NcnnBackend(
        net,
        ncnn,
        meta.get("input_blob", INPUT_BLOB),
        meta.get("output_blob", OUTPUT_BLOB),
        **backend_fields(FORMAT.runtime, device, path, meta, entry),
    )


# How a program loads this format with its runtime alone: the README's snippet, which deploy writes into EMBEDDING.md.
EMBEDDING = Snippet(
    "ncnn, with only ncnn, numpy and Pillow",
    "import json\n\nimport ncnn\nimport numpy as np\nfrom PIL import Image",
    """\
meta = json.load(open("model.ncnn.json"))
net = ncnn.Net()
net.opt.num_threads = 4
net.load_param("model.ncnn.param")
net.load_model("model.ncnn.bin")
mean, std = (np.array(json.loads(meta[key]), np.float32) for key in ("mean", "std"))
image = np.asarray(Image.open("image.png").convert("RGB"))  # H x W x 3 uint8, any size
x = np.ascontiguousarray(((image / 255.0 - mean) / std).transpose(2, 0, 1), np.float32)  # 3 x H x W
extractor = net.create_extractor()
extractor.input(meta["input_blob"], ncnn.Mat(x))
status, logits = extractor.extract(meta["output_blob"])  # status 0 on success
mask = np.array(logits).argmax(0)  # H x W class indices
""",
)


FORMAT = Format(
    name="ncnn",
    runtime="ncnn",
    suffixes=(".param",),
    file=NCNN_FILE,
    export=export,
    open=open_model,
    providers={Provider.CPU: "cpu"},
    unavailable=needs_runtime("ncnn", EXTRA),
    extra=EXTRA,
    embedding=EMBEDDING,
    export_seconds=1,
)
