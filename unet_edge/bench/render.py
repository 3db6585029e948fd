"""Rendering a bench report: the one column list that both the Markdown table and the terminal's table are
built from, and the latency/throughput plot."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UNetEdgeError

__all__ = ["COLUMNS", "Column", "backend_label", "plot", "to_markdown"]

Row = dict[str, Any]


@dataclass(frozen=True)
class Column:
    """A column of the results table: `cell` is its text in Markdown and, unless `terminal_cell` is given, on the
    terminal too, where `terminal_title` (if given) is a shorter title. Text columns are left-aligned there."""

    title: str
    cell: Callable[[Row], str]
    text: bool = False
    terminal_title: str | None = None
    terminal_cell: Callable[[Row], str] | None = None

    def terminal(self, row: Row) -> str:
        return (self.terminal_cell or self.cell)(row)


def backend_label(row: Row) -> str:
    """The runtime, and for PyTorch rows the variant that ran ("pytorch channels-last")."""
    return f"{row['backend']} {row['variant']}" if row.get("variant") else row["backend"]


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _figure(key: str, digits: int = 1) -> Callable[[Row], str]:
    return lambda row: _number(row[key], digits)


def _latency(stat: str) -> Callable[[Row], str]:
    return lambda row: _number((row["latency_ms"] or {}).get(stat))


def _short_status(row: Row) -> str:
    status = row["status"]
    return status if status == "ok" else "[red]failed[/]" if status.startswith("failed") else "[yellow]unavailable[/]"


COLUMNS: tuple[Column, ...] = (
    Column(
        "model",
        lambda row: "/".join(Path(row["path"]).parts[-2:]),
        text=True,
        terminal_cell=lambda row: Path(row["path"]).name,
    ),
    Column("backend", backend_label, text=True),
    Column(
        "provider",
        lambda row: row["provider"],
        text=True,
        terminal_cell=lambda row: row["provider"].replace("ExecutionProvider", ""),
    ),
    Column("precision", lambda row: row["precision"] or "-", terminal_title="prec"),
    Column("batch", lambda row: str(row["batch_size"] or "-")),
    Column("H×W", lambda row: f"{row['height']}×{row['width']}"),
    *(Column(f"{stat} ms", _latency(stat)) for stat in ("p50", "p90", "p99", "mean", "min")),
    Column("img/s", _figure("throughput_ips")),
    Column("GFLOP/img", _figure("gflops_per_image", 2)),
    Column("GFLOP/s", _figure("gflops_per_s")),
    Column("roofline", _figure("roofline_fraction", 2)),
    Column("MB", _figure("file_mb", 2)),
    Column("status", lambda row: row["status"], text=True, terminal_cell=_short_status),  # rich markup on the terminal
)


def to_markdown(report: dict[str, Any]) -> str:
    """The results as a Markdown table (what benchmarks/README.md and `bench --markdown` contain)."""
    lines = ["| " + " | ".join(column.title for column in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(column.cell(row) for column in COLUMNS) + " |" for row in report["results"]]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Latency per backend (smallest batch) and throughput against batch size, as one PNG."""
    from ..io import pyplot, save_figure

    rows = [r for r in report["results"] if r["status"] == "ok"]
    if not rows:
        raise UNetEdgeError("nothing to plot: no backend could be measured")
    smallest = min(r["batch_size"] for r in rows)
    fig, (ax_lat, ax_tp) = pyplot().subplots(1, 2, figsize=(12, 4.5))
    first = [r for r in rows if r["batch_size"] == smallest]
    labels = [f"{backend_label(r)}\n{r['provider'].replace('ExecutionProvider', '')}\n{r['precision']}" for r in first]
    ax_lat.bar(range(len(first)), [r["latency_ms"]["p50"] for r in first], color="C0")
    ax_lat.errorbar(
        range(len(first)),
        [r["latency_ms"]["p50"] for r in first],
        yerr=[[0] * len(first), [r["latency_ms"]["p90"] - r["latency_ms"]["p50"] for r in first]],
        fmt="none",
        color="black",
        capsize=3,
    )
    ax_lat.set_xticks(range(len(first)), labels, fontsize=8)
    ax_lat.set(
        ylabel="latency ms (p50, bar to p90)",
        title=f"Latency, batch {smallest}, {rows[0]['height']}×{rows[0]['width']}",
    )
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        series.setdefault(
            f"{backend_label(r)} {r['provider'].replace('ExecutionProvider', '')} {r['precision']}", []
        ).append((r["batch_size"], r["throughput_ips"]))
    for name, points in series.items():
        points.sort()
        ax_tp.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax_tp.set(xlabel="batch size", ylabel="images/s", title="Throughput against batch size")
    ax_tp.legend(fontsize=8)
    for ax in (ax_lat, ax_tp):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
