"""The report: deploy.json, deploy.png, and the winner copied out with its manifest entry and EMBEDDING.md."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..artifact import MANIFEST_FILE, read_manifest
from ..errors import ArtifactError
from ..formats import FORMATS
from ..io import atomic_path, atomic_write_text
from .decide import Decision
from .records import Baseline, Candidate, Machine, Reference, Settings, Skipped

__all__ = ["EMBEDDING_FILE", "PLOT_FILE", "REPORT_FILE", "DeployResult", "copy_winner", "plot", "write_outputs"]

REPORT_FILE = "deploy.json"
PLOT_FILE = "deploy.png"
EMBEDDING_FILE = "EMBEDDING.md"


@dataclass
class DeployResult:
    """Everything `run_deploy` measured and decided, and the files it wrote."""

    candidates: list[Candidate]
    decision: Decision
    reference: Reference
    baseline: Baseline | None
    skipped: tuple[Skipped, ...]
    machine: Machine
    settings: Settings
    out: Path
    report: Path
    plot: Path | None = None
    winner_files: list[Path] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        rows = [
            {
                **asdict(v.candidate),
                "files": list(v.candidate.files),
                "rejected": v.reason,
                "pareto": v.pareto,
                "winner": v.winner,
            }
            for v in self.decision.verdicts
        ]
        winner, closest = self.decision.winner, self.decision.closest
        return {
            "producer": f"unet-edge {__version__}",
            "machine": self.machine.to_json(),
            "settings": {
                **asdict(self.settings),
                "checkpoints": list(self.settings.checkpoints),
                "image_size": list(self.settings.image_size),
            },
            "reference": asdict(self.reference),
            "baseline": {} if self.baseline is None else asdict(self.baseline),
            "skipped": [asdict(s) for s in self.skipped],
            "candidates": rows,
            "winner": None if winner is None else winner.key,
            "closest": None if closest is None else closest.key,
        }


def write_outputs(result: DeployResult) -> DeployResult:
    """deploy.json, deploy.png when anything was timed, and the winner's files: the result with their paths."""
    atomic_write_text(result.report, json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n")
    if any(c.p50 is not None for c in result.candidates):
        result.plot = plot(result, result.out / PLOT_FILE)
    if result.decision.winner is not None:
        result.winner_files = copy_winner(result.decision.winner, result.out, result)
    return result


def copy_winner(winner: Candidate, out: Path, result: DeployResult) -> list[Path]:
    """Copy the winner's files into OUT with a manifest.json holding its entry alone (so verify, bench and
    predict check its sha256 there) and EMBEDDING.md, the README's snippet for its runtime. Files of an
    earlier winner listed in OUT's manifest are removed first."""
    from ..formats.embedding import embedding_markdown

    if winner.path is None:
        raise ArtifactError(f"{winner.label}: the winner has no file")
    source = Path(winner.path)
    manifest = read_manifest(source.parent)
    if manifest is None:
        raise ArtifactError(f"{source.parent}: no {MANIFEST_FILE} beside the winner")
    entry = next(e for e in manifest["artifacts"] if e["file"] == source.name)
    try:
        previous = read_manifest(out) or {}
    except ArtifactError:
        previous = {}
    for old in previous.get("artifacts", []):
        for record in (old, *old.get("companions", [])):
            (out / Path(record["file"]).name).unlink(missing_ok=True)
    copied = []
    for record in winner.files:
        target = out / Path(record["file"]).name
        with atomic_path(target) as staged:
            shutil.copyfile(record["file"], staged)
        copied.append(target)
    eager = None if result.baseline is None else result.baseline.p50
    ratio = None if eager is None or winner.p50 is None else winner.p50 / eager
    deploy_record = {
        "model": winner.model,
        "format": winner.format,
        "precision": winner.precision,
        "runtime": winner.runtime,
        "miou": winner.miou,
        "miou_drop": winner.miou_drop,
        "max_miou_drop": result.decision.max_miou_drop,
        "max_latency_ms": result.decision.max_latency_ms,
        "pixel_agreement": winner.pixel_agreement,
        "latency_ms": winner.latency_ms,
        "app_latency_ms": winner.app_latency_ms,
        "eager_ratio": ratio,
        "reference": result.reference.checkpoint,
        "machine": result.machine.cpu,
        "cpu_int8_bf16": list(result.machine.cpu_int8_bf16),
        "settings": result.to_json()["settings"],
    }
    atomic_write_text(
        out / MANIFEST_FILE, json.dumps({**manifest, "artifacts": [entry], "deploy": deploy_record}, indent=2) + "\n"
    )
    atomic_write_text(
        out / EMBEDDING_FILE,
        embedding_markdown(
            FORMATS[winner.format], source.name, [Path(f["file"]).name for f in winner.files[1:]], winner.precision
        ),
    )
    return [*copied, out / MANIFEST_FILE, out / EMBEDDING_FILE]


def plot(result: DeployResult, path: Path) -> Path:
    """Latency (p50, log scale) against val mIoU: every timed candidate, the Pareto front, the winner, the
    reference checkpoint's eager point and mIoU, and the budget line."""
    from ..io import pyplot, save_figure

    decision = result.decision
    timed = [c for c in decision.ranked if c.p50 is not None]
    fig, ax = pyplot().subplots(figsize=(9, 5.5))
    models = sorted({c.model for c in timed})
    for index, model in enumerate(models):
        points = [c for c in timed if c.model == model]
        ax.scatter(
            [c.p50 for c in points], [c.miou for c in points], color=f"C{index}", label=model, alpha=0.7, zorder=2
        )
    front = decision.front
    if front:
        ax.step(
            [c.p50 for c in front],
            [c.miou for c in front],
            where="post",
            color="black",
            linewidth=1,
            label="Pareto front",
            zorder=1,
        )
        for c in front:
            ax.annotate(
                f"{c.format} {c.precision}", (c.p50, c.miou), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
    if decision.winner is not None:
        ax.scatter(
            [decision.winner.p50],
            [decision.winner.miou],
            marker="*",
            s=260,
            color="gold",
            edgecolor="black",
            label="winner",
            zorder=3,
        )
    reference_miou = result.reference.miou
    ax.axhline(
        reference_miou, color="grey", linestyle=":", linewidth=1, label=f"reference mIoU ({result.reference.model})"
    )
    ax.axhline(
        reference_miou - decision.max_miou_drop,
        color="red",
        linestyle="--",
        linewidth=1,
        label=f"budget (drop {decision.max_miou_drop:g})",
    )
    if result.baseline is not None and result.baseline.p50 is not None:
        ax.scatter(
            [result.baseline.p50],
            [reference_miou],
            marker="s",
            color="grey",
            label="reference, PyTorch eager",
            zorder=3,
        )
    ax.set_xscale("log")
    settings, machine = result.settings, result.machine
    size = "×".join(str(v) for v in settings.image_size)
    flags = ", ".join(machine.cpu_int8_bf16) or "no int8/bf16 instructions"
    ax.set(
        xlabel=f"p50 latency, ms (batch {settings.batch_size}, {size}, {settings.threads} threads, log scale)",
        ylabel="val mIoU",
        title=f"deploy on {machine.cpu} ({flags})",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)
