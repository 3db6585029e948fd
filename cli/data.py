"""`unet-edge data`: the embedded synthetic dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import console, handle_errors, progress_display

app = typer.Typer(help="Datasets: write the embedded synthetic set.", no_args_is_help=True)


@app.command("synth")
@handle_errors
def synth(
    out: Annotated[Path, typer.Option("--out", help="Folder to write ({train,val}/{images,labels}, dataset.json).")],
    num_train: Annotated[int, typer.Option(min=1, help="Training images.")] = 512,
    num_val: Annotated[int, typer.Option(min=1, help="Validation images.")] = 64,
    size: Annotated[int, typer.Option(min=16, help="Image side in pixels.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives byte-identical files.")] = 0,
) -> None:
    """Write a deterministic synthetic dataset: shapes on textured, noisy backgrounds."""
    from unet_edge.synth import CLASSES, SynthSpec, write_synth

    spec = SynthSpec(num_train=num_train, num_val=num_val, size=size, seed=seed)
    with progress_display("synth") as progress:
        root = write_synth(out, spec, progress)
    console.print(
        f"wrote {num_train} train + {num_val} val images ({size}x{size}, classes: {', '.join(CLASSES)}) to {root}"
    )
