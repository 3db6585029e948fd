"""`unet-edge deploy`: the fastest artifact that keeps the accuracy, chosen by measurement on this machine."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from unet_edge.formats import CalibMethod, Precision, export_formats
from unet_edge.formats.onnx_quantize import CALIB_METHOD

from .common import RunsOption, by_field_name, comma_separated, console, fmt, handle_errors, parse_size, progress_bar

# `--formats` choices: every format export writes, or all of them.
FormatChoice = Enum("FormatChoice", {name: name for name in [*export_formats(), "all"]}, type=str)  # type: ignore[misc]


def deploy_table(result: Any) -> Table:
    """One row per candidate, fastest first: accuracy against the reference, latency, and why a row was rejected."""
    decision = result.decision
    machine, settings = result.machine, result.settings
    flags = ", ".join(machine.get("cpu_int8_bf16") or []) or "none"
    size = "×".join(str(v) for v in settings["image_size"])
    table = Table(
        title=f"deploy: {machine['cpu']} (int8/bf16 instructions: {flags}), {settings['threads']} threads, batch {settings['batch_size']}, "
        f"{size}; reference {result.reference['model']} val mIoU {result.reference['miou']:.4f}, budget {decision.max_miou_drop:g}"
    )
    for column in (
        "",
        "model",
        "format",
        "prec",
        "val mIoU",
        "drop",
        "agreement",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "app p50 ms",
        "× eager",
        "MB",
        "status",
    ):
        table.add_column(column, justify="left" if column in ("", "model", "format", "prec", "status") else "right")
    eager = (result.baseline.get("latency_ms") or {}).get("p50")
    if eager is not None:
        lat, app = result.baseline["latency_ms"], result.baseline["app_latency_ms"]
        table.add_row(
            "",
            f"{result.baseline['model']} (reference)",
            "pytorch eager",
            "fp32",
            fmt(result.reference["miou"]),
            fmt(0.0),
            fmt(1.0, 5),
            *(fmt(lat[k], 2) for k in ("p50", "p90", "p99")),
            fmt(app["p50"], 2),
            "1.00",
            "-",
            "baseline",
        )
        table.add_section()
    front = {c.key for c in decision.front}
    for c in decision.ranked:
        lat, app = c.latency_ms or {}, c.app_latency_ms or {}
        mark = "★" if c is decision.winner else ("◆" if c.key in front else "")
        status = (
            "[bold green]winner[/]"
            if c is decision.winner
            else "[green]ok[/]"
            if c.rejected is None
            else f"[red]{c.rejected}[/]"
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


@handle_errors
def deploy(
    checkpoints: Annotated[
        list[Path] | None,
        typer.Argument(help="Checkpoints that compete (a teacher and students; default: the newest runs/*/best.pt)."),
    ] = None,
    max_miou_drop: Annotated[
        float, typer.Option(min=0.0, help="Largest val mIoU drop allowed against the reference checkpoint.")
    ] = 0.01,
    reference: Annotated[
        Path | None,
        typer.Option(
            help="The checkpoint the budget is measured against (default: the most accurate one given; it competes too)."
        ),
    ] = None,
    image_size: Annotated[
        str, typer.Option(help="S or HxW you deploy at: timing runs at it and fixed-size formats are exported at it.")
    ] = "256",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per call you deploy with.")] = 1,
    threads: Annotated[
        int | None, typer.Option(min=1, help="Threads for every runtime alike (default: all cores).")
    ] = None,
    formats: Annotated[
        Any,
        comma_separated(
            FormatChoice, "--formats", help="Comma-separated formats to consider (default: every installed one)."
        ),
    ] = "all",
    precisions: Annotated[
        Any,
        comma_separated(
            Precision,
            "--precisions",
            help="Comma-separated precisions to consider (default: each that a format offers and this CPU computes natively).",
        ),
    ] = ",".join(p.value for p in Precision),
    seconds: Annotated[
        float, typer.Option(min=0.0, help="Timed seconds per candidate, for each of its two latency columns.")
    ] = 2.0,
    min_calls: Annotated[int, typer.Option(min=1, help="Timed calls per candidate and column, at least.")] = 30,
    out: Annotated[
        Path,
        typer.Option(
            help="Folder for deploy.json, deploy.png, the winner and the candidates' exports (and the cache a rerun resumes from)."
        ),
    ] = Path("deployed"),
    data: Annotated[
        Path | None,
        typer.Option(
            help="Dataset whose val split measures accuracy and whose train split calibrates int8 (default: the checkpoints')."
        ),
    ] = None,
    calib_images: Annotated[int, typer.Option(min=1, help="Training images used to calibrate int8.")] = 32,
    calib_method: Annotated[
        CalibMethod, typer.Option(help=f"{CALIB_METHOD.help} (read by: onnx)")
    ] = CALIB_METHOD.default,
    runs: RunsOption = Path("runs"),
) -> None:
    """Export every checkpoint to every installed format and precision, keep those within the mIoU budget,
    time them with one protocol and copy the fastest into --out, ready to embed."""
    from unet_edge.deploy import DeployOptions, run_deploy

    names = tuple(f.value for f in formats)
    options = DeployOptions(
        **by_field_name(
            DeployOptions,
            locals(),
            {"runs": "runs_dir"},
            checkpoints=tuple(checkpoints or ()),
            image_size=parse_size(image_size),
            formats=None if "all" in names else names,
            precisions=tuple(precisions),
        )
    )
    with progress_bar() as progress:
        task = progress.add_task("deploy", total=None, status="planning")

        def update(done: float, total: float, status: str) -> None:
            progress.update(task, completed=done, total=total, status=status)

        result = run_deploy(options, update)
    console.print(deploy_table(result))
    for skip in result.skipped:
        console.print(
            f"[yellow]skipped {skip['format']}{' ' + skip['precision'] if skip['precision'] else ''}: {skip['reason']}[/]",
            soft_wrap=True,
        )
    console.print(f"wrote {result.report}" + (f", {result.plot}" if result.plot else ""))
    winner = result.decision.require_winner()
    eager = (result.baseline.get("latency_ms") or {}).get("p50")
    ratio = f" = {winner.p50 / eager:.3f}× the reference's PyTorch eager ({eager:.2f} ms)" if eager else ""
    console.print(
        f"[bold]winner[/]: {winner.label}: p50 {winner.p50:.2f} ms{ratio}, val mIoU {winner.miou:.4f} (drop {winner.miou_drop:.4f}), "
        f"pixel agreement {winner.pixel_agreement:.4f}",
        soft_wrap=True,
    )
    console.print(f"copied to {result.out}: {', '.join(p.name for p in result.winner_files)}", soft_wrap=True)
