import json
import shutil
import subprocess
import sys
from unittest.mock import patch

import numpy as np
import onnx
import pytest

from unet_edge.checkpoint import load_checkpoint, load_model, save_checkpoint
from unet_edge.formats import FORMATS, export_formats
from unet_edge.io import sha256_file


@pytest.fixture(scope="session")
def export_dir(exported_all):
    folder, result = exported_all
    assert "pass" in result.stdout and "model.onnx" in result.stdout
    return folder


@pytest.mark.slow
def test_export_writes_checked_onnx_with_metadata_and_manifest(export_dir, tiny_checkpoint):
    model = onnx.load(str(export_dir / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"]) == ["background", "circle", "square", "triangle"]
    assert len(json.loads(meta["mean"])) == 3 and len(json.loads(meta["std"])) == 3
    assert json.loads(meta["ignore_index"]) == 255 and meta["precision"] == "fp32"
    assert "NCHW" in meta["input_layout"] and meta["producer"].startswith("unet-edge")
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == ["logits"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))
    assert b"/work/" not in (export_dir / "model.onnx").read_bytes()  # no local source paths shipped

    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert manifest["checkpoint"]["sha256"] == sha256_file(tiny_checkpoint)
    assert manifest["classes"] == ["background", "circle", "square", "triangle"]
    entries = {e["file"]: e for e in manifest["artifacts"]}
    assert set(entries) == {
        fmt.file for fmt in export_formats().values()
    }  # --format all: one fp32 file per format (test_formats.py checks each)
    assert entries["model.onnx"]["opset"] == 18
    listed = {
        "manifest.json",
        "EMBEDDING.md",
        *entries,
        *(c["file"] for e in entries.values() for c in e.get("companions", [])),
    }
    assert sorted(p.name for p in export_dir.iterdir()) == sorted(
        listed
    )  # nothing else: no converter leftovers or temporary files


@pytest.mark.slow
def test_torchscript_loads_without_unet_edge(export_dir, tmp_path):
    code = (
        "import sys, torch\n"
        f"m = torch.jit.load({str(export_dir / 'model.ts')!r})\n"
        "out = m(torch.randn(2, 3, 97, 131))\n"
        "assert 'unet_edge' not in sys.modules\n"
        "print(tuple(out.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(2, 4, 97, 131)"


@pytest.mark.slow
def test_verify_reports_each_model_it_is_given(export_dir, tmp_path, cli):
    """Several models in one call: one report row each (each format's own row: test_formats.py)."""
    report_path = tmp_path / "verify.json"
    result = cli("verify", str(export_dir / "model.onnx"), str(export_dir / "model.ts"), "--json", str(report_path))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    assert report["passed"] is True and [e["format"] for e in report["artifacts"]] == ["onnx", "torchscript"]


@pytest.mark.slow
def test_verify_of_a_lone_model_without_runs_asks_for_its_checkpoint(export_dir, tmp_path, cli, one_line_error):
    """No manifest beside the file names its checkpoint and there is no run to fall back on."""
    lone = tmp_path / "lone" / "model.onnx"
    lone.parent.mkdir()
    shutil.copy(export_dir / "model.onnx", lone)
    one_line_error(
        cli("verify", str(lone), cwd=tmp_path),
        f"{lone}: no manifest.json beside it names the checkpoint it came from",
        "pass --checkpoint",
    )


@pytest.mark.slow
def test_verify_fails_export_of_another_checkpoint(export_dir, other_checkpoint, tmp_path, cli):
    report_path = tmp_path / "verify.json"
    result = cli(
        "verify", str(export_dir / "model.onnx"), "--checkpoint", str(other_checkpoint), "--json", str(report_path)
    )
    assert result.returncode == 1
    report = json.loads(report_path.read_text())
    assert report["passed"] is False and report["artifacts"][0]["pixel_agreement"] < 0.999
    assert "FAIL" in result.stdout


@pytest.mark.slow
def test_explain_names_the_perturbed_layer(export_dir, tmp_path, cli):
    model = onnx.load(str(export_dir / "model.onnx"))
    target = "decoder.0.3"  # second convolution of the first decoder block
    node = next(
        n
        for n in model.graph.node
        if n.op_type == "Conv"
        and any(p.key == "pkg.torch.onnx.name_scopes" and f"'{target}'" in p.value for p in n.metadata_props)
    )
    weights = next(i for i in model.graph.initializer if i.name == node.input[1])
    array = onnx.numpy_helper.to_array(weights)
    weights.CopyFrom(onnx.numpy_helper.from_array((-3.0 * array).astype(np.float32), weights.name))
    perturbed = tmp_path / "perturbed.onnx"
    onnx.save(model, str(perturbed))
    report_path = tmp_path / "explain.json"
    result = cli(
        "verify",
        str(perturbed),
        "--checkpoint",
        json.loads((export_dir / "manifest.json").read_text())["checkpoint"]["path"],
        "--explain",
        "--json",
        str(report_path),
    )
    assert result.returncode == 1
    explain = json.loads(report_path.read_text())["artifacts"][0]["explain"]
    assert explain["first_divergent_layer"] == target
    assert f"first divergent layer {target}" in result.stdout


def one_line_error(result) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


@pytest.mark.slow
def test_fold_refused_by_the_model_is_a_one_line_error_before_writing(tiny_checkpoint, tmp_path, cli):
    state = load_checkpoint(tiny_checkpoint)
    state["model"]["stem.5.weight"][1] = -0.5  # a negative BatchNorm scale feeding the first max-pool
    unfoldable = tmp_path / "unfoldable.pt"
    save_checkpoint(unfoldable, state)
    out = tmp_path / "exported"
    line = one_line_error(cli("export", str(unfoldable), "--fold", "--out", str(out), "--parity-images", "0"))
    assert "unfoldable.pt: cannot fold BatchNorm exactly" in line and "encoder.0" in line
    assert not out.exists()
    result = cli("export", str(unfoldable), "--format", "onnx", "--out", str(out), "--parity-images", "0")
    assert result.returncode == 0, result.stderr  # without --fold the same model exports


@pytest.mark.slow
def test_no_fold_keeps_model_onnx_unfolded_and_variants_fold_unless_told(tiny_checkpoint, tmp_path, cli):
    def folded(*flags: str, in_process: bool | None = None) -> dict[str, bool]:
        result = cli(
            "export",
            str(tiny_checkpoint),
            "--format",
            "onnx",
            "--precision",
            "fp16",
            "--out",
            str(tmp_path),
            "--name",
            "f",
            "--parity-images",
            "0",
            *flags,
            in_process=in_process,
        )
        assert result.returncode == 0, result.stderr
        recorded = {
            e["file"]: e["batchnorm_folded"]
            for e in json.loads((tmp_path / "f" / "manifest.json").read_text())["artifacts"]
        }
        for file, is_folded in recorded.items():  # the graph itself, not only its record
            ops = {node.op_type for node in onnx.load(str(tmp_path / "f" / file)).graph.node}
            assert ("BatchNormalization" not in ops) == is_folded, (flags, file, sorted(ops))
        return recorded

    assert folded("--no-fold") == {"model.onnx": False, "model_fp16.onnx": True}
    assert folded("--fold", "--no-fold-variants") == {"model.onnx": True, "model_fp16.onnx": False}
    # folded alike, fp16 is converted from model.onnx itself: one ONNX export, the same graph in half precision
    with patch("unet_edge.formats.onnx_quantize.export_onnx", side_effect=AssertionError("exported again")):
        assert folded("--fold", in_process=True) == {"model.onnx": True, "model_fp16.onnx": True}
    ops = [
        [n.op_type for n in onnx.load(str(tmp_path / "f" / f)).graph.node] for f in ("model.onnx", "model_fp16.onnx")
    ]
    assert [op for op in ops[1] if op != "Cast"] == ops[0]


@pytest.mark.slow
def test_enum_options_are_validated_by_the_cli(tiny_checkpoint, tmp_path, cli):
    cases = [
        (["export", "--format", "onnx,onxx"], "'onxx' is not one of"),
        (["export", "--formats", "onxx"], "'onxx' is not one of"),  # the plural spelling, a hidden alias
        (["export", "--precision", "fp16,int4"], "'int4' is not one of fp32, fp16, "),
        (["export", "--precisions", "fp16,int4"], "'int4' is not one of fp32, fp16, "),
        (["deploy", "--format", "onxx"], "'onxx' is not one of"),
        (["deploy", "--formats", "onxx"], "'onxx' is not one of"),
        (["deploy", "--calib-method", "median"], "'median' is not one of"),
        (["export", "--calib-method", "median"], "'median' is not one of"),
        (["verify", "--provider", "tpu"], "'tpu' is not one of"),
    ]
    for args, message in cases:
        target = str(tiny_checkpoint) if args[0] in ("export", "deploy") else str(tmp_path / "x.onnx")
        result = cli(*args, target, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not any(tmp_path.iterdir())


def test_a_budget_of_zero_or_below_is_refused_before_any_work(tmp_path, cli):
    cases = [
        (["deploy", "x.pt", "--max-latency-ms", "0"], "'--max-latency-ms': 0 is not above 0"),
        (["search", "--max-latency-ms", "-1"], "'--max-latency-ms': -1 is not above 0"),
        (["search", "--max-latency-ratio", "0", "--teacher", "t.pt"], "'--max-latency-ratio': 0 is not above 0"),
    ]
    for args, message in cases:
        result = cli(*args, cwd=tmp_path)
        assert result.returncode == 2 and message in " ".join(result.stderr.split()), result.stderr
    assert not any(tmp_path.iterdir())


def test_export_deploy_and_search_spell_their_flags_alike(cli):
    for command in ("export", "deploy", "search"):
        shown = cli(command, "--help").stdout
        assert "--format" in shown and "--precision" in shown, command
        assert "--formats" not in shown and "--precisions" not in shown, command  # hidden aliases


@pytest.mark.slow
def test_precision_no_selected_format_has_is_refused(tiny_checkpoint, tmp_path, cli):
    line = one_line_error(
        cli("export", str(tiny_checkpoint), "--format", "torchscript", "--precision", "int8", "--out", str(tmp_path))
    )
    offering = ", ".join(name for name, fmt in export_formats().items() if "int8" in {p.value for p in fmt.precisions})
    assert f"torchscript: no int8 variant (formats with int8: {offering})" in line and offering.startswith("onnx")
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_manifest_checks_companion_files_of_an_artifact(tiny_checkpoint, tmp_path):
    """Formats whose model is several files (a graph and its weights) list the others as companions: a
    changed companion is refused like a changed model file."""
    from unet_edge.artifact import ExportedArtifact, check_manifest_sha256, io_spec, write_manifest
    from unet_edge.errors import ArtifactError

    graph, weights = tmp_path / "model.graph", tmp_path / "model.weights"
    graph.write_bytes(b"graph")
    weights.write_bytes(b"weights" * 100)
    inputs, outputs = io_spec(4, size=(64, 96))
    artifact = ExportedArtifact("model.graph", "multi-file", "fp32", graph, inputs, outputs, companions=[weights])
    write_manifest(tmp_path, load_model(tiny_checkpoint), [artifact])
    (entry,) = json.loads((tmp_path / "manifest.json").read_text())["artifacts"]
    assert entry["companions"] == [{"file": "model.weights", "sha256": sha256_file(weights), "size_bytes": 700}]
    assert entry["inputs"][0]["shape"] == ["batch", 3, 64, 96]  # a fixed-size contract is recorded as such
    assert check_manifest_sha256(graph)["file"] == "model.graph"
    weights.write_bytes(b"weights" * 50)
    with pytest.raises(ArtifactError, match=r"model\.weights: sha256 .* truncated: 350 of 700 bytes"):
        check_manifest_sha256(graph)
    weights.unlink()
    with pytest.raises(ArtifactError, match=r"model\.weights: listed in manifest\.json but missing"):
        check_manifest_sha256(graph)


@pytest.mark.slow
def test_all_exports_the_installed_formats_and_names_the_others(tiny_checkpoint, tmp_path, monkeypatch):
    """`--format all` on an install without an edge extra writes every format whose runtime is there and says
    which were left out and the extra that brings each, instead of failing on the first missing runtime."""
    import dataclasses

    from unet_edge.export import ExportOptions, run_export

    missing = [name for name in export_formats() if name not in ("onnx", "torchscript")]
    for name in missing:
        reason = f"{name} is not installed: pip install 'unet-edge[{name}]'"
        monkeypatch.setitem(
            FORMATS, name, dataclasses.replace(FORMATS[name], unavailable=lambda provider, why=reason: why)
        )
    result = run_export(ExportOptions(checkpoint=tiny_checkpoint, out=tmp_path, name="core", parity_images=0))
    assert sorted(a.format for a in result.artifacts) == ["onnx", "torchscript"]
    assert result.skipped == {name: f"{name} is not installed: pip install 'unet-edge[{name}]'" for name in missing}
    manifest = json.loads((tmp_path / "core" / "manifest.json").read_text())
    assert sorted(entry["file"] for entry in manifest["artifacts"]) == ["model.onnx", "model.ts"]


@pytest.mark.slow
def test_the_parity_report_names_the_exported_files_not_the_staging_folder(tiny_checkpoint, tmp_path, exported_all):
    from unet_edge.export import ExportOptions, run_export

    result = run_export(
        ExportOptions(checkpoint=tiny_checkpoint, out=tmp_path, name="p", formats=("onnx",), parity_images=2)
    )
    assert [row["path"] for row in result.parity["artifacts"]] == [str(tmp_path / "p" / "model.onnx")]
    assert ".export-" not in exported_all[1].stdout  # the table printed by `unet-edge export`
