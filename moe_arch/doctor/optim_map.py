"""Which optimizer, group and state belong to which tensor.

Optimizers built from ``named_parameters()`` save ``param_groups[i]['param_names']``; then the mapping is
exact. Otherwise the optimizer's parameters (in group order) are matched, as a subsequence, against the
model's tensors in state-dict order, using each parameter's state shape (a parameter with no state matches
any tensor). The earliest and the latest valid matches bound every valid matching: where they agree the
mapping is forced; where they differ it is ambiguous, and the report says so instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moe_arch.checkpoint.readers import BUFFER_PATTERNS, CheckpointView, strip_prefixes


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

    @property
    def fully_mapped(self) -> bool:
        """Every parameter of this optimizer was matched to a tensor name (else which tensors it holds is unknown)."""
        return self.method != "unmapped" and self.n_mapped == self.n_params


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


def _bounds(seq: list[tuple[int, ...] | None], cand_shapes: list[tuple[int, ...]]):
    early = _greedy(seq, cand_shapes)
    late_rev = _greedy(seq[::-1], cand_shapes[::-1])
    if early is None or late_rev is None:
        return None
    late = [len(cand_shapes) - 1 - i for i in late_rev[::-1]]
    return early, late


# Modules that models register in an order other than their names sort in (siblings of one parent): attention
# before the MLP, q/k/v/o, gate/up/down. Only the order among siblings named in one tuple is taken from here; the
# optimizer's state shapes must then agree at every position, or the order is not used.
REGISTRATION_ORDERS = (
    ("self_attn", "attn", "attention", "cross_attn", "mlp", "feed_forward", "ffn", "block_sparse_moe", "moe"),
    ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"),
    ("query", "key", "value", "dense"),
    ("gate_proj", "up_proj", "gate_up_proj", "down_proj"),
    ("w1", "w3", "w2"),
    ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj"),
    ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"),
)
_RANK = {name: (i, j) for i, seq in enumerate(REGISTRATION_ORDERS) for j, name in enumerate(seq)}


def registration_order(names: list[str]) -> list[str]:
    """Names in the order a model most likely registered them: numbered levels (layers, experts) by number, not
    as text, and known siblings (:data:`REGISTRATION_ORDERS`) in their registration order. safetensors sorts names
    as text, so a file without the model's class (a PEFT adapter checkpoint) loses the order the optimizer lists
    its parameters in."""

    def key(name: str):
        out = []
        for part in name.split("."):
            if part.isdigit():
                out.append((0, int(part), 0, ""))
            elif part in _RANK:
                out.append((1, *_RANK[part], ""))
            else:
                out.append((2, 0, 0, part))
        return out

    return sorted(names, key=key)


def map_optimizers(view: CheckpointView) -> tuple[dict[str, ParamSlot], list[OptimizerSummary]]:
    if view.param_layout is not None:
        # Map onto the parameters as the optimizer saw them, then carry each one's state to the saved tensors.
        slots, summaries = _map(view, list(view.param_layout))
        return _to_saved_names(view, slots, summaries)
    cands = candidate_tensors(view)
    slots, summaries = _map(view, cands)
    if not all(s.fully_mapped and not s.ambiguous for s in summaries):
        # The file's order is not the model's (safetensors sorts names): retry in the likely registration order, and
        # keep it only where it maps every parameter unambiguously.
        shape_of = dict(cands)
        reordered = [(n, shape_of[n]) for n in registration_order([n for n, _ in cands])]
        slots2, summaries2 = _map(view, reordered)
        if all(s.fully_mapped and not s.ambiguous for s in summaries2):
            for s in summaries2:
                s.method = "shape-registration-order" if s.method == "shape-order" else s.method
            for slot in slots2.values():
                slot.method = "shape-registration-order" if slot.method == "shape-order" else slot.method
            return slots2, summaries2
    return slots, summaries


def _to_saved_names(
    view: CheckpointView, slots: dict[str, ParamSlot], summaries: list[OptimizerSummary]
) -> tuple[dict[str, ParamSlot], list[OptimizerSummary]]:
    """One in-memory parameter becomes one or more saved tensors (a stacked expert tensor: one per expert and
    projection); each gets its share of every state tensor, and the group, lr and step of the parameter."""
    shape_of = dict(view.param_layout)
    by_name = {s.name: s for s in summaries}
    out: dict[str, ParamSlot] = {}
    for name, slot in slots.items():
        try:
            saved = list(view.to_saved({name: torch.empty(shape_of[name], device="meta")}))
            pieces = {
                k: view.to_saved({name: v})
                for k, v in slot.state.items()
                if isinstance(v, torch.Tensor) and tuple(v.shape) == shape_of[name]
            }
        except Exception:  # a conversion that needs other parameters too: this one stays unmapped
            saved, pieces = [], {}
        ok = (
            saved
            and all(n in view.tensors for n in saved)
            and all(tuple(p[n].shape) == tuple(view.tensors[n].shape) for p in pieces.values() for n in saved)
        )
        summ = by_name[slot.optimizer]
        if not ok:
            summ.n_mapped -= 1
            summ.unmatched += 1
            continue
        for n in saved:
            state = {k: (pieces[k][n] if k in pieces else v) for k, v in slot.state.items()}
            out[n] = ParamSlot(slot.optimizer, slot.group_index, slot.group, state, slot.method + "+hf-conversion")
    return out, summaries


def _map(
    view: CheckpointView, cands: list[tuple[str, tuple[int, ...]]]
) -> tuple[dict[str, ParamSlot], list[OptimizerSummary]]:
    cand_names = [n for n, _ in cands]
    shape_of = dict(cands)
    slots: dict[str, ParamSlot] = {}
    summaries: list[OptimizerSummary] = []
    pending = []  # (summary, group index, group meta, [(pid, shape)], state) for groups mapped by shape
    for opt in view.optimizers:
        sd = opt.state_dict
        groups = sd.get("param_groups", [])
        state = sd.get("state", {})
        have_names = bool(groups) and all("param_names" in g for g in groups)
        group_meta = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in groups]
        n_params = sum(len(g["params"]) for g in groups)
        summ = OptimizerSummary(
            opt.name,
            optimizer_kind(sd),
            "param_names" if have_names else "shape-order",
            n_params,
            0,
            sum(1 for g in groups for pid in g["params"] if state.get(pid)),
            group_meta,
        )
        summaries.append(summ)
        for gi, g in enumerate(groups):
            if have_names:
                for pid, name in zip(g["params"], g["param_names"]):
                    name = strip_prefixes(name)
                    if name in shape_of or (view.param_layout is None and name in view.tensors):
                        slots[name] = ParamSlot(opt.name, gi, group_meta[gi], state.get(pid, {}), "param_names")
                        summ.n_mapped += 1
                    else:
                        summ.unmatched += 1
            else:
                pending.append(
                    (summ, gi, group_meta[gi], [(pid, _state_shape(state.get(pid, {}))) for pid in g["params"]], state)
                )
    # Shape/order matching with constraint propagation across groups.
    fixed: dict[int, dict[int, str]] = {k: {} for k in range(len(pending))}  # group -> {param position: name}
    taken_by_names = set(slots)
    for _ in range(len(pending) + 1):
        changed = False
        for k, (summ, gi, meta, params, state) in enumerate(pending):
            others = taken_by_names | {n for j, f in fixed.items() if j != k for n in f.values()}
            names = [n for n in cand_names if n not in others]
            b = _bounds([shp for _, shp in params], [shape_of[n] for n in names])
            if b is None:
                continue
            for pos, (e, l) in enumerate(zip(*b)):
                if e == l and pos not in fixed[k]:
                    fixed[k][pos] = names[e]
                    changed = True
        if not changed:
            break
    for k, (summ, gi, meta, params, state) in enumerate(pending):
        others = taken_by_names | {n for j, f in fixed.items() if j != k for n in f.values()}
        names = [n for n in cand_names if n not in others]
        b = _bounds([shp for _, shp in params], [shape_of[n] for n in names])
        if b is None:
            summ.unmatched += len(params)
            summ.method = "unmapped"
            continue
        for pos, (pid, shp) in enumerate(params):
            if pos in fixed[k]:
                slots[fixed[k][pos]] = ParamSlot(summ.name, gi, meta, state.get(pid, {}), "shape-order")
                summ.n_mapped += 1
            else:
                e, l = b[0][pos], b[1][pos]
                options = [names[i] for i in range(e, l + 1) if shp is None or shape_of[names[i]] == shp]
                summ.ambiguous.append(
                    {"index": pos, "group": gi, "candidates": options[:8], "n_candidates": len(options)}
                )
    return slots, summaries
