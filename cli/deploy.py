"""`unet-edge deploy`: the fastest artifact that keeps the accuracy, chosen by measurement on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from unet_edge.deploy.records import DeployOptions
from unet_edge.formats import Precision, export_formats

from .common import (
    FormatAlias,
    PrecisionAlias,
    RunsOption,
    above_zero,
    by_field_name,
    comma_separated,
    console,
    fmt,
    formats_option,
    handle_errors,
    parse_formats,
    parse_precisions,
    parse_size,
    progress_display,
)

DEFAULTS = DeployOptions()
# The int8 calibration methods the formats offer, and which formats read the choice (from the registry).
CALIBRATIONS = tuple(dict.fromkeys(m for f in export_formats().values() for m in f.calibrations))
CALIBRATING = ", ".join(name for name, f in export_formats().items() if f.calibrations)


def deploy_table(result: Any) -> Table:
    """One row per candidate, fastest first: accuracy against the reference, latency, and why a row was rejected."""
    decision, machine, settings, reference = result.decision, result.machine, result.settings, result.reference
    flags = ", ".join(machine.cpu_int8_bf16) or "none"
    size = "×".join(str(v) for v in settings.image_size)
    table = Table(
        title=f"deploy: {machine.cpu} (int8/bf16 instructions: {flags}), {settings.threads} threads, batch "
        f"{settings.batch_size}, {size}; reference {reference.model} val mIoU {reference.miou:.4f}, budget "
        f"{decision.max_miou_drop:g}"
        + ("" if decision.max_latency_ms is None else f", latency budget {decision.max_latency_ms:g} ms")
    )
    columns = ("", "model", "format", "prec", "val mIoU", "drop", "agreement", "p50 ms", "p90 ms", "p99 ms")
    for column in (*columns, "app p50 ms", "× eager", "MB", "status"):
        table.add_column(column, justify="left" if column in ("", "model", "format", "prec", "status") else "right")
    baseline = result.baseline
    eager = None if baseline is None else baseline.p50
    if eager is not None:
        lat, app = baseline.latency_ms, baseline.app_latency_ms
        table.add_row(
            "",
            f"{baseline.model} (reference)",
            "pytorch eager",
            "fp32",
            fmt(reference.miou),
            fmt(0.0),
            fmt(1.0, 5),
            *(fmt(lat[k], 2) for k in ("p50", "p90", "p99")),
            fmt(app["p50"], 2),
            "1.00",
            "-",
            "baseline",
        )
        table.add_section()
    for verdict in decision.verdicts:
        c = verdict.candidate
        lat, app = c.latency_ms or {}, c.app_latency_ms or {}
        mark = "★" if verdict.winner else ("◆" if verdict.pareto else "")
        status = {"winner": "[bold green]winner[/]", "ok": "[green]ok[/]"}.get(
            verdict.status, f"[red]{verdict.reason}[/]"
        )
        table.add_row(
            mark,
            c.model,
            c.format,
            c.precision,
            fmt(c.miou),
            fmt(c.miou_drop),
            fmt(c.pixel_agreement, 5),
            *(fmt(lat.get(k), 2) for k in ("p50", "p90", "p99")),
            fmt(app.get("p50"), 2),
            fmt(c.p50 / eager, 2) if c.p50 is not None and eager else "-",
            fmt(c.size_mb, 2),
            status,
        )
    return table


def _check_calibration(value: str | None) -> str | None:
    if value is not None and value not in CALIBRATIONS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(CALIBRATIONS)}")
    return value


@handle_errors
def deploy(
    checkpoints: Annotated[
        list[Path] | None,
        typer.Argument(help="Checkpoints that compete (a teacher and students; default: the newest runs/*/best.pt)."),
    ] = None,
    max_miou_drop: Annotated[
        float, typer.Option(min=0.0, help="Largest val mIoU drop allowed against the reference checkpoint.")
    ] = DEFAULTS.max_miou_drop,
    max_latency_ms: Annotated[
        float | None,
        typer.Option(
            callback=above_zero,
            help="A latency budget (p50 ms at --image-size and --batch-size): the winner is then the most accurate "
            "candidate within it and the mIoU budget, not the fastest.",
        ),
    ] = DEFAULTS.max_latency_ms,
    reference: Annotated[
        Path | None,
        typer.Option(
            help="The checkpoint the budget is measured against (default: the most accurate one given; "
            "it competes too)."
        ),
    ] = DEFAULTS.reference,
    image_size: Annotated[
        str, typer.Option(help="S or HxW you deploy at: timing runs at it and fixed-size formats are exported at it.")
    ] = "x".join(str(v) for v in DEFAULTS.image_size),
    batch_size: Annotated[int, typer.Option(min=1, help="Images per call you deploy with.")] = DEFAULTS.batch_size,
    threads: Annotated[
        int | None, typer.Option(min=1, help="Threads for every runtime alike (default: all cores).")
    ] = DEFAULTS.threads,
    formats: Annotated[
        str, formats_option("Comma-separated formats to consider, or all (every installed one).")
    ] = "all",
    precisions: Annotated[
        Any,
        comma_separated(
            Precision,
            "--precision",
            help="Comma-separated precisions to consider (default: each that a format offers and this CPU "
            "computes natively).",
        ),
    ] = ",".join(p.value for p in Precision),
    seconds: Annotated[
        float, typer.Option(min=0.0, help="Timed seconds per candidate, for each of its two latency columns.")
    ] = DEFAULTS.seconds,
    min_calls: Annotated[
        int,
        typer.Option(
            min=1,
            help="Timed calls per candidate and column, at least (a candidate the first of "
            "the timing rounds shows cannot win keeps that round's share).",
        ),
    ] = DEFAULTS.min_calls,
    out: Annotated[
        Path,
        typer.Option(
            help="Folder for deploy.json, deploy.png, the winner and the candidates' exports (and the cache a "
            "rerun resumes from)."
        ),
    ] = DEFAULTS.out,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Dataset whose val split measures accuracy and whose train split calibrates int8 (default: the "
            "checkpoints')."
        ),
    ] = DEFAULTS.data,
    calib_images: Annotated[
        int, typer.Option(min=1, help="Training images used to calibrate int8.")
    ] = DEFAULTS.calib_images,
    calib_method: Annotated[
        str | None,
        typer.Option(
            metavar="[" + "|".join(CALIBRATIONS) + "]",
            callback=_check_calibration,
            help=f"int8 activation-range calibration (default: each format's own; read by: {CALIBRATING or 'none'}).",
        ),
    ] = DEFAULTS.calibration,
    runs: RunsOption = DEFAULTS.runs_dir,
    jobs: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Exports run at once, each in a worker process (default: one per core; 1: one after another in "
            "this process). Timing always runs alone, after them.",
        ),
    ] = DEFAULTS.jobs,
    latency_table: Annotated[
        Path | None,
        typer.Option(
            help="Read the latencies on this latency table's scale (one `unet-edge search` measured on this machine "
            "at these threads): its anchor model is timed with the candidates, so a --max-latency-ms taken from "
            "the search means what it meant there, however the machine's speed drifted since.",
        ),
    ] = None,
    format_alias: FormatAlias = None,
    precision_alias: PrecisionAlias = None,
) -> None:
    """Export every checkpoint to every installed format and precision, keep those within the mIoU budget,
    time them with one protocol and copy the fastest into --out, ready to embed."""
    from unet_edge.deploy import run_deploy
    from unet_edge.formats import default_threads
    from unet_edge.search.latency import table_anchor

    size = parse_size(image_size)
    anchor_ms = (
        None if latency_table is None else table_anchor(latency_table, threads or default_threads(), size, batch_size)
    )

    parameters = {
        "max_miou_drop": max_miou_drop,
        "max_latency_ms": max_latency_ms,
        "reference": reference,
        "batch_size": batch_size,
        "threads": threads,
        "seconds": seconds,
        "min_calls": min_calls,
        "out": out,
        "data": data,
        "calib_images": calib_images,
        "calib_method": calib_method,
        "runs": runs,
        "jobs": jobs,
    }
    options = DeployOptions(
        **by_field_name(
            DeployOptions,
            parameters,
            {"runs": "runs_dir", "calib_method": "calibration"},
            checkpoints=tuple(checkpoints or ()),
            image_size=size,
            anchor_ms=anchor_ms,
            formats=parse_formats(format_alias if format_alias is not None else formats),
            precisions=parse_precisions(precision_alias) if precision_alias is not None else tuple(precisions),
        )
    )
    with progress_display("deploy", "planning") as progress:
        result = run_deploy(options, progress)
    console.print(deploy_table(result))
    for skip in result.skipped:
        console.print(
            f"[yellow]skipped {skip.format}{' ' + skip.precision if skip.precision else ''}: {skip.reason}[/]",
            soft_wrap=True,
        )
    console.print(f"wrote {result.report}" + (f", {result.plot}" if result.plot else ""))
    baseline = result.baseline
    if baseline is not None and baseline.anchor_p50_ms is not None:
        console.print(
            f"latencies read on the latency table's scale: ×{baseline.scale:.3f} (the anchor took "
            f"{baseline.anchor_p50_ms:.3f} ms here against the table's {result.settings.anchor_ms:.3f} ms)",
            soft_wrap=True,
        )
    winner = result.decision.require_winner()
    p50 = winner.p50 or 0.0  # the winner is timed
    eager = None if result.baseline is None else result.baseline.p50
    ratio = f" = {p50 / eager:.3f}× the reference's PyTorch eager ({eager:.2f} ms)" if eager else ""
    console.print(
        f"[bold]winner[/]: {winner.label}: p50 {p50:.2f} ms{ratio}, val mIoU {winner.miou:.4f} "
        f"(drop {winner.miou_drop:.4f}), pixel agreement {winner.pixel_agreement:.4f}",
        soft_wrap=True,
    )
    console.print(f"copied to {result.out}: {', '.join(p.name for p in result.winner_files)}", soft_wrap=True)
