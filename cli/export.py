"""`unet-edge export`: write ONNX / TorchScript artifacts and a manifest, then check parity."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import RunsOption, console, err_console, handle_errors
from .verify import parity_table


@handle_errors
def export(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="Checkpoint (default: the newest runs/*/best.pt).")] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="onnx, torchscript or all.")] = "all",
    out: Annotated[Path, typer.Option(help="Parent folder of export folders.")] = Path("exported"),
    name: Annotated[Optional[str], typer.Option(help="Export folder name (default: the run's folder name).")] = None,
    opset: Annotated[int, typer.Option(min=17, help="ONNX opset.")] = 18,
    parity_images: Annotated[int, typer.Option(min=0, help="Validation images for the parity check at the end (0: skip).")] = 8,
    data: Annotated[Optional[Path], typer.Option(help="Dataset for the parity check (default: the checkpoint's).")] = None,
    end_to_end: Annotated[bool, typer.Option("--end-to-end", help="Also write model_e2e.onnx: uint8 RGB N x H x W x 3 in, uint8 class mask N x H x W out.")] = False,
    probabilities: Annotated[bool, typer.Option("--probabilities", help="Give model_e2e.onnx a second output, softmax probabilities N x K x H x W.")] = False,
    runs: RunsOption = Path("runs"),
) -> None:
    """Export a checkpoint to ONNX and/or TorchScript, write manifest.json and check parity on validation images."""
    from unet_edge.checkpoint import find_latest_checkpoint
    from unet_edge.errors import UNetEdgeError
    from unet_edge.export import export_checkpoint, update_manifest
    from unet_edge.parity import verify

    formats = {"onnx": ("onnx",), "torchscript": ("torchscript",), "all": ("onnx", "torchscript")}.get(format)
    if formats is None:
        raise typer.BadParameter(f"unknown format {format!r}: use onnx, torchscript or all", param_hint="--format")
    source = checkpoint if checkpoint is not None else find_latest_checkpoint(runs)
    if probabilities and not end_to_end:
        raise typer.BadParameter("--probabilities only applies to the end-to-end model: add --end-to-end", param_hint="--probabilities")
    folder = out / (name or source.resolve().parent.name)
    with err_console.status(f"exporting {source} ({', '.join(formats + (('end-to-end onnx',) if end_to_end else ()))})"):
        loaded, folder, artifacts = export_checkpoint(source, folder, formats=formats, opset=opset, end_to_end=end_to_end, probabilities=probabilities)
        update_manifest(folder, loaded, artifacts)
    for artifact in artifacts:
        console.print(f"wrote {artifact.path} ({artifact.path.stat().st_size / 1e6:.2f} MB)")
    if parity_images == 0:
        return
    with err_console.status(f"parity check on {parity_images} validation images"):
        report = verify([a.path for a in artifacts], checkpoint=source, data=data, num_images=parity_images)
    update_manifest(folder, loaded, [], {Path(r["path"]).name: {k: v for k, v in r.items() if k != "path"} for r in report["artifacts"]})
    console.print(parity_table(report))
    console.print(f"manifest: {folder / 'manifest.json'}")
    if not report["passed"]:
        raise UNetEdgeError(f"{folder}: an exported artifact failed the parity check (see the table)")
