"""Planning: which format x precision pairs compete, from the registry and what this CPU computes natively."""

from __future__ import annotations

from dataclasses import dataclass

from ..cpuinfo import precision_skip_reason
from ..errors import UNetEdgeError
from ..formats import Precision, Provider, export_formats
from .records import Skipped

__all__ = ["Plan", "plan_candidates"]


@dataclass(frozen=True)
class Plan:
    """The formats to export with the precisions each competes in, and what was left out with the reason."""

    formats: tuple[tuple[str, tuple[Precision, ...]], ...]
    skipped: tuple[Skipped, ...]

    @property
    def pairs(self) -> int:
        return sum(len(precisions) for _, precisions in self.formats)


def plan_candidates(formats: tuple[str, ...] | None, precisions: tuple[Precision, ...] | None) -> Plan:
    """Formats whose runtime is installed, with the precisions each declares and this CPU computes natively."""
    exportable = export_formats()
    names = tuple(exportable) if formats is None else formats
    unknown = [name for name in names if name not in exportable]
    if unknown:
        raise UNetEdgeError(f"unknown format {unknown[0]!r}: use {', '.join(exportable)}")
    plan: list[tuple[str, tuple[Precision, ...]]] = []
    skipped: list[Skipped] = []
    for name in names:
        fmt = exportable[name]
        offered = tuple(p for p in fmt.precisions if precisions is None or p in precisions)
        if not offered:
            continue
        why = fmt.unavailable(Provider.CPU)
        if why is not None:
            skipped.append(Skipped(name, None, why))
            continue
        kept = []
        for precision in offered:
            reason = precision_skip_reason(precision.value)
            if reason is None:
                kept.append(precision)
            else:
                skipped.append(Skipped(name, precision.value, reason))
        if kept:
            plan.append((name, tuple(kept)))
    return Plan(tuple(plan), tuple(skipped))
