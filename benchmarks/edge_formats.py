"""Every runtime and precision unet-edge exports to, on the default-size UNetStudent (base 32, depth 4),
3x256x256 at batch 1 and 8, timed interleaved in one run, with the ratios that matter.

Rewrites the `edge` section of benchmarks/README.md with the table, the machine, the command and, per
batch size, each row against PyTorch eager fp32 and against ONNX Runtime fp32, each reduced precision
against its own fp32, and the fastest row. Run from the repository root, with nothing else running:

    .venv/bin/python benchmarks/edge_formats.py [--seconds 3] [--min-calls 20] [--threads N] [--compile]

The model is untrained (BatchNorm statistics perturbed so folding is not the identity), so the
reduced-precision files are written with the mIoU budget off: this script measures speed. Accuracy
within the budget is what `unet-edge export` enforces and `unet-edge verify` reports on trained
checkpoints (README "Edge variants", "Formats").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import OUT, README, print_progress, write_section
from run_inference import default_checkpoint


def export_everything(checkpoint: Path, formats: tuple[str, ...] | None, max_batch: int, size: int) -> list[Path]:
    """Every installed format's fp32 file, then every reduced precision each format offers (budget off).
    Fixed-size formats are exported at `size`, bounded ones (ExecuTorch) to `max_batch` x `size` x `size`:
    the memory they plan is then what these rows need."""
    from unet_edge.export import ExportOptions, run_export
    from unet_edge.formats import FORMATS, Precision

    precisions = tuple(
        sorted(
            {p for fmt in FORMATS.values() for p in fmt.precisions if p is not Precision.FP32}, key=lambda p: p.value
        )
    )
    result = run_export(
        ExportOptions(
            checkpoint=checkpoint,
            out=OUT,
            name="edge",
            precisions=(Precision.FP32, *precisions),
            max_miou_drop=1.0,
            calib_images=16,
            parity_images=0,
            formats=formats,
            format_options={"image_size": (size, size), "max_batch": max_batch, "max_size": size},
        )
    )
    for name, why in result.skipped.items():
        print(f"skipped {name}: {why}")
    return [checkpoint, *(a.path for a in result.artifacts)]


def label(row: dict) -> str:
    name = Path(row["path"]).name
    variant = f" {row['variant']}" if row.get("variant") else ""
    return f"{name} ({row['backend']}{variant}, {row['precision'] or 'fp32'})"


def ratio_lines(report: dict, batch: int) -> list[str]:
    """A Markdown table: each row against PyTorch eager fp32 and ONNX Runtime fp32, reduced precisions against
    the fp32 file of the same runtime."""
    rows = [r for r in report["results"] if r["status"] == "ok" and r["batch_size"] == batch]
    p50 = {id(r): r["latency_ms"]["p50"] for r in rows}
    eager = next(
        (
            r
            for r in rows
            if r["path"].endswith(".pt") and r.get("variant") == "eager" and (r["precision"] or "fp32") == "fp32"
        ),
        None,
    )
    ort = next((r for r in rows if r["path"].endswith("/model.onnx") and r["backend"] == "onnxruntime"), None)
    if eager is None or ort is None:
        return [f"- batch {batch}: no PyTorch eager or ONNX Runtime fp32 row to compare with"]
    fp32_of = {}
    for r in rows:
        if (r["precision"] or "fp32") == "fp32":
            fp32_of.setdefault((r["backend"], r.get("variant"), Path(r["path"]).suffix), r)
    lines = ["| row | p50 ms | × PyTorch eager | × ONNX Runtime fp32 | × its fp32 |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: p50[id(r)]):
        own = fp32_of.get((r["backend"], r.get("variant"), Path(r["path"]).suffix))
        versus_own = (
            f"{p50[id(r)] / own['latency_ms']['p50']:.2f}"
            if own is not None and own is not r and (r["precision"] or "fp32") != "fp32"
            else "-"
        )
        lines.append(
            f"| {label(r)} | {p50[id(r)]:.1f} | {p50[id(r)] / eager['latency_ms']['p50']:.2f} | "
            f"{p50[id(r)] / ort['latency_ms']['p50']:.2f} | {versus_own} |"
        )
    fastest = min(rows, key=lambda r: p50[id(r)])
    lines.append("")
    lines.append(
        f"Fastest at batch {batch}: **{label(fastest)}**, {p50[id(fastest)]:.1f} ms = "
        f"**{p50[id(fastest)] / eager['latency_ms']['p50']:.2f}×** PyTorch eager fp32 ({eager['latency_ms']['p50']:.1f} ms)."
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed budget per row")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="threads for every runtime (default: one per core)")
    parser.add_argument("--min-calls", type=int, default=20, help="timed calls per row at least")
    parser.add_argument(
        "--compile", action="store_true", help="add torch.compile rows (about a minute of compiling per shape)"
    )
    parser.add_argument(
        "--formats", default=None, help="comma-separated formats to export (default: every installed one)"
    )
    args = parser.parse_args()

    from unet_edge.bench import BenchSpec, run_bench, to_markdown

    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    formats = tuple(args.formats.split(",")) if args.formats else None
    paths = export_everything(default_checkpoint(OUT / "edge.pt"), formats, max(batch_sizes), args.size)
    export_s = time.perf_counter() - started
    variants = ("eager", "channels-last", "compile") if args.compile else ("eager", "channels-last")
    spec = BenchSpec(
        batch_sizes=batch_sizes,
        height=args.size,
        width=args.size,
        seconds=args.seconds,
        threads=args.threads,
        min_iters=args.min_calls,
        torch_variants=variants,
        dtypes=("fp32", "bf16"),
    )
    report = run_bench(paths, spec, ("cpu",), print_progress("bench"))
    (OUT / "edge.json").write_text(json.dumps(report, indent=2))
    machine = report["machine"]
    ratios = "\n\n".join("\n".join(ratio_lines(report, batch)) for batch in spec.batch_sizes)
    command = "python " + " ".join(["benchmarks/edge_formats.py", *sys.argv[1:]])
    body = f"""## Edge runtimes: every format and precision, default-size UNetStudent (base 32, depth 4), 3×{args.size}×{args.size}

Command: `{command}` ({time.strftime("%Y-%m-%d")}; exports took {export_s:.0f} s)

Machine: {machine["cpu"]} (int8/bf16 instructions: {", ".join(machine["cpu_int8_bf16"]) or "none"}), {machine["cores"]} cores,
{machine["threads"]} threads for every runtime; torch {machine["torch"]}, onnxruntime {machine["onnxruntime"]}.
Untrained model, reduced precisions written with the mIoU budget off: these rows measure speed only
(int8 and bf16 need avx512_vnni / avx512_bf16 to be fast; see the inference section).

{to_markdown(report)}
Ratios (same run, CPU rows, sorted by p50):

{ratios}
"""
    write_section(README, "edge", body)
    print(body)


if __name__ == "__main__":
    main()
