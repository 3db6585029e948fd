"""`unet-edge export`: write the artifacts of each format and a manifest, then check parity."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from unet_edge.formats import CalibMethod, ExportFormat, Precision

from .common import RunsOption, comma_separated, parse_size, console, err_console, handle_errors
from .verify import parity_table


def int8_summary(info: dict[str, Any]) -> str:
    """One line: a reduced-precision model's val mIoU against the checkpoint's, the budget, and the layers kept in float."""
    precision = info.get("precision", "int8")
    verdict = "within" if info["within_budget"] else "OVER"
    line = (
        f"{precision}: val mIoU {info[f'miou_{precision}']:.4f} vs {info['miou_reference']:.4f} (drop {info['miou_drop']:.4f}, budget "
        f"{info['max_miou_drop']:.4f}, {verdict})"
    )
    if "kept_float" in info:
        line += "; layers kept in float: " + (", ".join(f"{k['layer']} ({k['node']})" for k in info["kept_float"]) or "none")
    return line


@handle_errors
def export(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="Checkpoint (default: the newest runs/*/best.pt).")] = None,
    format: Annotated[ExportFormat, typer.Option("--format", "-f", help="Format to write, or all (every format whose runtime is installed; the others are named as skipped).")] = ExportFormat("all"),
    out: Annotated[Path, typer.Option(help="Parent folder of export folders.")] = Path("exported"),
    name: Annotated[Optional[str], typer.Option(help="Export folder name (default: the run's folder name).")] = None,
    opset: Annotated[int, typer.Option(min=17, help="ONNX opset.")] = 18,
    parity_images: Annotated[int, typer.Option(min=0, help="Validation images for the parity check at the end (0: skip).")] = 8,
    data: Annotated[Optional[Path], typer.Option(help="Dataset for the parity check and the int8 budget (default: the checkpoint's).")] = None,
    end_to_end: Annotated[bool, typer.Option("--end-to-end", help="Also write model_e2e.onnx: uint8 RGB N x H x W x 3 in, uint8 class mask N x H x W out.")] = False,
    probabilities: Annotated[bool, typer.Option("--probabilities", help="Give model_e2e.onnx a second output, softmax probabilities N x K x H x W.")] = False,
    precision: Annotated[Any, comma_separated(Precision, "--precision", help="Comma-separated precisions; fp32 is always written, fp16/int8 as variants of the formats that have them (ONNX).")] = "fp32",
    fold: Annotated[Optional[bool], typer.Option("--fold/--no-fold", help="Fold BatchNorm into the convolutions of model.onnx, exactly (default: for conv-bn-relu models); an error when the fold is impossible.")] = None,
    fold_variants: Annotated[bool, typer.Option("--fold-variants/--no-fold-variants", help="Quantise/convert fp16 and int8 from the BatchNorm-folded graph when the fold is exact (else noted in the manifest).")] = True,
    calib_data: Annotated[Optional[Path], typer.Option(help="Dataset whose train split calibrates int8 (default: the parity dataset).")] = None,
    calib_images: Annotated[int, typer.Option(min=1, help="Training images used to calibrate int8.")] = 32,
    calib_method: Annotated[CalibMethod, typer.Option(help="int8 activation-range calibration.")] = CalibMethod.MINMAX,
    max_miou_drop: Annotated[float, typer.Option(min=0.0, help="int8 accuracy budget: largest allowed val mIoU drop against the checkpoint.")] = 0.01,
    image_size: Annotated[Optional[str], typer.Option(help="S or HxW: the fixed input size of formats that need one (LiteRT; default: the checkpoint's training crop size, else 256). Other image sizes are padded or tiled to it.")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Largest batch of formats with bounded dynamic shapes (ExecuTorch), which plan memory for it.")] = 8,
    max_size: Annotated[int, typer.Option(min=2, help="Largest image height and width of formats with bounded dynamic shapes (ExecuTorch, whose memory grows with it: about 4.4 GB at 8 x 1024 x 1024 for the default-size model).")] = 1024,
    runs: RunsOption = Path("runs"),
) -> None:
    """Export a checkpoint to ONNX and/or TorchScript, write manifest.json and check parity on validation images."""
    from unet_edge.errors import UNetEdgeError
    from unet_edge.export import ExportOptions, run_export

    if probabilities and not end_to_end:
        raise typer.BadParameter("--probabilities only applies to the end-to-end model: add --end-to-end", param_hint="--probabilities")
    options = ExportOptions(
        checkpoint=checkpoint,
        out=out,
        name=name,
        formats=None if format.value == "all" else (format.value,),
        precisions=precision,
        opset=opset,
        end_to_end=end_to_end,
        probabilities=probabilities,
        fold=fold,
        fold_variants=fold_variants,
        data=data,
        calib_data=calib_data,
        calib_images=calib_images,
        calib_method=calib_method,
        max_miou_drop=max_miou_drop,
        parity_images=parity_images,
        image_size=parse_size(image_size) if image_size else None,
        max_batch=max_batch,
        max_size=max_size,
        runs_dir=runs,
    )
    with err_console.status("exporting") as status:
        result = run_export(options, progress=status.update)
    for name, why in result.skipped.items():
        console.print(f"skipped {name}: {why}")
    for info in result.quantization:
        console.print(int8_summary(info))
    for artifact in result.artifacts:
        console.print(f"wrote {artifact.path} ({artifact.path.stat().st_size / 1e6:.2f} MB)")
    if result.parity is not None:
        console.print(parity_table(result.parity))
        console.print(f"manifest: {result.manifest}")
    if not result.passed:
        raise UNetEdgeError(f"{result.folder}: an exported artifact failed the parity check (see the table)")
