"""Deploy benchmark: `unet-edge deploy` over a teacher (base 32, depth 4) and students of base 8 and 16 on the
digits scenes of train_quality.py, at 1x3x256x256 with 2 threads; the section it writes names the winner, its
ratio to the reference checkpoint's PyTorch eager p50 measured in the same run, and the CPU's flags.

Checkpoints are taken from the arguments, or trained where missing (`unet-edge train` on the digits scenes
as train_quality.py builds them; students distilled from the teacher with `--teacher` when the train
command has it, alone otherwise, and the section says which). Each run writes the section of its CPU kind
(the CPU model and its int8/bf16 flags), so runs on other CPU kinds add sections beside it.

    python benchmarks/deploy.py                                  # train what is missing, deploy, write the section
    python benchmarks/deploy.py --teacher T.pt --students S8.pt,S16.pt --conditions "alone on the machine"

Timing figures depend on what else runs on the machine; the ratios of one deploy run do much less, since
every candidate and the eager baseline are timed interleaved. `--conditions` states them in the section.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from common import OUT, README, write_section
from train_quality import write_digits

TARGET_RATIO = 0.10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, help="teacher checkpoint (default: train base 32, depth 4)")
    parser.add_argument(
        "--students",
        default="",
        help="comma-separated student checkpoints (default: train base 8 and base 16, depth 4)",
    )
    parser.add_argument(
        "--student-widths", default="8,16", help="base channels of the students trained when --students is not given"
    )
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--work", type=Path, default=OUT / "deploy", help="dataset, runs and the deploy output")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--train-images", type=int, default=240)
    parser.add_argument("--val-images", type=int, default=60)
    parser.add_argument(
        "--distill",
        choices=("auto", "yes", "no"),
        default="auto",
        help="students distilled from the teacher (auto: when `unet-edge train` has --teacher)",
    )
    parser.add_argument("--image-size", default="256")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--min-calls", type=int, default=30)
    parser.add_argument("--max-miou-drop", type=float, default=0.01)
    parser.add_argument(
        "--reference", type=Path, help="deploy's --reference (default: the most accurate checkpoint given)"
    )
    parser.add_argument("--formats", default="all")
    parser.add_argument("--precisions", default="fp32,fp16,bf16,int8")
    parser.add_argument(
        "--conditions", default="", help="what else ran on the machine during the run, stated in the section"
    )
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    parser.add_argument(
        "--train-only",
        action="store_true",
        help="train the missing checkpoints and stop (deploy later, on a quiet machine)",
    )
    return parser.parse_args()


def unet_edge(*args: str) -> list[str]:
    return [sys.executable, "-m", "unet_edge_cli.main", *args]


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def train_has_teacher() -> bool:
    out = subprocess.run(unet_edge("train", "--help"), capture_output=True, text=True, env={"COLUMNS": "200", **_env()})
    return "--teacher" in out.stdout


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def train(data: Path, runs: Path, name: str, base: int, args: argparse.Namespace, teacher: Path | None = None) -> Path:
    """runs/NAME/best.pt, trained with `unet-edge train` unless it is there already."""
    best = runs / name / "best.pt"
    if best.is_file():
        say(f"{name}: using {best}")
        return best
    command = unet_edge(
        "train",
        "--data",
        str(data),
        "--epochs",
        str(args.epochs),
        "--base-channels",
        str(base),
        "--depth",
        str(args.depth),
        "--device",
        "cpu",
        "--out",
        str(runs),
        "--name",
        name,
        *(("--teacher", str(teacher)) if teacher else ()),
    )
    say(f"training {name}: {shlex.join(command[2:])}")
    start = time.perf_counter()
    subprocess.run(command, check=True)
    say(f"{name}: trained in {time.perf_counter() - start:.0f} s")
    return best


def cpu_flags() -> list[str]:
    """The CPU's int8/bf16 flags as /proc/cpuinfo lists them (what the README's figures are named by)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted(set(re.findall(r"\b(avx512_vnni|avx_vnni|avx512_bf16|amx_int8|amx_bf16|avx512_fp16)\b", text)))


def how_trained(checkpoint: Path) -> str:
    """Alone, or distilled from which teacher with which term, as the checkpoint records it."""
    from unet_edge.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    settings = state.get("train_config") or {}
    epochs = f"best at epoch {state.get('epoch')} of {settings.get('epochs')}"
    teacher = state.get("teacher")
    if not teacher:
        return f"trained alone, {epochs}"
    term = f"{settings.get('distill_loss')}, T {settings.get('distill_temperature')}, weight {settings.get('distill_weight')}"
    return f"distilled from {Path(teacher.get('path', '?')).parent.name} ({term}), {epochs}"


def num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def section(
    report: dict, command: list[str], args: argparse.Namespace, students_how: str, flags: list[str], wall_s: float
) -> tuple[str, str]:
    """(the CPU kind, the Markdown section for it)."""
    machine, settings, baseline = report["machine"], report["settings"], report["baseline"]
    kind = f"{machine['cpu']} ({', '.join(flags) or 'no int8/bf16 flags'})"
    eager = (baseline.get("latency_ms") or {}).get("p50")
    rows = {row["key"]: row for row in report["candidates"]}
    winner = rows.get(report["winner"]) if report["winner"] else None
    size = "×".join(str(v) for v in settings["image_size"])
    lines = [
        f"## Deploy on {kind}",
        "",
        f"Command (`benchmarks/deploy.py`, {date.today().isoformat()}, deploy took {wall_s:.0f} s): `{shlex.join(['unet-edge', *command[3:]])}`",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, CPU flags {', '.join(flags) or 'none of avx512_vnni/avx_vnni/avx512_bf16/amx_int8'}; "
        f"{settings['threads']} threads for every runtime, batch {settings['batch_size']}, {size}; torch {machine['torch']}, onnxruntime {machine['onnxruntime']}.",
        f"Conditions: {args.conditions or 'not stated'}.",
        f"Checkpoints on the digits scenes ({args.train_images} train / {settings['validation_images']} val, train_quality.py's); "
        f"students {students_how}. Reference: {report['reference']['model']} "
        f"({report['reference']['architecture']}, val mIoU {report['reference']['miou']:.4f}); budget: val mIoU drop ≤ {settings['max_miou_drop']}.",
        "",
    ]
    for name, info in report["reference"]["checkpoints"].items():
        lines.append(
            f"- {name}: {info['architecture']}, val mIoU {info['miou']:.4f} (PyTorch eager), {how_trained(Path(info['path']))}"
        )
    lines += [
        "",
        "| | model | format | precision | val mIoU | drop | agreement | p50 ms | p90 ms | app p50 ms | × eager | MB | status |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    if eager is not None:
        lines.append(
            f"| | {baseline['model']} (reference) | pytorch eager | fp32 | {report['reference']['miou']:.4f} | 0.0000 | 1.0000 | "
            f"{num(eager)} | {num(baseline['latency_ms']['p90'])} | {num(baseline['app_latency_ms']['p50'])} | 1.00 | - | baseline |"
        )
    for row in report["candidates"]:
        lat, app = row["latency_ms"] or {}, row["app_latency_ms"] or {}
        mark = "★" if row["winner"] else "◆" if row["pareto"] else ""
        status = "winner" if row["winner"] else "ok" if row["rejected"] is None else row["rejected"].replace("|", "/")
        ratio = num(lat["p50"] / eager, 3) if lat and eager else "-"
        lines.append(
            f"| {mark} | {row['model']} | {row['format']} | {row['precision']} | {num(row['miou'], 4)} | {num(row['miou_drop'], 4)} | "
            f"{num(row['pixel_agreement'], 4)} | {num(lat.get('p50'))} | {num(lat.get('p90'))} | {num(app.get('p50'))} | {ratio} | {num(row['size_mb'])} | {status} |"
        )
    skipped = "; ".join(
        f"{s['format']}{' ' + s['precision'] if s['precision'] else ''}: {s['reason']}" for s in report["skipped"]
    )
    lines += [
        "",
        "★ winner, ◆ Pareto front (latency against val mIoU, among the candidates within the budget)."
        + (f" Skipped: {skipped}." if skipped else ""),
        "",
    ]
    if winner is None:
        closest = rows.get(report["closest"]) if report["closest"] else None
        near = (
            f"{closest['model']} {closest['format']} {closest['precision']} (drop {closest['miou_drop']:.4f})"
            if closest
            else "none measured"
        )
        lines.append(f"**No candidate within the budget on {kind}**; the closest: {near}.")
    else:
        ratio = winner["latency_ms"]["p50"] / eager if eager else None
        reached = "reached" if ratio is not None and ratio <= TARGET_RATIO else "NOT reached"
        lines.append(
            f"**Winner on {kind}: {winner['model']} ({winner['architecture']}) {winner['format']} {winner['precision']}**, p50 "
            f"{winner['latency_ms']['p50']:.2f} ms = **{num(ratio, 3)}× the reference's PyTorch eager p50** ({num(eager)} ms, same run), "
            f"val mIoU {winner['miou']:.4f} (drop {winner['miou_drop']:.4f} ≤ {settings['max_miou_drop']}); the ≤ {TARGET_RATIO:.2f}× target: {reached}."
        )
    return kind, "\n".join(lines)


def main() -> None:
    args = parse_args()

    work = args.work.resolve()
    data = work / "digits"
    if not (data / "ImageSets").is_dir():
        say(f"writing the digits scenes to {data}")
        write_digits(data, args.train_images, args.val_images)
    runs = work / "runs"
    teacher = args.teacher or train(data, runs, f"teacher-b32d{args.depth}", 32, args)
    distill = args.distill == "yes" or (args.distill == "auto" and train_has_teacher())
    if args.students:
        students = [Path(p) for p in args.students.split(",")]
        students_how = "as listed below"
    else:
        widths = [int(w) for w in args.student_widths.split(",")]
        suffix = "kd" if distill else "alone"
        students = [
            train(data, runs, f"student-b{w}d{args.depth}-{suffix}", w, args, teacher if distill else None)
            for w in widths
        ]
        students_how = f"base {', '.join(map(str, widths))}, depth {args.depth}, " + (
            "distilled from the teacher (`--teacher`)" if distill else "trained alone (no distillation)"
        )
    if args.train_only:
        return
    out = work / "deployed"
    command = unet_edge(
        "deploy",
        str(teacher),
        *map(str, students),
        "--data",
        str(data),
        "--image-size",
        args.image_size,
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--seconds",
        str(args.seconds),
        "--min-calls",
        str(args.min_calls),
        "--max-miou-drop",
        str(args.max_miou_drop),
        "--format",
        args.formats,
        "--precision",
        args.precisions,
        "--out",
        str(out),
        *(("--reference", str(args.reference)) if args.reference else ()),
    )
    say(f"deploying: {shlex.join(['unet-edge', *command[3:]])}")
    start = time.perf_counter()
    finished = subprocess.run(command)
    wall_s = time.perf_counter() - start
    report_path = out / "deploy.json"
    if not report_path.is_file():
        raise SystemExit(f"error: deploy wrote no {report_path} (exit {finished.returncode})")
    report = json.loads(report_path.read_text())
    kind, text = section(report, command, args, students_how, cpu_flags(), wall_s)
    print(text)
    if not args.no_write:
        write_section(args.readme, f"deploy {kind}", text)
        say(f"wrote the section for {kind} into {args.readme}")


if __name__ == "__main__":
    main()
