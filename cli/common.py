"""Shared pieces of the CLI: option aliases, the one error path, and table rendering.

Nothing here imports torch, so `unet-edge --help` stays instant.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from unet_edge.formats import FORMATS
from unet_edge.progress import Progress

# Piped output (CI logs, files) gets a wide fixed width instead of rich's 80-column default.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 140)

F = TypeVar("F", bound=Callable[..., Any])

DataOption = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="Dataset folder: ROOT/{train,val}/{images,labels}, or Pascal VOC (JPEGImages, SegmentationClass, "
        "ImageSets/Segmentation). Default: the embedded synthetic set.",
    ),
]
JsonOption = Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON to this file.")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
RunsOption = Annotated[Path, typer.Option("--runs", help="Folder holding training runs (to find the newest).")]
ExportedOption = Annotated[Path, typer.Option("--exported", help="Folder of export folders (to find the newest).")]
# What a command that runs models takes: the registry's names, read without importing any runtime.
MODEL_FILES = f"a training checkpoint or an exported model of any registered format ({', '.join(FORMATS)})"


def parse_size(text: str) -> tuple[int, int]:
    """`--image-size` as S or HxW -> (height, width)."""
    from unet_edge.formats.base import parse_size as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--image-size") from None


def above_zero(value: float | None) -> float | None:
    """A Typer callback for budgets: a latency or a ratio of 0 (or below) cannot be met, so it is refused before any
    work rather than after it."""
    if value is not None and value <= 0:
        raise typer.BadParameter(f"{value:g} is not above 0")
    return value


def enum_list(enum: type[Enum], text: Any) -> tuple[Any, ...]:
    """Comma-separated values of a str Enum ("fp16,int8") -> a tuple of members (duplicates dropped, order kept);
    a value that is not one is a usage error naming the choices."""
    if isinstance(text, tuple):
        return text
    values = [member.value for member in enum]
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    unknown = [item for item in items if item not in values] or ([] if items else [text])
    if unknown:
        raise typer.BadParameter(f"{unknown[0]!r} is not one of {', '.join(values)}")
    return tuple(enum(item) for item in dict.fromkeys(items))


def comma_separated(enum: type[Enum], *names: str, help: str) -> Any:
    """A typer.Option taking comma-separated values of a str Enum: each is checked, the choices are listed in
    --help, and the command gets a tuple of Enum members."""
    values = [member.value for member in enum]
    return typer.Option(
        *names, parser=functools.partial(enum_list, enum), metavar="[" + "|".join(values) + "],...", help=help
    )


def parse_precisions(text: Any) -> tuple[Any, ...]:
    """`--precision` (or its plural spelling `--precisions`): comma-separated precisions."""
    from unet_edge.formats import Precision

    return enum_list(Precision, text)


def by_field_name(
    cls: Any, values: dict[str, Any], renamed: dict[str, str] | None = None, **given: Any
) -> dict[str, Any]:
    """The keyword arguments of dataclass `cls` from a command's parameter values (a dict of the parameters by
    name, never `locals()`): each value whose name (after `renamed`, parameter -> field) is a field of `cls`,
    then `given` on top (values the command derives)."""
    import dataclasses

    renamed = renamed or {}
    names = {f.name for f in dataclasses.fields(cls)}
    picked = {renamed.get(name, name): value for name, value in values.items() if renamed.get(name, name) in names}
    return {**picked, **given}


def parse_formats(text: Any) -> tuple[str, ...] | None:
    """`--format`: comma-separated names of export formats, or all (None), checked against the registry as it is
    when the command runs (a format registered at run time is accepted)."""
    from unet_edge.formats import export_formats

    if text is None or isinstance(text, tuple):
        return text
    names = [item.strip() for item in str(text).split(",") if item.strip()]
    if "all" in names:
        return None
    choices = [*export_formats(), "all"]
    unknown = [name for name in names if name not in choices] or ([] if names else [str(text)])
    if unknown:
        raise typer.BadParameter(f"{unknown[0]!r} is not one of {', '.join(choices)}", param_hint="--format")
    return tuple(dict.fromkeys(names))


def formats_option(help: str) -> Any:
    """`--format NAME,...|all`, `-f` (the spelling of every command; the plural `--formats` is a hidden alias,
    `FormatAlias`)."""
    from unet_edge.formats import export_formats

    return typer.Option("--format", "-f", metavar="[" + "|".join([*export_formats(), "all"]) + "],...", help=help)


# The plural spellings (deploy's in earlier versions), hidden from --help.
FormatAlias = Annotated[str | None, typer.Option("--formats", hidden=True)]
PrecisionAlias = Annotated[str | None, typer.Option("--precisions", hidden=True)]


def debug_enabled() -> bool:
    return os.environ.get("UNET_EDGE_DEBUG", "") not in ("", "0")


def handle_errors(fn: F) -> F:
    """Turn library errors into `error: <message>` on stderr and a non-zero exit (traceback only with --debug).

    An OSError that no library code turned into a typed error (a folder that cannot be created, a
    file that cannot be read) takes the same path, named by its file, rather than a traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from unet_edge.errors import UNetEdgeError

        try:
            return fn(*args, **kwargs)
        except (UNetEdgeError, OSError) as exc:
            if debug_enabled():
                raise
            if isinstance(exc, OSError):
                where = exc.filename2 or exc.filename
                message = f"{where}: {exc.strerror or exc}" if where else str(exc)
            else:
                message = str(exc)
            err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
            raise typer.Exit(code=getattr(exc, "exit_code", 1)) from None
        except KeyboardInterrupt:
            err_console.print("interrupted", soft_wrap=True)
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]  # functools.wraps keeps the signature F describes


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def iou_table(classes: Sequence[str], per_class: Sequence[float | None], miou: float | None, title: str) -> Table:
    table = Table(title=title)
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for name, value in zip(classes, per_class):
        table.add_row(name, fmt(value))
    table.add_section()
    table.add_row("[bold]mean[/]", f"[bold]{fmt(miou)}[/]")
    return table


def write_json(path: Path | None, payload: Any) -> None:
    if path is None:
        return
    from unet_edge.io import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2, allow_nan=False) + "\n")
    err_console.print(f"wrote {path}")


@contextlib.contextmanager
def progress_display(description: str, status: str = "") -> Iterator[Progress]:
    """A rich bar for one command, rendering the library's progress protocol: `(done, total, label)`, the label
    shown beside the bar (what is being done now), `total` None while unknown."""
    with progress_bar() as bar:
        task = bar.add_task(description, total=None, status=status)

        def update(done: float, total: float | None, label: str) -> None:
            bar.update(task, completed=done, total=total, status=label)

        yield update


def _progress_console() -> Console:
    """The console progress bars draw on: stderr through a descriptor of its own, so that a bar keeps moving (and
    names the step) while a converter's output is captured at descriptors 1 and 2 (`unet_edge.quiet`)."""
    try:
        stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1, closefd=True)
    except (AttributeError, OSError, ValueError):  # no descriptor behind stderr (a test runner's capture)
        return err_console
    return Console(file=stream, highlight=False, width=None if stream.isatty() else 140)


def progress_bar(enabled: bool = True, **kwargs: Any):
    """A rich progress bar on stderr with ETA; off when not `enabled` (other ranks) or UNET_EDGE_PROGRESS=0."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=_progress_console() if enabled else err_console,
        transient=False,
        disable=not enabled or os.environ.get("UNET_EDGE_PROGRESS", "") == "0",
        **kwargs,
    )
