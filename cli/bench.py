"""`unet-edge bench`: latency and throughput of each artifact on each backend and provider."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from unet_edge.bench.plan import BenchSpec
from unet_edge.formats import Provider
from unet_edge.formats.torch_backend import TorchDtype, TorchVariant

from .common import (
    MODEL_FILES,
    ExportedOption,
    JsonOption,
    comma_separated,
    console,
    handle_errors,
    parse_size,
    progress_display,
    write_json,
)


def _int_list(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=name) from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"expected positive integers, got {text!r}", param_hint=name)
    return values


def bench_table(report: dict[str, Any]) -> Table:
    """The results on the terminal: the same columns as `to_markdown`'s table, some shorter."""
    from unet_edge.bench.render import COLUMNS

    machine = report["machine"]
    int8_bf16 = ", ".join(machine.get("cpu_int8_bf16") or []) or "none"
    title = f"{machine['cpu']} ({machine['threads']} threads; int8/bf16 instructions: {int8_bf16})"
    table = Table(title=title + (f", {machine['gpu']}" if machine.get("gpu") else ""))
    for column in COLUMNS:
        table.add_column(column.terminal_title or column.title, justify="left" if column.text else "right")
    for row in report["results"]:
        table.add_row(*(column.terminal(row) for column in COLUMNS))
    return table


def unavailable_notes(report: dict[str, Any]) -> list[str]:
    from unet_edge.bench import backend_label

    notes = []
    for r in report["results"]:
        if r["status"] != "ok":
            note = (
                f"{Path(r['path']).name} on {backend_label(r)} [{r['provider']}] {r['precision'] or ''}: {r['status']}"
            )
            if note not in notes:
                notes.append(note)
    return notes


DEFAULTS = BenchSpec()


@handle_errors
def bench(
    artifacts: Annotated[
        list[Path] | None,
        typer.Argument(help=f"Model files, each {MODEL_FILES} (default: the newest export and its checkpoint)."),
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Also measure this checkpoint in PyTorch eager.")] = None,
    providers: Annotated[
        Any,
        comma_separated(
            Provider, "--providers", help="Comma-separated providers; each model runs on those its runtime supports."
        ),
    ] = ",".join(p.value for p in Provider),
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = ",".join(
        str(b) for b in DEFAULTS.batch_sizes
    ),
    image_size: Annotated[str, typer.Option(help="S or HxW.")] = f"{DEFAULTS.height}x{DEFAULTS.width}",
    threads: Annotated[
        int | None, typer.Option(min=1, help="Threads for every runtime alike (default: all cores).")
    ] = DEFAULTS.threads,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed runs before timing.")] = DEFAULTS.warmup,
    iters: Annotated[
        int | None, typer.Option(min=1, help="Timed runs (default: as many as fit in --seconds).")
    ] = DEFAULTS.iters,
    seconds: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Seconds of timed runs per row (model, provider, batch size) when --iters is not given; a bench "
            "takes about this times the number of rows.",
        ),
    ] = DEFAULTS.seconds,
    json_path: JsonOption = None,
    markdown: Annotated[Path | None, typer.Option(help="Also write the table as Markdown.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Also draw latency and throughput as a PNG.")] = None,
    exported: ExportedOption = Path("exported"),
    torch_variants: Annotated[
        Any,
        comma_separated(
            TorchVariant,
            "--torch-variants",
            help="PyTorch models (checkpoint, TorchScript): one row per variant; compile is for checkpoints, "
            "cudagraphs for CUDA.",
        ),
    ] = ",".join(DEFAULTS.torch_variants),
    dtypes: Annotated[
        Any, comma_separated(TorchDtype, "--dtypes", help="PyTorch models: one row per dtype of weights and inputs.")
    ] = ",".join(DEFAULTS.dtypes),
) -> None:
    """Benchmark checkpoints and exported models on each provider their runtime supports (p50/p90/p99, img/s,
    roofline)."""
    from unet_edge.bench import bench_paths, run_bench, to_markdown
    from unet_edge.bench import plot as draw
    from unet_edge.io import atomic_write_text, check_writable

    for target in (json_path, markdown, plot):
        check_writable(target)
    height, width = parse_size(image_size)
    spec = BenchSpec(
        batch_sizes=_int_list(batch_sizes, "--batch-sizes"),
        height=height,
        width=width,
        threads=threads,
        warmup=warmup,
        iters=iters,
        seconds=seconds,
        torch_variants=tuple(v.value for v in torch_variants),
        dtypes=tuple(d.value for d in dtypes),
    )
    with progress_display("bench", "opening the models") as progress:
        report = run_bench(bench_paths(artifacts, checkpoint, exported), spec, providers, progress)
    console.print(bench_table(report))
    for note in unavailable_notes(report):
        console.print(f"[yellow]{note}[/]", soft_wrap=True)
    write_json(json_path, report)
    if markdown is not None:
        atomic_write_text(markdown, to_markdown(report))
        console.print(f"wrote {markdown}")
    if plot is not None:
        console.print(f"wrote {draw(report, plot)}")
