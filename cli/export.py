"""`unet-edge export`: write the artifacts of each format and a manifest, then check parity."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from unet_edge.export import ExportOptions
from unet_edge.formats import Precision, export_formats, export_options, option_formats

from .common import (
    FormatAlias,
    PrecisionAlias,
    RunsOption,
    by_field_name,
    comma_separated,
    console,
    formats_option,
    handle_errors,
    parse_formats,
    parse_precisions,
    progress_display,
)
from .verify import parity_table

DEFAULTS = ExportOptions()
DEFAULT_PRECISIONS = ",".join(precision.value for precision in DEFAULTS.precisions)
PRECISION_FORMATS = "; ".join(
    f"{p.value}: {', '.join(name for name, fmt in export_formats().items() if p in fmt.precisions)}"
    for p in Precision
    if p is not Precision.FP32
)


def int8_summary(info: dict[str, Any]) -> str:
    """One line: a reduced-precision model's val mIoU against the checkpoint's, the budget, and the layers kept in
    float."""
    precision = info["precision"]
    verdict = "within" if info["within_budget"] else "OVER"
    line = (
        f"{precision}: val mIoU {info[f'miou_{precision}']:.4f} vs {info['miou_reference']:.4f} "
        f"(drop {info['miou_drop']:.4f}, budget {info['max_miou_drop']:.4f}, {verdict})"
    )
    if "kept_float" in info:
        line += "; layers kept in float: " + (
            ", ".join(f"{k['layer']} ({k['node']})" for k in info["kept_float"]) or "none"
        )
    return line


def _export_template(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="Checkpoint (default: the newest runs/*/best.pt).")
    ] = DEFAULTS.checkpoint,
    formats: Annotated[
        str,
        formats_option(
            "Comma-separated formats to write, or all (every format whose runtime is installed; the others are "
            "named as skipped)."
        ),
    ] = "all",
    out: Annotated[Path, typer.Option(help="Parent folder of export folders.")] = DEFAULTS.out,
    name: Annotated[str | None, typer.Option(help="Export folder name (default: the run's folder name).")] = None,
    parity_images: Annotated[
        int, typer.Option(min=0, help="Validation images for the parity check at the end (0: skip).")
    ] = DEFAULTS.parity_images,
    data: Annotated[
        Path | None,
        typer.Option(help="Dataset for the parity check and the int8 budget (default: the checkpoint's)."),
    ] = DEFAULTS.data,
    precisions: Annotated[
        Any,
        comma_separated(
            Precision,
            "--precision",
            help="Comma-separated precisions; fp32 is always written, the others as variants of the formats that "
            f"have them ({PRECISION_FORMATS}).",
        ),
    ] = DEFAULT_PRECISIONS,
    fold: Annotated[
        bool | None,
        typer.Option(
            "--fold/--no-fold",
            help="Fold BatchNorm into the convolutions of the formats that export a conv graph, exactly (default: "
            "for conv-bn-relu models); an error when the fold is impossible.",
        ),
    ] = DEFAULTS.fold,
    calib_data: Annotated[
        Path | None, typer.Option(help="Dataset whose train split calibrates int8 (default: the parity dataset).")
    ] = DEFAULTS.calib_data,
    calib_images: Annotated[
        int, typer.Option(min=1, help="Training images used to calibrate int8.")
    ] = DEFAULTS.calib_images,
    max_miou_drop: Annotated[
        float,
        typer.Option(
            min=0.0, help="Accuracy budget of int8 (and bf16): largest allowed val mIoU drop against the checkpoint."
        ),
    ] = DEFAULTS.max_miou_drop,
    format_alias: FormatAlias = None,
    precision_alias: PrecisionAlias = None,
    runs: RunsOption = DEFAULTS.runs_dir,
) -> None:
    """Only its signature is used: the options every export has; each format's own options are added to it."""


def _format_parameters() -> list[inspect.Parameter]:
    """One keyword parameter per export option the registered formats declare (`FormatOption`), its help naming them."""
    parameters = []
    for option in export_options().values():
        kind = option.type or type(option.default)
        negatable = kind is bool and option.default
        flag = f"{option.flag}/--no-{option.flag[2:]}" if negatable else option.flag
        info = typer.Option(
            flag, help=f"{option.help} (read by: {', '.join(option_formats(option.name))})", min=option.min
        )
        parameters.append(
            inspect.Parameter(
                option.name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=option.default,
                annotation=Annotated[kind, info],
            )
        )
    return parameters


def _parsed_format_options(values: dict[str, Any]) -> dict[str, Any]:
    """The format options as their formats take them (`FormatOption.parse`), a refused value as a usage error."""
    options = {}
    for name, option in export_options().items():
        value = values.get(name, option.default)
        if option.parse is not None and value is not None:
            try:
                value = option.parse(value)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint=option.flag) from None
        options[name] = value
    return options


@handle_errors
def export(**values: Any) -> None:
    """Export a checkpoint to every registered format (or those --format names) and its precision variants, write
    manifest.json and check parity on validation images."""
    from unet_edge.errors import UNetEdgeError
    from unet_edge.export import run_export

    common = {name: values.pop(name) for name in _COMMON}
    chosen, precision_alias = common.pop("format_alias"), common.pop("precision_alias")
    options = ExportOptions(
        **by_field_name(
            ExportOptions,
            common,
            _RENAMED,
            formats=parse_formats(chosen if chosen is not None else common["formats"]),
            precisions=parse_precisions(precision_alias) if precision_alias is not None else common["precisions"],
            format_options=_parsed_format_options(values),
        )
    )
    with progress_display("export", "checking the options") as progress:
        result = run_export(options, progress)
    _report(result)
    if not result.passed:
        raise UNetEdgeError(f"{result.folder}: an exported artifact failed the parity check (see the table)")


def _report(result: Any) -> None:
    for name, why in result.skipped.items():
        console.print(f"skipped {name}: {why}")
    for info in result.quantization:
        console.print(int8_summary(info))
    for artifact in result.artifacts:
        console.print(f"wrote {artifact.path} ({artifact.path.stat().st_size / 1e6:.2f} MB)")
    if result.parity is not None:
        console.print(parity_table(result.parity))
        console.print(f"manifest: {result.manifest}")


_TEMPLATE = inspect.signature(_export_template, eval_str=True)
# The common options are ExportOptions' fields of the same name, but for these.
_RENAMED = {"runs": "runs_dir"}
_COMMON = tuple(_TEMPLATE.parameters)
# The command's parameters: the common options, then each format's own, as one signature Typer reads.
export.__signature__ = _TEMPLATE.replace(  # type: ignore[attr-defined]  # Typer reads __signature__
    parameters=[*list(_TEMPLATE.parameters.values())[:-1], *_format_parameters(), _TEMPLATE.parameters["runs"]]
)
