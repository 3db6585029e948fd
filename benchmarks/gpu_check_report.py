"""The Python half of `benchmarks/gpu_check.sh`: the versions it prints first, the training-quality check,
and the JSON and Markdown summary it writes last.

    python benchmarks/gpu_check_report.py versions WORK/versions.json [--require-cuda]
    python benchmarks/gpu_check_report.py train-check RUN/metrics.jsonl --min-miou 0.95
    python benchmarks/gpu_check_report.py summary WORK OUT
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any


def versions(path: Path, require_cuda: bool) -> int:
    """Print and save the GPU, driver, torch, CUDA and runtime versions; 1 when CUDA is required and absent."""
    import onnx
    import onnxruntime
    import torch
    import torchvision

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            {
                "gpu": props.name,
                "gpu_count": torch.cuda.device_count(),
                "compute_capability": f"{props.major}.{props.minor}",
                "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "cudnn": torch.backends.cudnn.version(),
                "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False),
            }
        )
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        done = subprocess.run(query, capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    for key, value in info.items():
        print(f"{key:>26}: {value}")
    path.write_text(json.dumps(info, indent=2) + "\n")
    if require_cuda and not info["cuda_available"]:
        print("error: PyTorch sees no CUDA GPU: run with --cpu-smoke on a machine without one", file=sys.stderr)
        return 1
    return 0


def train_check(metrics: Path, min_miou: float | None, save: Path | None) -> int:
    """Print (and `save`) the run's best val mIoU and images/s; 1 when the best mIoU is below `min_miou`."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not records:
        print(f"error: {metrics}: no epoch records", file=sys.stderr)
        return 1
    best = max(records, key=lambda r: r.get("miou") or 0.0)
    last = records[-1]
    line = (
        f"best val mIoU {best['miou']:.4f} at epoch {best['epoch']} of {last['epoch']}; last epoch "
        f"{last['train_images_per_s']:.1f} images/s, waiting for data {last['data_time_s']:.2f} s of {last['epoch_time_s']:.2f} s"
    )
    print(line)
    if save is not None:
        save.write_text(line + "\n")
    if min_miou is not None and (best["miou"] or 0.0) < min_miou:
        print(f"error: {metrics}: best val mIoU {best['miou']:.4f} is below the demo's {min_miou}", file=sys.stderr)
        return 1
    return 0


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _bench_rows(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Measured rows of all `reports` with p50 latency, images/s, and the ratio of images/s against eager
    fp32 PyTorch of the same batch, size and device (from whichever report holds it)."""
    rows = []
    for report in reports:
        for r in report["results"]:
            rows.append(
                {
                    "model": Path(r["path"]).name,
                    "backend": r["backend"],
                    "variant": r.get("variant"),
                    "provider": r["provider"],
                    "precision": r["precision"],
                    "batch": r["batch_size"],
                    "size": f"{r['height']}x{r['width']}",
                    "p50_ms": (r["latency_ms"] or {}).get("p50"),
                    "images_per_s": r["throughput_ips"],
                    "status": r["status"],
                }
            )
    baselines = {
        (row["provider"], row["batch"], row["size"]): row["images_per_s"]
        for row in rows
        if row["backend"] == "pytorch"
        and row["variant"] == "eager"
        and row["precision"] == "fp32"
        and row["images_per_s"]
    }
    for row in rows:
        base = baselines.get((row["provider"], row["batch"], row["size"]))
        row["vs_eager_fp32"] = row["images_per_s"] / base if base and row["images_per_s"] else None
    return rows


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def summary(work: Path, out: Path, mode: str) -> int:
    """Write OUT/gpu_check.json and OUT/gpu_check.md from what the steps left in WORK and OUT."""
    steps = []
    for line in (work / "steps.tsv").read_text().splitlines():
        name, status, seconds, detail = line.split("\t")
        steps.append({"step": name, "status": status, "seconds": float(seconds), "detail": detail})
    bench = _bench_rows([_read_json(path) for path in sorted(out.glob("bench_*.json"))])
    verify = {path.stem: _read_json(path) for path in sorted(work.glob("verify_*.json"))}
    train = work / "train_check.txt"
    sweep = work / "sweep.md"
    passed = all(step["status"] != "failed" for step in steps)
    report = {
        "mode": mode,
        "passed": passed,
        "versions": _read_json(work / "versions.json"),
        "steps": steps,
        "train": train.read_text().strip() if train.is_file() else None,
        "verify": {
            name: [
                {"artifact": Path(a["path"]).name, "provider": a.get("provider"), "passed": a["passed"]}
                for a in v["artifacts"]
            ]
            for name, v in verify.items()
        },
        "bench": bench,
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")

    lines = [f"# unet-edge GPU check ({mode}): {'passed' if passed else 'FAILED'}", ""]
    lines += [f"- {key}: {value}" for key, value in (report["versions"] or {}).items()]
    lines += ["", "| step | status | seconds | detail |", "| --- | --- | ---: | --- |"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']:.1f} | {s['detail']} |" for s in steps]
    if report["train"]:
        lines += ["", "## Training", "", report["train"]]
    if sweep.is_file():
        lines += ["", sweep.read_text().strip()]
    for name, results in report["verify"].items():
        lines += ["", f"## {name}", ""] + [
            f"- {a['artifact']} on {a['provider']}: {'pass' if a['passed'] else 'FAIL'}" for a in results
        ]
    if bench:
        lines += [
            "",
            "## Inference",
            "",
            "| model | backend | variant | provider | precision | batch | size | p50 ms | images/s | vs eager fp32 | status |",
            "| --- | --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: | --- |",
        ]
        lines += [
            f"| {r['model']} | {r['backend']} | {r['variant'] or '-'} | {r['provider']} | {r['precision'] or '-'} | {_cell(r['batch'])} | "
            f"{r['size']} | {_cell(r['p50_ms'])} | {_cell(r['images_per_s'], 1)} | {_cell(r['vs_eager_fp32'])} | {r['status']} |"
            for r in bench
        ]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("versions")
    cmd.add_argument("path", type=Path)
    cmd.add_argument("--require-cuda", action="store_true")
    cmd = commands.add_parser("train-check")
    cmd.add_argument("metrics", type=Path)
    cmd.add_argument("--min-miou", type=float, default=None)
    cmd.add_argument("--save", type=Path, default=None)
    cmd = commands.add_parser("summary")
    cmd.add_argument("work", type=Path)
    cmd.add_argument("out", type=Path)
    cmd.add_argument("--mode", default="gpu")
    args = parser.parse_args()
    if args.command == "versions":
        return versions(args.path, args.require_cuda)
    if args.command == "train-check":
        return train_check(args.metrics, args.min_miou, args.save)
    return summary(args.work, args.out, args.mode)


if __name__ == "__main__":
    sys.exit(main())
