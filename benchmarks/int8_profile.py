"""INT8 on the CPU, explained: prints every int8 figure benchmarks/README.md states, for the default-size
UNetStudent (base 32, depth 4, 4 classes) of both block orders at 3x256x256:

  * the CPU's int8/bf16 instruction sets, its measured GEMM rates (fp32: best of ONNX Runtime MatMul and
    torch.mm; int8: MatMulInteger u8s8; 2048² and 4096², with --threads) and, beside them, the theoretical peak from
    vector width x FMA units x clock x cores (the clock /proc/cpuinfo reports; boost clocks can beat it);
  * node counts of ONNX Runtime's optimised graph (what stays in float, Transpose, Q/DQ left over);
  * operator time shares from ONNX Runtime's profiler, and QLinearConv's achieved rate;
  * p50/p90/p99 at each batch size, timed interleaved: fp32 as exported (seed order unfolded, conv-bn-relu
    folded), fp32 with the plain exact fold (seed order: the C+1 ones channel), int8 as exported (the
    int8 layout of fold.py), int8 from the plain fold (the earlier export) and, for the seed order, int8
    of the unfolded graph.

Run from the repository root (alone on the machine for figures worth quoting):

    .venv/bin/python benchmarks/int8_profile.py [--threads 2] [--seconds 6] [--min-calls 30] [--batch-sizes 1,8]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "int8"
WATCHED_OPS = (
    "QLinearConv",
    "Conv",
    "FusedConv",
    "BatchNormalization",
    "ConvTranspose",
    "DepthToSpace",
    "Resize",
    "Transpose",
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConcat",
    "Concat",
)


def cpu_facts() -> dict:
    """Model, logical CPUs, reported clock, vector width and int8/bf16 flags of this CPU."""
    from unet_edge.bench import cpu_int8_bf16_flags
    from unet_edge.formats.base import default_threads

    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""

    def field(name: str) -> str | None:
        return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(name)), None)

    flags = (field("flags") or "").split()
    return {
        "cpu": field("model name") or "unknown",
        "logical_cpus": default_threads(),
        "mhz": float(field("cpu MHz") or 0.0),
        "vector_bits": 512 if "avx512f" in flags else 256 if "avx2" in flags else 128,
        "int8_bf16": cpu_int8_bf16_flags(text),
    }


def theoretical_peaks(facts: dict, fma_units: int, cores: int) -> dict[str, float | None]:
    """GFLOP/s (fp32) and GOP/s (int8, only with VNNI: 4 u8 x s8 products per 32-bit lane per instruction)
    as cores x clock x FMA units x lanes x ops per lane."""
    ghz, lanes = facts["mhz"] / 1000.0, facts["vector_bits"] // 32
    vnni = any(f in facts["int8_bf16"] for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    return {
        "fp32": cores * ghz * fma_units * lanes * 2,
        "int8": cores * ghz * fma_units * lanes * 4 * 2 if vnni else None,
    }


def build_models(threads: int, calib_images: int) -> dict[str, dict[str, Path]]:
    """Per block order, the fp32 and int8 ONNX files to compare (see the module docstring)."""
    from run_inference import default_checkpoint

    from unet_edge.artifact import artifact_metadata
    from unet_edge.checkpoint import load_model
    from unet_edge.data import load_eval_images
    from unet_edge.formats.onnx import export_onnx
    from unet_edge.formats.onnx_quantize import float_source, quantize_int8
    from unet_edge.synth import ensure_synth

    OUT.mkdir(parents=True, exist_ok=True)
    models: dict[str, dict[str, Path]] = {}
    for order in ("conv-relu-bn", "conv-bn-relu"):
        folder = OUT / order
        folder.mkdir(exist_ok=True)
        loaded = load_model(default_checkpoint(folder / "model.pt", order))
        calibration = load_eval_images(
            ensure_synth(), loaded.mean, loaded.std, split="train", num_images=calib_images
        ).normalised
        files = {
            "fp32 unfolded": export_onnx(loaded.model, folder / "fp32-unfolded.onnx", artifact_metadata(loaded, "fp32"))
        }
        files["fp32 plain fold"] = float_source(loaded, folder, True, 18)[0].rename(folder / "fp32-fold.onnx")
        layout = float_source(loaded, folder, True, 18, int8_layout=True)[0].rename(folder / "fp32-int8-layout.onnx")
        files["int8 (export: int8 layout)"] = quantize_int8(
            layout, folder / "int8-layout.onnx", calibration, workdir=folder
        )
        files["int8 plain fold"] = quantize_int8(
            files["fp32 plain fold"], folder / "int8-fold.onnx", calibration, workdir=folder
        )
        if order == "conv-relu-bn":
            files["int8 unfolded"] = quantize_int8(
                files["fp32 unfolded"], folder / "int8-unfolded.onnx", calibration, workdir=folder
            )
        models[order] = files
    return models


def session(path: Path, threads: int, *, optimized: Path | None = None, profile: bool = False):
    import onnxruntime as ort

    from unet_edge.formats.onnx import session_options

    options = session_options(threads)
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = str(OUT / "profile")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def node_counts(path: Path, threads: int) -> dict[str, int]:
    """Op types of ONNX Runtime's optimised graph (level ALL, as bench runs it)."""
    import onnx

    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session(path, threads, optimized=optimized)
        ops = collections.Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
    return {op: ops[op] for op in WATCHED_OPS if ops[op]} | {"total": sum(ops.values())}


def operator_shares(path: Path, threads: int, runs: int, image: np.ndarray) -> tuple[dict[str, float], float]:
    """Share of kernel time per op type over `runs` profiled calls (after one unprofiled warm-up call
    in the same session), and the mean kernel time per call in ms."""
    sess = session(path, threads, profile=True)
    feed = {sess.get_inputs()[0].name: image}
    sess.run(None, feed)
    for _ in range(runs):
        sess.run(None, feed)
    trace = Path(sess.end_profiling())
    events = [e for e in json.loads(trace.read_text()) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    trace.unlink()
    per_op: dict[str, float] = collections.defaultdict(float)
    for event in events[len(events) // (runs + 1) :]:  # drop the warm-up call
        per_op[event["args"]["op_name"]] += event["dur"]
    total = sum(per_op.values())
    return {op: t / total for op, t in sorted(per_op.items(), key=lambda kv: -kv[1])}, total / runs / 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads for every session and the GEMM reference (default: one per core)",
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per model and batch size")
    parser.add_argument(
        "--min-calls", type=int, default=30, help="timed calls per model and batch size at least (p99 needs many)"
    )
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--profile-runs", type=int, default=10)
    parser.add_argument("--calib-images", type=int, default=16)
    parser.add_argument(
        "--fma-units", type=int, default=2, help="vector FMA units per core assumed for the theoretical peak"
    )
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    from common import WARMUP, latency_stats, print_progress, time_interleaved

    from unet_edge.bench import count_gflops, measure_matmul_gflops
    from unet_edge.formats.base import default_threads

    ort.set_default_logger_severity(3)  # saving an optimised graph warns that it is hardware-specific: known

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)  # for torch.mm in the fp32 GEMM reference
    facts = cpu_facts()
    peaks = theoretical_peaks(facts, args.fma_units, threads)
    print(
        f"## CPU: {facts['cpu']}, {facts['logical_cpus']} logical CPUs, {threads} threads used, reported clock {facts['mhz']:.0f} MHz"
    )
    print(
        f"int8/bf16 instruction sets: {', '.join(facts['int8_bf16']) or 'none'}; vector width {facts['vector_bits']} bits\n"
    )
    print("| reference | GEMM 2048² | GEMM 4096² | theoretical peak |\n| --- | ---: | ---: | ---: |")
    best_rate = {}
    for precision, unit in (("fp32", "GFLOP/s"), ("int8", "GOP/s")):
        rates = [measure_matmul_gflops("cpu", precision, size=n, seconds=2.0, threads=threads) for n in (2048, 4096)]
        best_rate[precision] = max(rates)
        peak = peaks[precision]
        print(
            f"| {precision} ({unit}), measured {'ONNX Runtime MatMulInteger u8s8' if precision == 'int8' else 'best of ONNX Runtime MatMul and torch.mm'} "
            f"| {rates[0]:.0f} | {rates[1]:.0f} | {f'{peak:.0f}' if peak else 'n/a (no VNNI)'} |"
        )
    print(
        f"\nPeak = {threads} cores x {facts['mhz'] / 1000:.2f} GHz x {args.fma_units} FMA units x {facts['vector_bits'] // 32} 32-bit lanes "
        "x 2 (fp32) or x 4 x 2 (int8 VNNI); measured rates above it mean the cores run above the reported clock.\n"
    )

    models = build_models(threads, args.calib_images)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, 3, args.size, args.size), dtype=np.float32)
    gflops = count_gflops({"num_classes": 4, "base_channels": 32, "depth": 4}, args.size, args.size)
    int8_rate, int8_peak = best_rate["int8"], peaks["int8"]
    for order, files in models.items():
        print(f"## {order}\n\nNode counts of the optimised graph (ONNX Runtime, level ALL):\n")
        counts = {name: node_counts(path, threads) for name, path in files.items()}
        ops = [op for op in (*WATCHED_OPS, "total") if any(op in c for c in counts.values())]
        print("| model | " + " | ".join(ops) + " |\n|---|" + "---:|" * len(ops))
        for name, c in counts.items():
            print(f"| {name} | " + " | ".join(str(c.get(op, 0)) for op in ops) + " |")
        print(f"\nOperator time shares at batch 1 ({args.profile_runs} profiled calls):\n")
        for name in (n for n in files if n.startswith("int8")):
            shares, per_call = operator_shares(files[name], threads, args.profile_runs, image)
            conv_ms = shares.get("QLinearConv", 0.0) * per_call
            rate = gflops / (conv_ms / 1000.0) if conv_ms else 0.0
            print(
                f"- {name}: "
                + ", ".join(f"{op} {share:.0%}" for op, share in shares.items() if share >= 0.005)
                + f"; kernels {per_call:.1f} ms per call; QLinearConv {rate:.0f} GOP/s of the model's {gflops:.1f} GOP"
                f" = {rate / int8_rate:.2f} of the best measured int8 GEMM rate ({int8_rate:.0f} GOP/s)"
                + (
                    f", {rate / int8_peak:.2f} of the theoretical int8 peak ({int8_peak:.0f} GOP/s)"
                    if int8_peak
                    else ""
                )
            )
        print()
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            sessions = [session(path, threads) for path in files.values()]
            x = rng.standard_normal((batch, 3, args.size, args.size), dtype=np.float32)
            runners = [lambda s=s, x=x: s.run(None, {s.get_inputs()[0].name: x}) for s in sessions]
            latencies = time_interleaved(
                runners,
                warmup=WARMUP,
                iters=None,
                seconds=args.seconds,
                min_iters=args.min_calls,
                progress=print_progress(f"{order}, batch {batch}"),
            )
            stats = [latency_stats(lat) for lat in latencies]
            base = stats[list(files).index("fp32 unfolded" if order == "conv-relu-bn" else "fp32 plain fold")]["p50"]
            print(f"Batch {batch}, {args.size}x{args.size}, interleaved (ratio = p50 / fp32 as exported):\n")
            print("| model | calls | p50 ms | p90 ms | p99 ms | ratio |\n|---|---:|---:|---:|---:|---:|")
            for name, lat, s in zip(files, latencies, stats):
                print(
                    f"| {name} | {len(lat)} | {s['p50']:.1f} | {s['p90']:.1f} | {s['p99']:.1f} | {s['p50'] / base:.2f} |"
                )
            print()


if __name__ == "__main__":
    main()
