"""The `unet-edge` Typer app: one module per command, merged here. Commands import torch lazily."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from unet_edge import __version__
from unet_edge.formats import export_formats

from . import (
    bench as bench_cmd,
)
from . import (
    data,
)
from . import (
    deploy as deploy_cmd,
)
from . import (
    eval as eval_cmd,
)
from . import (
    export as export_cmd,
)
from . import (
    predict as predict_cmd,
)
from . import (
    search as search_cmd,
)
from . import (
    train as train_cmd,
)
from . import (
    verify as verify_cmd,
)

app = typer.Typer(
    name="unet-edge",
    help=(
        "Train a U-Net segmentation model, export it to the formats edge runtimes run "
        f"({', '.join(export_formats())}), prove parity and benchmark it for the edge."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"unet-edge {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            help="Show what converters and runtimes print (step logs, warnings), which is captured otherwise.",
        ),
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    max_pixels: Annotated[
        int | None,
        typer.Option(
            "--max-pixels",
            min=1,
            help="Largest image (width x height) any command decodes; larger ones, such as decompression bombs, are "
            "refused "
            "from their header. Default: 8192 x 8192 = 67,108,864.",
        ),
    ] = None,
) -> None:
    """unet-edge: from training to an edge device, with proof at every step."""
    if debug:
        os.environ["UNET_EDGE_DEBUG"] = "1"
    if verbose:
        os.environ["UNET_EDGE_VERBOSE"] = "1"
    if max_pixels is not None:
        os.environ["UNET_EDGE_MAX_PIXELS"] = str(max_pixels)  # read by every image decode, loader workers included


app.command("train")(train_cmd.train)
app.command("eval")(eval_cmd.evaluate)
app.command("export")(export_cmd.export)
app.command("verify")(verify_cmd.verify)
app.command("predict")(predict_cmd.predict)
app.command("bench")(bench_cmd.bench)
app.command("deploy")(deploy_cmd.deploy)
app.command("search")(search_cmd.search)
app.add_typer(data.app, name="data")


def run() -> None:
    app()


if __name__ == "__main__":
    run()
