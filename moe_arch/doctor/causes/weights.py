"""Checkpoint causes: what explains the facts about each tensor (bitwise unchanged, partly unchanged, changed,
non-finite) of one checkpoint, or of the live monitor's window.

A tensor gets the most fundamental cause its evidence supports; the engine runs the causes in ``order`` and a
claiming cause's tensors get no later one:

==========================  =====  ==========================================================================
cause                       order  rule
==========================  =====  ==========================================================================
``non_finite``              10     NaN/inf in its weights or optimizer state
``not_in_optimizer``        20     no optimizer holds the tensor (and it did not change, so it is not a buffer)
``zero_learning_rate``      30     its group's saved learning rate is 0, and it was never scheduled above 0 or
                                   another group still trains (no reference needed; one that shows the
                                   tensors moved overrules it)
``dead_experts``            38     some experts of a router (found by structure: doctor/experts.py; stacked
                                   slices or per-expert tensors) never got a gradient / never changed while
                                   their siblings trained (claims per-expert tensors, not stacked ones)
``no_gradient``             40     in an optimizer but never received a gradient (no state, all-zero moments)
``precision_underflow``     50     stored in bf16/fp16, its expected update is below half a ULP for (almost)
                                   every element, and the tensor did not change (reference) or still sits at
                                   its initial constant; alone otherwise a forecast at the saved lr; never when
                                   the optimizer keeps sub-ULP updates (moe_arch.doctor.stacks)
``excessive_update``        70     its change is an outlier among this run's tensors (robust z-score on the
                                   log of the update RMS, and of ||w - w0|| / ||w0|| where w0 has a size: see
                                   :func:`excessive_updates`; does not claim)
``frozen_unexplained``      80     bitwise unchanged since the reference after optimizer steps, and none of
                                   the above explains it
==========================  =====  ==========================================================================
"""

from __future__ import annotations

import math

import torch

from moe_arch.doctor.analyze import TensorEvidence
from moe_arch.doctor.causes.base import CheckpointCause, CheckpointEvidence, Finding, describe, fmt, fmt_list, register
from moe_arch.doctor.experts import dead_expert_sets
from moe_arch.doctor.stacks import rounding_unknown
from moe_arch.numerics import half_ulp_at

ALL_NO_GRADIENT = (
    "no tensor received a gradient: this usually means optimizer.zero_grad() runs between "
    "loss.backward() and optimizer.step(), or the optimizer was built on the parameters of another "
    "model object (e.g. before the model was copied, moved with .to() into a new object, or re-created)"
)

OUTLIER_Z = 4.0  # robust z-score (in MADs) above which a tensor's change is an outlier
OUTLIER_DECADES = 1.0  # ... and at least this far above the run's median (so a tight run flags nothing)


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return float(torch.tensor(xs, dtype=torch.float64).median()) if xs else None


def _peak_lr(ev: CheckpointEvidence, e: TensorEvidence) -> float | None:
    """The scheduled peak lr of the tensor's group: the group's ``initial_lr`` (torch schedulers set it), else the
    schedulers' ``base_lrs`` the checkpoint saved (paired with the optimizers by position)."""
    if e.initial_lr is not None:
        return e.initial_lr
    meta = ev.view.meta if ev.view is not None else {}
    names = [o.name for o in ev.view.optimizers] if ev.view is not None else []
    i = names.index(e.optimizer) if e.optimizer in names else 0
    bases = [s.get("base_lrs") for s in meta.get("schedulers") or [] if isinstance(s, dict)]
    base = bases[i] if i < len(bases) else (meta.get("scheduled_peak_lrs") if i == 0 else None)
    if isinstance(base, list) and e.group_index is not None and e.group_index < len(base):
        return float(base[e.group_index])
    return None


def _ulp_evidence(group: list[TensorEvidence], basis: str, updates: list[float | None]) -> dict:
    """What a precision finding (measured or forecast) reports for its tensors: their dtype, lrs and optimizers,
    the median expected update against half a ULP at their median value and at 1.0."""
    dtypes = sorted({e.dtype for e in group})
    med_abs = _median([e.median_abs for e in group])
    dt = getattr(torch, dtypes[0])
    return {
        "basis": basis,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "learning_rates": sorted({e.lr for e in group if e.lr is not None}),
        "optimizers": sorted({e.optimizer for e in group if e.optimizer}),
        "median_expected_update": _median(updates),
        "median_abs_value": med_abs,
        "half_ulp_at_median_value": half_ulp_at(med_abs, dt) if med_abs is not None else None,
        "half_ulp_at_1.0": half_ulp_at(1.0, dt),
    }


def _unchanged_since_reference(group: list[TensorEvidence]) -> bool | None:
    """Every tensor of the group with a reference is unchanged (None: none has a reference)."""
    return all(e.unchanged for e in group if e.has_reference) if any(e.has_reference for e in group) else None


def _outliers(values: dict[str, float]) -> tuple[dict[str, float], float]:
    """Robust outliers (high side) of log10 values: {name: z}, and the median (not in log)."""
    logs = {k: math.log10(v) for k, v in values.items()}
    center = _median(list(logs.values()))
    # Robust scale in decades, floored so that a run whose tensors all move alike flags nothing.
    scale = max(1.4826 * _median([abs(x - center) for x in logs.values()]), 0.25)
    return (
        {
            k: (x - center) / scale
            for k, x in logs.items()
            if (x - center) / scale > OUTLIER_Z and x - center > OUTLIER_DECADES
        },
        10**center,
    )


def excessive_updates(evidence: list[TensorEvidence]):
    """Tensors whose change since the reference is an outlier among the run's tensors, on every scale that exists
    for them; ``None`` when none is (or there are too few tensors to say).

    Two scales: the *update RMS* per element, ||w - w0|| / sqrt(n), which every tensor has and which adaptive
    optimizers keep within a decade or so across a healthy run; and the *relative change* ||w - w0|| / ||w0||,
    which says a tensor was rewritten but only means that when w0 has a size of its own. Tensors that start at
    zero or near it (Qwen's q/k/v biases, gates, D/dt terms, LoRA B) have a relative change of order 1 or more
    by construction, whatever the optimizer did, so the relative scale alone raises false alarms on them. A
    tensor is flagged only when its update RMS is an outlier, and also its relative change when it has one.
    The checkpoint doctor and the live monitor both reach this, on their own evidence.
    """
    moved = [e for e in evidence if e.update_rms and e.update_rms > 0 and e.numel >= 16]
    if len(moved) < 8:
        return None
    abs_z, center_abs = _outliers({e.name: e.update_rms for e in moved})
    with_rel = {e.name: e.rel_change for e in moved if e.rel_change and e.rel_change > 0}
    rel_z, center_rel = _outliers(with_rel) if len(with_rel) >= 8 else ({}, None)
    found = [
        (e, max(abs_z[e.name], rel_z.get(e.name, 0.0)))
        for e in moved
        if e.name in abs_z and (e.name not in with_rel or e.name in rel_z)
    ]
    return (found, center_abs, center_rel) if found else None


class _UnchangedForWindow(CheckpointCause):
    """Causes whose live alert adds how long the tensors stayed unchanged."""

    def alert(self, f: Finding, step: int, window: int, tensors: list[str]) -> str:
        return f"step {step}: {f.summary}; unchanged for {window} optimizer steps"


@register
class NonFinite(CheckpointCause):
    name = "non_finite"
    order, rank = 10, 0
    severity = "critical"
    before_training = True  # NaN/inf is judged on any checkpoint: nothing else about these tensors can be
    recommendation = (
        "the run diverged or was corrupted: resume from the last checkpoint whose tensors are finite, "
        "with a lower learning rate, gradient clipping, and (in bf16/fp16) loss scaling "
        "or fp32 master weights"
    )
    short_fix = "lower the lr, check the data, or use a more stable precision"
    fixes = {
        "moe_arch": "the run diverged or was corrupted: resume from the last checkpoint whose tensors are finite "
        "with a lower --optim.adamw_lr / --optim.muon_lr, --train.grad_clip 1.0 and --train.precision bf16-mixed",
        "hf-trainer": "the run diverged or was corrupted: resume from the last checkpoint-N whose tensors are finite "
        "with a lower TrainingArguments(learning_rate=...), max_grad_norm=1.0, and the model loaded in float32 "
        "with TrainingArguments(bf16=True)",
        "lightning": "the run diverged or was corrupted: resume from the last finite .ckpt with a lower lr in "
        'configure_optimizers, L.Trainer(gradient_clip_val=1.0) and precision="bf16-mixed"',
    }

    def detect(self, ev: CheckpointEvidence) -> list[Finding]:
        bad = [e for e in ev.params if e.fact == "non_finite"]
        if not bad:
            return []
        return [
            self.finding(
                "critical",
                [e.name for e in bad],
                {
                    "n_tensors": len(bad),
                    "first": bad[0].name,
                    "nonfinite_elements": {e.name: e.nonfinite for e in bad[:20]},
                    "in_optimizer_state": [e.name for e in bad if e.state_nonfinite][:20],
                    "nonfinite_state_elements": {
                        e.name: e.state_nonfinite_elements for e in bad[:20] if e.state_nonfinite_elements
                    },
                },
            )
        ]

    def summarize(self, f: Finding) -> str:
        return f"{len(f.tensors)} tensors ({describe(f.tensors)}) hold NaN/inf values (first: {f.evidence['first']})"


@register
class NotInOptimizer(_UnchangedForWindow):
    name = "not_in_optimizer"
    order, rank = 20, 2
    severity = "critical when the reference shows the tensors unchanged; warning without a reference"
    never_trained = True
    recommendation = (
        "add these parameters to an optimizer param group: check the filter that builds the groups "
        "(name patterns, ndim rules) and that requires_grad is True"
    )
    short_fix = "add them to an optimizer param group"
    fixes = {
        "hf-trainer": "the Trainer's optimizer holds every parameter with requires_grad=True: set requires_grad=True "
        "on these, or add them to the param groups of the optimizer passed as Trainer(optimizers=(...))",
        "lightning": "pass these parameters to the optimizer that configure_optimizers returns (e.g. "
        "self.parameters()) and check that requires_grad is True",
    }

    def detect(self, ev: CheckpointEvidence) -> list[Finding]:
        if not ev.has_optimizer_state or ev.unmapped_optimizer:
            return []
        orphans = [
            e for e in ev.unclaimed() if e.optimizer is None and e.name not in ev.ambiguous_names and e.alias_of is None
        ]
        confirmed = [e for e in orphans if e.has_reference and e.unchanged]
        unconfirmed = [e for e in orphans if not e.has_reference]
        out = []
        if confirmed:
            out.append(
                self.finding(
                    "critical",
                    [e.name for e in confirmed],
                    {
                        "n_tensors": len(confirmed),
                        "unchanged_since_reference": True,
                        "reference": ev.reference,
                        "optimizers": [o.name for o in ev.optimizers],
                    },
                )
            )
        if unconfirmed:
            out.append(
                self.finding(
                    "warning",
                    [e.name for e in unconfirmed],
                    {
                        "n_tensors": len(unconfirmed),
                        "unchanged_since_reference": None,
                        "note": "no reference checkpoint to confirm they never changed (they could be "
                        "buffers updated outside the optimizer)",
                    },
                )
            )
        return out

    def summarize(self, f: Finding) -> str:
        return f"{len(f.tensors)} tensors ({describe(f.tensors)}) are in no optimizer param group" + (
            " and did not change since the reference" if f.evidence.get("unchanged_since_reference") else ""
        )

    def explain(self, f: Finding) -> str:
        return (
            "the tensors appear in no param group of "
            + fmt(f.evidence.get("optimizers"))
            + (
                " and are bitwise unchanged since the reference."
                if f.evidence.get("unchanged_since_reference")
                else "."
            )
        )


@register
class ZeroLearningRate(_UnchangedForWindow):
    name = "zero_learning_rate"
    order, rank = 30, 4
    severity = "critical"
    never_trained = True
    recommendation = (
        "give their param group a non-zero learning rate (check per-group lr multipliers and the scheduler's lambdas)"
    )
    short_fix = "give their param group a non-zero lr"
    fixes = {
        "hf-trainer": "give their param group a non-zero learning rate: check the optimizer and lr_scheduler passed as "
        "Trainer(optimizers=(optimizer, scheduler)) (a LambdaLR lambda returning 0 for a group)",
        "lightning": "give their param group a non-zero learning rate: check the optimizer and lr_scheduler that "
        "configure_optimizers returns (a LambdaLR lambda returning 0 for a group)",
    }

    def detect(self, ev: CheckpointEvidence) -> list[Finding]:
        # The saved lr is what the last step used. 0 with no scheduled peak is a zero lr. 0 after a peak (a schedule
        # that sets it, e.g. a LambdaLR returning 0 for a group) is one while some other group still has a learning
        # rate: the checkpoint alone shows it; a reference that shows the tensors moved overrules it (their lr
        # reached 0 after they trained). A schedule that decays every group to 0 at its end (the Hugging Face
        # default) says nothing about why some tensors never moved.
        running = sorted({e.lr for e in ev.params if e.optimizer is not None and (e.lr or 0) > 0})
        zero = [
            e
            for e in ev.in_optimizer()
            if e.lr == 0.0 and (not (_peak_lr(ev, e) or 0) > 0 or (running and (not e.has_reference or e.unchanged)))
        ]
        if not zero:
            return []
        groups = sorted({(e.optimizer, e.group_index) for e in zero})
        steps = sorted({int(e.state_step) for e in zero if e.state_step is not None})
        return [
            self.finding(
                "critical",
                [e.name for e in zero],
                {
                    "groups": [{"optimizer": o, "group": g} for o, g in groups],
                    "saved_lr": 0.0,
                    "scheduled_peak_lr": sorted({p for e in zero if (p := _peak_lr(ev, e))}) or None,
                    "other_groups_lr": running or None,
                    "unchanged_since_reference": _unchanged_since_reference(zero),
                    "optimizer_steps_in_state": steps or None,
                    "moments_non_zero": any(e.moments_zero is False for e in zero),
                },
            )
        ]

    def summarize(self, f: Finding) -> str:
        ev = f.evidence
        peak = ev.get("scheduled_peak_lr")
        others = ev.get("other_groups_lr")
        return (
            f"{len(f.tensors)} tensors ({describe(f.tensors)}) are in a param group whose saved learning rate "
            "is 0"
            + (f" (scheduled peak {fmt_list(peak)}: the scheduler set it to 0)" if peak else "")
            + (f" while other groups train at {fmt_list(others)}" if others else "")
        )

    def explain(self, f: Finding) -> str:
        ev = f.evidence
        why = (
            f"while other groups still have lr {fmt_list(ev['other_groups_lr'])}"
            if ev.get("other_groups_lr")
            else "and no non-zero scheduled lr"
        )
        moved = {True: "; the tensors are bitwise unchanged since the reference", None: ""}.get(
            ev.get("unchanged_since_reference"), ""
        )
        grads = (
            "; their Adam moments are non-zero: gradients reach them, the lr stops them"
            if ev.get("moments_non_zero")
            else ""
        )
        return f"param groups {fmt(ev['groups'])} have saved lr 0 {why}{moved}{grads}."


@register
class NoGradient(_UnchangedForWindow):
    name = "no_gradient"
    order, rank = 40, 3
    severity = "critical"
    never_trained = True
    recommendation = (
        "these tensors never received a gradient: check that the forward pass uses them and that "
        "nothing detaches their inputs or outputs"
    )
    short_fix = "check that the forward uses them (and that zero_grad runs before backward, not before step)"

    def detect(self, ev: CheckpointEvidence) -> list[Finding]:
        # An optimizer stepped when a tensor in it with finite values has state with non-zero moments (a tensor
        # whose learning rate is 0 still shows that).
        stepped = {
            e.optimizer
            for e in ev.params
            if e.optimizer is not None and e.fact != "non_finite" and e.has_state and not e.moments_zero
        }
        candidates = ev.in_optimizer()
        nograd = [e for e in candidates if not e.has_state or e.moments_zero]
        if not nograd:
            return []
        names = {e.name for e in nograd}
        evidence = {
            "n_tensors": len(nograd),
            "without_state": sum(1 for e in nograd if not e.has_state),
            "with_all_zero_moments": sum(1 for e in nograd if e.moments_zero),
            "optimizers": sorted({e.optimizer for e in nograd}),
            "other_tensors_in_these_optimizers_have_state": bool(stepped & {e.optimizer for e in nograd}),
            "optimizer_steps_of_the_others": max(
                (e.state_step for e in ev.params if e.state_step is not None and e.name not in names), default=None
            ),
        }
        if any(e.has_reference for e in nograd):
            evidence["unchanged_since_reference"] = all(e.unchanged for e in nograd if e.has_reference)
        rec = self.recommendation
        if len(nograd) == len(candidates):
            evidence["all_tensors"] = True
            rec = ALL_NO_GRADIENT + "; " + rec
        return [self.finding("critical", [e.name for e in nograd], evidence, rec)]

    def summarize(self, f: Finding) -> str:
        return f"{len(f.tensors)} tensors ({describe(f.tensors)}) are in an optimizer but never received a gradient" + (
            " (every tensor: see the recommendation)" if f.evidence.get("all_tensors") else ""
        )

    def explain(self, f: Finding) -> str:
        ev = f.evidence
        return (
            f"{ev['without_state']} have no optimizer state and {ev['with_all_zero_moments']} have all-zero "
            "moments while the optimizer stepped"
            + (
                " (the other tensors of the same optimizer have state)"
                if ev.get("other_tensors_in_these_optimizers_have_state")
                else ""
            )
            + "."
        )

    def corroborate(self, f: Finding, probe: dict) -> None:
        hit = [t for t in f.tensors if t in set(probe["no_grad"]) | set(probe["zero_grad"])]
        f.evidence["probe_confirms_no_gradient"] = len(hit)


@register
class PrecisionUnderflow(CheckpointCause):
    name = "precision_underflow"
    order, rank = 50, 1
    severity = (
        "critical when >= 99% of elements lose their update and >= 99% never changed (shown by the reference, or, "
        "without one, by every element still at its initial constant); warning when >= 50% do; without a reference "
        "and without that proof, a warning that >= 50% of the updates round away from now on at the saved lr"
    )
    never_trained = True
    recommendation = (
        "keep fp32 master weights for these tensors: keep the model in float32 and run the forward under "
        "torch.autocast(dtype=torch.bfloat16), or use an optimizer that keeps updates below half a ULP "
        "(torchao.optim._AdamW(bf16_stochastic_round=True), torch-optimi's kahan_sum=True); raising the "
        "learning rate is not a fix: updates stay below the rounding step for most of training"
    )
    fixes = {
        "moe_arch": "keep fp32 master weights for these tensors (--train.precision bf16-mixed) or use compensated "
        "updates (--train.precision bf16-compensated); raising the learning rate is not a fix: updates stay below "
        "the rounding step for most of training",
        "hf-trainer": "load the model in float32 (from_pretrained(..., torch_dtype=torch.float32), no .to(bfloat16)) "
        "and set TrainingArguments(bf16=True): the Trainer then computes in bf16 over fp32 master weights",
        "peft": "load the base model in float32 (or keep the adapters in float32: LoRA layers trainable in fp32) and "
        "set TrainingArguments(bf16=True)",
        "accelerate": "load the model in float32 and use Accelerator(mixed_precision='bf16'): bf16 compute over "
        "fp32 master weights",
        "lightning": 'use L.Trainer(precision="bf16-mixed") instead of "bf16-true": bf16 compute over fp32 '
        "master weights",
        "torchao": "use torchao.optim._AdamW(..., bf16_stochastic_round=True) (updates below half a ULP then land "
        "in proportion), or keep the weights in float32",
        "optimi": "pass kahan_sum=True to the torch-optimi optimizer (a compensation buffer keeps what rounding "
        "drops), or keep the weights in float32",
        "deepspeed": 'enable "bf16": {"enabled": true} in the DeepSpeed config with the module in float32, so the '
        "optimizer steps fp32 master weights (not bf16_master_weights_and_grads)",
    }
    short_fix = "use --train.precision bf16-mixed (fp32 master weights) or bf16-compensated"

    def detect(self, ev: CheckpointEvidence) -> list[Finding]:
        unknown = rounding_unknown(ev.view)
        frozen, partial, forecast = [], [], []
        for e in ev.unclaimed():
            if not e.low_precision or e.frac_lost is None:
                continue
            # The rule predicts the loss; a fact must show it: the reference (the elements did not move) or, without
            # one, elements still at their initial constant (all-ones norms, zero biases). Otherwise the saved state
            # says only what happens from now on: the rule at the saved lr and moments, never a claim about the past
            # (earlier, larger updates may have moved the tensor).
            kept = e.frac_unchanged or 0.0 if e.has_reference else e.frac_at_init or 0.0
            if e.frac_lost >= 0.99 and kept >= 0.99:
                frozen.append(e)
            elif e.frac_lost >= 0.5 and kept >= 0.5:
                partial.append(e)
            elif not e.has_reference and not unknown and (e.frac_lost_now or 0.0) >= 0.5:
                forecast.append(e)
        return [
            self._finding(group, sev, ev.reference, kind)
            for group, sev, kind in ((frozen, "critical", "frozen"), (partial, "warning", "partial"))
            if group
        ] + ([self._forecast(forecast)] if forecast else [])

    def _finding(self, group: list[TensorEvidence], sev: str, reference: str | None, kind: str) -> Finding:
        basis = kind if any(e.has_reference for e in group) else f"{kind}: elements at their initial constant"
        ev = {
            **_ulp_evidence(group, basis, [e.median_update for e in group]),
            "peak_learning_rates": sorted({max(e.lr or 0.0, e.initial_lr or 0.0) for e in group if e.lr is not None}),
            "fraction_of_elements_lost": _median([e.frac_lost for e in group]),
            "fraction_of_elements_unchanged": _median([e.frac_unchanged for e in group if e.has_reference]),
            "unchanged_since_reference": _unchanged_since_reference(group),
            "reference": reference,
        }
        if not any(e.has_reference for e in group):
            ev["fraction_of_elements_at_initial_value"] = _median([e.frac_at_init for e in group])
            ev["initial_values"] = sorted({e.init_value for e in group if e.init_value is not None})
        consts = sorted({e.constant_value for e in group if e.constant_value is not None})
        if consts:
            ev["constant_values"] = consts[:4]
        return self.finding(sev, [e.name for e in group], ev)

    def _forecast(self, group: list[TensorEvidence]) -> Finding:
        ev = {
            **_ulp_evidence(group, "forecast", [e.median_update_now for e in group]),
            "fraction_of_updates_lost_from_now": _median([e.frac_lost_now for e in group]),
            "unchanged_since_reference": None,
            "hypothesis": (
                "a forecast from the saved lr and optimizer moments: it says which updates round away from now on, "
                "not whether the tensors moved during the run (earlier, larger updates may have moved them); pass "
                "--against the run's initial checkpoint to see what changed"
            ),
        }
        return self.finding("warning", [e.name for e in group], ev)

    def summarize(self, f: Finding) -> str:
        ev = f.evidence
        upd = ev.get("median_expected_update") or 0.0
        hu = ev.get("half_ulp_at_median_value") or 0.0
        if ev.get("basis") == "forecast":
            return (
                f"{len(f.tensors)} tensors ({describe(f.tensors)}) are stored in {ev['dtype']}: from now on, "
                f"{ev['fraction_of_updates_lost_from_now']:.0%} of their updates round away at the current lr "
                f"{fmt_list(ev.get('learning_rates'))} (expected update ~{upd:.1e}, half a ULP at their values "
                f"~{hu:.1e}); whether they moved so far is not known without a reference"
            )
        head = (
            f"{len(f.tensors)} tensors ({describe(f.tensors)}) are stored in {ev['dtype']}; their expected "
            f"update (~{upd:.1e} at peak lr {fmt_list(ev.get('peak_learning_rates'))}) is below half a ULP at "
            f"their values (~{hu:.1e}; {ev['half_ulp_at_1.0']:.1e} at 1.0) for "
            f"{ev['fraction_of_elements_lost']:.0%} of elements"
        )
        at_init = ev.get("fraction_of_elements_at_initial_value")
        init = fmt(ev.get("initial_values") or "their initial value")
        if f.severity == "critical":
            if ev.get("unchanged_since_reference"):
                tail = ", and they did not change"
            elif at_init is not None:
                tail = f", and every element still equals {init}, its initial value"
            else:
                tail = ""
            return head + tail + ": every update rounded away"
        unch = ev.get("fraction_of_elements_unchanged")
        if unch is not None:
            tail = f"; {unch:.0%} of their elements never changed"
        elif at_init is not None:
            tail = f"; {at_init:.0%} of their elements still equal {init}, their initial value"
        else:
            tail = ""
        return head + tail + ": most updates round away"

    def explain(self, f: Finding) -> str:
        ev = f.evidence
        if ev.get("basis") == "forecast":
            return (
                f"stored dtype {ev['dtype']} \u2192 half a ULP at the tensors' typical value "
                f"{fmt(ev.get('median_abs_value'))} is {fmt(ev.get('half_ulp_at_median_value'))} \u2192 at the saved "
                f"lr {fmt(ev.get('learning_rates'))} and the saved moments the expected step is "
                f"{fmt(ev.get('median_expected_update'))} \u2192 so "
                f"{(ev.get('fraction_of_updates_lost_from_now') or 0):.0%} of the next updates round back to the "
                "stored value (a forecast: what happened earlier in the run is not in the checkpoint)."
            )
        steps = [
            f"stored dtype {ev['dtype']}",
            f"half a ULP at the tensors' typical value {fmt(ev.get('median_abs_value'))} is "
            f"{fmt(ev.get('half_ulp_at_median_value'))} ({fmt(ev.get('half_ulp_at_1.0'))} at 1.0)",
            f"the optimizer's expected step is {fmt(ev.get('median_expected_update'))} (at the schedule's peak "
            f"lr {fmt(ev.get('peak_learning_rates'))}, from the optimizer state)",
            f"so {(ev.get('fraction_of_elements_lost') or 0):.0%} of the updated elements round back to their "
            "stored value",
        ]
        if ev.get("unchanged_since_reference"):
            steps.append(f"and the tensors are bitwise identical to the reference ({ev.get('reference')})")
        elif ev.get("constant_values"):
            steps.append(f"and every element still equals {fmt(ev['constant_values'])}, the initial value")
        elif ev.get("fraction_of_elements_at_initial_value") is not None:
            steps.append(
                f"and {ev['fraction_of_elements_at_initial_value']:.0%} of the elements still equal "
                f"{fmt(ev.get('initial_values'))}, the initial value"
            )
        return " \u2192 ".join(steps) + "."

    def alert(self, f: Finding, step: int, window: int, tensors: list[str]) -> str:
        ev = f.evidence
        change = (
            "have not changed"
            if f.severity == "critical"
            else f"have mostly not changed ({ev.get('fraction_of_elements_unchanged') or 0:.0%} of sampled elements)"
        )
        return (
            f"step {step}: {len(tensors)} tensors ({describe(tensors)}) {change} in {window} optimizer steps: "
            f"{ev.get('dtype')} stores them and their updates (\u2248{ev.get('median_expected_update', 0):.1e}) "
            f"are below half a ULP "
            f"({ev.get('half_ulp_at_median_value') or half_ulp_at(1.0, torch.bfloat16):.1e})"
        )


@register
class DeadExperts(CheckpointCause):
    name = "dead_experts"
    order, rank = 38, 7
    severity = "warning"
    claims = False
    recommendation = (
        "some experts receive no tokens: raise the load-balance loss weight "
        "(--model.router_aux_loss_coef), add router z-loss, or use auxiliary-loss-free bias balancing "
        "(--model.router_bias_balancing true)"
    )
    short_fix = "raise the load-balance weight or enable router bias balancing"

    def detect(self, ev: CheckpointEvidence) -> list[Finding]:
        found = dead_expert_sets(ev.params, ev.claimed)
        if not found:
            return []
        # A tensor of a dead expert alone (saved per expert) is wholly explained here, so no later cause (no_gradient,
        # frozen_unexplained) claims it; a stacked tensor is only partly dead and stays open to the others.
        ev.claimed |= {t for d in found for t in d.whole_tensors}
        modules = {
            d.expert_set.module: {
                "tensors": d.tensors,
                "evidence": d.evidence,
                "n_experts": d.expert_set.n_experts,
                "layer": d.expert_set.layer,
                "layout": d.expert_set.layout,
                "router": d.expert_set.router or None,
                "trained_experts": d.alive,
            }
            for d in found
        }
        return [
            self.finding(
                "warning",
                [t for d in found for t in d.tensors],
                {
                    "modules": modules,
                    "layers": {d.expert_set.module: d.expert_set.layer for d in found},
                    "n_dead": sum(len(d.dead) for d in found),
                },
                experts={d.expert_set.module: d.dead for d in found},
            )
        ]

    def summarize(self, f: Finding) -> str:
        parts = [f"{m}: experts {ids}" for m, ids in (f.experts or {}).items()]
        return f"{f.evidence['n_dead']} expert slices never trained ({'; '.join(parts)})"

    def explain(self, f: Finding) -> str:
        return (
            f"per-expert slices: {fmt({m: v['evidence'] for m, v in f.evidence['modules'].items()})}; "
            f"experts {fmt(f.experts)}."
        )

    def corroborate(self, f: Finding, probe: dict) -> None:
        f.evidence["probe_expert_zero_grad"] = probe["expert_zero_grad"]


@register
class ExcessiveUpdate(CheckpointCause):
    name = "excessive_update"
    order, rank = 70, 6
    severity = "warning"
    claims = False
    recommendation = (
        "these tensors moved far more than the rest of the run: lower their learning rate (or their "
        "group's), check their initialisation scale, and clip gradients"
    )
    short_fix = "lower their learning rate / check their init scale"

    def detect(self, ev: CheckpointEvidence) -> list[Finding]:
        outliers = excessive_updates(ev.unclaimed())
        if not outliers:
            return []
        found, center_abs, center_rel = outliers
        return [
            self.finding(
                "warning",
                [e.name for e, _ in found],
                {
                    "update_rms": {e.name: e.update_rms for e, _ in found},
                    "run_median_update_rms": center_abs,
                    "relative_change": {e.name: e.rel_change for e, _ in found if e.rel_change is not None},
                    "run_median_relative_change": center_rel,
                    "robust_z": {e.name: z for e, z in found},
                    "reference": ev.reference,
                },
            )
        ]

    def summarize(self, f: Finding) -> str:
        ev = f.evidence
        ur = ev["update_rms"]
        worst = max(ur, key=ur.get)
        rc = ev.get("relative_change") or {}
        rel = (
            f", relative change {rc[worst]:.2g} (run median {ev['run_median_relative_change']:.2g})"
            if worst in rc and ev.get("run_median_relative_change")
            else ""
        )
        return (
            f"{len(f.tensors)} tensors ({describe(f.tensors)}) moved far more than the rest of the run: largest "
            f"{worst}, update RMS {ur[worst]:.2g} per element (run median {ev['run_median_update_rms']:.2g}){rel}"
        )

    def explain(self, f: Finding) -> str:
        ev = f.evidence
        rel = (
            f"; relative change {fmt(ev['relative_change'])} against a run median of "
            f"{fmt(ev['run_median_relative_change'])}"
            if ev.get("relative_change")
            else ""
        )
        return (
            f"update RMS per element since the reference is {fmt(ev['update_rms'])}, against a run median of "
            f"{fmt(ev['run_median_update_rms'])}{rel} (robust z {fmt(ev['robust_z'])})."
        )


@register
class FrozenUnexplained(CheckpointCause):
    name = "frozen_unexplained"
    order, rank = 80, 5
    severity = "critical"
    never_trained = True
    recommendation = (
        "these tensors did not change although the run took optimizer steps, and the checkpoint "
        "does not show why: check that they are in an optimizer param group with a non-zero "
        "learning rate, that they receive gradients, and their storage dtype; save the optimizer "
        "state (mapped to names) with the checkpoint so the doctor can tell which"
    )

    def detect(self, ev: CheckpointEvidence) -> list[Finding]:
        if ev.trained is False or ev.reference_identical:
            return []
        frozen = [e for e in ev.unclaimed() if e.fact == "unchanged" and e.alias_of is None]
        if not frozen:
            return []
        checks = {
            "optimizer state": ev.has_optimizer_state,
            "a mapping of the optimizer state to names": ev.has_optimizer_state and not ev.unmapped_optimizer,
        }
        return [
            self.finding(
                "critical",
                [e.name for e in frozen],
                {
                    "n_tensors": len(frozen),
                    "unchanged_since_reference": True,
                    "reference": ev.reference,
                    "optimizer_steps": ev.steps,
                    "evidence_available": ["a reference"] + [k for k, ok in checks.items() if ok],
                    "evidence_missing": [k for k, ok in checks.items() if not ok],
                    "in_an_optimizer": sorted({e.optimizer for e in frozen if e.optimizer}),
                },
            )
        ]

    def summarize(self, f: Finding) -> str:
        ev = f.evidence
        steps = ev["optimizer_steps"] if ev.get("optimizer_steps") is not None else "some"
        return (
            f"{len(f.tensors)} tensors ({describe(f.tensors)}) are bitwise unchanged since the reference after "
            f"{steps} optimizer steps, and the checkpoint does not show why"
            + (f" (missing: {', '.join(ev['evidence_missing'])})" if ev.get("evidence_missing") else "")
        )
