"""The result: every trial with its val mIoU and its architecture's latency, the accuracy-latency Pareto front
(search.json, search.png) and deploy's verdict on the front's checkpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from ..deploy.decide import pareto_front
from ..io import atomic_write_text
from .latency import LatencyTable, TableSettings
from .space import Architecture
from .study import shown_url

__all__ = ["PLOT_FILE", "REPORT_FILE", "SearchResult", "TrialRecord", "collect_trials", "write_report"]

REPORT_FILE = "search.json"
PLOT_FILE = "search.png"


@dataclass(frozen=True)
class TrialRecord:
    """One trial of the study: what it trained, how it ended, its val mIoU and its architecture's table latency."""

    number: int
    state: str  # complete, pruned, fail, running, waiting
    params: dict[str, Any]
    miou: float | None
    latency_ms: float | None
    run_dir: str | None
    checkpoint: str | None
    note: str | None = None  # why it was pruned or failed, or the trial whose result it shares

    @property
    def p50(self) -> float | None:
        return self.latency_ms

    @property
    def architecture(self) -> str:
        return str(self.params.get("architecture", ""))


@dataclass(frozen=True)
class SearchResult:
    folder: Path
    table: LatencyTable
    settings: TableSettings
    budget_ms: float | None
    teacher: str | None
    teacher_ms: float | None
    space: tuple[Architecture, ...]
    best_rows: dict[str, dict[str, Any]]
    feasible: tuple[Architecture, ...]
    trials: tuple[TrialRecord, ...] = ()
    study_name: str = ""
    storage: str = ""
    deploy: Any = None  # deploy's DeployResult on the front's checkpoints
    wall_s: float = 0.0
    report: Path | None = None
    plot: Path | None = None

    @property
    def front(self) -> list[TrialRecord]:
        """The finished trials (each trained once) no other beats on both val mIoU and latency, fastest first."""
        trained = [t for t in self.trials if t.state == "complete" and t.checkpoint and "same as" not in (t.note or "")]
        return cast(list[TrialRecord], pareto_front(cast(list[Any], trained)))  # it reads .p50 and .miou only


def collect_trials(study: Any) -> tuple[TrialRecord, ...]:
    """The study's trials as records (those turned away by the trial limit left out), by number."""
    records = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if "skipped" in attrs:
            continue
        run_dir = attrs.get("run_dir")
        best = Path(run_dir) / "best.pt" if run_dir else None
        note = None
        if "same_as" in attrs:
            note = f"same as trial {attrs['same_as']}"
        elif "failed" in attrs:
            note = attrs["failed"]
        elif "stopped" in attrs:
            note = f"stopped by {attrs['stopped']}"
        elif trial.state.name == "PRUNED":
            note = "pruned"
        elif trial.state.name == "FAIL":
            note = "its process ended before it finished"
        values = list(trial.intermediate_values.values())
        miou = trial.value if trial.value is not None else (max(values) if values else None)
        records.append(
            TrialRecord(
                number=trial.number,
                state=trial.state.name.lower(),
                params=dict(trial.params),
                miou=None if miou is None else float(miou),
                latency_ms=attrs.get("latency_ms"),
                run_dir=run_dir,
                checkpoint=str(best) if best is not None and best.is_file() else None,
                note=note,
            )
        )
    return tuple(sorted(records, key=lambda r: r.number))


def _deploy_json(deploy: Any) -> dict[str, Any] | None:
    if deploy is None:
        return None
    winner = deploy.decision.winner
    return {
        "report": str(deploy.report),
        "folder": str(deploy.out),
        # deploy's figures on the table's scale: what it timed times this factor (1.0: the machine ran as then)
        "anchor_scale": None if deploy.baseline is None else deploy.baseline.scale,
        "winner": None
        if winner is None
        else {
            "model": winner.model,
            "checkpoint": winner.checkpoint,
            "format": winner.format,
            "precision": winner.precision,
            "latency_ms": winner.latency_ms,
            "val_miou": winner.miou,
            "files": [str(p) for p in deploy.winner_files],
        },
    }


def search_json(result: SearchResult) -> dict[str, Any]:
    settings = result.settings
    front = {id(t) for t in result.front}
    return {
        "study": {"name": result.study_name, "storage": shown_url(result.storage)},
        "budget_ms": result.budget_ms,
        "teacher": result.teacher,
        "teacher_eager_p50_ms": result.teacher_ms,
        "latency_table": {
            "file": str(result.table.path),
            "machine": result.table.machine,
            "measured_on_this_machine": not result.table.foreign,
            "rows_measured_now": result.table.measured,
            "image_size": list(settings.image_size),
            "batch_size": settings.batch_size,
            "threads": settings.threads,
        },
        "architectures": [
            {
                "architecture": arch.name,
                "fastest": result.best_rows.get(arch.name),
                "feasible": arch in result.feasible,
            }
            for arch in result.space
        ],
        "trials": [
            {
                "number": t.number,
                "state": t.state,
                "params": t.params,
                "val_miou": t.miou,
                "latency_ms": t.latency_ms,
                "run_dir": t.run_dir,
                "checkpoint": t.checkpoint,
                "note": t.note,
                "pareto": id(t) in front,
            }
            for t in result.trials
        ],
        "front": [
            {
                "number": t.number,
                "architecture": t.architecture,
                "val_miou": t.miou,
                "latency_ms": t.p50,
                "checkpoint": t.checkpoint,
            }
            for t in result.front
        ],
        "deploy": _deploy_json(result.deploy),
        "wall_s": result.wall_s,
    }


def _plot(result: SearchResult, path: Path) -> Path | None:
    points = [(t.state, t.latency_ms, t.miou) for t in result.trials if t.miou is not None and t.latency_ms is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for state, marker in (("complete", "o"), ("pruned", "x")):
        chosen = [(latency, miou) for kind, latency, miou in points if kind == state]
        if chosen:
            axes.scatter(*zip(*chosen, strict=True), marker=marker, label=state, alpha=0.7)
    front = result.front
    if front:
        axes.plot(
            [t.latency_ms or 0.0 for t in front], [t.miou or 0.0 for t in front], "r-", marker="D", label="Pareto front"
        )
    if result.budget_ms is not None:
        axes.axvline(result.budget_ms, color="grey", linestyle="--", label=f"budget {result.budget_ms:.2f} ms")
    size = "x".join(map(str, result.settings.image_size))
    axes.set_xlabel(f"fastest artifact p50 (ms) at {size}, batch {result.settings.batch_size}")
    axes.set_ylabel("best val mIoU")
    axes.set_title(f"search {result.study_name}: {len(points)} trials")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_report(result: SearchResult) -> SearchResult:
    result.folder.mkdir(parents=True, exist_ok=True)
    plot = _plot(result, result.folder / PLOT_FILE)
    report = result.folder / REPORT_FILE
    atomic_write_text(report, json.dumps(search_json(result), indent=2, allow_nan=False, default=str) + "\n")
    return replace(result, report=report, plot=plot)
