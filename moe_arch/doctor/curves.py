"""Findings from a run's history: the registered curve causes (:mod:`moe_arch.doctor.causes.curves` lists them and
their rules), run over the loss, learning-rate, gradient, throughput and routing curves."""

from __future__ import annotations

from moe_arch.doctor.causes import CurveEvidence, Finding, curve_causes
from moe_arch.doctor.history import History


def curve_findings(
    h: History,
    vocab_size: int | None = None,
    n_experts: int | None = None,
    mod_capacity: float | None = None,
    grad_clip: float | None = None,
) -> list[Finding]:
    """Each curve cause in its order (a cause sees the findings of those before it), then the findings sorted by
    severity and first step. The arguments (from the run's config) win; the history's own metadata fills in."""
    ev = CurveEvidence(
        h,
        vocab_size or h.meta.get("vocab_size"),
        n_experts or h.meta.get("n_experts"),
        mod_capacity or h.meta.get("mod_capacity"),
        grad_clip or h.meta.get("grad_clip"),
    )
    for c in curve_causes():
        ev.found += c.detect(ev)
    return sorted(ev.found, key=lambda f: (f.severity != "critical", f.evidence.get("first_step", 0)))
