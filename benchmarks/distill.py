"""Distillation: does `unet-edge train --teacher` bring a small student closer to a large model?

On each of train_quality's datasets (shapes, digits, textures: see benchmarks/train_quality.py), with the
same epochs (by default the schedule `unet-edge train` picks for the set's size), batch size, crop and schedule
(every other setting at `unet-edge train`'s defaults) for all:

- a teacher (default base 16, depth 4: 4.8x a base-8 depth-3 student's FLOPs; larger teachers need not teach
  small students better, Cho & Hariharan 2019), trained by `unet-edge train`, one per dataset (seed 0);
- each student (default base 8 and base 16, depth 3) trained alone, one run per seed;
- the same student distilled from that teacher (`--teacher`), one run per seed, paired with the lone
  student's seed (same initial weights, batch order and crops: the two differ only in the distillation term).

With `--teacher ensemble` the teacher of each distilled seed is instead the ensemble of the same student's lone
runs on the other seeds (`unet-edge train --teacher A --teacher B ...`, the mean of their class probabilities;
leave-one-out, so no student is taught by its own pair), written to the `distill-ensemble` section.

One teacher per dataset, not per seed: the question is what a given teacher does for a student, and a teacher
costs as much to train as seven lone students here. Every run is a real `unet-edge train` subprocess with
OMP_NUM_THREADS=--threads, so its figures do not depend on how busy the machine is (only its time does).

Reported: best val mIoU (mean ± sd over seeds, and each seed's pair), the fraction of the teacher-student gap that
distillation closes ((distilled - alone) / (teacher - alone), on the means), GFLOP per 256x256 image, CPU latency
(PyTorch fp32, channels-last, batch 1, 256x256, measured at the end), and the training-time cost (the sum of
`epoch_time_s` over a run's epochs, which metrics.jsonl holds, per run alone and distilled).

    python benchmarks/distill.py --threads 1                     # writes the `distill` section of benchmarks/README.md
    python benchmarks/distill.py --threads 1 --distill '[{}, {"distill_loss": "kl", "distill_temperature": 1, "distill_weight": 0.3}]'
    python benchmarks/distill.py --select --datasets digits --seeds 5 --students 8,3 --no-write  # compare settings
    python benchmarks/distill.py --teacher ensemble --students 8,3 --latency-seconds 0  # teachers: the other seeds

Finished runs are cached in OUT/results.json and skipped; a run that was stopped resumes from its last.pt.
The run folders (best.pt of every teacher and student) stay under OUT/runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import HERE, README, machine, median_ms, write_section
from train_quality import write_datasets

SECTION = "distill"
# The value of --teacher that teaches each seed with the ensemble of the other seeds' lone students.
ENSEMBLE = "ensemble"
# The settings --select compares (each a set of `unet-edge train` options for the distilled runs); the earlier
# teacher checkpoint is compared with --teacher-epoch.
SELECT_VARIANTS = (
    {"distill_loss": "kl", "distill_temperature": 1.0, "distill_weight": 1.0},
    {"distill_loss": "dist", "distill_temperature": 1.0, "distill_weight": 1.0},
    {"distill_loss": "cwd", "distill_temperature": 1.0, "distill_weight": 3.0},
    {"distill_loss": "cwd", "distill_temperature": 1.0, "distill_weight": 3.0, "distill_warmup": 0.25},
)


# The teacher of the section; a distilled run of another teacher carries "-tBASExDEPTH" in its name.
DEFAULT_TEACHER = (16, 4)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets", default="shapes,digits,textures", help="comma-separated: shapes, digits, textures"
    )
    parser.add_argument("--seeds", type=int, default=5, help="student and distilled runs per dataset (seeds 0..N-1)")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="default: what `unet-edge train` picks for --train-images images and each model's width",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--train-images", type=int, default=240)
    parser.add_argument("--val-images", type=int, default=60)
    parser.add_argument(
        "--teacher",
        default=",".join(map(str, DEFAULT_TEACHER)),
        metavar="BASE,DEPTH|ensemble",
        help="the teacher's architecture, or 'ensemble': each seed taught by the same student's other seeds",
    )
    parser.add_argument("--students", default="8,3;16,3", metavar="BASE,DEPTH;...", help="students, ';'-separated")
    parser.add_argument(
        "--teacher-epoch",
        type=int,
        default=None,
        help="distil from the teacher's checkpoint after this epoch (RUN/epochN.pt, kept by a teacher run), "
        "not best.pt",
    )
    parser.add_argument(
        "--distill",
        default="{}",
        help='JSON of distillation settings beyond the defaults, e.g. \'{"distill_loss": "kl"}\', or a list of them (one row each)',
    )
    parser.add_argument(
        "--select", action="store_true", help="distil with each of SELECT_VARIANTS instead (to choose the defaults)"
    )
    parser.add_argument("--threads", type=int, default=1, help="threads of every run and of the latency step")
    parser.add_argument("--latency-seconds", type=float, default=3.0, help="0: no latency step")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "distill")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="train nothing: report the runs already finished under OUT/runs (pairs with a missing side are left out)",
    )
    return parser.parse_args()


def arch(text: str) -> tuple[int, int]:
    base, depth = (int(v) for v in text.split(","))
    return base, depth


def option_args(settings: dict) -> list[str]:
    return [part for key, value in settings.items() for part in (f"--{key.replace('_', '-')}", str(value))]


def epochs_for(args: argparse.Namespace, base: int) -> int:
    """A run's epochs: --epochs when given, else what `unet-edge train` runs on the set for the model's width."""
    from unet_edge.config import schedule_epochs

    return args.epochs if args.epochs_given else schedule_epochs(args.train_images, base)


def epochs_tag(args: argparse.Namespace, base: int) -> str:
    """The fragment "-epN" of a run's name when its epochs differ from the set's schedule at base 16 (`args.epochs`),
    so a run of another length is never mistaken for one of the names' earlier meaning."""
    epochs = epochs_for(args, base)
    return "" if epochs == args.epochs else f"-ep{epochs}"


def flip_tag(root: Path) -> str:
    """The fragment "-hflipP" of a run's name on a set whose dataset.json declares its classes mirror-symmetric, where
    `unet-edge train` flips by default (`default_hflip`): runs of the names' earlier meaning trained without a flip."""
    from unet_edge.config import default_hflip
    from unet_edge.data import read_dataset_info

    info = read_dataset_info(root)
    flip = default_hflip(info is not None and info.mirror_symmetric)
    return f"-hflip{flip:g}" if flip else ""


def teacher_run(dataset: str, flip: str, teacher_arch: tuple[int, int]) -> str:
    """The name of a set's teacher run (seed 0)."""
    return f"{dataset}-teacher{flip}-b{teacher_arch[0]}-d{teacher_arch[1]}-s0"


def is_teacher_run(name: str) -> bool:
    """Whether `name` is a `teacher_run`: the second field is "teacher" (a distilled run's name holds "-teacher-"
    too, through its `teacher-right` pixels)."""
    return name.split("-")[1:2] == ["teacher"]


def tag(settings: dict) -> str:
    """A run-name fragment for distillation settings, so a cached run is never mistaken for another setting's."""
    from unet_edge.config import TrainConfig

    defaults = TrainConfig()
    full = {
        "distill_loss": defaults.distill_loss,
        "distill_temperature": defaults.distill_temperature,
        "distill_weight": defaults.distill_weight,
        "distill_pixels": defaults.distill_pixels,
        **settings,
    }
    warmup = f"-warm{full['distill_warmup']:g}" if full.get("distill_warmup") else ""
    pixels = "" if full["distill_pixels"] == "all" else f"-{full['distill_pixels']}"
    return f"{full['distill_loss']}-T{full['distill_temperature']:g}-w{full['distill_weight']:g}{warmup}{pixels}"


class Runner:
    """Runs `unet-edge train` once per run name, caching each finished run's figures in OUT/results.json."""

    def __init__(self, args: argparse.Namespace, roots: dict[str, Path]) -> None:
        self.args = args
        self.roots = roots
        self.runs = args.out / "runs"
        self.cache_file = args.out / "results.json"
        self.results: dict[str, dict] = json.loads(self.cache_file.read_text()) if self.cache_file.is_file() else {}

    def checkpoint(self, name: str) -> Path:
        return self.runs / name / "best.pt"

    def train(
        self, name: str, dataset: str, seed: int, base: int, depth: int, extra: list[str], keep_epoch: int | None = None
    ) -> dict | None:
        """The run's figures, training it first unless cached (with --finished-only: None for a run not finished);
        `keep_epoch` also keeps RUN/epochN.pt (a copy of last.pt when the run has finished that epoch), so an
        earlier checkpoint of a teacher can teach."""
        kept = self.runs / name / f"epoch{keep_epoch}.pt" if keep_epoch else None
        if name in self.results and (kept is None or kept.is_file()):
            cached = self.results[name]
            if not {"cpu_kernels", "teacher_miou"} <= set(cached):  # cached before these were kept: read once
                cached.update(run_facts(self.runs / name))
                self._save()
            return cached
        args = self.args
        folder = self.runs / name
        epochs = epochs_for(args, base)
        common = ["--device", "cpu", "--epochs", str(epochs)]
        last = folder / "last.pt"
        metrics = folder / "metrics.jsonl"
        finished = metrics.is_file() and len(metrics.read_text().splitlines()) >= epochs
        if args.finished_only and not finished:
            return None
        if last.is_file():
            command = ["train", "--resume", str(last), *common]
        else:
            shutil.rmtree(folder, ignore_errors=True)
            command = [
                "train",
                "--data",
                str(self.roots[dataset]),
                "--batch-size",
                str(args.batch_size),
                "--image-size",
                str(args.image_size),
                "--base-channels",
                str(base),
                "--depth",
                str(depth),
                "--seed",
                str(seed),
                "--out",
                str(self.runs),
                "--name",
                name,
                *common,
                *extra,
            ]
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(args.threads),
            "MKL_NUM_THREADS": str(args.threads),
            "UNET_EDGE_PROGRESS": "0",
        }
        if kept is not None and folder.is_dir() and not kept.is_file() and last.is_file():
            raise SystemExit(
                f"error: {name}: its epoch {keep_epoch} checkpoint was not kept; delete {folder} to retrain"
            )
        started = time.perf_counter()
        if finished and (kept is None or kept.is_file()):  # trained before (by this script or by hand): read it
            done = subprocess.CompletedProcess(command, 0, "", "")
        else:
            done = self._run(command, env, folder, keep_epoch, kept)
        if done.returncode != 0 and not (done.returncode == 1 and "nothing to train" in done.stderr):
            raise SystemExit(
                f"error: {name}: unet-edge {shlex.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}"
            )
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        shares = [r["teacher_share"] for r in records if r.get("teacher_share") is not None]
        teacher_notes = [line for line in done.stderr.splitlines() if line.startswith(("teacher ", "warning:"))]
        result = {
            **run_facts(folder),
            "dataset": dataset,
            "seed": seed,
            "base": base,
            "depth": depth,
            "extra": extra,
            "curve": [r["miou"] for r in records],
            "best": max(r["miou"] for r in records),
            "train_seconds": sum(r["epoch_time_s"] for r in records),
            "teacher_share": statistics.mean(shares) if shares else None,
            "wall_seconds": time.perf_counter() - started,
            "notes": teacher_notes,
        }
        self.results[name] = result
        self._save()
        share = f", teacher {result['teacher_share']:.0%} of step time" if shares else ""
        print(
            f"{time.strftime('%H:%M:%S')} {name}: best val mIoU {result['best']:.4f} ({result['train_seconds']:.0f} s of training{share})",
            flush=True,
        )
        for note in teacher_notes:
            print(f"    {note}", flush=True)
        return result

    def _save(self) -> None:
        self.args.out.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.replace(self.cache_file)

    @staticmethod
    def _run(command: list[str], env: dict, folder: Path, keep_epoch: int | None, kept: Path | None):
        with tempfile.TemporaryFile("w+") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "unet_edge_cli.main", *command],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                text=True,
            )
            while process.poll() is None:
                time.sleep(0.5)
                if kept is not None and keep_epoch is not None and not kept.is_file():
                    _keep_epoch(folder, keep_epoch, kept)
            stderr.seek(0)
            return subprocess.CompletedProcess(process.args, process.returncode, "", stderr.read())


def _keep_epoch(folder: Path, epoch: int, kept: Path) -> None:
    """Copy FOLDER/last.pt to `kept` if it holds exactly `epoch` finished epochs."""
    import torch

    last = folder / "last.pt"
    if not last.is_file():
        return
    try:
        state = torch.load(last, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError):  # being written
        return
    if int(state.get("epoch", 0)) == epoch:
        torch.save(state, kept)


def run_facts(folder: Path) -> dict:
    """What a run's last.pt says, read once: the CPU kernels its epochs were computed with (PyTorch's vector
    instruction set, e.g. AVX512; "AVX512+AVX2" for a run resumed on another kind; the device type for a GPU run;
    None where the checkpoint predates that record: seeded runs repeat to the last digit only on one kind) and the
    teacher's val mIoU a distilled run recorded (None: trained alone). Both None without a readable checkpoint."""
    from unet_edge.checkpoint import load_checkpoint
    from unet_edge.errors import CheckpointError

    try:
        state = load_checkpoint(folder / "last.pt")
    except CheckpointError:
        return {"cpu_kernels": None, "teacher_miou": None}
    kinds = [s.get("cpu_capability") or s.get("device") for s in state.get("environments") or []]
    teacher = state.get("teacher")
    return {
        "cpu_kernels": "+".join(dict.fromkeys(k for k in kinds if k)) or None,
        "teacher_miou": teacher.get("val_miou") if teacher else None,
    }


def cpu_kernels(folder: Path) -> str | None:
    """The CPU kernels a run's epochs were computed with (`run_facts`)."""
    return run_facts(folder)["cpu_kernels"]


def leave_one_out(lone: list[Path]) -> list[list[str]]:
    """Per seed, the `--teacher` options that make the other seeds' lone students its teacher (their ensemble)."""
    return [
        [part for i, path in enumerate(lone) if i != seed for part in ("--teacher", str(path))]
        for seed in range(len(lone))
    ]


def ensemble_teacher(distilled: list[dict]) -> dict:
    """The teacher entry of an ensemble row: the mean val mIoU of the seeds' leave-one-out ensembles (each run
    records its own), with their spread; no run of its own."""
    scores = [run["teacher_miou"] for run in distilled if run.get("teacher_miou") is not None]
    return {"best": statistics.mean(scores) if scores else float("nan"), "members": scores, "ensemble": True}


def kernels_note(rows: list, alone_rows: list) -> str:
    """Which CPU kernels the section's runs were computed with, and the pairs whose two runs used different ones."""
    runs = [run for _, _, alone in alone_rows for run in alone]
    runs += [run for _, _, _, teacher, _, distilled in rows for run in (teacher, *distilled) if not run.get("ensemble")]
    counts: dict[str, int] = {}
    for run in runs:
        kind = run.get("cpu_kernels") or "not recorded"
        counts[kind] = counts.get(kind, 0) + 1
    text = "CPU kernels of the runs: " + ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())) + "."
    crossed = [
        f"{dataset} b{base}-d{depth} {setting} s{x['seed']} ({x['cpu_kernels']} vs {y['cpu_kernels']})"
        for dataset, (base, depth), setting, _, alone, distilled in rows
        for x, y in zip(distilled, alone, strict=True)
        if x.get("cpu_kernels") and y.get("cpu_kernels") and x["cpu_kernels"] != y["cpu_kernels"]
    ]
    if crossed:
        text += (
            f" **{len(crossed)} pair(s) compare runs computed with different CPU kernels**, whose seeded figures do "
            f"not repeat across kinds, so they measure the machines as well as distillation: {'; '.join(crossed)}."
        )
    return text


def pair_spread(differences: list[float], alone: list[dict]) -> str:
    """The sd of the seeds' (distilled - alone), and in brackets what it would be if a distilled run were a draw
    independent of its pair with the lone runs' spread (sqrt(2) x their sd): a term that steers each seed the same
    way keeps the first well below the second."""
    if len(differences) < 2:
        return "-"
    independent = math.sqrt(2) * statistics.stdev(r["best"] for r in alone)
    return f"{statistics.stdev(differences):.3f} ({independent:.3f})"


def summary(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def latency_ms(checkpoint: Path, threads: int, seconds: float) -> float:
    """p50 ms of one 256x256 image through the checkpoint's model: PyTorch fp32, channels-last, `threads` threads."""
    import torch

    from unet_edge.checkpoint import load_model

    torch.set_num_threads(threads)
    model = load_model(checkpoint).model.to(memory_format=torch.channels_last)
    image = torch.randn(1, 3, 256, 256).contiguous(memory_format=torch.channels_last)

    def run() -> None:
        with torch.inference_mode():
            model(image)

    return median_ms([run], seconds=seconds)[0]


def main() -> None:
    args = parse_args()
    import torch

    from unet_edge.config import schedule_epochs

    # train's own schedule, passed on explicitly so that run names and caches stay exact: args.epochs is the set's
    # schedule at base 16 (the names' unmarked length); a narrower model's runs carry "-epN" (`epochs_tag`)
    args.epochs_given = args.epochs is not None
    if args.epochs is None:
        args.epochs = schedule_epochs(args.train_images)

    from unet_edge.bench import count_gflops
    from unet_edge.checkpoint import load_checkpoint

    torch.set_num_threads(args.threads)
    names = args.datasets.split(",")
    ensemble = args.teacher == ENSEMBLE
    if ensemble and (args.teacher_epoch or args.seeds < 3):
        raise SystemExit("error: --teacher ensemble needs --seeds 3 or more and no --teacher-epoch")
    teacher_arch = None if ensemble else arch(args.teacher)
    students = [arch(text) for text in args.students.split(";")]
    data_dir = args.out / f"data-{args.train_images}-{args.val_images}"
    roots = {}
    for name in names:
        if not (data_dir / name / ".complete").is_file():
            shutil.rmtree(data_dir / name, ignore_errors=True)
            write_datasets([name], data_dir, args.train_images, args.val_images)
            (data_dir / name / ".complete").touch()
        roots[name] = data_dir / name
    runner = Runner(args, roots)
    flips = {name: flip_tag(root) for name, root in roots.items()}
    started = time.perf_counter()
    given = json.loads(args.distill)
    variants = [dict(v) for v in SELECT_VARIANTS] if args.select else given if isinstance(given, list) else [given]
    seeds = range(args.seeds)
    rows = []
    teacher_file = f"epoch{args.teacher_epoch}.pt" if args.teacher_epoch else "best.pt"
    alone_rows = []
    for dataset in names:
        flip = flips[dataset]
        teacher_name = teacher_run(dataset, flip, teacher_arch) if teacher_arch else ""
        teacher = (
            runner.train(teacher_name, dataset, 0, *teacher_arch, [], keep_epoch=args.teacher_epoch)
            if teacher_arch
            else None
        )
        if teacher is not None and args.teacher_epoch:
            teacher = {**teacher, "best": teacher["curve"][args.teacher_epoch - 1]}
        for base, depth in students:
            alone_names = [
                f"{dataset}-student{flip}{epochs_tag(args, base)}-b{base}-d{depth}-s{seed}" for seed in seeds
            ]
            alone = [runner.train(name, dataset, seed, base, depth, []) for name, seed in zip(alone_names, seeds)]
            if any(run is not None for run in alone):
                alone_rows.append((dataset, (base, depth), [run for run in alone if run is not None]))
            if ensemble:
                if any(run is None for run in alone):  # --finished-only: an ensemble needs every other seed
                    continue
                teachers = leave_one_out([runner.runs / name / "best.pt" for name in alone_names])
            elif teacher is None:
                continue
            else:
                teachers = [["--teacher", str(runner.runs / teacher_name / teacher_file)] for _ in seeds]
            for variant in variants:
                label = tag(variant) + (f"-e{args.teacher_epoch}" if args.teacher_epoch else "")
                if ensemble:
                    label += f"-ens{args.seeds - 1}"
                elif teacher_arch != DEFAULT_TEACHER:  # another teacher's students are other runs
                    label += f"-t{teacher_arch[0]}x{teacher_arch[1]}"
                distilled = [
                    runner.train(
                        f"{dataset}-distilled-{label}{flip}{epochs_tag(args, base)}-b{base}-d{depth}-s{seed}",
                        dataset,
                        seed,
                        base,
                        depth,
                        [*teachers[seed], *option_args(variant)],
                    )
                    for seed in seeds
                ]
                pairs = [(x, y) for x, y in zip(distilled, alone, strict=True) if x is not None and y is not None]
                if pairs:
                    done = [x for x, _ in pairs]
                    row_teacher = ensemble_teacher(done) if ensemble else teacher
                    rows.append((dataset, (base, depth), label, row_teacher, [y for _, y in pairs], done))
    print(
        f"{time.strftime('%H:%M:%S')} training done ({(time.perf_counter() - started) / 60:.1f} min in this "
        "invocation); measuring latency",
        flush=True,
    )

    where = "digits" if "digits" in names else names[0]
    flip = flips[where]
    models = {"teacher": (teacher_run(where, flip, teacher_arch), teacher_arch)} if teacher_arch else {}
    for base, depth in students:
        models[f"student b{base}"] = (
            f"{where}-student{flip}{epochs_tag(args, base)}-b{base}-d{depth}-s0",
            (base, depth),
        )
    costs = {}
    for label, (name, (base, depth)) in models.items():
        checkpoint = runner.checkpoint(name)
        if not checkpoint.is_file():
            continue
        gflop = count_gflops(load_checkpoint(checkpoint)["config"], 256, 256)
        latency = latency_ms(checkpoint, args.threads, args.latency_seconds) if args.latency_seconds > 0 else None
        costs[label] = (base, depth, gflop, latency)
        print(
            f"{label}: base {base}, depth {depth}: {gflop:.2f} GFLOP ({checkpoint})",
            flush=True,
        )

    text = section(args, alone_rows, rows, costs, runner, machine(), flips)
    print(text)
    if not args.no_write:
        write_section(args.readme, f"{SECTION}-{ENSEMBLE}" if ensemble else SECTION, text)


def epochs_text(args: argparse.Namespace, rows: list, alone_rows: list) -> str:
    """The runs' epochs, as the section states them."""
    if args.epochs_given:
        return f"{args.epochs} epochs"
    teacher = set() if args.teacher == ENSEMBLE else {arch(args.teacher)[0]}
    bases = sorted({row[1][0] for row in [*rows, *alone_rows]} | teacher)
    by_epochs: dict[int, list[int]] = {}
    for base in bases:
        by_epochs.setdefault(epochs_for(args, base), []).append(base)
    parts = [f"{epochs} epochs for base {', '.join(map(str, widths))}" for epochs, widths in sorted(by_epochs.items())]
    return f"the schedule `unet-edge train` picks for the set and the model's width ({'; '.join(parts)})"


def section(
    args: argparse.Namespace,
    alone_rows: list,
    rows: list,
    costs: dict,
    runner: Runner,
    machine_line: str,
    flips: dict[str, str],
) -> str:
    from unet_edge.config import TrainConfig

    defaults = TrainConfig()
    student_text = ", ".join(f"base {b}, depth {d}" for b, d in sorted({row[1] for row in [*rows, *alone_rows]}))
    flip_text = ", ".join(f"{flip.removeprefix('-hflip') or 'none'} on {name}" for name, flip in flips.items())
    if args.teacher == ENSEMBLE:
        title = "## Distillation from the other seeds: each student taught by the ensemble of its width's other runs"
        teacher_text = (
            f"Teacher of seed k: the ensemble of the same student's lone runs on the other {args.seeds - 1} seeds "
            "(`--teacher` given once per run: the mean of their class probabilities; leave-one-out, so no student "
            "is taught by its own pair; the teacher column is the mean ± sd of those ensembles' val mIoU)"
        )
    else:
        teacher = costs["teacher"]
        title = "## Distillation: small students taught by a large model"
        teacher_text = f"Teacher UNetStudent base {teacher[0]}, depth {teacher[1]} (one per dataset, seed 0)"
    lines = [
        title,
        "",
        f"{teacher_text}; students {student_text}, alone and distilled "
        f"(`--teacher`), seeds 0..{args.seeds - 1}, each distilled seed paired with the lone student's (same initial "
        f"weights, batches and crops). All runs: `unet-edge train`, {epochs_text(args, rows, alone_rows)}, "
        f"batch {args.batch_size}, "
        f"{args.image_size}x{args.image_size} crops, every other setting at its default (loss {defaults.loss}, "
        f"{defaults.warmup_fraction:.0%} warm-up + cosine, the learning rate `train` picks for the model's width, "
        f"the flip `train` picks from each set's dataset.json: {flip_text}), "
        f"{args.train_images} train / {args.val_images} val images per dataset (train_quality's sets), {args.threads} "
        "thread(s) per run. Best val mIoU over the epochs, mean ± sd over seeds; gap closed = (distilled - alone) / "
        "(teacher - alone), on the means; worst pair = the lowest (distilled - alone) of a seed; pairs' sd = the sd of "
        "(distilled - alone) over the seeds, in brackets sqrt(2) x the lone runs' sd, what it would be if a distilled "
        "run were a new draw of the same spread; time = seconds of "
        "training and validation per run (mean).",
        "",
        "| dataset | student | distillation | teacher | alone | distilled | gap closed | worst pair | pairs' sd "
        "(independent) | distilled per seed (alone) | s/run alone | s/run distilled |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for dataset, (base, depth), setting, teacher_run, alone, distilled in rows:
        t = teacher_run["best"]
        shown_teacher = summary(teacher_run["members"]) if teacher_run.get("ensemble") else f"{t:.3f}"
        a = statistics.mean(r["best"] for r in alone)
        d = statistics.mean(r["best"] for r in distilled)
        closed = f"{(d - a) / (t - a):.0%}" if t - a > 0.01 else "- (gap under 0.01)"
        differences = [x["best"] - y["best"] for x, y in zip(distilled, alone, strict=True)]
        worst = min(differences)
        seeds = ", ".join(f"{x['best']:.3f} ({y['best']:.3f})" for x, y in zip(distilled, alone, strict=True))
        lines.append(
            f"| {dataset} | b{base}-d{depth} | {setting} | {shown_teacher} | {summary([r['best'] for r in alone])} | "
            f"{summary([r['best'] for r in distilled])} | {closed} | {worst:+.3f} | {pair_spread(differences, alone)} | "
            f"{seeds} | "
            f"{statistics.mean(r['train_seconds'] for r in alone):.0f} | "
            f"{statistics.mean(r['train_seconds'] for r in distilled):.0f} |"
        )
    lines += [
        "",
        "Students alone (the same runs; seeds as listed), best val mIoU:",
        "",
        "| dataset | student | alone | worst seed below the mean | per seed | s/run |",
        "| --- | --- | ---: | ---: | --- | ---: |",
    ]
    for dataset, (base, depth), alone in alone_rows:
        values = [r["best"] for r in alone]
        per_seed = ", ".join(f"s{r['seed']} {r['best']:.3f}" for r in alone)
        lines.append(
            f"| {dataset} | b{base}-d{depth} | {summary(values)} | {statistics.mean(values) - min(values):.3f} | "
            f"{per_seed} | {statistics.mean(r['train_seconds'] for r in alone):.0f} |"
        )
    lines += [
        "",
        "| model | GFLOP / 256² image | CPU latency p50, 256², batch 1 |",
        "| --- | ---: | ---: |",
    ]
    for label, (base, depth, gflop, latency) in costs.items():
        shown = f"{latency:.1f} ms" if latency is not None else "not measured"
        lines.append(f"| {label} (base {base}, depth {depth}) | {gflop:.2f} | {shown} |")
    teachers = [r for name, r in runner.results.items() if is_teacher_run(name)]
    minutes = sum(r["train_seconds"] for r in runner.results.values()) / 60
    command = shlex.join(["python", "benchmarks/distill.py", *sys.argv[1:]])
    teacher_time = (
        f"A teacher run took {statistics.mean(r['train_seconds'] for r in teachers):.0f} s. "
        if teachers and args.teacher != ENSEMBLE
        else ""
    )
    lines += [
        "",
        f"{teacher_time}{len(runner.results)} runs cached, {minutes:.0f} CPU-thread minutes of training in all. The times are those "
        "of runs that shared the machine with other work (the mIoU figures are not affected: every run is "
        "single-threaded and seeded).",
        "",
        f"Machine: {machine_line}. {kernels_note(rows, alone_rows)}",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
