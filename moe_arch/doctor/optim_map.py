"""Which optimizer, group and state belong to which tensor.

Optimizers built from ``named_parameters()`` save ``param_groups[i]['param_names']``; then the mapping is
exact. Otherwise the optimizer's parameters (in group order) are matched, as a subsequence, against the
model's tensors in state-dict order, using each parameter's state shape (a parameter with no state matches
any tensor). The earliest and the latest valid matches bound every valid matching: where they agree the
mapping is forced; where they differ it is ambiguous, and the report says so instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from moe_arch.doctor.loader import BUFFER_PATTERNS, CheckpointView, _strip


@dataclass
class ParamSlot:
    optimizer: str
    group_index: int
    group: dict  # the param group (without 'params'), incl. lr, weight_decay, ...
    state: dict  # this parameter's optimizer state (may be empty)
    method: str  # "param_names" | "shape-order"


@dataclass
class OptimizerSummary:
    name: str
    kind: str  # adam | muon | sgd | unknown
    method: str  # how parameters were mapped to names
    n_params: int
    n_mapped: int
    n_with_state: int
    groups: list[dict]
    ambiguous: list[dict] = field(default_factory=list)  # [{"index": i, "candidates": [names]}]
    unmatched: int = 0


def optimizer_kind(sd: dict) -> str:
    keys: set[str] = set()
    for st in sd.get("state", {}).values():
        keys |= set(st)
    g0 = sd["param_groups"][0] if sd.get("param_groups") else {}
    if "exp_avg_sq" in keys or "betas" in g0:
        return "adam"
    if "ns_steps" in g0 or "ns_coefficients" in g0:
        return "muon"
    if "momentum_buffer" in keys or "momentum" in g0:
        return "sgd"
    return "unknown"


def _state_shape(st: dict) -> tuple[int, ...] | None:
    for k in ("exp_avg", "momentum_buffer", "exp_avg_sq", "square_avg", "sum"):
        v = st.get(k)
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return tuple(v.shape)
    return None


def candidate_tensors(view: CheckpointView) -> list[tuple[str, tuple[int, ...]]]:
    """Model tensors that can be parameters: floating point, not a known buffer, in state-dict order."""
    buffers = set(view.meta.get("buffers") or [])
    out = []
    seen_storage = set()
    for name, ti in view.tensors.items():
        if not ti.dtype.is_floating_point or name in buffers or BUFFER_PATTERNS.search(name):
            continue
        out.append((name, ti.shape))
    return out


def _greedy(seq: list[tuple[int, ...] | None], cands: list[tuple[int, ...]]) -> list[int] | None:
    pos, out = 0, []
    for shape in seq:
        while pos < len(cands) and shape is not None and cands[pos] != shape:
            pos += 1
        if pos >= len(cands):
            return None
        out.append(pos)
        pos += 1
    return out


def map_optimizers(view: CheckpointView) -> tuple[dict[str, ParamSlot], list[OptimizerSummary]]:
    cands = candidate_tensors(view)
    cand_names = [n for n, _ in cands]
    cand_shapes = [s for _, s in cands]
    slots: dict[str, ParamSlot] = {}
    summaries: list[OptimizerSummary] = []
    for opt in view.optimizers:
        sd = opt.state_dict
        groups = sd.get("param_groups", [])
        state = sd.get("state", {})
        kind = optimizer_kind(sd)
        flat: list[tuple[int, int, Any]] = []  # (group index, param id, name or None)
        have_names = bool(groups) and all("param_names" in g for g in groups)
        for gi, g in enumerate(groups):
            names = g.get("param_names") if have_names else None
            for j, pid in enumerate(g["params"]):
                flat.append((gi, pid, _strip(names[j]) if names else None))
        group_meta = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in groups]
        summ = OptimizerSummary(opt.name, kind, "param_names" if have_names else "shape-order", len(flat), 0,
                                sum(1 for _, pid, _ in flat if state.get(pid)), group_meta)
        if have_names:
            for gi, pid, name in flat:
                if name in view.tensors:
                    slots[name] = ParamSlot(opt.name, gi, group_meta[gi], state.get(pid, {}), "param_names")
                    summ.n_mapped += 1
                else:
                    summ.unmatched += 1
        else:
            seq = [_state_shape(state.get(pid, {})) for _, pid, _ in flat]
            early = _greedy(seq, cand_shapes)
            late_rev = _greedy(seq[::-1], cand_shapes[::-1])
            if early is None or late_rev is None:
                summ.unmatched = len(flat)
                summ.method = "unmapped"
            else:
                late = [len(cands) - 1 - i for i in late_rev[::-1]]
                for k, (gi, pid, _) in enumerate(flat):
                    if early[k] == late[k]:
                        name = cand_names[early[k]]
                        slots[name] = ParamSlot(opt.name, gi, group_meta[gi], state.get(pid, {}), "shape-order")
                        summ.n_mapped += 1
                    else:
                        options = [cand_names[i] for i in range(early[k], late[k] + 1)
                                   if seq[k] is None or cand_shapes[i] == seq[k]]
                        summ.ambiguous.append({"index": k, "group": gi, "candidates": options[:8],
                                               "n_candidates": len(options)})
        summaries.append(summ)
    return slots, summaries
