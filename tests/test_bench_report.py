"""The bench report's rows and tables, without timing anything: the JSON keys a row keeps, and the one column
list that the Markdown table and the terminal table are both built from."""

import json

from unet_edge.bench import BenchRow, Target, render, to_markdown
from unet_edge.bench.plan import not_measured
from unet_edge.formats import Provider
from unet_edge_cli.bench import bench_table

KEYS = [
    "path",
    "backend",
    "variant",
    "provider",
    "precision",
    "batch_size",
    "height",
    "width",
    "latency_ms",
    "e2e_latency_ms",
    "iterations",
    "throughput_ips",
    "gflops_per_image",
    "gflops_per_s",
    "roofline_fraction",
    "roofline_gflops_per_s",
    "file_mb",
    "status",
]


def measured_row() -> BenchRow:
    latency = {"p50": 2.0, "p90": 2.5, "p99": 3.0, "mean": 2.1, "min": 1.9}
    return BenchRow(
        path="exported/unet/model.onnx",
        backend="onnxruntime",
        variant=None,
        provider="CPUExecutionProvider",
        precision="fp32",
        batch_size=8,
        height=40,
        width=56,
        latency_ms=latency,
        e2e_latency_ms=None,
        iterations=6,
        throughput_ips=4000.0,
        gflops_per_image=0.25,
        gflops_per_s=1000.0,
        roofline_fraction=0.5,
        roofline_gflops_per_s=2000.0,
        file_mb=1.5,
        status="ok",
    )


def test_rows_keep_the_reports_json_keys_and_read_back_unchanged(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\0" * 3000)
    unavailable = not_measured(Target(model, "onnx", Provider.CUDA), 40, 56, "unavailable: no GPU")
    measured = measured_row().to_dict()
    assert list(measured) == KEYS
    assert list(unavailable.to_dict()) == [key for key in KEYS if key not in ("iterations", "roofline_gflops_per_s")]
    assert unavailable.to_dict()["provider"] == "CUDAExecutionProvider" and unavailable.to_dict()["file_mb"] == 0.003
    for row in (measured, unavailable.to_dict()):
        assert BenchRow.from_dict(json.loads(json.dumps(row))).to_dict() == row


def report(*rows: BenchRow) -> dict:
    return {
        "machine": {"cpu": "Some CPU", "threads": 1, "cpu_int8_bf16": []},
        "results": [row.to_dict() for row in rows],
    }


def test_markdown_and_terminal_tables_have_the_same_columns_a_new_one_appearing_in_both(monkeypatch):
    two = report(measured_row(), BenchRow(**{**measured_row().to_dict(), "status": "failed: RuntimeError: boom"}))
    markdown = to_markdown(two).splitlines()
    table = bench_table(two)
    assert markdown[0] == "| " + " | ".join(column.title for column in render.COLUMNS) + " |"
    assert [column.header for column in table.columns] == [
        column.terminal_title or column.title for column in render.COLUMNS
    ]
    assert all(line.count("|") == len(render.COLUMNS) + 1 for line in markdown)
    assert markdown[2].startswith("| unet/model.onnx | onnxruntime | CPUExecutionProvider | fp32 | 8 | 40×56 | 2.0 |")
    assert list(table.columns[2].cells) == ["CPU", "CPU"] and list(table.columns[-1].cells)[1] == "[red]failed[/]"

    monkeypatch.setattr(render, "COLUMNS", (*render.COLUMNS, render.Column("extra", lambda row: "x")))
    assert to_markdown(two).splitlines()[0].endswith("| status | extra |")
    assert bench_table(two).columns[-1].header == "extra" and list(bench_table(two).columns[-1].cells) == ["x", "x"]
