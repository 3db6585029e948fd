"""The format contract: formats depend on nothing above them, and a new format is one module plus one registry
line. The toy format below is defined only here; registered, it exports, verifies, benches and predicts through
the same commands as the real ones, with no other file touched."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import unet_edge.formats as formats_pkg
from unet_edge.artifact import ExportedArtifact, artifact_metadata, io_spec
from unet_edge.formats import FORMATS, ExportRequest, Format, FormatOption, Provider, export_formats, export_options
from unet_edge.formats.base import backend_fields

FORMATS_DIR = Path(formats_pkg.__file__).parent
# The pipeline and the commands sit above the formats: a format importing one of them closes an import circle.
HIGHER = {"parity", "quantize", "bench", "backends", "export", "deploy", "predict", "evaluate", "train", "distill"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a module under unet_edge/formats, at any depth (function-local
    too)."""
    package = ["unet_edge", "formats"]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]  # `from .. import parity`
    return found


def test_formats_import_nothing_above_them():
    offending = [
        f"{path.name}:{line} imports {module}"
        for path in sorted(FORMATS_DIR.glob("*.py"))
        for line, module in _imports(path)
        if module.startswith("unet_edge_cli") or (module.startswith("unet_edge.") and module.split(".")[1] in HIGHER)
    ]
    assert offending == []


def test_the_import_check_catches_a_function_local_import(tmp_path):
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from ..parity import load_eval_images\n    from .. import quantize\n")
    assert (2, "unet_edge.parity") in _imports(module) and (3, "unet_edge.quantize") in _imports(module)


def test_every_export_option_is_declared_once_and_reaches_the_cli(cli):
    from unet_edge_cli.export import _format_parameters

    declared = export_options()
    assert {"opset", "end_to_end", "image_size", "max_batch", "max_size", "calib_method"} <= set(declared)
    parameters = _format_parameters()
    assert [p.name for p in parameters] == list(declared)
    helps = {p.name: p.annotation.__metadata__[0].help for p in parameters}
    assert helps["max_batch"].endswith("(read by: executorch)") and helps["image_size"].endswith("(read by: litert)")
    shown = cli("export", "--help", env={"COLUMNS": "300"}).stdout
    assert all(option.flag in shown for option in declared.values())
    assert "checkpoint" in FORMATS and not FORMATS["checkpoint"].exportable and "checkpoint" not in export_formats()


# --- a format defined only here --------------------------------------------------------------------------------

TOY_FILE = "model.toy.npz"
NOTE = FormatOption("toy_note", "", "A note the toy format stores in its file.")


def _toy_export(request: ExportRequest) -> list[ExportedArtifact]:
    """The float weights as a numpy archive, with the artifact metadata (and the note option) beside them."""
    loaded = request.loaded
    arrays = {f"w:{key}": value.detach().cpu().numpy() for key, value in loaded.model.state_dict().items()}
    metadata = {**artifact_metadata(loaded, "fp32"), "toy_note": request.option(NOTE)}
    path = request.folder / TOY_FILE
    with open(path, "wb") as handle:
        np.savez(handle, __metadata__=np.array(json.dumps(metadata)), **arrays)
    inputs, outputs = io_spec(len(loaded.classes))
    return [ExportedArtifact(TOY_FILE, "toy", "fp32", path, inputs, outputs)]


def _toy_open(path: Path, provider: Provider, threads: int | None, entry: dict | None):
    import torch

    from unet_edge.formats.torch_backend import TorchBackend
    from unet_edge.model import build_model

    with np.load(path) as archive:
        metadata = json.loads(str(archive["__metadata__"]))
        state = {key[2:]: torch.from_numpy(archive[key]) for key in archive.files if key.startswith("w:")}
    fields = backend_fields("toy-runtime", "cpu", path, metadata, entry)
    model = build_model(fields["model_config"])
    model.load_state_dict(state)
    return TorchBackend(model.eval(), device="cpu", **fields)


TOY = Format(
    name="toy",
    runtime="toy-runtime",
    suffixes=(".npz",),
    file=TOY_FILE,
    export=_toy_export,
    open=_toy_open,
    providers={Provider.CPU: "cpu"},
    unavailable=lambda provider: None,
    options=(NOTE,),
    folds_batchnorm=False,
)


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(FORMATS, "toy", TOY)  # the one registry line
    return TOY


@pytest.mark.slow
def test_a_format_defined_in_one_place_exports_verifies_benches_and_predicts(
    toy_registered, tiny_checkpoint, tiny_data, tmp_path, cli, agreement
):
    from unet_edge.export import ExportOptions, run_export
    from unet_edge_cli.export import _format_parameters

    assert "toy_note" in [p.name for p in _format_parameters()]  # its option reaches `unet-edge export`
    result = cli(
        "export", str(tiny_checkpoint), "--format", "toy", "--out", str(tmp_path), "--name", "t", "--parity-images", "4"
    )
    assert result.returncode == 0, result.stderr
    model = tmp_path / "t" / TOY_FILE
    (entry,) = json.loads((tmp_path / "t" / "manifest.json").read_text())["artifacts"]
    assert entry["file"] == TOY_FILE and entry["format"] == "toy" and entry["parity"]["passed"] is True

    verify = cli(
        "verify",
        str(model),
        "--checkpoint",
        str(tiny_checkpoint),
        "--num-images",
        "4",
        "--json",
        str(tmp_path / "v.json"),
    )
    assert verify.returncode == 0, verify.stderr
    (row,) = json.loads((tmp_path / "v.json").read_text())["artifacts"]
    assert row["format"] == "toy" and row["passed"] is True

    bench = cli(
        "bench",
        str(model),
        "--providers",
        "cpu",
        "--batch-sizes",
        "1",
        "--image-size",
        "32",
        "--iters",
        "3",
        "--json",
        str(tmp_path / "b.json"),
    )
    assert bench.returncode == 0, bench.stderr
    rows = json.loads((tmp_path / "b.json").read_text())["results"]
    assert [(r["backend"], r["status"], r["latency_ms"]["p50"] > 0) for r in rows] == [("toy-runtime", "ok", True)]

    images = tiny_data / "val" / "images"
    for name, source in (("toy", model), ("eager", tiny_checkpoint)):
        out = cli("predict", str(source), str(images), "--limit", "3", "--out", str(tmp_path / name), "--no-overlay")
        assert out.returncode == 0, out.stderr
    for mask in sorted((tmp_path / "eager").glob("*_mask.png")):
        assert agreement(np.asarray(Image.open(tmp_path / "toy" / mask.name)), np.asarray(Image.open(mask))) == 1.0

    noted = run_export(
        ExportOptions(
            checkpoint=tiny_checkpoint,
            out=tmp_path,
            name="n",
            formats=("toy",),
            parity_images=0,
            format_options={"toy_note": "hi"},
        )
    )
    with np.load(noted.artifacts[0].path) as archive:
        assert json.loads(str(archive["__metadata__"]))["toy_note"] == "hi"


@pytest.mark.slow
def test_an_undeclared_export_option_is_refused(tiny_checkpoint, tmp_path):
    from unet_edge.errors import UNetEdgeError
    from unet_edge.export import ExportOptions, run_export

    with pytest.raises(UNetEdgeError, match="unknown export option 'opsett'"):
        run_export(
            ExportOptions(checkpoint=tiny_checkpoint, out=tmp_path, formats=("onnx",), format_options={"opsett": 17})
        )
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize(("options", "got"), [({"max_batch": 0}, "got 0 and 1024"), ({"max_size": 1}, "got 8 and 1")])
def test_a_format_refuses_its_options_before_anything_is_written(tiny_checkpoint, tmp_path, options, got):
    """A format's own check (ExecuTorch's bounds) runs with the pipeline's checks, before the checkpoint is exported."""
    from unet_edge.errors import UNetEdgeError
    from unet_edge.export import ExportOptions, run_export

    with pytest.raises(UNetEdgeError, match=f"ExecuTorch bounds must be a batch >= 1 and a size >= 2, {got}"):
        run_export(
            ExportOptions(
                checkpoint=tiny_checkpoint,
                out=tmp_path,
                formats=("executorch",),
                parity_images=0,
                format_options=options,
            )
        )
    assert not any(tmp_path.iterdir())


def test_embedding_md_takes_the_snippet_and_its_precision_note_from_the_format():
    from unet_edge.formats.embedding import embedding_markdown

    litert = FORMATS["litert"]
    int8 = embedding_markdown(litert, "model_int8.tflite", ["model.json"], "int8")
    assert litert.embedding.code.rstrip("\n") in int8 and litert.embedding.notes["int8"] in int8
    assert litert.embedding.notes["int8"] not in embedding_markdown(litert, "model.tflite", ["model.json"])
    assert "no embedding snippet for the toy format" in embedding_markdown(TOY, TOY_FILE, [])


def test_runtime_threads_default_to_the_cores_unless_unet_edge_threads_says(monkeypatch):
    from unet_edge.errors import UNetEdgeError
    from unet_edge.formats import available_cores, default_threads
    from unet_edge.formats.base import requested_threads
    from unet_edge.formats.onnx_graph import session_options

    monkeypatch.delenv("UNET_EDGE_THREADS", raising=False)
    assert default_threads() == available_cores() >= 1
    monkeypatch.setenv("UNET_EDGE_THREADS", "3")
    assert default_threads() == 3
    assert session_options().intra_op_num_threads == 3  # what every runtime is opened with when no count is asked
    assert session_options(threads=2).intra_op_num_threads == 2  # an explicit count still wins
    assert requested_threads(None) == 3 and requested_threads(2) == 2  # PyTorch's backends: set only when asked
    monkeypatch.delenv("UNET_EDGE_THREADS")
    assert requested_threads(None) is None  # PyTorch keeps its own default
    for bad in ("0", "two", "-1", "1.5"):
        monkeypatch.setenv("UNET_EDGE_THREADS", bad)
        with pytest.raises(UNetEdgeError, match=r"^UNET_EDGE_THREADS=.*: must be a whole number of threads >= 1$"):
            default_threads()
