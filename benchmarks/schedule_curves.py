"""The schedule behind the students' seed lottery: val mIoU per epoch of runs trained for 20 epochs and for the
schedule `unet-edge train` picks for the set's size, read from their metrics.jsonl, against the crops seen.

Each GROUP is LABEL=GLOB (run folders). For every run the section gives its best val mIoU, the epoch of that best,
how far the curve still climbed over the last quarter of the run (best of the last quarter minus best of the third
quarter: a run that has levelled off climbs about 0) and the learning rate there; per group, mean ± sd of the bests
and the spread (max - min). The picture (benchmarks/schedule-curves.png) draws every run's curve.

    python benchmarks/schedule_curves.py \\
        "digits, 20 epochs=benchmarks/out/distill-e20/runs/digits-student-b8-d3-s?" \\
        "digits, 60 epochs=benchmarks/out/distill/runs/digits-student-b8-d3-s?"
"""

from __future__ import annotations

import argparse
import glob
import json
import shlex
import statistics
import sys
from pathlib import Path

from common import HERE, README, write_section

SECTION = "schedule-curves"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="+", metavar="LABEL=GLOB")
    parser.add_argument("--train-images", type=int, default=240, help="images per epoch, for the crops axis")
    parser.add_argument("--png", type=Path, default=HERE / "schedule-curves.png")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    return parser.parse_args()


def read_run(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def late_climb(curve: list[float]) -> float:
    """Best of the last quarter of the epochs minus best of the quarter before it."""
    quarter = max(1, len(curve) // 4)
    return max(curve[-quarter:]) - max(curve[-2 * quarter : -quarter])


def main() -> None:
    args = parse_args()
    groups: list[tuple[str, list[tuple[str, list[dict]]]]] = []
    for spec in args.groups:
        label, _, pattern = spec.partition("=")
        folders = sorted(Path(p) for p in glob.glob(pattern) if (Path(p) / "metrics.jsonl").is_file())
        if not folders:
            raise SystemExit(f"error: {pattern}: no run folder with a metrics.jsonl")
        groups.append((label, [(folder.name, read_run(folder)) for folder in folders]))

    lines = [
        "## Students and the schedule: val mIoU per epoch, 20 epochs against the default schedule",
        "",
        "| group | run | epochs | best val mIoU | best at epoch | climb over the last quarter | per-class IoU at best |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    summary = ["", "| group | runs | best val mIoU, mean ± sd | spread (max - min) |", "| --- | ---: | ---: | ---: |"]
    for label, runs in groups:
        bests = []
        for name, records in runs:
            curve = [r["miou"] for r in records]
            best = max(records, key=lambda r: r["miou"])
            bests.append(best["miou"])
            per_class = " ".join(f"{v:.2f}" for v in best["per_class_iou"].values())
            lines.append(
                f"| {label} | {name} | {len(curve)} | {best['miou']:.3f} | {best['epoch']} | "
                f"{late_climb(curve):+.3f} | {per_class} |"
            )
        spread = statistics.stdev(bests) if len(bests) > 1 else 0.0
        summary.append(
            f"| {label} | {len(bests)} | {statistics.mean(bests):.3f} ± {spread:.3f} | {max(bests) - min(bests):.3f} |"
        )
    lines += summary
    lines += [
        "",
        f"![val mIoU per epoch]({args.png.name})",
        "",
        "Command:",
        "",
        "```",
        shlex.join(["python", "benchmarks/schedule_curves.py", *sys.argv[1:]]),
        "```",
    ]
    draw(groups, args.png, args.train_images)
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(args.readme, SECTION, text)


def draw(groups: list[tuple[str, list[tuple[str, list[dict]]]]], png: Path, train_images: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Pairs of groups (e.g. one dataset at two schedules) one above the other, one column per pair.
    rows = 2 if len(groups) > 2 and len(groups) % 2 == 0 else 1
    columns = len(groups) // rows
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), sharey=True, squeeze=False)
    places = [axes[i % rows][i // rows] for i in range(len(groups))]
    for ax, (label, runs) in zip(places, groups, strict=True):
        for name, records in runs:
            crops = [r["epoch"] * train_images / 1000 for r in records]
            ax.plot(crops, [r["miou"] for r in records], label=name.rsplit("-", 1)[-1], linewidth=1.2)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("thousand training crops seen")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("val mIoU")
    places[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
