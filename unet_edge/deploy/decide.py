"""The decision: a pure function of the measured records. Nothing here measures, writes or changes a record."""

from __future__ import annotations

from dataclasses import dataclass

from ..formats import within_budget
from .records import Candidate, DeployError

__all__ = ["Decision", "Verdict", "checkpoint_over_budget", "decide", "pareto_front", "verdict"]


def checkpoint_over_budget(miou: float, reference_miou: float, max_miou_drop: float) -> str | None:
    """Why no candidate of a checkpoint can win, before any is exported: its own val mIoU is already further below
    the reference's than the budget allows, and its exports only track it (fp32 to the pixel, the variants within
    their own drop). None when it is within the budget."""
    drop = reference_miou - miou
    if within_budget(drop, max_miou_drop):
        return None
    return (
        f"not exported: its checkpoint's val mIoU {miou:.4f} is {drop:.4f} below the reference's, over the budget "
        f"{max_miou_drop:.4f}"
    )


def verdict(candidate: Candidate, max_miou_drop: float, max_latency_ms: float | None = None) -> str | None:
    """Why `candidate` cannot win (None: it can, once timed): what failed while exporting, measuring or timing
    it, else its mIoU drop over the budget, else (once timed) its p50 over the latency budget. The budgets are
    compared here (and, for a whole checkpoint before its exports, in `checkpoint_over_budget`) and nowhere else
    in deploy."""
    if candidate.rejected is not None:
        return candidate.rejected
    if candidate.miou_drop is None:
        return "not measured"
    if not within_budget(candidate.miou_drop, max_miou_drop):
        return f"over budget: val mIoU drop {candidate.miou_drop:.4f} > {max_miou_drop:.4f}"
    if max_latency_ms is not None and candidate.p50 is not None and candidate.p50 > max_latency_ms:
        return f"over the latency budget: p50 {candidate.p50:.3f} ms > {max_latency_ms:.3f} ms"
    return None


@dataclass(frozen=True)
class Verdict:
    """A candidate with the decision's word on it: `reason` is None for those that passed."""

    candidate: Candidate
    reason: str | None
    pareto: bool = False
    winner: bool = False

    @property
    def status(self) -> str:
        return "winner" if self.winner else "ok" if self.reason is None else "rejected"


@dataclass(frozen=True)
class Decision:
    """Every candidate's verdict in report order (timed ones by p50, then the others by drop), the Pareto front
    of latency against mIoU, the winner (None: nothing passes) and, when nothing passes, the closest."""

    verdicts: tuple[Verdict, ...]
    front: tuple[Candidate, ...]
    winner: Candidate | None
    closest: Candidate | None
    max_miou_drop: float
    max_latency_ms: float | None = None

    @property
    def ranked(self) -> list[Candidate]:
        return [v.candidate for v in self.verdicts]

    def require_winner(self) -> Candidate:
        """The winner, or a `DeployError` naming the closest candidate and its drop."""
        if self.winner is not None:
            return self.winner
        if self.closest is None:
            raise DeployError("no candidate could be exported and measured (see the table for each one's reason)")
        if self.max_latency_ms is not None and self.closest.p50 is not None:
            raise DeployError(
                f"{self.closest.path or self.closest.checkpoint}: no candidate within the accuracy budget runs in "
                f"{self.max_latency_ms:.3f} ms; the fastest, {self.closest.label}, takes {self.closest.p50:.3f} ms"
            )
        raise DeployError(
            f"{self.closest.path or self.closest.checkpoint}: no candidate keeps the accuracy; the closest, "
            f"{self.closest.label}, drops val mIoU by {self.closest.miou_drop:.4f} (budget {self.max_miou_drop:.4f})"
        )


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """The timed candidates no other one beats on both latency (p50) and val mIoU, fastest first."""
    points = [(c, c.p50, c.miou) for c in candidates if c.p50 is not None and c.miou is not None]

    def dominated(p50: float, miou: float) -> bool:
        return any(q <= p50 and m >= miou and (q < p50 or m > miou) for _, q, m in points)

    kept = [(c, p50, miou) for c, p50, miou in points if not dominated(p50, miou)]
    return [c for c, _, _ in sorted(kept, key=lambda point: (point[1], -point[2]))]


def decide(candidates: list[Candidate], max_miou_drop: float, max_latency_ms: float | None = None) -> Decision:
    """The winner is the lowest p50 among timed candidates within the budget (ties: higher mIoU, then the
    smaller file); with a latency budget, the highest val mIoU among those within both budgets (ties: lower
    p50, then the smaller file). The front is over the candidates within the accuracy budget. With no winner,
    the closest is the fastest candidate within the accuracy budget when a latency budget ruled them all out,
    else the candidate with the smallest drop."""
    reasons = [verdict(c, max_miou_drop, max_latency_ms) for c in candidates]
    accurate = [c for c in candidates if verdict(c, max_miou_drop) is None and c.p50 is not None]
    eligible = [(c, c.p50) for c, why in zip(candidates, reasons) if why is None and c.p50 is not None]
    front = pareto_front(accurate)
    if max_latency_ms is None:
        best = min(eligible, key=lambda pair: (pair[1], -(pair[0].miou or 0.0), pair[0].size_mb or 0.0), default=None)
    else:
        best = min(eligible, key=lambda pair: (-(pair[0].miou or 0.0), pair[1], pair[0].size_mb or 0.0), default=None)
    winner = None if best is None else best[0]
    measured = [(c, c.miou_drop) for c in candidates if c.miou_drop is not None]
    if winner is not None or not measured:
        closest = None
    elif max_latency_ms is not None and accurate:
        closest = min(accurate, key=lambda c: c.p50 or 0.0)
    else:
        closest = min(measured, key=lambda pair: pair[1])[0]
    on_front = {id(c) for c in front}
    verdicts = [Verdict(c, why, pareto=id(c) in on_front, winner=c is winner) for c, why in zip(candidates, reasons)]
    timed = sorted((v for v in verdicts if v.candidate.p50 is not None), key=lambda v: v.candidate.p50 or 0.0)
    rest = sorted(
        (v for v in verdicts if v.candidate.p50 is None),
        key=lambda v: (v.candidate.miou_drop is None, v.candidate.miou_drop or 0.0),
    )
    return Decision(tuple(timed + rest), tuple(front), winner, closest, max_miou_drop, max_latency_ms)
