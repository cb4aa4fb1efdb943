"""Mixture-of-experts layers found by structure, on every layout, and the experts in them that never trained.

A router scores E experts of the model's width d: a 2-D tensor [E, d] (E >= 2). Its experts are its siblings
inside the MoE block (the router's parent module): either stacked tensors with leading dim E ([E, a, b] with d in
(a, b), as transformers 5, DeepSeek-style and our own models train them), or E sibling submodules
``<container>.<i>.<...>`` for i in 0..E-1 with identical tensor shapes (as transformers 5 *saves* Mixtral
``block_sparse_moe.experts.<i>.w1``, and Qwen2/3-MoE, OLMoE and DeepSeek ``mlp.experts.<i>.gate_proj``). Names
vary by stack (``gate``, ``router``, ``w_in``); this structure does not.

An expert is dead when every tensor (or stacked slice) of it got no gradient: all-zero moments or no optimizer
state (that is the direct evidence, judged alone or with a reference), or, where no optimizer state is mapped to
it, unchanged since the reference. A set of dead experts beside siblings that trained is ``dead_experts`` (the
router never sent them a token), not a ``no_gradient`` or ``frozen_unexplained`` on their tensors.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # typing only: analyze imports this module
    from moe_arch.doctor.analyze import TensorEvidence

MAX_EXPERT_TENSORS = 8  # tensors per expert submodule (w1/w2/w3, gate/up/down, + biases); a decoder layer has more
_INDEX = re.compile(r"^(.*?)\.(\d+)\.(.+)$")
_LAYER = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


@dataclass
class ExpertSet:
    """The experts of one router: ``members[k]`` lists expert k's tensors as (name, slice index), the slice index
    being k for a stacked [E, ...] tensor and None for a tensor of expert k alone."""

    router: str
    module: str  # the MoE block: the router's parent module
    n_experts: int
    layer: int | None
    layout: str  # stacked | per-expert
    members: list[list[tuple[str, int | None]]] = field(default_factory=list)

    @property
    def tensors(self) -> list[str]:
        return sorted({n for m in self.members for n, _ in m})


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _under(name: str, scope: str) -> bool:
    return name.startswith(scope + ".") if scope else True


def layer_of(module: str) -> int | None:
    found = _LAYER.findall(module)
    return int(found[-1]) if found else None


def find_expert_sets(shapes: dict[str, tuple[int, ...]]) -> list[ExpertSet]:
    """Every router [E, d] with E experts beside it (stacked or per expert), in name order; a tensor belongs to
    one set at most."""
    sets: list[ExpertSet] = []
    taken: set[str] = set()
    for router, rshape in shapes.items():
        if len(rshape) != 2 or rshape[0] < 2 or router in taken:
            continue
        n, d = rshape
        module = _parent(router)
        block = _parent(module) if router.endswith(".weight") else module
        for scope in dict.fromkeys((block, module)):
            found = _stacked(shapes, router, scope, n, d, taken) or _per_expert(shapes, router, scope, n, d, taken)
            if found is not None:
                layout, members = found
                sets.append(ExpertSet(router, scope, n, layer_of(scope), layout, members))
                taken |= {router} | {t for m in members for t, _ in m}
                break
    return sets


def _stacked(shapes, router, scope, n, d, taken):
    """[E, a, b] tensors under the block with d in (a, b), and the [E, x] tensors (stacked biases) of their
    modules."""
    cubes = [
        t
        for t, s in shapes.items()
        if t not in taken and _under(t, scope) and len(s) == 3 and s[0] == n and d in s[1:] and t != router
    ]
    if not cubes:
        return None
    mods = {_parent(t) for t in cubes}
    extra = [
        t
        for t, s in shapes.items()
        if t not in taken and t != router and len(s) == 2 and s[0] == n and _parent(t) in mods and t not in cubes
    ]
    names = cubes + extra
    return "stacked", [[(t, k) for t in names] for k in range(n)]


def _per_expert(shapes, router, scope, n, d, taken):
    """E sibling submodules ``<container>.<i>.<...>`` (i = 0..E-1) under the block, each a few matrices (and
    biases) of identical shapes, one of them of width d."""
    by_container: dict[str, dict[int, dict[str, tuple[int, ...]]]] = defaultdict(lambda: defaultdict(dict))
    for t, s in shapes.items():
        if t in taken or t == router or not _under(t, scope):
            continue
        m = _INDEX.match(t[len(scope) + 1 :] if scope else t)
        if m is None:
            continue
        container = f"{scope}.{m.group(1)}" if scope else m.group(1)
        if _parent(router).startswith(container + "."):
            continue  # the router sits inside it: a stack of blocks, not experts of this router
        by_container[container][int(m.group(2))][m.group(3)] = tuple(s)
    for container, experts in by_container.items():
        if set(experts) != set(range(n)):
            continue
        layout = experts[0]
        if not (
            0 < len(layout) <= MAX_EXPERT_TENSORS
            and all(experts[k] == layout for k in range(n))
            and all(len(s) >= 2 or rest.endswith("bias") for rest, s in layout.items())
            and any(d in s for s in layout.values() if len(s) >= 2)
        ):
            continue
        return "per-expert", [[(f"{container}.{k}.{rest}", None) for rest in sorted(layout)] for k in range(n)]
    return None


def stacked_expert_tensors(shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """The stacked [E, ...] expert tensors (each judged per expert slice)."""
    return {t for s in find_expert_sets(shapes) if s.layout == "stacked" for m in s.members[:1] for t, _ in m}


# ------------------------------------------------------------------------------------------------ dead experts
@dataclass
class DeadExpertSet:
    expert_set: ExpertSet
    dead: list[int]
    alive: list[int]
    evidence: str  # what showed it: all-zero optimizer moments / no optimizer state / unchanged since the reference
    tensors: list[str]  # the tensors named: the dead experts' own tensors, or the stacked tensors holding them
    whole_tensors: list[str]  # tensors that belong to dead experts alone (explained wholly by dead_experts)


def _member_state(e: TensorEvidence, k: int | None) -> bool | None:
    """The member got no gradient by its optimizer state (None: no mapped state says)."""
    if k is None:
        if e.optimizer is None:
            return None
        if not e.has_state:
            return True
        return e.moments_zero
    return e.slice_state_zero[k] if e.slice_state_zero is not None else None


def _member_unchanged(e: TensorEvidence, k: int | None) -> bool | None:
    if k is None:
        return e.unchanged if e.has_reference else None
    return e.slice_unchanged[k] if e.slice_unchanged is not None else None


def _judge(members: list[tuple[TensorEvidence, int | None]]) -> tuple[bool | None, str | None]:
    """Is this expert dead, and by which evidence (None: the evidence cannot say)."""
    state = [_member_state(e, k) for e, k in members]
    if all(s is not None for s in state):
        if all(state):
            no_state = all(k is None and not e.has_state for e, k in members)
            return True, "no optimizer state" if no_state else "all-zero optimizer moments"
        return False, None
    changed = [_member_unchanged(e, k) for e, k in members]
    if all(c is not None for c in changed):
        return (True, "unchanged since the reference") if all(changed) else (False, None)
    return None, None


def dead_expert_sets(
    evidence: list[TensorEvidence], claimed: set[str] | frozenset = frozenset()
) -> list[DeadExpertSet]:
    """Expert sets in which some experts got no gradient while at least one sibling trained. Experts with a
    tensor that an earlier cause explained (non-finite, in no optimizer, lr 0) or that cannot be judged are left
    out, and stacked tensors without a router beside them are grouped by their module."""
    by_name = {e.name: e for e in evidence}
    sets = find_expert_sets({e.name: tuple(e.shape) for e in evidence if not e.buffer_like})
    covered = {t for s in sets for t in s.tensors}
    orphans: dict[str, list[TensorEvidence]] = defaultdict(list)
    for e in evidence:  # stacked by name (``experts`` in it) with per-slice facts, but no router found beside it
        if e.name not in covered and (e.slice_unchanged is not None or e.slice_state_zero is not None):
            orphans[_parent(e.name)].append(e)
    for module, es in orphans.items():
        n = es[0].shape[0]
        es = [e for e in es if e.shape[0] == n]
        sets.append(
            ExpertSet("", module, n, layer_of(module), "stacked", [[(e.name, k) for e in es] for k in range(n)])
        )
    out = []
    for s in sets:
        verdicts = []
        for member in s.members:
            evs = [(by_name[t], k) for t, k in member if t in by_name]
            if not evs or any(e.name in claimed or e.fact == "non_finite" for e, _ in evs):
                verdicts.append((None, None))
            else:
                verdicts.append(_judge(evs))
        dead = [k for k, (v, _) in enumerate(verdicts) if v is True]
        alive = [k for k, (v, _) in enumerate(verdicts) if v is False]
        if not dead or not alive:
            continue
        sources = sorted({src for v, src in verdicts if v and src})
        if s.layout == "stacked":
            tensors = [t for t, _ in s.members[0] if t in by_name]
            whole: list[str] = []
        else:
            tensors = whole = [t for k in dead for t, _ in s.members[k] if t in by_name]
        out.append(DeadExpertSet(s, dead, alive, "; ".join(sources), tensors, whole))
    return out
