"""The standard inference comparison, in one process: the default-size UNetStudent (base 32, depth 4)
on PyTorch eager, TorchScript and ONNX Runtime, 3x256x256 at batch 1 and 8, timed interleaved.

Rewrites the `inference` section of benchmarks/README.md with the table, the machine, the command
and the ratios that matter. Run from the repository root:

    .venv/bin/python benchmarks/run_inference.py [--seconds 4] [--min-calls 30] [--threads N] [--no-variants]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import OUT, README, median_ms, print_progress, write_section


def default_checkpoint(path: Path, block_order: str = "conv-relu-bn") -> Path:
    """A default-size UNetStudent with BatchNorm statistics that are not the identity, saved as a checkpoint."""
    from unet_edge.checkpoint import save_checkpoint
    from unet_edge.model import UNetStudent
    from unet_edge.synth import CLASSES, IGNORE_INDEX
    from unet_edge.transforms import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    model = UNetStudent(num_classes=len(CLASSES), base_channels=32, depth=4, block_order=block_order).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "config": model.config.to_dict(),
            "classes": list(CLASSES),
            "ignore_index": IGNORE_INDEX,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "epoch": 0,
        },
    )
    return path


def int8_variants(loaded, folder: Path, calib_images: int, naive: bool = True) -> list[Path]:
    """int8 as export makes it (BatchNorm-folded, int8 layout) and, for the seed order, naive int8 from
    the unfolded graph, calibrated on embedded training images; plus fp16 from the plain fold."""
    from unet_edge.data import load_eval_images
    from unet_edge.formats.onnx_quantize import convert_fp16, float_source, quantize_int8, stamp_precision
    from unet_edge.synth import ensure_synth

    calibration = load_eval_images(
        ensure_synth(), loaded.mean, loaded.std, split="train", num_images=calib_images
    ).normalised
    paths = []
    for fold in (True, False) if naive else (True,):
        source, folded, _ = float_source(loaded, folder, fold, 18)
        name = "model_int8.onnx" if folded else "model_int8_naive.onnx"
        int8_source = float_source(loaded, folder, True, 18, int8_layout=True)[0] if folded else source
        quantize_int8(int8_source, folder / f"tmp-{name}", calibration)
        if int8_source != source:
            int8_source.unlink()
        paths.append(stamp_precision(folder / f"tmp-{name}", folder / name, loaded, "int8"))
        (folder / f"tmp-{name}").unlink()
        if folded:
            paths.append(
                stamp_precision(
                    convert_fp16(source, folder / "tmp-fp16.onnx"), folder / "model_fp16.onnx", loaded, "fp16"
                )
            )
            (folder / "tmp-fp16.onnx").unlink()
        source.unlink()
    return paths


def command_ms(*commands: list[str], runs: int = 5) -> list[float]:
    """Median wall time in ms of each command, interleaved (after one untimed run that warms the file cache)."""
    return median_ms(
        [lambda command=command: subprocess.run(command, capture_output=True, check=True) for command in commands],
        seconds=0.0,
        warmup=1,
        iters=runs,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="time budget per backend and batch size")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--no-variants", dest="variants", action="store_false", help="skip the int8/fp16 rows")
    parser.add_argument("--calib-images", type=int, default=16)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for every runtime and the GEMM reference (default: one per core)",
    )
    parser.add_argument(
        "--min-calls", type=int, default=30, help="timed calls per row at least, so batch-8 rows have a p90/p99"
    )
    args = parser.parse_args()

    from unet_edge.bench import BenchSpec, run_bench, to_markdown
    from unet_edge.checkpoint import load_model
    from unet_edge.export import ExportOptions, run_export

    OUT.mkdir(parents=True, exist_ok=True)
    checkpoint = default_checkpoint(OUT / "seed-order.pt")
    seed_order = run_export(
        ExportOptions(
            checkpoint=checkpoint, out=OUT, name="seed-order", formats=("onnx", "torchscript"), parity_images=0
        )
    )
    paths = [checkpoint, *(a.path for a in seed_order.artifacts)]
    if args.variants:
        paths += int8_variants(load_model(checkpoint), seed_order.folder, args.calib_images)
        cbr_checkpoint = default_checkpoint(OUT / "conv-bn-relu.pt", "conv-bn-relu")
        cbr = run_export(
            ExportOptions(
                checkpoint=cbr_checkpoint, out=OUT, name="conv-bn-relu", formats=("onnx",), fold=True, parity_images=0
            )
        )
        paths += [a.path for a in cbr.artifacts] + int8_variants(
            load_model(cbr_checkpoint), cbr.folder, args.calib_images, naive=False
        )
    spec = BenchSpec(
        batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
        height=args.size,
        width=args.size,
        seconds=args.seconds,
        threads=args.threads,
        min_iters=args.min_calls,
        torch_variants=("eager", "channels-last"),
    )
    report = run_bench(paths, spec, ("cpu", "cuda", "tensorrt"), print_progress("bench"))
    (OUT / "inference.json").write_text(json.dumps(report, indent=2))

    ok = [r for r in report["results"] if r["status"] == "ok"]

    def find(
        name: str, batch: int, backend: str = "onnxruntime", provider: str = "CPUExecutionProvider"
    ) -> dict | None:
        return next(
            (
                r
                for r in ok
                if r["path"].endswith(name)
                and r["backend"] == backend
                and r["provider"] == provider
                and r["batch_size"] == batch
            ),
            None,
        )

    lines = []
    for batch in spec.batch_sizes:
        eager = find("seed-order.pt", batch, "pytorch", "cpu")
        fp32 = find("seed-order/model.onnx", batch)
        if eager and fp32:
            lines.append(
                f"- batch {batch}: ONNX Runtime CPU fp32 p50 / PyTorch eager p50 = "
                f"{fp32['latency_ms']['p50']:.1f} / {eager['latency_ms']['p50']:.1f} ms = "
                f"**{fp32['latency_ms']['p50'] / eager['latency_ms']['p50']:.2f}**; roofline fraction: ONNX Runtime "
                f"**{fp32['roofline_fraction']:.2f}**, PyTorch eager {eager['roofline_fraction']:.2f}"
            )
        for order in ("seed-order", "conv-bn-relu"):
            base = find(f"{order}/model.onnx", batch)
            for variant in ("model_int8.onnx", "model_int8_naive.onnx", "model_fp16.onnx"):
                row = find(f"{order}/{variant}", batch)
                if base and row:
                    lines.append(
                        f"- batch {batch}, {order} {variant}: p50 {row['latency_ms']['p50']:.1f} ms = "
                        f"**{row['latency_ms']['p50'] / base['latency_ms']['p50']:.2f}×** its fp32 ONNX; file "
                        f"{base['file_mb']:.2f} → {row['file_mb']:.2f} MB (**{base['file_mb'] / row['file_mb']:.2f}×** smaller)"
                    )
    help_ms, torch_ms = command_ms(
        [str(Path(sys.executable).with_name("unet-edge")), "--help"], [sys.executable, "-c", "import torch"]
    )
    machine = report["machine"]
    body = f"""## Inference: default-size UNetStudent (base 32, depth 4), 3×{args.size}×{args.size}

Command: `.venv/bin/python benchmarks/run_inference.py --seconds {args.seconds:g} --min-calls {args.min_calls}` ({time.strftime("%Y-%m-%d")})

Machine: {machine["cpu"]} (int8/bf16 instructions: {", ".join(machine["cpu_int8_bf16"]) or "none"}), {machine["cores"]} cores,
{machine["threads"]} threads for PyTorch and ONNX Runtime alike; GPU: {machine["gpu"] or "none"};
torch {machine["torch"]}, onnxruntime {machine["onnxruntime"]}, Python {machine["python"]}.
Reference rates, measured GEMM at the start of the run with the same threads (fp32: best of torch.mm and
ONNX Runtime MatMul; int8: ONNX Runtime MatMulInteger u8s8; 2048²), which the "roofline" column divides by:
{", ".join(f"{k} {v:.1f} {'GOP/s' if k.endswith('int8') else 'GFLOP/s'}" for k, v in machine["matmul_gflops_per_s"].items())}. A measured rate, not a peak
(benchmarks/int8_profile.py prints the theoretical peak beside it): fractions above 1 are possible.

Backends are timed interleaved (blocks of calls, round-robin) so a noisy neighbour affects all alike;
throughput = batch / p50. GFLOP counted once with `torch.utils.flop_counter` (2 × multiply-accumulate).

{to_markdown(report)}
Ratios that matter (same run):

{chr(10).join(lines)}

Start-up: `unet-edge --help` {help_ms:.0f} ms against `python -c "import torch"` {torch_ms:.0f} ms (median of 5; the CLI imports torch only inside commands).
"""
    write_section(README, "inference", body)
    print(body)


if __name__ == "__main__":
    main()
