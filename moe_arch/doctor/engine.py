"""Turn per-tensor evidence into findings, each with one cause, the tensors, the numbers, and one fix.

Facts come first: every tensor is recorded as bitwise unchanged, partly unchanged, changed, non-finite, or
unknown (no reference). Causes then explain the facts, and the status follows from both: a tensor that the
reference shows unchanged after optimizer steps never leaves a run "healthy"; when no cause explains it, it is
still a finding (``frozen_unexplained``) that says what evidence was and was not available.

Causes (a tensor gets the most fundamental one that its evidence supports, in this order):

- ``non_finite``         NaN/inf in its weights or optimizer state;
- ``not_in_optimizer``   no optimizer holds the tensor (and it did not change, so it is not a buffer);
- ``zero_learning_rate`` its group's learning rate is 0 (and was never scheduled above 0);
- ``no_gradient``        it is in an optimizer but never received a gradient (no state, or all-zero moments);
- ``precision_underflow`` stored in bf16/fp16, its expected update is below half a ULP for (almost) every
                          element, and the tensor did not change: every update rounded away;
- ``dead_experts``       some expert slices of a stacked expert tensor never changed / never got a gradient;
- ``excessive_update``   its change is an outlier among this run's tensors (robust z-score on the log of the
                          update RMS, and of ||w - w0|| / ||w0|| where w0 has a size: see excessive_updates);
- ``frozen_unexplained`` bitwise unchanged since the reference after optimizer steps, and none of the above
                          explains it.

Status: ``critical`` or ``warning`` from the findings; ``inconclusive`` when there is no finding but the evidence
cannot support "healthy" (the reasons say what is missing); ``untrained`` for a checkpoint before its first
optimizer step; ``healthy`` only when the evidence was there and showed nothing.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch

from moe_arch.doctor.analyze import TensorEvidence
from moe_arch.doctor.optim_map import OptimizerSummary
from moe_arch.doctor.rules import half_ulp_at

CAUSES = ("non_finite", "precision_underflow", "not_in_optimizer", "no_gradient", "zero_learning_rate",
          "frozen_unexplained", "excessive_update", "dead_experts")

RECOMMENDATIONS = {
    "non_finite": ("the run diverged or was corrupted: resume from the last checkpoint whose tensors are finite, "
                   "with a lower learning rate, gradient clipping, and (in bf16/fp16) loss scaling "
                   "or fp32 master weights"),
    "frozen_unexplained": ("these tensors did not change although the run took optimizer steps, and the checkpoint "
                           "does not show why: check that they are in an optimizer param group with a non-zero "
                           "learning rate, that they receive gradients, and their storage dtype; save the optimizer "
                           "state (mapped to names) with the checkpoint so the doctor can tell which"),
    "precision_underflow": ("keep fp32 master weights for these tensors (moe-arch: --train.precision bf16-mixed) or "
                            "use compensated updates (--train.precision bf16-compensated); raising the learning rate "
                            "is not a fix: updates stay below the rounding step for most of training"),
    "not_in_optimizer": ("add these parameters to an optimizer param group: check the filter that builds the groups "
                         "(name patterns, ndim rules) and that requires_grad is True"),
    "no_gradient": ("these tensors never received a gradient: check that the forward pass uses them and that nothing "
                    "detaches their inputs or outputs"),
    "zero_learning_rate": ("give their param group a non-zero learning rate (check per-group lr multipliers and the "
                           "scheduler's lambdas)"),
    "excessive_update": ("these tensors moved far more than the rest of the run: lower their learning rate (or their "
                         "group's), check their initialisation scale, and clip gradients"),
    "dead_experts": ("some experts receive no tokens: raise the load-balance loss weight "
                     "(--model.router_aux_loss_coef), add router z-loss, or use auxiliary-loss-free bias balancing "
                     "(--model.router_bias_balancing true)"),
}

ALL_NO_GRADIENT = ("no tensor received a gradient: this usually means optimizer.zero_grad() runs between "
                   "loss.backward() and optimizer.step(), or the optimizer was built on the parameters of another "
                   "model object (e.g. before the model was copied, moved with .to() into a new object, or re-created)")


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


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return float(torch.tensor(xs, dtype=torch.float64).median()) if xs else None


OUTLIER_Z = 4.0  # robust z-score (in MADs) above which a tensor's change is an outlier
OUTLIER_DECADES = 1.0  # ... and at least this far above the run's median (so a tight run flags nothing)


def _outliers(values: dict[str, float]) -> tuple[dict[str, float], float]:
    """Robust outliers (high side) of log10 values: {name: z}, and the median (not in log)."""
    logs = {k: math.log10(v) for k, v in values.items()}
    center = _median(list(logs.values()))
    # Robust scale in decades, floored so that a run whose tensors all move alike flags nothing.
    scale = max(1.4826 * _median([abs(x - center) for x in logs.values()]), 0.25)
    return ({k: (x - center) / scale for k, x in logs.items()
             if (x - center) / scale > OUTLIER_Z and x - center > OUTLIER_DECADES}, 10 ** center)


def excessive_updates(evidence: list[TensorEvidence]):
    """Tensors whose change since the reference is an outlier among the run's tensors, on every scale that exists
    for them; ``None`` when none is (or there are too few tensors to say).

    Two scales: the *update RMS* per element, ||w - w0|| / sqrt(n), which every tensor has and which adaptive
    optimizers keep within a decade or so across a healthy run; and the *relative change* ||w - w0|| / ||w0||,
    which says a tensor was rewritten but only means that when w0 has a size of its own. Tensors that start at
    zero or near it (Qwen's q/k/v biases, gates, D/dt terms, LoRA B) have a relative change of order 1 or more
    by construction, whatever the optimizer did, so the relative scale alone raises false alarms on them. A
    tensor is flagged only when its update RMS is an outlier, and also its relative change when it has one.
    The checkpoint doctor and the live monitor both call this, on their own evidence.
    """
    moved = [e for e in evidence if e.update_rms and e.update_rms > 0 and e.numel >= 16]
    if len(moved) < 8:
        return None
    abs_z, center_abs = _outliers({e.name: e.update_rms for e in moved})
    with_rel = {e.name: e.rel_change for e in moved if e.rel_change and e.rel_change > 0}
    rel_z, center_rel = _outliers(with_rel) if len(with_rel) >= 8 else ({}, None)
    found = [(e, max(abs_z[e.name], rel_z.get(e.name, 0.0))) for e in moved
             if e.name in abs_z and (e.name not in with_rel or e.name in rel_z)]
    return (found, center_abs, center_rel) if found else None


def diagnose(evidence: list[TensorEvidence], optimizers: list[OptimizerSummary], has_optimizer_state: bool,
             reference: str | None, steps: int | None = None, reference_identical: bool = False
             ) -> list[Finding]:
    """Findings from the facts. ``steps``: optimizer steps the checkpoint records (None: unknown; then any
    tensor that changed since the reference shows that steps were taken). ``reference_identical``: the reference
    is the same state as the checkpoint (then "unchanged" says nothing about training)."""
    trained = (steps > 0) if steps is not None else (
        any(e.fact in ("changed", "partly_unchanged") for e in evidence if not e.buffer_like) or None)
    params = [e for e in evidence if not e.buffer_like]
    claimed: set[str] = set()
    findings: list[Finding] = []
    ambiguous_names = {n for o in optimizers for a in o.ambiguous for n in a["candidates"]}
    # An optimizer whose parameters could not all be matched to names: which tensors it holds is unknown, so
    # "in no optimizer" cannot be claimed for any tensor.
    unmapped_opt = not all(o.fully_mapped for o in optimizers)

    # 0. non-finite weights or optimizer state: nothing else about these tensors can be judged
    bad = [e for e in params if e.fact == "non_finite"]
    if bad:
        first = bad[0]
        findings.append(Finding("non_finite", "critical", [e.name for e in bad],
                                {"n_tensors": len(bad), "first": first.name,
                                 "nonfinite_elements": {e.name: e.nonfinite for e in bad[:20]},
                                 "in_optimizer_state": [e.name for e in bad if e.state_nonfinite][:20]},
                                RECOMMENDATIONS["non_finite"]))
        claimed |= {e.name for e in bad}

    # 1. not in any optimizer
    if has_optimizer_state and not unmapped_opt:
        orphans = [e for e in params if e.optimizer is None and e.name not in ambiguous_names
                   and e.name not in claimed and e.alias_of is None]
        confirmed = [e for e in orphans if e.has_reference and e.unchanged]
        unconfirmed = [e for e in orphans if not e.has_reference]
        if confirmed:
            findings.append(Finding("not_in_optimizer", "critical", [e.name for e in confirmed],
                                    {"n_tensors": len(confirmed), "unchanged_since_reference": True,
                                     "reference": reference,
                                     "optimizers": [o.name for o in optimizers]},
                                    RECOMMENDATIONS["not_in_optimizer"]))
        if unconfirmed:
            findings.append(Finding("not_in_optimizer", "warning", [e.name for e in unconfirmed],
                                    {"n_tensors": len(unconfirmed), "unchanged_since_reference": None,
                                     "note": "no reference checkpoint to confirm they never changed (they could be "
                                             "buffers updated outside the optimizer)"},
                                    RECOMMENDATIONS["not_in_optimizer"]))
        claimed |= {e.name for e in confirmed + unconfirmed}

    in_opt = [e for e in params if e.optimizer is not None and e.name not in claimed]

    # 2. zero learning rate
    # The saved lr is what the last step used. 0 with no scheduled peak is a zero lr; 0 after a peak (a schedule that
    # sets it, e.g. a LambdaLR returning 0 for a group) is one only when the tensors show it: unchanged since the
    # reference, and while some other group still has a learning rate: a schedule that decays to 0 at its end (the
    # Hugging Face default) leaves every group at lr 0, which says nothing about why some tensors never moved.
    running = any((e.lr or 0) > 0 for e in params if e.optimizer is not None)
    zero = [e for e in in_opt if e.lr == 0.0 and (not (e.initial_lr or 0) > 0
                                                   or (running and e.has_reference and e.unchanged))]
    if zero:
        groups = sorted({(e.optimizer, e.group_index) for e in zero})
        findings.append(Finding("zero_learning_rate", "critical", [e.name for e in zero],
                                {"groups": [{"optimizer": o, "group": g} for o, g in groups], "saved_lr": 0.0,
                                 "scheduled_peak_lr": sorted({e.initial_lr for e in zero if e.initial_lr}) or None,
                                 "unchanged_since_reference": all(e.unchanged for e in zero if e.has_reference)
                                 if any(e.has_reference for e in zero) else None},
                                RECOMMENDATIONS["zero_learning_rate"]))
        claimed |= {e.name for e in zero}

    # 3. no gradient: in an optimizer that stepped, but no state / all-zero moments
    stepped = {e.optimizer for e in in_opt if e.has_state and not e.moments_zero}
    nograd = [e for e in in_opt if e.name not in claimed and (not e.has_state or e.moments_zero)]
    if nograd:
        all_of_them = len(nograd) == len([e for e in in_opt if e.name not in claimed])
        ev = {"n_tensors": len(nograd), "without_state": sum(1 for e in nograd if not e.has_state),
              "with_all_zero_moments": sum(1 for e in nograd if e.moments_zero),
              "optimizers": sorted({e.optimizer for e in nograd}),
              "other_tensors_in_these_optimizers_have_state": bool(stepped & {e.optimizer for e in nograd})}
        if any(e.has_reference for e in nograd):
            ev["unchanged_since_reference"] = all(e.unchanged for e in nograd if e.has_reference)
        rec = RECOMMENDATIONS["no_gradient"]
        if all_of_them:
            ev["all_tensors"] = True
            rec = ALL_NO_GRADIENT + "; " + rec
        findings.append(Finding("no_gradient", "critical", [e.name for e in nograd], ev, rec))
        claimed |= {e.name for e in nograd}

    # 4. precision underflow
    frozen, partial = [], []
    for e in params:
        if e.name in claimed or not e.low_precision or e.frac_lost is None:
            continue
        # The rule predicts the loss; the reference (when there is one) must show it: the elements did not move.
        # Without a reference the rule is a hypothesis: critical only when the checkpoint itself proves the tensor
        # never moved (every element still at a standard initial constant: all-ones norms, all-zero biases).
        at_init = e.constant_value in (0.0, 1.0)
        kept = (1.0 if at_init else 0.0) if not e.has_reference else (e.frac_unchanged or 0.0)
        if e.frac_lost >= 0.99 and kept >= 0.99:
            frozen.append(e)
        elif e.frac_lost >= 0.5 and (kept >= 0.5 or not e.has_reference):
            partial.append(e)
    for group, sev in ((frozen, "critical"), (partial, "warning")):
        if not group:
            continue
        dtypes = sorted({e.dtype for e in group})
        lrs = sorted({e.lr for e in group if e.lr is not None})
        peak = sorted({max(e.lr or 0.0, e.initial_lr or 0.0) for e in group if e.lr is not None})
        med_upd = _median([e.median_update for e in group])
        med_abs = _median([e.median_abs for e in group])
        dt = getattr(torch, dtypes[0])
        ev = {"dtype": dtypes[0] if len(dtypes) == 1 else dtypes, "learning_rates": lrs, "peak_learning_rates": peak,
              "optimizers": sorted({e.optimizer for e in group if e.optimizer}),
              "median_expected_update": med_upd, "median_abs_value": med_abs,
              "half_ulp_at_median_value": half_ulp_at(med_abs, dt) if med_abs is not None else None,
              "half_ulp_at_1.0": half_ulp_at(1.0, dt),
              "fraction_of_elements_lost": _median([e.frac_lost for e in group]),
              "fraction_of_elements_unchanged": _median([e.frac_unchanged for e in group if e.has_reference]),
              "unchanged_since_reference": (all(e.unchanged for e in group if e.has_reference)
                                            if any(e.has_reference for e in group) else None),
              "reference": reference}
        if not any(e.has_reference for e in group) and sev == "warning":
            ev["hypothesis"] = ("predicted by the rounding rule alone: no reference checkpoint shows whether these "
                                "tensors moved; pass --against with the run's initial checkpoint to confirm")
        consts = sorted({e.constant_value for e in group if e.constant_value is not None})
        if consts:
            ev["constant_values"] = consts[:4]
        findings.append(Finding("precision_underflow", sev, [e.name for e in group], ev,
                                RECOMMENDATIONS["precision_underflow"]))
        claimed |= {e.name for e in group}

    # 5. dead experts (per slice)
    dead: dict[str, list[int]] = {}
    dead_ev: dict[str, dict] = {}
    for e in params:
        if e.name in claimed:
            continue
        flags = None
        src = None
        if e.slice_state_zero is not None and any(e.slice_state_zero) and not all(e.slice_state_zero):
            flags, src = e.slice_state_zero, "all-zero optimizer moments"
        elif e.slice_unchanged is not None and any(e.slice_unchanged) and not all(e.slice_unchanged):
            flags, src = e.slice_unchanged, "unchanged since the reference"
        if flags:
            ids = [i for i, f in enumerate(flags) if f]
            module = e.name.rsplit(".", 1)[0]
            prev = dead.get(module)
            dead[module] = sorted(set(ids) | set(prev or []))
            entry = dead_ev.setdefault(module, {"tensors": [], "evidence": src, "n_experts": e.shape[0]})
            entry["tensors"].append(e.name)
    if dead:
        findings.append(Finding("dead_experts", "warning", [t for m in dead_ev.values() for t in m["tensors"]],
                                {"modules": dead_ev, "n_dead": sum(len(v) for v in dead.values())},
                                RECOMMENDATIONS["dead_experts"], experts=dead))

    # 6. excessive update: outliers on every scale that exists for the tensor (see excessive_updates)
    outliers = excessive_updates([e for e in params if e.name not in claimed])
    if outliers:
        found, center_abs, center_rel = outliers
        findings.append(Finding("excessive_update", "warning", [e.name for e, _ in found],
                                {"update_rms": {e.name: e.update_rms for e, _ in found},
                                 "run_median_update_rms": center_abs,
                                 "relative_change": {e.name: e.rel_change for e, _ in found
                                                     if e.rel_change is not None},
                                 "run_median_relative_change": center_rel,
                                 "robust_z": {e.name: z for e, z in found}, "reference": reference},
                                RECOMMENDATIONS["excessive_update"]))

    # 7. facts no cause explained: bitwise unchanged after optimizer steps
    if trained is not False and not reference_identical:
        frozen_left = [e for e in params if e.name not in claimed and e.fact == "unchanged" and e.alias_of is None]
        if frozen_left:
            checks = {"optimizer state": has_optimizer_state,
                      "a mapping of the optimizer state to names": has_optimizer_state and not unmapped_opt}
            have = ["a reference"] + [k for k, ok in checks.items() if ok]
            missing = [k for k, ok in checks.items() if not ok]
            findings.append(Finding("frozen_unexplained", "critical", [e.name for e in frozen_left],
                                    {"n_tensors": len(frozen_left), "unchanged_since_reference": True,
                                     "reference": reference, "optimizer_steps": steps,
                                     "evidence_available": have, "evidence_missing": missing,
                                     "in_an_optimizer": sorted({e.optimizer for e in frozen_left if e.optimizer})},
                                    RECOMMENDATIONS["frozen_unexplained"]))

    for f in findings:
        f.summary = summarize(f)
    findings.sort(key=lambda f: (f.severity != "critical", -len(f.tensors), CAUSES.index(f.cause)))
    return findings


def summarize(f: Finding) -> str:
    ev = f.evidence
    what = describe(f.tensors)
    n = len(f.tensors)
    if f.cause == "precision_underflow":
        upd = ev.get("median_expected_update")
        hu = ev.get("half_ulp_at_median_value")
        head = (f"{n} tensors ({what}) are stored in {ev['dtype']}; their expected update (~{upd:.1e} at peak lr "
                f"{_fmt_list(ev.get('peak_learning_rates'))}) is below half a ULP at their values (~{hu:.1e}; "
                f"{ev['half_ulp_at_1.0']:.1e} at 1.0) for {ev['fraction_of_elements_lost']:.0%} of elements")
        if f.severity == "critical":
            tail = ", and they did not change" if ev.get("unchanged_since_reference") else ""
            return head + tail + ": every update rounded away"
        unch = ev.get("fraction_of_elements_unchanged")
        return head + (f"; {unch:.0%} of their elements never changed" if unch is not None else "") + \
            ": most updates round away"
    if f.cause == "not_in_optimizer":
        return f"{n} tensors ({what}) are in no optimizer param group" + (
            " and did not change since the reference" if ev.get("unchanged_since_reference") else "")
    if f.cause == "no_gradient":
        return f"{n} tensors ({what}) are in an optimizer but never received a gradient" + (
            " (every tensor: see the recommendation)" if ev.get("all_tensors") else "")
    if f.cause == "zero_learning_rate":
        peak = ev.get("scheduled_peak_lr")
        return (f"{n} tensors ({what}) are in a param group whose saved learning rate is 0"
                + (f" (scheduled peak {_fmt_list(peak)}: the scheduler set it to 0)" if peak else ""))
    if f.cause == "non_finite":
        return f"{n} tensors ({what}) hold NaN/inf values (first: {ev['first']})"
    if f.cause == "frozen_unexplained":
        return (f"{n} tensors ({what}) are bitwise unchanged since the reference after "
                f"{ev['optimizer_steps'] if ev.get('optimizer_steps') is not None else 'some'} optimizer steps, "
                f"and the checkpoint does not show why" + (f" (missing: {', '.join(ev['evidence_missing'])})"
                                                            if ev.get("evidence_missing") else ""))
    if f.cause == "dead_experts":
        parts = [f"{m}: experts {ids}" for m, ids in (f.experts or {}).items()]
        return f"{ev['n_dead']} expert slices never trained ({'; '.join(parts)})"
    if f.cause == "excessive_update":
        ur = ev["update_rms"]
        worst = max(ur, key=ur.get)
        rc = ev.get("relative_change") or {}
        rel = (f", relative change {rc[worst]:.2g} (run median {ev['run_median_relative_change']:.2g})"
               if worst in rc and ev.get("run_median_relative_change") else "")
        return (f"{n} tensors ({what}) moved far more than the rest of the run: largest {worst}, update RMS "
                f"{ur[worst]:.2g} per element (run median {ev['run_median_update_rms']:.2g}){rel}")
    return what


def _fmt_list(xs) -> str:
    return "/".join(f"{x:.1e}" for x in (xs or [])) or "?"


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
