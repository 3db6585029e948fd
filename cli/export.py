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
    precision: Annotated[str, typer.Option(help="Comma-separated ONNX precisions beside fp32: fp16, int8 (fp32 is always written).")] = "fp32",
    fold: Annotated[Optional[bool], typer.Option("--fold/--no-fold", help="Fold BatchNorm into the convolutions of model.onnx (default: for conv-bn-relu models; int8 always folds when it can).")] = None,
    calib_data: Annotated[Optional[Path], typer.Option(help="Dataset whose train split calibrates int8 (default: the parity dataset).")] = None,
    calib_images: Annotated[int, typer.Option(min=1, help="Training images used to calibrate int8.")] = 32,
    calib_method: Annotated[str, typer.Option(help="int8 calibration: minmax, entropy or percentile.")] = "minmax",
    max_miou_drop: Annotated[float, typer.Option(min=0.0, help="int8 accuracy budget: largest allowed val mIoU drop against the checkpoint.")] = 0.01,
    runs: RunsOption = Path("runs"),
) -> None:
    """Export a checkpoint to ONNX and/or TorchScript, write manifest.json and check parity on validation images."""
    from unet_edge.checkpoint import find_latest_checkpoint
    from unet_edge.errors import UNetEdgeError
    from unet_edge.export import export_checkpoint, update_manifest
    from unet_edge.evaluate import checkpoint_data_root
    from unet_edge.train import resolve_data
    from unet_edge.parity import verify
    from unet_edge.quantize import CALIBRATION_METHODS, Int8Options, export_precisions

    formats = {"onnx": ("onnx",), "torchscript": ("torchscript",), "all": ("onnx", "torchscript")}.get(format)
    if formats is None:
        raise typer.BadParameter(f"unknown format {format!r}: use onnx, torchscript or all", param_hint="--format")
    source = checkpoint if checkpoint is not None else find_latest_checkpoint(runs)
    for folder_option in (data, calib_data):
        if folder_option is not None:
            resolve_data(str(folder_option))  # a missing dataset is an error before anything is written
    if probabilities and not end_to_end:
        raise typer.BadParameter("--probabilities only applies to the end-to-end model: add --end-to-end", param_hint="--probabilities")
    precisions = tuple(p.strip() for p in precision.split(",") if p.strip())
    unknown = set(precisions) - {"fp32", "fp16", "int8"}
    if unknown:
        raise typer.BadParameter(f"unknown precision {', '.join(sorted(unknown))}: use fp32, fp16, int8", param_hint="--precision")
    if calib_method not in CALIBRATION_METHODS:
        raise typer.BadParameter(f"unknown method {calib_method!r}: use {', '.join(CALIBRATION_METHODS)}", param_hint="--calib-method")
    folder = out / (name or source.resolve().parent.name)
    with err_console.status(f"exporting {source} ({', '.join(formats + (('end-to-end onnx',) if end_to_end else ()))})"):
        from unet_edge.checkpoint import load_model

        fold_fp32 = fold if fold is not None else load_model(source).config.block_order == "conv-bn-relu"
        loaded, folder, artifacts = export_checkpoint(
            source, folder, formats=formats, opset=opset, end_to_end=end_to_end, probabilities=probabilities, fold=fold_fp32
        )
        update_manifest(folder, loaded, artifacts)
    variants = tuple(p for p in precisions if p != "fp32")
    if variants:
        with err_console.status(f"exporting {', '.join(variants)}") as status:
            artifacts += export_precisions(
                loaded,
                folder,
                variants,
                data_root=checkpoint_data_root(loaded.state, data),
                options=Int8Options(calib_data, calib_images, calib_method, max_miou_drop, fold=fold is not False),
                opset=opset,
                progress=lambda message: status.update(message),
            )
        update_manifest(folder, loaded, artifacts)
        for artifact in artifacts:
            info = (artifact.extra or {}).get("quantization")
            if info:
                kept = ", ".join(f"{k['layer']} ({k['node']})" for k in info["kept_float"]) or "none"
                console.print(
                    f"int8: val mIoU {info['miou_int8']:.4f} vs {info['miou_reference']:.4f} (drop {info['miou_drop']:.4f}, budget "
                    f"{info['max_miou_drop']:.4f}, {'within' if info['within_budget'] else 'OVER'}); layers kept in float: {kept}"
                )
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
