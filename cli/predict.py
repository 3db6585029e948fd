"""`unet-edge predict`: class masks, overlays and per-class areas for images, from any model file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from unet_edge.formats import Provider

from .common import MODEL_FILES, console, handle_errors, progress_display


@handle_errors
def predict(
    model: Annotated[
        Path,
        typer.Argument(
            help=f"The model: {MODEL_FILES}; an end-to-end (uint8) ONNX model too; or a folder whose manifest.json "
            "lists one model file, such as deploy's output (its winner)."
        ),
    ],
    inputs: Annotated[list[Path], typer.Argument(help="Images, or folders of images.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for <name>_mask.png, <name>_overlay.png, <name>_stats.json.")
    ] = Path("predictions"),
    overlay: Annotated[
        bool, typer.Option("--overlay/--no-overlay", help="Also write the mask blended over the image, with a legend.")
    ] = True,
    stats: Annotated[
        bool, typer.Option("--stats", help="Also write per-class pixel areas as JSON and print their totals.")
    ] = False,
    provider: Annotated[
        Provider, typer.Option(help="Where the model runs (its runtime's provider or device).")
    ] = Provider.CPU,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Images per batch (consecutive images of one size are batched).")
    ] = 8,
    limit: Annotated[int | None, typer.Option(min=1, help="Segment only the first N images (in name order).")] = None,
) -> None:
    """Segment images: a palette PNG class mask of each image's own size, an overlay, and optionally areas."""
    from unet_edge.predict import predict as run_predict

    with progress_display("predict") as progress:
        results = run_predict(
            model,
            inputs,
            out,
            overlay=overlay,
            stats=stats,
            provider=provider,
            batch_size=batch_size,
            limit=limit,
            progress=progress,
        )
    if stats:
        totals: dict[str, int] = {}
        for result in results:
            for name, count in result.areas.items():
                totals[name] = totals.get(name, 0) + count
        pixels = sum(totals.values()) or 1
        table = Table(title=f"class areas over {len(results)} images")
        table.add_column("class")
        table.add_column("pixels", justify="right")
        table.add_column("share", justify="right")
        for name, count in totals.items():
            table.add_row(name, str(count), f"{100 * count / pixels:.2f}%")
        console.print(table)
    written = "masks" + (", overlays" if overlay else "") + (", stats" if stats else "")
    console.print(f"wrote {written} for {len(results)} images to {out}")
    if overlay and results:
        console.print(f"overlays: {out}/*_overlay.png (e.g. {results[0].overlay})")
