"""Per-tensor evidence, computed in one streaming pass over the checkpoint (and its reference).

For each floating-point tensor: its optimizer slot and state; change against the reference (exact equality,
fraction of equal elements, relative change ||w - w0|| / ||w0||, update RMS), per expert slice for stacked
expert tensors; and, when stored in bf16/fp16, how many elements' expected optimizer updates are smaller than
half a ULP of their stored value. Tensors are processed in flat chunks, and memory-mapped pages are released
after each chunk, so memory stays bounded whatever the checkpoint's size.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from moe_arch.checkpoint.readers import BUFFER_PATTERNS, CheckpointView, LoadError, release
from moe_arch.doctor.experts import stacked_expert_tensors
from moe_arch.doctor.optim_map import ParamSlot
from moe_arch.doctor.stacks import group_keeper, state_keeper, subulp_keeper
from moe_arch.numerics import LOW_PRECISION, adam_update, half_ulp, muon_update_rms

CHUNK = 1 << 22  # elements per chunk (16 MB of fp32 temporaries each)
SAMPLE = 1 << 14  # elements kept for medians


@dataclass
class TensorEvidence:
    name: str
    shape: list[int]
    dtype: str
    numel: int
    role: str
    buffer_like: bool = False
    # optimizer
    optimizer: str | None = None
    group_index: int | None = None
    optimizer_kind: str | None = None
    lr: float | None = None
    initial_lr: float | None = None
    weight_decay: float | None = None
    has_state: bool = False
    state_step: float | None = None
    moments_zero: bool | None = None
    frac_moment_zero: float | None = None  # elements whose first moment is exactly 0 (never a non-zero gradient)
    state_keys: list[str] = field(default_factory=list)
    mapping: str | None = None
    # change against the reference
    has_reference: bool = False
    unchanged: bool | None = None  # bitwise equal to the reference
    frac_unchanged: float | None = None
    rel_change: float | None = None
    update_rms: float | None = None
    ref_norm: float | None = None
    norm: float = 0.0
    constant_value: float | None = None  # every element equals this value (an initialisation signature)
    # elements still exactly at a standard initial constant (1.0: norm gains, 0.0: biases, zero-init projections),
    # when at least half are: proof, without a reference, that those elements never moved
    init_value: float | None = None
    frac_at_init: float | None = None
    # stacked expert tensors [E, ...]
    slice_unchanged: list[bool] | None = None
    slice_rel_change: list[float] | None = None
    slice_state_zero: list[bool] | None = None
    # precision rule
    low_precision: bool = False
    frac_lost: float | None = None  # share of elements whose expected update < half a ULP (at the peak lr)
    median_update: float | None = None
    # the same at the saved (current) lr: what rounds away from now on, not what happened during the run
    frac_lost_now: float | None = None
    median_update_now: float | None = None
    subulp_kept: str | None = None  # why the optimizer keeps sub-ULP updates (master copy, Kahan, stochastic rounding)
    median_half_ulp: float | None = None
    median_abs: float | None = None
    # the fact about this tensor, before any cause: unchanged | partly_unchanged | changed | non_finite | unknown
    fact: str = "unknown"
    nonfinite: int = 0  # NaN/inf elements in the weights
    state_nonfinite: bool = False  # NaN/inf in its optimizer state
    state_nonfinite_elements: int = 0  # ... how many elements of its first moment
    alias_of: str | None = None  # a tied tensor: the same storage as this one (e.g. lm_head.weight = wte.weight)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


_LAYER = re.compile(r"\.(\d+)\.")


def infer_role(name: str, shape: tuple[int, ...], roles: dict[str, str] | None) -> str:
    if roles and name in roles:
        return roles[name]
    low = name.lower()
    if len(shape) == 1 and ("norm" in low or low.endswith("ln.weight") or ".ln_" in low):
        return "norm"
    if low.endswith(".bias"):
        return "bias"
    if "embed" in low or "wte" in low or "tok_emb" in low:
        return "embedding"
    if "lm_head" in low or low.startswith("output.") or "unembed" in low:
        return "output_head"
    if len(shape) == 3 and "expert" in low:
        return "expert_matrix"
    if "router" in low or low.endswith("gate.weight") and len(shape) == 2 and shape[0] <= 256:
        return "router"
    if "conv" in low:
        return "conv"
    if low.endswith("a_log") or low.endswith(".d"):
        return "ssm"
    if len(shape) >= 2:
        return "hidden_matrix"
    return "other"


def is_stacked(role: str, shape: tuple[int, ...]) -> bool:
    return role == "expert_matrix" and len(shape) == 3 and shape[0] > 1


def tied_tensors(view: CheckpointView) -> dict[str, str]:
    """Names that are the same tensor as an earlier name (tied or aliased weights share one storage in a
    torch.save file, e.g. nanoGPT's lm_head.weight and transformer.wte.weight): {alias: first name}. Formats that
    store each tensor once (safetensors drops tied copies) have none."""
    if not view.from_pickle:
        return {}
    seen: dict[tuple, str] = {}
    out: dict[str, str] = {}
    alive = []  # keep every tensor referenced while comparing, so no address is reused by a later one
    for name, ti in view.tensors.items():
        try:
            t = ti.get()
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        except (RuntimeError, NotImplementedError):
            continue
        alive.append(t)
        if t.numel() == 0 or key[0] == 0:
            continue
        if key in seen:
            out[name] = seen[key]
        else:
            seen[key] = name
    return out


def analyze_tensors(
    view: CheckpointView,
    ref: CheckpointView | None,
    slots: dict[str, ParamSlot],
    optimizer_kinds: dict[str, str],
    progress: Callable[[int], None] | None = None,
) -> list[TensorEvidence]:
    roles = view.meta.get("param_roles")
    experts = stacked_expert_tensors({n: tuple(t.shape) for n, t in view.tensors.items() if t.dtype.is_floating_point})
    buffers = set(view.meta.get("buffers") or [])
    compensated = set(view.meta.get("precision_state") or {})
    keeper = subulp_keeper(view)
    aliases = tied_tensors(view)
    out: list[TensorEvidence] = []
    for name, ti in view.tensors.items():
        if not ti.dtype.is_floating_point:
            if progress:
                progress(ti.numel)
            continue
        role = infer_role(name, ti.shape, roles)
        if name in experts and not (roles and name in roles):
            role = "expert_matrix"
        ev = TensorEvidence(
            name,
            list(ti.shape),
            str(ti.dtype).replace("torch.", ""),
            ti.numel,
            role,
            buffer_like=name in buffers or bool(BUFFER_PATTERNS.search(name)),
        )
        slot = slots.get(name)
        ev.alias_of = aliases.get(name)
        if slot is None and ev.alias_of is not None:
            slot = slots.get(ev.alias_of)  # tied: the optimizer holds the tensor under its other name
        if slot is not None:
            g = slot.group
            ev.optimizer, ev.group_index, ev.mapping = slot.optimizer, slot.group_index, slot.method
            ev.optimizer_kind = optimizer_kinds.get(slot.optimizer)
            ev.lr = float(g["lr"]) if "lr" in g else None
            ev.initial_lr = float(g["initial_lr"]) if "initial_lr" in g else None
            ev.weight_decay = float(g.get("weight_decay", 0.0))
            ev.has_state = any(isinstance(v, torch.Tensor) and v.dim() > 0 for v in slot.state.values())
            ev.state_keys = sorted(str(k) for k in slot.state)
            step = slot.state.get("step", g.get("step"))  # torch-optimi counts steps per param group
            ev.state_step = float(step) if step is not None else None
        ref_ti = ref.tensors.get(name) if ref is not None else None
        if ref is not None and ref_ti is not None and tuple(ref_ti.shape) != tuple(ti.shape):
            raise LoadError(
                f"{name}: shape {tuple(ti.shape)} in the checkpoint but {tuple(ref_ti.shape)} in the "
                f"reference {ref.path}; --against must be a checkpoint of the same model"
            )
        _stream(ev, ti.get(), ref_ti.get() if ref_ti is not None else None, slot, progress)
        if slot is not None and hasattr(slot.state, "release"):
            slot.state.release()  # lazily read optimizer state (distributed checkpoints): free it now
        kept = (
            ("Kahan compensation (moe_arch bf16-compensated)" if name in compensated else None)
            or keeper
            or (group_keeper(slot.group) if slot is not None else None)
            or (state_keeper(slot.state, ti.numel) if slot is not None else None)
        )
        if kept and ev.low_precision:
            # What rounding drops is kept (a compensation buffer applied later, stochastic rounding, an fp32 master
            # copy), so the rounding rule does not apply: the stored weight may lag, the training state loses nothing.
            ev.frac_lost = ev.frac_lost_now = ev.median_update_now = None
            ev.subulp_kept = kept
            ev.notes.append(f"{ev.dtype} with {kept}: updates below half a ULP are kept, not rounded away")
        out.append(ev)
    return out


def _stream(ev: TensorEvidence, w: torch.Tensor, w0: torch.Tensor | None, slot: ParamSlot | None, progress) -> None:
    n = w.numel()
    flat = w.reshape(-1)
    flat0 = w0.reshape(-1) if w0 is not None else None
    st = slot.state if slot is not None else {}
    m = st.get("exp_avg")
    v = st.get("exp_avg_sq")
    buf = st.get("momentum_buffer")
    moment = m if isinstance(m, torch.Tensor) else buf if isinstance(buf, torch.Tensor) else None
    if moment is not None and moment.numel() != n:
        moment = None  # factored or sharded state: skip element-wise rules
        ev.notes.append("optimizer state shape differs from the tensor; element-wise rules skipped")
    v = v if isinstance(v, torch.Tensor) and v.numel() == n else None
    low = w.dtype in LOW_PRECISION
    ev.low_precision = low
    group = slot.group if slot is not None else {}
    # Judge the rounding rule at the schedule's peak (initial) lr: if even that update cannot survive, nothing in
    # the schedule could; the current lr of a decayed schedule would understate what the run tried.
    lr = max(float(group.get("lr", 0.0)), float(group.get("initial_lr", 0.0) or 0.0)) if slot is not None else None
    # ... and at the saved lr: the forecast of what rounds away from now on (Adam's step is linear in the lr)
    now = float(group.get("lr", 0.0)) / lr if lr else 0.0
    betas = tuple(group["betas"]) if "betas" in group else (group.get("beta1", 0.9), group.get("beta2", 0.999))
    step_count = st.get("step", group.get("step", 0))
    kind = ev.optimizer_kind
    muon_upd = None
    if low and kind == "muon" and lr is not None and len(ev.shape) >= 2:
        muon_upd = muon_update_rms(lr, tuple(ev.shape), group.get("adjust_lr_fn"))

    nonfin = 0
    state_bad = False
    eq = 0
    diff2 = 0.0
    ref2 = 0.0
    sq = 0.0
    lost = 0
    lost_now = 0
    moving = 0  # elements with a non-zero expected update (zero moments mean no update, not a lost one)
    mom_zero = 0
    state_bad_n = 0
    at_one = at_zero = 0
    mom_nonzero = False
    lo = math.inf
    hi = -math.inf
    stacked = is_stacked(ev.role, tuple(ev.shape))
    per = n // ev.shape[0] if stacked else 0
    slice_eq = [0] * ev.shape[0] if stacked else None
    slice_d2 = [0.0] * ev.shape[0] if stacked else None
    slice_r2 = [0.0] * ev.shape[0] if stacked else None
    slice_mom = [False] * ev.shape[0] if stacked else None
    upd_samples, hu_samples, abs_samples = [], [], []
    chunk = CHUNK if not stacked else max(per, (CHUNK // per) * per) if per else CHUNK
    sample_every = max(1, n // SAMPLE)
    f64 = torch.float64
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        wc_raw = flat[s:e]
        wc = wc_raw.float()
        nrm = float(torch.linalg.vector_norm(wc, dtype=f64))  # accumulated in float64: only NaN/inf make it non-finite
        if not math.isfinite(nrm):
            bad = ~torch.isfinite(wc)
            nonfin += int(bad.sum())
            wc = torch.where(bad, torch.zeros_like(wc), wc)  # the statistics below describe the finite elements
            nrm = float(torch.linalg.vector_norm(wc, dtype=f64))
        sq += nrm**2
        mn, mx = torch.aminmax(wc)
        lo, hi = min(lo, float(mn)), max(hi, float(mx))
        at_one += int(torch.count_nonzero(wc == 1.0))
        at_zero += int(torch.count_nonzero(wc == 0.0))
        if flat0 is not None:
            w0c = flat0[s:e].float()
            d = wc - w0c
            if stacked:
                same = d == 0
                eq += int(torch.count_nonzero(same))
                for k in range(s // per, (e + per - 1) // per):
                    a, b = max(s, k * per) - s, min(e, (k + 1) * per) - s
                    slice_eq[k] += int(torch.count_nonzero(same[a:b]))
                    slice_d2[k] += float(torch.linalg.vector_norm(d[a:b], dtype=f64)) ** 2
                    slice_r2[k] += float(torch.linalg.vector_norm(w0c[a:b], dtype=f64)) ** 2
            else:
                eq += (e - s) - int(torch.count_nonzero(d))
            diff2 += float(torch.linalg.vector_norm(d, dtype=f64)) ** 2
            ref2 += float(torch.linalg.vector_norm(w0c, dtype=f64)) ** 2
        mc = moment.reshape(-1)[s:e] if moment is not None else None
        if mc is not None:
            mom_zero += int(torch.count_nonzero(mc == 0))
            if stacked:
                nz = mc != 0
                mom_nonzero |= bool(nz.any())
                state_bad = state_bad or not all(math.isfinite(float(x)) for x in torch.aminmax(mc))
                for k in range(s // per, (e + per - 1) // per):
                    a, b = max(s, k * per) - s, min(e, (k + 1) * per) - s
                    slice_mom[k] |= bool(nz[a:b].any())
            else:  # one pass for both: min/max propagate NaN; any non-zero moves one of them off 0
                m_lo, m_hi = (float(x) for x in torch.aminmax(mc))
                mom_nonzero = mom_nonzero or m_lo != 0.0 or m_hi != 0.0
                # the first moment is checked (a NaN/inf gradient reaches it on the same step as the second's)
                state_bad = state_bad or not (math.isfinite(m_lo) and math.isfinite(m_hi))
            if state_bad:
                state_bad_n += int((~torch.isfinite(mc.float())).sum())
        if low and lr is not None:
            hu = half_ulp(wc_raw)
            if muon_upd is not None:
                upd = torch.full_like(hu, muon_upd)
            elif kind == "adam":
                vc = v.reshape(-1)[s:e] if v is not None else None
                upd = adam_update(lr, mc, vc, float(step_count or 0), betas, float(group.get("eps", 1e-8)))
                upd = upd if isinstance(upd, torch.Tensor) else torch.full_like(hu, upd)
            elif kind == "sgd" and mc is not None:
                upd = lr * mc.float().abs()
            else:
                upd = torch.full_like(hu, lr)
            live = upd > 0
            moving += int(live.sum())
            lost += int(((upd < hu) & live).sum())
            lost_now += int(((upd * now < hu) & live).sum())
            idx = slice(0, None, sample_every)
            upd_samples.append(upd[idx].float())
            hu_samples.append(hu[idx])
        abs_samples.append(wc[::sample_every].abs())
        for t in (wc_raw, flat0[s:e] if flat0 is not None else None, mc, v.reshape(-1)[s:e] if v is not None else None):
            release(t)
        if progress:
            progress(e - s)
    ev.norm = math.sqrt(sq)
    ev.nonfinite, ev.state_nonfinite = nonfin, state_bad
    ev.constant_value = lo if n > 0 and lo == hi and not nonfin else None
    ev.state_nonfinite_elements = state_bad_n
    if n and max(at_one, at_zero) * 2 >= n:
        ev.init_value, ev.frac_at_init = (1.0, at_one / n) if at_one >= at_zero else (0.0, at_zero / n)
    if moment is not None and n:
        ev.frac_moment_zero = mom_zero / n
    ev.median_abs = float(torch.cat(abs_samples).median()) if abs_samples else None
    if moment is not None:
        ev.moments_zero = not mom_nonzero
    if flat0 is not None:
        ev.has_reference = True
        ev.frac_unchanged = eq / n if n else 1.0
        ev.unchanged = eq == n
        ev.ref_norm = math.sqrt(ref2)
        ev.update_rms = math.sqrt(diff2 / n) if n else 0.0
        ev.rel_change = math.sqrt(diff2) / ev.ref_norm if ev.ref_norm > 0 else None
        if stacked:
            ev.slice_unchanged = [c == per for c in slice_eq]
            ev.slice_rel_change = [
                math.sqrt(d) / math.sqrt(r) if r > 0 else float("nan") for d, r in zip(slice_d2, slice_r2)
            ]
    if stacked and moment is not None:
        ev.slice_state_zero = [not x for x in slice_mom]
    if nonfin or state_bad:
        ev.fact = "non_finite"
    elif ev.has_reference:
        ev.fact = "unchanged" if ev.unchanged else "partly_unchanged" if (ev.frac_unchanged or 0) >= 0.5 else "changed"
    if low and lr is not None and n and moving:
        ev.frac_lost = lost / moving
        ev.median_update = float(torch.cat(upd_samples).median())
        ev.median_half_ulp = float(torch.cat(hu_samples).median())
        if now > 0:  # at a saved lr of 0 nothing updates from now on: no forecast
            ev.frac_lost_now = lost_now / moving
            ev.median_update_now = ev.median_update * now
