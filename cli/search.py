"""`unet-edge search`: the most accurate student that meets a latency budget on this device."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from unet_edge.config import BlockOrder, Upsample
from unet_edge.formats import Precision
from unet_edge.search.space import BASE_CHANNELS, DEPTHS

from .common import (
    DataOption,
    DeviceOption,
    RunsOption,
    above_zero,
    by_field_name,
    comma_separated,
    console,
    enum_list,
    fmt,
    formats_option,
    handle_errors,
    parse_formats,
    parse_size,
    progress_display,
)

# The defaults of the library's options dataclass, read without importing torch.
DEFAULT_FORMATS = "onnx,openvino"


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(dict.fromkeys(int(item) for item in text.split(",") if item.strip()))
    except ValueError:
        raise typer.BadParameter(f"{text!r}: comma-separated whole numbers", param_hint=option) from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{text!r}: comma-separated numbers of at least 1", param_hint=option)
    return values


def trials_table(result: Any) -> Table:
    """One row per trial, best val mIoU first; the front marked."""
    front = {t.number for t in result.front}
    budget = f"{result.budget_ms:.3f} ms" if result.budget_ms is not None else "none"
    table = Table(
        title=f"search {result.study_name}: {len(result.feasible)} of {len(result.space)} architectures within the "
        f"budget ({budget}); ◆ Pareto front"
    )
    for column in ("", "trial", "architecture", "lr", "distill", "val mIoU", "p50 ms", "state"):
        table.add_column(column, justify="right" if column in ("trial", "lr", "val mIoU", "p50 ms") else "left")
    for trial in sorted(result.trials, key=lambda t: -(t.miou if t.miou is not None else -1.0)):
        distill = trial.params.get("distill_weight")
        table.add_row(
            "◆" if trial.number in front else "",
            str(trial.number),
            trial.architecture,
            fmt(trial.params.get("lr"), 5),
            fmt(distill, 3) if trial.params.get("distill") else "-",
            fmt(trial.miou),
            fmt(trial.latency_ms, 3),
            trial.state + (f" ({trial.note})" if trial.note else ""),
        )
    return table


@handle_errors
def search(
    data: DataOption = None,
    teacher: Annotated[
        Path | None, typer.Option(help="A larger model's checkpoint or TorchScript: trials may distil from it.")
    ] = None,
    name: Annotated[str, typer.Option(help="The search: its folder RUNS/search/NAME and its study.")] = "search",
    max_latency_ms: Annotated[
        float | None,
        typer.Option(
            callback=above_zero, help="Budget: the fastest artifact's p50 (ms) at --image-size and --batch-size."
        ),
    ] = None,
    max_latency_ratio: Annotated[
        float | None,
        typer.Option(
            callback=above_zero, help="Budget as a fraction of the teacher's PyTorch eager p50 (needs --teacher)."
        ),
    ] = None,
    base_channels: Annotated[str, typer.Option(help="Widths of the space (comma-separated).")] = ",".join(
        map(str, BASE_CHANNELS)
    ),
    depths: Annotated[str, typer.Option(help="Depths of the space (comma-separated).")] = ",".join(map(str, DEPTHS)),
    block_orders: Annotated[
        Any, comma_separated(BlockOrder, "--block-orders", help="Block orders of the space (comma-separated).")
    ] = ",".join(BlockOrder),
    upsample: Annotated[
        Any, comma_separated(Upsample, "--upsample", help="Up-sampling modes of the space (comma-separated).")
    ] = ",".join(Upsample),
    image_size: Annotated[str, typer.Option(help="S or HxW you deploy at: the latency table is timed at it.")] = "256",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per call you deploy with.")] = 1,
    threads: Annotated[
        int | None, typer.Option(min=1, help="Threads for every runtime alike (default: all cores).")
    ] = None,
    formats: Annotated[
        str, formats_option("Formats the latency table and deploy consider (comma-separated, or all).")
    ] = DEFAULT_FORMATS,
    precisions: Annotated[
        Any,
        comma_separated(
            Precision,
            "--precision",
            help="Precisions to consider (default: each a format offers and this CPU computes natively).",
        ),
    ] = ",".join(p.value for p in Precision),
    latency_table: Annotated[
        Path | None,
        typer.Option(
            help="Latency table file. Default: RUNS/search/latency-table.json, measured here and reused. A table "
            "measured on another machine (the target device) is used as it is."
        ),
    ] = None,
    latency_only: Annotated[
        bool, typer.Option(help="Measure the latency table (and the teacher's latency), write it and stop.")
    ] = False,
    table_seconds: Annotated[float, typer.Option(min=0.0, help="Timed seconds per table row.")] = 0.5,
    table_min_calls: Annotated[int, typer.Option(min=1, help="Timed calls per table row, at least.")] = 10,
    trials: Annotated[int, typer.Option(min=1, help="Trials in the study, in all (finished or pruned).")] = 20,
    timeout: Annotated[
        float | None,
        typer.Option(min=0.0, help="Seconds: no trial starts after it, a running one stops at its epoch's end."),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Processes on this machine working on the study.")] = 1,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Any Optuna storage URL (e.g. postgresql://user@host/db) shared by several machines. Default: "
            "sqlite:///RUNS/search/NAME/study.db."
        ),
    ] = None,
    heartbeat: Annotated[
        int,
        typer.Option(
            min=1,
            help="Seconds between a running trial's heartbeats; one silent for three is failed and queued again.",
        ),
    ] = 20,
    epochs: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Epochs per trial (default: what `unet-edge train` runs on the training set for the start trials' "
            "width, the same for every trial).",
        ),
    ] = None,
    train_batch_size: Annotated[int, typer.Option(min=1, help="Training batch size of each trial.")] = 16,
    train_image_size: Annotated[int, typer.Option(min=8, help="Training crop size of each trial.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of every trial (the same for all, so they compare).")] = 0,
    device: DeviceOption = "auto",
    deploy: Annotated[
        bool, typer.Option(help="Hand the front's checkpoints to deploy (RUNS/search/NAME/deploy).")
    ] = True,
    max_miou_drop: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Deploy's mIoU budget against the front's best (default: none with a latency budget, where the "
            "most accurate artifact within it ships; 0.01 without one, where the fastest within it ships).",
        ),
    ] = None,
    deploy_seconds: Annotated[float, typer.Option(min=0.0, help="Deploy's timed seconds per candidate.")] = 2.0,
    runs: RunsOption = Path("runs"),
) -> None:
    """Time every architecture of the space here (random weights, cached per machine), keep those within the
    latency budget, run an Optuna study over them and the training settings, and deploy the Pareto front."""
    from unet_edge.search import SearchOptions, run_search

    parameters = {
        "name": name,
        "data": data,
        "teacher": teacher,
        "max_latency_ms": max_latency_ms,
        "max_latency_ratio": max_latency_ratio,
        "batch_size": batch_size,
        "threads": threads,
        "latency_table": latency_table,
        "latency_only": latency_only,
        "table_seconds": table_seconds,
        "table_min_calls": table_min_calls,
        "trials": trials,
        "timeout": timeout,
        "workers": workers,
        "storage": storage,
        "heartbeat": heartbeat,
        "epochs": epochs,
        "train_batch_size": train_batch_size,
        "train_image_size": train_image_size,
        "seed": seed,
        "device": device,
        "deploy": deploy,
        "max_miou_drop": max_miou_drop,
        "deploy_seconds": deploy_seconds,
        "runs": runs,
    }
    options = SearchOptions(
        **by_field_name(
            SearchOptions,
            parameters,
            {"runs": "runs_dir", "timeout": "timeout_s", "heartbeat": "heartbeat_s"},
            base_channels=_ints(base_channels, "--base-channels"),
            depths=_ints(depths, "--depths"),
            block_orders=tuple(b.value for b in enum_list(BlockOrder, block_orders)),
            upsamples=tuple(u.value for u in enum_list(Upsample, upsample)),
            image_size=parse_size(image_size),
            formats=parse_formats(formats),
            precisions=tuple(precisions) if len(tuple(precisions)) < len(Precision) else None,
        )
    )
    with progress_display("search", "latency table") as progress:
        result = run_search(options, progress)
    table = result.table
    origin = "measured here" if not table.foreign else f"measured on {table.machine.get('cpu')}"
    console.print(
        f"latency table {table.path} ({origin}; {table.measured} rows measured now, {len(table.rows)} in all)",
        soft_wrap=True,
    )
    if result.teacher_ms is not None:
        console.print(f"teacher {result.teacher}: PyTorch eager p50 {result.teacher_ms:.3f} ms", soft_wrap=True)
    if latency_only:
        fastest = sorted(result.best_rows.items(), key=lambda item: item[1]["latency_ms"]["p50"])
        for arch, row in fastest:
            console.print(f"{arch}: {row['latency_ms']['p50']:.3f} ms ({row['format']} {row['precision']})")
        return
    console.print(trials_table(result))
    console.print(f"wrote {result.report}" + (f", {result.plot}" if result.plot else ""), soft_wrap=True)
    if not result.front:
        console.print(
            "no trial finished, so the front is empty and nothing was deployed (a longer --timeout or "
            "fewer --epochs lets trials finish; rerun the command to go on)",
            soft_wrap=True,
        )
    if result.deploy is not None:
        winner = result.deploy.decision.winner
        if winner is None:
            closest = result.deploy.decision.closest
            why = (
                ""
                if closest is None or closest.p50 is None
                else f"; the fastest, {closest.label}, takes {closest.p50:.3f} ms"
            )
            console.print(f"deploy: nothing passed (see {result.deploy.report}){why}", soft_wrap=True)
        else:
            baseline = result.deploy.baseline
            scale = 1.0 if baseline is None else baseline.scale
            on = "" if scale == 1.0 else f" on the latency table's scale (timed ×{scale:.2f})"
            console.print(
                f"[bold]to ship[/]: {winner.label}: p50 {winner.p50:.3f} ms{on}, val mIoU {winner.miou:.4f}, copied to "
                f"{result.deploy.out}: {', '.join(p.name for p in result.deploy.winner_files)}",
                soft_wrap=True,
            )
