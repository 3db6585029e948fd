"""What the Python layer costs: each C++ host of examples/cpp beside the Python runtime of the same file, on the
default-size UNetStudent (base 32, depth 4), one 3x256x256 image (batch 1), plus PyTorch eager and TorchScript.

Exports model.xml, model.pte and model.pt2 (and model.ts), builds examples/cpp (the build time is reported), times
the Python runtimes with `unet-edge bench`'s timing (interleaved, warm-up excluded) and then each C++ program's
`--repeat` calls (the runtime's call alone: PNG decoding, normalisation and argmax outside the clock), with the same
thread count. Rewrites the `cpp-hosts` section of benchmarks/README.md. Run from the repository root, alone on the
machine; where several jobs share it, `--lock FILE` holds FILE (flock) while building and timing, not while exporting:

    .venv/bin/python benchmarks/cpp_hosts.py [--calls 50] [--seconds 3] [--threads N] [--lock FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from common import HERE, OUT, README, write_section
from run_inference import default_checkpoint

SOURCE = HERE.parent / "examples" / "cpp"
# C++ program -> (the file it runs, the runtime's name in the table)
HOSTS = {
    "unet_openvino": ("model.xml", "OpenVINO (CPU plugin)"),
    "unet_executorch": ("model.pte", "ExecuTorch (XNNPACK)"),
    "unet_aoti": ("model.pt2", "AOTInductor (pt2)"),
}


def export(checkpoint: Path, size: int) -> Path:
    from unet_edge.export import ExportOptions, run_export

    options = ExportOptions(
        checkpoint=checkpoint,
        out=OUT,
        name="cpp-hosts",
        formats=("torchscript", "openvino", "executorch", "pt2"),
        parity_images=0,
        format_options={"max_batch": 1, "max_size": size},  # ExecuTorch plans its memory for these bounds
    )
    return run_export(options).folder


def build(build_dir: Path) -> float:
    """Configure and build examples/cpp from scratch (two jobs); the seconds it took."""
    import shutil

    shutil.rmtree(build_dir, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(
        ["cmake", "-S", str(SOURCE), "-B", str(build_dir), f"-DPython3_EXECUTABLE={sys.executable}"],
        check=True,
        capture_output=True,
    )
    subprocess.run(["cmake", "--build", str(build_dir), "-j2"], check=True, capture_output=True)
    return time.perf_counter() - started


def time_host(program: Path, model: Path, image: Path, calls: int, threads: int) -> dict:
    args = [str(program), str(model), str(image), str(OUT / "cpp-mask.png"), "--repeat", str(calls)]
    if program.name != "unet_executorch":  # XNNPACK's pool stays at its default: one thread per core
        args += ["--threads", str(threads)]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{program.name}: {done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50, help="timed calls of each C++ host (at least 30)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed budget of each Python row")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="threads for every runtime (default: one per core)")
    parser.add_argument("--lock", type=Path, default=None, help="a file to hold locked while building and timing")
    args = parser.parse_args()
    if args.calls < 30:
        parser.error("--calls must be at least 30")

    from PIL import Image

    from unet_edge.bench import BenchSpec, run_bench, to_markdown
    from unet_edge.cpuinfo import cpu_flags
    from unet_edge.formats import default_threads
    from unet_edge.synth import render_sample

    threads = args.threads or default_threads()
    OUT.mkdir(parents=True, exist_ok=True)
    checkpoint = default_checkpoint(OUT / "cpp-hosts.pt")
    started = time.perf_counter()
    folder = export(checkpoint, args.size)
    export_s = time.perf_counter() - started
    with contextlib.ExitStack() as held:
        if args.lock is not None:
            lock = held.enter_context(open(args.lock, "a"))
            print(f"waiting for {args.lock}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        load_before = os.getloadavg()
        build_s = build(OUT / "cpp-build")
        image = OUT / "cpp-image.png"
        Image.fromarray(render_sample(0, 1, args.size)[0]).save(image)
        paths = [checkpoint, folder / "model.ts", *(folder / file for file, _ in HOSTS.values())]
        spec = BenchSpec(
            batch_sizes=(1,), height=args.size, width=args.size, seconds=args.seconds, threads=threads, min_iters=30
        )
        report = run_bench(paths, spec, ("cpu",))
        hosts = {
            name: time_host(OUT / "cpp-build" / name, folder / file, image, args.calls, threads)
            for name, (file, _) in HOSTS.items()
        }
        load_after = os.getloadavg()
    (OUT / "cpp-hosts-python.json").write_text(json.dumps(report, indent=2))
    python_p50 = {Path(r["path"]).name: r["latency_ms"]["p50"] for r in report["results"] if r["status"] == "ok"}
    (OUT / "cpp-hosts.json").write_text(json.dumps(hosts, indent=2))

    rows = ["| runtime | file | Python p50 ms | C++ p50 ms | C++ min ms | Python − C++ |", "|---|---|---|---|---|---|"]
    for name, (file, runtime) in HOSTS.items():
        py, cpp = python_p50.get(file), hosts[name]
        gap = f"{py - cpp['p50_ms']:+.2f} ms ({py / cpp['p50_ms']:.2f}×)" if py else "n/a"
        py_text = f"{py:.2f}" if py else "not measured"
        rows.append(f"| {runtime} | `{file}` | {py_text} | {cpp['p50_ms']:.2f} | {cpp['min_ms']:.2f} | {gap} |")
    machine = report["machine"]
    command = "python " + " ".join(["benchmarks/cpp_hosts.py", *sys.argv[1:]])
    flags = ", ".join(machine["cpu_int8_bf16"]) or "none"
    avx = "AVX-512" if "avx512f" in cpu_flags() else "AVX2" if "avx2" in cpu_flags() else "no AVX2"
    body = f"""## C++ hosts beside the Python runtimes: default-size UNetStudent, 1×3×{args.size}×{args.size}

Command: `{command}` ({time.strftime("%Y-%m-%d")}; exports took {export_s:.0f} s, a clean build of examples/cpp
(configure + `cmake --build -j2`, all three programs) {build_s:.0f} s; 1-minute load average
{load_before[0]:.2f} before the build, {load_after[0]:.2f} after the timing)

Machine: {machine["cpu"]} ({avx}; int8/bf16 instructions: {flags}), {machine["cores"]} cores, {threads} threads for
every runtime (ExecuTorch: XNNPACK's default pool, one thread per core, in both languages); {platform.system()},
torch {machine["torch"]}. Python rows: `unet-edge bench`'s timing of each file's backend (interleaved, warm-up
excluded, at least 30 calls); C++ rows: {args.calls} calls of the runtime's inference call after one warm-up, PNG
decoding, normalisation and argmax outside the clock. The pt2 package was compiled here, for this CPU.

{chr(10).join(rows)}

The same Python run, PyTorch eager and TorchScript beside the pt2 package:

{to_markdown(report)}"""
    write_section(README, "cpp-hosts", body)
    print(body)


if __name__ == "__main__":
    main()
