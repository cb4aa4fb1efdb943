"""What a cause is, what it sees, what it returns, and the registry that holds them.

A cause is one object: its name, its kind (``checkpoint``: explains per-tensor facts; ``curve``: reads a run's
history), when it runs (``order``), its severity rule, ``detect(evidence) -> [Finding]``, its recommendation and
the live monitor's short fix, and how its findings are summarised, explained in the report and alerted. Everything
that needs a cause's name (the engine's loop, the curve loop, the monitor, the report, the pipeline) asks the
registry, so adding a cause is one class and one ``@register`` in one module of this package.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, ClassVar

from moe_arch.checkpoint.readers import CheckpointView
from moe_arch.config import MonitorConfig
from moe_arch.doctor.analyze import TensorEvidence
from moe_arch.doctor.history import History
from moe_arch.doctor.optim_map import OptimizerSummary
from moe_arch.doctor.stacks import detect_stacks


@dataclass
class Finding:
    cause: str
    severity: str  # critical | warning
    tensors: list[str]
    evidence: dict
    recommendation: str
    experts: dict[str, list[int]] | None = None
    summary: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["experts"] is None:
            d.pop("experts")
        return d


# ---------------------------------------------------------------------------------------------- evidence
@dataclass
class CheckpointEvidence:
    """What checkpoint causes judge: the per-tensor facts and the optimizer summaries of one checkpoint (or of the
    live monitor's window). ``claimed``: tensors an earlier cause already explained (a tensor gets one cause, the
    most fundamental its evidence supports); the engine adds each claiming cause's tensors after it runs.
    ``steps``: optimizer steps the checkpoint records (None: unknown). ``reference_identical``: the reference is
    the checkpoint's own state (then "unchanged" says nothing about training). ``view``: the checkpoint itself
    (its meta, optimizer hyper-parameters and state, scaler and scheduler states), for causes that read facts
    beyond the per-tensor evidence; None for the live monitor's window."""

    tensors: list[TensorEvidence]
    optimizers: list[OptimizerSummary]
    has_optimizer_state: bool
    reference: str | None
    steps: int | None = None
    reference_identical: bool = False
    claimed: set[str] = field(default_factory=set)
    view: CheckpointView | None = None

    @cached_property
    def stacks(self) -> tuple[str, ...]:
        """The stack keys of the checkpoint, most specific first (moe_arch.doctor.stacks; () without a view)."""
        return detect_stacks(self.view)

    @cached_property
    def params(self) -> list[TensorEvidence]:
        return [e for e in self.tensors if not e.buffer_like]

    @cached_property
    def trained(self) -> bool | None:
        """The run took optimizer steps: from the step count, else from any tensor that changed (None: unknown)."""
        if self.steps is not None:
            return self.steps > 0
        return any(e.fact in ("changed", "partly_unchanged") for e in self.tensors if not e.buffer_like) or None

    @cached_property
    def ambiguous_names(self) -> set[str]:
        return {n for o in self.optimizers for a in o.ambiguous for n in a["candidates"]}

    @cached_property
    def unmapped_optimizer(self) -> bool:
        """An optimizer whose parameters could not all be matched to names: which tensors it holds is unknown, so
        "in no optimizer" cannot be claimed for any tensor."""
        return not all(o.fully_mapped for o in self.optimizers)

    def unclaimed(self) -> list[TensorEvidence]:
        return [e for e in self.params if e.name not in self.claimed]

    def in_optimizer(self) -> list[TensorEvidence]:
        """Unclaimed tensors that some optimizer holds."""
        return [e for e in self.params if e.optimizer is not None and e.name not in self.claimed]


@dataclass
class CurveEvidence:
    """What curve causes judge: a run's history and what its config says (vocabulary, experts, MoD capacity, clip
    threshold); ``found``: the findings of the curve causes that ran before (the loop appends them)."""

    history: History
    vocab_size: int | None = None
    n_experts: int | None = None
    mod_capacity: float | None = None
    grad_clip: float | None = None
    monitor: MonitorConfig | None = None  # the live monitor's settings the spike rule replays (default: defaults)
    found: list[Finding] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- causes
class Cause:
    """One registered cause. Subclass :class:`CheckpointCause` or :class:`CurveCause`, set the class attributes,
    implement ``detect``, and decorate the class with :func:`register`."""

    name: ClassVar[str]
    kind: ClassVar[str]  # checkpoint | curve
    # When it runs among its kind: checkpoint causes claim tensors in this order (the most fundamental first);
    # curve causes are listed in this order before the loop sorts their findings by severity and first step.
    order: ClassVar[int]
    severity: ClassVar[str]  # the severity rule, in words (detect applies it)
    recommendation: ClassVar[str]
    short_fix: ClassVar[str | None] = None  # the live monitor's one-line fix (None: the monitor never raises it)
    # The recommendation in the words of a stack (moe_arch.doctor.stacks keys: "hf-trainer", "lightning", "torchao",
    # "moe_arch", ...): the report gives the entry of the checkpoint's most specific stack, else `recommendation`.
    fixes: ClassVar[dict[str, str]] = {}

    def fix_for(self, stacks: tuple[str, ...], given: str) -> str:
        """The recommendation for these stacks, when ``given`` is this cause's default one (a finding that wrote its
        own keeps it)."""
        if given != self.recommendation:
            return given
        return next((self.fixes[s] for s in stacks if s in self.fixes), given)

    def detect(self, evidence: Any) -> list[Finding]:
        raise NotImplementedError

    def finding(
        self, severity: str, tensors: list[str], evidence: dict, recommendation: str | None = None, **kw
    ) -> Finding:
        return Finding(self.name, severity, tensors, evidence, recommendation or self.recommendation, **kw)

    def summarize(self, f: Finding) -> str:
        return f.summary or describe(f.tensors)

    def explain(self, f: Finding) -> str:
        """The report's chain of evidence that decided the finding."""
        return f.summary


class CheckpointCause(Cause):
    kind: ClassVar[str] = "checkpoint"
    # Tie-break among findings of one severity and tensor count (the report lists the lower rank first).
    rank: ClassVar[int]
    claims: ClassVar[bool] = True  # its tensors get no later cause (False: a finding beside others)
    never_trained: ClassVar[bool] = False  # its tensors never trained: it explains a loss that does not fall
    before_training: ClassVar[bool] = False  # still judged on a checkpoint that took no optimizer step

    def detect(self, evidence: CheckpointEvidence) -> list[Finding]:
        raise NotImplementedError

    def alert(self, f: Finding, step: int, window: int, tensors: list[str]) -> str:
        """The live monitor's message (before its "cause ...; short fix" tail)."""
        return f"step {step}: {f.summary}"

    def corroborate(self, f: Finding, probe: dict) -> None:
        """Add what the model-aware probe (one real batch) says about the finding to its evidence."""


class CurveCause(Cause):
    kind: ClassVar[str] = "curve"
    flat_loss: ClassVar[bool] = False  # it says the loss does not fall: tensors that never trained explain it

    def detect(self, evidence: CurveEvidence) -> list[Finding]:
        raise NotImplementedError


REGISTRY: dict[str, Cause] = {}


def register(cls: type[Cause]) -> type[Cause]:
    """Class decorator: one instance of the cause joins the registry (a name or an order used twice is an error)."""
    c = cls()
    if c.name in REGISTRY:
        raise ValueError(f"cause {c.name!r} is registered twice")
    clash = [o.name for o in REGISTRY.values() if o.kind == c.kind and o.order == c.order]
    if clash:
        raise ValueError(f"cause {c.name!r} has the order {c.order} of {clash[0]!r}")
    REGISTRY[c.name] = c
    return cls


def cause(name: str) -> Cause:
    return REGISTRY[name]


def checkpoint_causes() -> list[CheckpointCause]:
    return sorted((c for c in REGISTRY.values() if isinstance(c, CheckpointCause)), key=lambda c: c.order)


def curve_causes() -> list[CurveCause]:
    return sorted((c for c in REGISTRY.values() if isinstance(c, CurveCause)), key=lambda c: c.order)


def is_curve(name: str) -> bool:
    return isinstance(REGISTRY.get(name), CurveCause)


# ---------------------------------------------------------------------------------------------- wording
def pattern_groups(names: list[str]) -> list[tuple[str, int]]:
    """Group names by replacing layer/expert indices with '*': [('layers.*.seq_norm.weight', 24), ...]."""
    counts: dict[str, int] = defaultdict(int)
    order: list[str] = []
    for n in names:
        p = re.sub(r"(?<=\.)\d+(?=\.)", "*", n)
        if p not in counts:
            order.append(p)
        counts[p] += 1
    return [(p, counts[p]) for p in order]


def describe(names: list[str], limit: int = 6) -> str:
    groups = pattern_groups(names)
    parts = [f"{p} \u00d7{c}" if c > 1 else p for p, c in groups[:limit]]
    if len(groups) > limit:
        parts.append(f"and {sum(c for _, c in groups[limit:])} more")
    return ", ".join(parts)


def fmt(v: Any) -> str:
    """A number, list or mapping as the reports print it."""
    if isinstance(v, float):
        if v == 0 or math.isnan(v):
            return f"{v:g}"
        return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v[:8]) + (" ..." if len(v) > 8 else "")
    if isinstance(v, dict):
        return "; ".join(f"{k}: {fmt(x)}" for k, x in list(v.items())[:8]) + (" ..." if len(v) > 8 else "")
    return str(v)


def fmt_list(xs) -> str:
    return "/".join(f"{x:.1e}" for x in (xs or [])) or "?"
