"""`unet-edge eval`: per-class IoU and mIoU of a checkpoint on a validation split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    DataOption,
    DeviceOption,
    JsonOption,
    RunsOption,
    console,
    handle_errors,
    iou_table,
    progress_display,
    write_json,
)


@handle_errors
def evaluate(
    checkpoint: Annotated[Path | None, typer.Argument(help="Checkpoint (default: the newest runs/*/best.pt).")] = None,
    data: DataOption = None,
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "val",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 16,
    device: DeviceOption = "auto",
    json_path: JsonOption = None,
    runs: RunsOption = Path("runs"),
) -> None:
    """Evaluate a checkpoint: per-class IoU table and mIoU from one confusion matrix over the split."""
    from unet_edge.evaluate import evaluate_checkpoint
    from unet_edge.io import check_writable

    check_writable(json_path)
    with progress_display("evaluate") as progress:
        report = evaluate_checkpoint(
            checkpoint,
            data=data,
            split=split,
            batch_size=batch_size,
            device=device,
            runs_dir=runs,
            progress=progress,
        )
    console.print(
        iou_table(
            report["classes"],
            list(report["per_class_iou"].values()),
            report["miou"],
            f"{report['split']} IoU of {report['checkpoint']}",
        )
    )
    write_json(json_path, report)
