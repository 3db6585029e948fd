"""`unet-edge verify`: prove that exported models segment like the checkpoint they came from."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from unet_edge.formats import FORMATS, Provider

from .common import DataOption, ExportedOption, JsonOption, RunsOption, console, fmt, handle_errors, write_json

LAYERED = ", ".join(name for name, f in FORMATS.items() if f.layer_outputs is not None)


def parity_table(report: dict[str, Any]) -> Table:
    folders = sorted({str(Path(r["path"]).parent) for r in report["artifacts"]})
    table = Table(
        title=f"parity of {', '.join(folders)} vs {report['checkpoint']} on {report['num_images']} validation images"
    )
    for column in (
        "artifact",
        "precision",
        "max |Δ|",
        "mean |Δ|",
        "agreement",
        "mIoU vs ref",
        "mIoU gt",
        "ref mIoU gt",
        "drop",
        "result",
    ):
        table.add_column(column, justify="left" if column == "artifact" else "right")
    for r in report["artifacts"]:
        table.add_row(
            Path(r["path"]).name
            if len(report["artifacts"]) < 2
            or len({Path(a["path"]).name for a in report["artifacts"]}) == len(report["artifacts"])
            else r["path"],
            r["precision"],
            fmt(r["max_abs_diff"], 2 if (r["max_abs_diff"] or 0) >= 0.01 else 6),
            fmt(r["mean_abs_diff"], 6),
            fmt(r["pixel_agreement"], 5),
            fmt(r["miou_vs_reference"]),
            fmt(r["miou_gt"]),
            fmt(r["miou_gt_reference"]),
            fmt(r["miou_drop"]),
            "[green]pass[/]" if r["passed"] else "[red]FAIL[/]",
        )
    return table


@handle_errors
def verify(
    artifacts: Annotated[
        list[Path] | None, typer.Argument(help="Model files (default: every artifact of the newest export).")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Reference checkpoint (default: the one in the manifest).")
    ] = None,
    data: DataOption = None,
    num_images: Annotated[int, typer.Option(help="Validation images to compare on (0: all).")] = 16,
    provider: Annotated[
        Provider,
        typer.Option(
            help="Where the artifacts run (an ONNX Runtime provider, a PyTorch device; each format maps it to its "
            "runtime's own)."
        ),
    ] = Provider.CPU,
    min_agreement: Annotated[
        float | None, typer.Option(help="Override the minimum pixel agreement (fp32: 0.999, fp16: 0.995).")
    ] = None,
    max_miou_drop: Annotated[float | None, typer.Option(help="Override the maximum mIoU drop (int8: 0.01).")] = None,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain",
            help=f"For a failing model of a format that exposes its layers ({LAYERED}), name the first layer that "
            f"diverges.",
        ),
    ] = False,
    json_path: JsonOption = None,
    exported: ExportedOption = Path("exported"),
    runs: RunsOption = Path("runs"),
) -> None:
    """Compare each artifact with its checkpoint on validation images; exit 1 when one fails its thresholds."""
    from unet_edge.io import check_writable
    from unet_edge.parity import Thresholds
    from unet_edge.parity import verify as run_verify

    check_writable(json_path)
    report = run_verify(
        artifacts,
        checkpoint=checkpoint,
        data=data,
        num_images=num_images,
        provider=provider,
        overrides=Thresholds(min_pixel_agreement=min_agreement, max_miou_drop=max_miou_drop),
        explain=explain,
        runs_dir=runs,
        exported_dir=exported,
    )
    console.print(parity_table(report))
    for r in report["artifacts"]:
        info = r.get("explain")
        if info and info.get("first_divergent_layer"):
            console.print(
                f"{r['path']}: first divergent layer [bold]{info['first_divergent_layer']}[/] "
                f"(relative difference {info['first_divergent_rel_diff']:.3g} > {info['rel_tolerance']:g}; "
                f"{info['layers_compared']} layers compared)"
            )
        elif info:
            reason = info.get("reason") or "no layer diverges beyond tolerance; the difference builds up gradually"
            console.print(f"{r['path']}: {reason}")
    write_json(json_path, report)
    if not report["passed"]:
        failed = ", ".join(r["path"] for r in report["artifacts"] if not r["passed"])
        console.print(f"[red]FAILED[/]: {failed}")
        raise typer.Exit(code=1)
    console.print("[green]all artifacts pass[/]")
