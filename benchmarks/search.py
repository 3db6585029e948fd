"""Search benchmark: on each of train_quality's datasets, `unet-edge search` within the latency budget of the
hand-made student (base 8, depth 3: the default block order and up-sampling) x 1.2, against that student
trained alone and distilled from the teacher, with the same seed and epochs (paired), and the teacher itself.
The teacher and the hand-made students are those of benchmarks/distill.py (its data and run folders, reused
when there, trained there with the same names when not), so the section also gives their 5-seed means.

The budget comes from the search's own latency table (the student's architecture timed with random weights,
fastest artifact p50 at 1x3xSIZE, `--threads` threads): latency does not depend on the weights. The section
reports per dataset the val mIoU of the teacher, the student alone and distilled, and the searched model (the
most accurate trial of the front, and what deploy ships of it), the searched model's p50 against the teacher's
eager p50, the trials and the search's wall time, with the front as a picture (benchmarks/search-DATASET.png).

Goal: the searched model >= the best hand-made student within the same budget on every dataset, and within
0.01 mIoU of the teacher at <= 0.15x the teacher's eager latency on at least two.

    python benchmarks/search.py                                    # all datasets, writes the `search` section
    python benchmarks/search.py --datasets shapes --epochs 3 --trials 4 --no-write     # a quick look

Training runs with one thread and a fixed seed, so accuracy figures do not depend on the load; latency figures
do: `--conditions` states what else ran.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from common import OUT, README, machine, print_progress, write_section
from train_quality import write_datasets


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="shapes,digits,textures")
    parser.add_argument("--work", type=Path, default=OUT / "search")
    parser.add_argument(
        "--hand-made",
        type=Path,
        default=OUT / "distill",
        help="benchmarks/distill.py's folder: its data-N-M sets and its teacher and student runs are reused",
    )
    parser.add_argument("--train-images", type=int, default=240)
    parser.add_argument("--val-images", type=int, default=60)
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs of every run, trials and hand-made students alike (default: train's schedule for the set at "
        "base 16, the runs of the recorded section)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="training batch of every run (distill.py's)")
    parser.add_argument("--teacher", default="16,4", help="base channels, depth of the teacher")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per search")
    parser.add_argument("--base-channels", default="4,6,8,12")
    parser.add_argument("--depths", default="2,3,4")
    parser.add_argument("--block-orders", default="conv-relu-bn")
    parser.add_argument("--upsample", default="transpose,bilinear")
    parser.add_argument("--formats", default="onnx,openvino")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="the seed of every trial and of the paired students")
    parser.add_argument("--seeds", type=int, default=5, help="hand-made students' seeds (0..N-1) for their means")
    parser.add_argument("--train-image-size", type=int, default=64, help="training crop of every run")
    parser.add_argument("--conditions", default="", help="what else ran on the machine, stated in the section")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    return parser.parse_args()


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(item) for item in text.split(",") if item.strip())


def hand_made(dataset: str, args: argparse.Namespace) -> dict:
    """The teacher and the base-8 depth-3 students (seeds 0..4, alone and distilled with train's defaults) of
    benchmarks/distill.py: its Runner reuses its finished runs and trains the missing ones under the same names."""
    import statistics

    from distill import Runner, tag

    data_dir = args.hand_made / f"data-{args.train_images}-{args.val_images}"
    if not (data_dir / dataset / ".complete").is_file():
        shutil.rmtree(data_dir / dataset, ignore_errors=True)
        write_datasets([dataset], data_dir, args.train_images, args.val_images)
        (data_dir / dataset / ".complete").touch()
    settings = argparse.Namespace(
        out=args.hand_made,
        epochs=args.epochs,
        epochs_given=True,
        batch_size=args.batch_size,
        image_size=args.train_image_size,
        threads=1,
        finished_only=False,
    )
    runner = Runner(settings, {dataset: data_dir / dataset})
    base, depth = ints(args.teacher)
    teacher_name = f"{dataset}-teacher-b{base}-d{depth}-s0"
    teacher = runner.train(teacher_name, dataset, 0, base, depth, [])
    options = ["--teacher", str(runner.checkpoint(teacher_name))]
    seeds = range(args.seeds)
    alone = [runner.train(f"{dataset}-student-b8-d3-s{s}", dataset, s, 8, 3, []) for s in seeds]
    distilled = [runner.train(f"{dataset}-distilled-{tag({})}-b8-d3-s{s}", dataset, s, 8, 3, options) for s in seeds]

    def spread(runs: list[dict]) -> tuple[float, float]:
        values = [run["best"] for run in runs]
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    return {
        "data": data_dir / dataset,
        "teacher": runner.checkpoint(teacher_name),
        "teacher_miou": teacher["best"],
        "alone": alone[args.seed]["best"],
        "distilled": distilled[args.seed]["best"],
        "alone_seeds": spread(alone),
        "distilled_seeds": spread(distilled),
    }


def run_dataset(name: str, args: argparse.Namespace) -> dict:
    from unet_edge.search import Architecture, SearchOptions, run_search

    made = hand_made(name, args)
    data = made["data"]
    runs = args.work / name / "runs"
    options = SearchOptions(
        name=name,
        runs_dir=runs,
        data=data,
        teacher=made["teacher"],
        base_channels=ints(args.base_channels),
        depths=ints(args.depths),
        block_orders=tuple(args.block_orders.split(",")),
        upsamples=tuple(args.upsample.split(",")),
        image_size=(args.image_size, args.image_size),
        threads=args.threads,
        formats=tuple(args.formats.split(",")),
        latency_table=args.work / "latency-table.json",
        trials=args.trials,
        workers=args.workers,
        timeout_s=args.timeout,
        epochs=args.epochs,
        train_batch_size=args.batch_size,
        train_image_size=args.train_image_size,
        seed=args.seed,
        device="cpu",
    )
    student = Architecture(8, 3, "conv-relu-bn", "transpose")
    # The whole space's table first: a row is read scaled by the table's reference anchor (search/latency.py), the
    # median of its first measurement, so the budget is read on the scale the search compares with.
    table = run_search(replace(options, latency_only=True), print_progress(f"{name} latency table"))
    budget = 1.2 * table.best_rows[student.name]["latency_ms"]["p50"]
    # The search's wall time is that of the run that trained its study; a rerun (which reuses the finished trials
    # and redoes what changed, such as the deploy step) reports the recorded figure.
    wall_file = args.work / name / "search-wall.json"
    fresh = not (runs / "search" / name / "study.db").is_file()
    started = time.perf_counter()
    result = run_search(replace(options, max_latency_ms=budget), print_progress(f"{name} search"))
    wall = time.perf_counter() - started
    if fresh:
        wall_file.write_text(json.dumps({"wall_s": wall}) + "\n")
    elif wall_file.is_file():
        wall = json.loads(wall_file.read_text())["wall_s"]
    best = max(result.front, key=lambda t: t.miou or 0.0)
    winner = result.deploy.decision.winner if result.deploy is not None else None
    picture = args.readme.with_name(f"search-{name}.png")
    if result.plot is not None and not args.no_write:
        shutil.copyfile(result.plot, picture)
    return {
        "dataset": name,
        "teacher": made["teacher_miou"],
        "teacher_ms": result.teacher_ms,
        "budget_ms": budget,
        "student_ms": table.best_rows[student.name]["latency_ms"]["p50"],
        "alone": made["alone"],
        "distilled": made["distilled"],
        "alone_seeds": made["alone_seeds"],
        "distilled_seeds": made["distilled_seeds"],
        "searched": best.miou,
        "searched_arch": best.architecture,
        "searched_params": best.params,
        "searched_ms": best.latency_ms,
        "shipped": None if winner is None else f"{winner.format} {winner.precision}",
        "shipped_ms": None if winner is None else winner.p50,
        "shipped_miou": None if winner is None else winner.miou,
        # deploy's figures on the table's scale: the factor it multiplied what it timed by (the anchor's drift)
        "deploy_scale": None
        if result.deploy is None or result.deploy.baseline is None
        else result.deploy.baseline.scale,
        "trials": len(result.trials),
        "feasible": len(result.feasible),
        "space": len(result.space),
        "wall_s": wall,
        "picture": picture.name,
    }


def section(rows: list[dict], args: argparse.Namespace) -> str:
    def f(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    def ms(pair):
        return f"{pair[0]:.3f} ± {pair[1]:.3f}"

    lines = [
        f"`python benchmarks/search.py` ({time.strftime('%Y-%m-%d')}, {machine()}, {args.threads} threads, "
        f"1x3x{args.image_size}x{args.image_size}; {args.epochs} epochs per run, batch {args.batch_size}, "
        f"{args.train_image_size}² crops, seed {args.seed} (hand-made students: seeds 0..{args.seeds - 1}), "
        f"single-threaded training; space: widths {args.base_channels}, depths {args.depths}, "
        f"{args.block_orders}, {args.upsample}; formats {args.formats}; teacher base {args.teacher.replace(',', ', depth ')}; {args.trials} trials; "
        f"{args.conditions or 'conditions not stated'}).",
        "",
        "| dataset | teacher mIoU | b8-d3 alone (seeds' mean ± sd) | b8-d3 distilled (seeds' mean ± sd) "
        "| searched mIoU | searched model | budget ms | searched p50 ms | × teacher eager | shipped (deploy, × its anchor scale) | trials (feasible/space) | search wall s |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        params = r["searched_params"]
        how = f"{r['searched_arch']}, lr {params.get('lr', 0):.2g}" + (
            f", distilled w {params['distill_weight']:.2g}" if params.get("distill") else ""
        )
        ratio = r["searched_ms"] / r["teacher_ms"] if r["teacher_ms"] and r["searched_ms"] else None
        shipped = f"{r['shipped']} {f(r['shipped_ms'], 2)} ms, mIoU {f(r['shipped_miou'])}" if r["shipped"] else "-"
        shipped += f" (×{r['deploy_scale']:.2f})" if r.get("deploy_scale") else ""
        lines.append(
            f"| {r['dataset']} | {f(r['teacher'])} | {f(r['alone'])} ({ms(r['alone_seeds'])}) | "
            f"{f(r['distilled'])} ({ms(r['distilled_seeds'])}) | {f(r['searched'])} | "
            f"{how} | {f(r['budget_ms'], 2)} | {f(r['searched_ms'], 2)} | {f(ratio, 3)} | {shipped} | "
            f"{r['trials']} ({r['feasible']}/{r['space']}) | {r['wall_s']:.0f} |"
        )
    beats = all((r["searched"] or 0) >= max(r["alone"], r["distilled"]) for r in rows)
    close = sum(
        1
        for r in rows
        if (r["searched"] or 0) >= r["teacher"] - 0.01
        and r["teacher_ms"]
        and (r["searched_ms"] or 1e9) <= 0.15 * r["teacher_ms"]
    )
    lines += [
        "",
        f"Goal 1 (searched ≥ the best hand-made b8-d3 within the same budget on every dataset): "
        f"{'met' if beats else 'not met'}. Goal 2 (within 0.01 mIoU of the teacher at ≤ 0.15× its eager p50 on at "
        f"least two datasets): {close} of {len(rows)}.",
        "",
        *(f"![{r['dataset']} front]({r['picture']})" for r in rows),
    ]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    # train's schedule for the set at base 16, explicit so that every trial and hand-made run trains as long and
    # distill.py's run names and caches match (its unmarked names are that length)
    if args.epochs is None:
        from unet_edge.config import schedule_epochs

        args.epochs = schedule_epochs(args.train_images)
    names = args.datasets.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [run_dataset(name, args) for name in names]
    (args.work / "search-benchmark.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    body = section(rows, args)
    print(body)
    if not args.no_write:
        write_section(args.readme, "search", body)


if __name__ == "__main__":
    main()
