"""Turn per-tensor evidence into findings, each with one cause, the tensors, the numbers, and one fix.

Facts come first: every tensor is recorded as bitwise unchanged, partly unchanged, changed, non-finite, or
unknown (no reference). Causes then explain the facts, and the status follows from both: a tensor that the
reference shows unchanged after optimizer steps never leaves a run "healthy"; when no cause explains it, it is
still a finding (``frozen_unexplained``) that says what evidence was and was not available.

The causes are the registered checkpoint causes (:mod:`moe_arch.doctor.causes.weights` lists them and their
rules): :func:`diagnose` runs them in their order, and a tensor gets the first (most fundamental) cause that
claims it.

Status: ``critical`` or ``warning`` from the findings; ``inconclusive`` when there is no finding but the evidence
cannot support "healthy" (the reasons say what is missing); ``untrained`` for a checkpoint before its first
optimizer step; ``healthy`` only when the evidence was there and showed nothing.
"""

from __future__ import annotations

from moe_arch.checkpoint.readers import CheckpointView
from moe_arch.doctor.analyze import TensorEvidence
from moe_arch.doctor.causes import REGISTRY, CheckpointCause, CheckpointEvidence, Finding, checkpoint_causes, describe
from moe_arch.doctor.optim_map import OptimizerSummary


def diagnose(
    evidence: list[TensorEvidence],
    optimizers: list[OptimizerSummary],
    has_optimizer_state: bool,
    reference: str | None,
    steps: int | None = None,
    reference_identical: bool = False,
    view: CheckpointView | None = None,
) -> list[Finding]:
    """Findings from the facts. ``steps``: optimizer steps the checkpoint records (None: unknown; then any
    tensor that changed since the reference shows that steps were taken). ``reference_identical``: the reference
    is the same state as the checkpoint (then "unchanged" says nothing about training)."""
    ev = CheckpointEvidence(evidence, optimizers, has_optimizer_state, reference, steps, reference_identical, view=view)
    findings: list[Finding] = []
    for c in checkpoint_causes():
        found = c.detect(ev)
        if c.claims:
            ev.claimed |= {t for f in found for t in f.tensors}
        findings += found
    for f in findings:
        f.summary = summarize(f)
    findings.sort(key=lambda f: (f.severity != "critical", -len(f.tensors), REGISTRY[f.cause].rank))
    return findings


def summarize(f: Finding) -> str:
    c = REGISTRY.get(f.cause)
    return c.summarize(f) if isinstance(c, CheckpointCause) else describe(f.tensors)


def status_of(findings: list[Finding], inconclusive: list[str] | None = None, untrained: bool = False) -> str:
    if any(f.severity == "critical" for f in findings):
        return "critical"
    if findings:
        return "warning"
    if untrained:
        return "untrained"
    if inconclusive:
        return "inconclusive"
    return "healthy"
