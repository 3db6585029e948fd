"""OpenVINO IR: export with bf16 and int8 variants, the weights file, plain-OpenVINO runs, a damaged loose IR, folding
(export, verify, predict and damaged files of the fp32 IR: tests/test_formats.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("openvino", reason="OpenVINO is an optional extra: pip install 'unet-edge[openvino]'")

from unet_edge.cpuinfo import precision_skip_reason

pytestmark = pytest.mark.slow  # exports and conversions: `make test` runs them, `make test-fast` does not

# bf16 is exported only where this CPU computes it natively (its accuracy budget is measured here).
BF16_SKIPPED = precision_skip_reason("bf16")
FILES = ("model.xml", "model_int8.xml") if BF16_SKIPPED else ("model.xml", "model_bf16.xml", "model_int8.xml")


@pytest.fixture(scope="module")
def ov_dir(tiny_checkpoint, tmp_path_factory, cli):
    out = tmp_path_factory.mktemp("exported-openvino")
    result = cli(
        "export",
        str(tiny_checkpoint),
        "--format",
        "openvino",
        "--precision",
        "bf16,int8",
        "--out",
        str(out),
        "--name",
        "tiny",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "int8: val mIoU" in result.stdout
    if BF16_SKIPPED:
        assert f"skipped bf16: {BF16_SKIPPED}" in result.stdout and "bf16: val mIoU" not in result.stdout
    else:
        assert "bf16: val mIoU" in result.stdout
    return out / "tiny"


def test_model_size_counts_the_weights_file(ov_dir):
    """bench's MB column is the graph plus the weights its manifest entry lists, not the .xml alone."""
    from unet_edge.artifact import artifact_bytes

    xml, weights = ov_dir / "model.xml", ov_dir / "model.bin"
    assert weights.stat().st_size > 0
    assert artifact_bytes(xml) == xml.stat().st_size + weights.stat().st_size


def test_export_writes_three_irs_with_manifest_entries(ov_dir):
    entries = {e["file"]: e for e in json.loads((ov_dir / "manifest.json").read_text())["artifacts"]}
    assert set(entries) == set(FILES)
    hints = {"model.xml": "f32", "model_bf16.xml": "bf16", "model_int8.xml": "f32"}
    for file, entry in entries.items():
        assert entry["format"] == "openvino"
        assert [c["file"] for c in entry["companions"]] == [file.replace(".xml", ".bin")]
        assert entry["compile_config"] == {"INFERENCE_PRECISION_HINT": hints[file]}
        assert entry["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
        assert entry["parity"]["passed"] is True
    assert [entries[f]["precision"] for f in sorted(entries)] == (
        ["fp32", "int8"] if BF16_SKIPPED else ["fp32", "bf16", "int8"]
    )
    for file in FILES[1:]:
        budget = entries[file]["quantization"]
        assert budget["max_miou_drop"] == 0.01 and budget["validation_images"] == 6
        assert budget["within_budget"] == (budget["miou_drop"] <= 0.01)
    assert entries["model_int8.xml"]["quantization"]["attempts"][0]["preset"] == "performance"
    # int8 weights take a quarter of the float32 ones (plus the quantisation parameters)
    assert (ov_dir / "model_int8.bin").stat().st_size < 0.5 * (ov_dir / "model.bin").stat().st_size


def test_plain_openvino_reads_metadata_and_runs_odd_sizes(ov_dir, tmp_path):
    """What an embedding app does: OpenVINO alone, metadata from rt_info, the stored precision hint, 97 x 131."""
    code = (
        "import json, sys, numpy as np, openvino as ov\n"
        "core = ov.Core()\n"
        f"model = core.read_model({str(ov_dir / 'model.xml')!r})\n"
        "classes = json.loads(model.get_rt_info(['unet_edge', 'classes']).astype(str))\n"
        "hint = model.get_rt_info(['unet_edge', 'inference_precision_hint']).astype(str)\n"
        "compiled = core.compile_model(model, 'CPU', {'INFERENCE_PRECISION_HINT': hint, 'INFERENCE_NUM_THREADS': 1})\n"
        "out = compiled(np.zeros((2, 3, 97, 131), np.float32))[0]\n"
        "assert 'unet_edge' not in sys.modules\n"
        "print(len(classes), hint, out.shape)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "4 f32 (2, 4, 97, 131)"


def test_verify_passes_the_reduced_precisions(ov_dir, cli):
    files = [str(ov_dir / f) for f in FILES[1:]]
    result = cli("verify", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all artifacts pass" in result.stdout


def test_damaged_ir_without_manifest_is_one_line(ov_dir, odd_image, tmp_path, cli, one_line_error):
    loose = tmp_path / "loose"
    loose.mkdir()
    for name in ("model.xml", "model.bin"):
        shutil.copy(ov_dir / name, loose / name)
    xml = loose / "model.xml"
    xml.write_text(xml.read_text()[:-200])
    one_line_error(
        cli("predict", str(xml), str(odd_image), "--out", str(tmp_path / "out")), "model.xml: OpenVINO cannot load it"
    )


def test_fold_is_decided_per_format_not_by_whether_onnx_is_exported(tiny_checkpoint, tmp_path):
    """`--format openvino --fold` gives the graph `--format all --fold` gives: each format that converts a conv
    graph reads the folded model (it was folded only when ONNX was among the formats)."""
    from unet_edge.export import ExportOptions, run_export

    def export(name, formats):
        run_export(
            ExportOptions(
                checkpoint=tiny_checkpoint, out=tmp_path, name=name, formats=formats, fold=True, parity_images=0
            )
        )
        entry = next(
            e
            for e in json.loads((tmp_path / name / "manifest.json").read_text())["artifacts"]
            if e["file"] == "model.xml"
        )
        graph = re.findall(
            r'type="(\w+)"', (tmp_path / name / "model.xml").read_text()
        )  # the ops (OpenVINO numbers node names)
        return entry, graph, (tmp_path / name / "model.bin").read_bytes()

    alone, with_onnx = export("alone", ("openvino",)), export("with-onnx", ("onnx", "openvino"))
    assert alone[0]["batchnorm_folded"] is True and with_onnx[0]["batchnorm_folded"] is True
    assert alone[1:] == with_onnx[1:]
    assert alone[1].count("Convolution") == with_onnx[1].count("Convolution") > 0
    # and the folded graph is not the trained one
    run_export(
        ExportOptions(
            checkpoint=tiny_checkpoint, out=tmp_path, name="plain", formats=("openvino",), fold=False, parity_images=0
        )
    )
    assert (tmp_path / "plain" / "model.bin").read_bytes() != alone[2]
