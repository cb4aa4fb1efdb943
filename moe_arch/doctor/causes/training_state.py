"""Checkpoint causes read from the training state beside the weights: the loss scaler, the optimizer's own step
counts and moment dtypes, the LR scheduler, and the adapters of a PEFT run. Each names a run that looks like it
trains while its optimizer steps do nothing (or do the wrong thing):

=================================  =====  ======================================================================
cause                              order  rule
=================================  =====  ======================================================================
``idle_adapter``                   15     LoRA ``lora_B`` matrices still all zero after optimizer steps (they
                                          start at zero, so the adapters add nothing), or every adapter bitwise
                                          unchanged since the reference: with the base frozen the run trains
                                          nothing
``skipped_steps``                  33     the optimizer state's step count is below the trainer's step (a
                                          GradScaler that skips every overflowing step, a skip-step optimizer,
                                          ``nan_policy: skip``), or a GradScaler whose scale fell below 1
``warmup_no_op``                   36     every group's saved lr is 0 while the schedule's peak is not, and the
                                          tensors show the steps did nothing; or a warmup as long as the run
``low_precision_optimizer_state``  55     Adam moments stored in bf16/fp16 (does not claim: beside the weights'
                                          own findings)
=================================  =====  ======================================================================
"""

from __future__ import annotations

import math
import re

import torch

from moe_arch.checkpoint.readers import release
from moe_arch.doctor.causes.base import CheckpointCause, CheckpointEvidence, Finding, describe, fmt, register
from moe_arch.doctor.optim_map import map_optimizers
from moe_arch.doctor.stacks import optimizer_library
from moe_arch.numerics import LOW_PRECISION

DEFAULT_INIT_SCALE = 65536.0  # torch.amp.GradScaler's init_scale (2**16)
SKIPPED_WARNING = 0.25  # share of the trainer's steps skipped above which a run is warned about
SKIPPED_CRITICAL = 0.9  # ... and above which (or when no step was applied at all) it trains nothing
ACCUMULATION_KEYS = ("gradient_accumulation_steps", "grad_accum", "accumulate_grad_batches", "accum_steps")
LORA_B = re.compile(r"(^|\.)lora_(B|embedding_B)(\.|$)")
LORA_A = re.compile(r"(^|\.)lora_(A|embedding_A)(\.|$)")
LIVE_ZERO_LR_STEPS = 2  # optimizer steps at lr 0 in one monitor window that it reports (1: a warmup from 0)
LOW_PRECISION_STATE_BY_DESIGN = ("torchao", "optimi")  # libraries whose AdamW stores bf16 moments on purpose


def _accumulation(config) -> int | None:
    if isinstance(config, dict):
        for k, v in config.items():
            if k in ACCUMULATION_KEYS and isinstance(v, int) and not isinstance(v, bool) and v > 1:
                return v
            found = _accumulation(v)
            if found:
                return found
    return None


def _number(v) -> float | None:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _steps_counter(ev: CheckpointEvidence) -> int | None:
    step = _number(ev.view.meta.get("step")) if ev.view is not None else None
    return int(step) if step is not None else None


# ---------------------------------------------------------------------------------------------- idle adapters
@register
class IdleAdapter(CheckpointCause):
    name = "idle_adapter"
    order, rank = 15, 2
    severity = "critical when every adapter is idle (the run trains nothing); warning when some are"
    never_trained = True
    recommendation = (
        "the LoRA adapters never trained: check that peft's target_modules name modules the forward pass uses "
        "(model.print_trainable_parameters() must list them), that the adapters require grad and are in an "
        "optimizer param group with a non-zero learning rate"
    )
    short_fix = "check target_modules, requires_grad and the adapters' lr (print_trainable_parameters())"

    def detect(self, ev: CheckpointEvidence) -> list[Finding]:
        if ev.trained is False or ev.reference_identical:
            return []
        adapters = [e for e in ev.unclaimed() if LORA_B.search(e.name) or LORA_A.search(e.name)]
        b_mats = [e for e in adapters if LORA_B.search(e.name)]
        if not b_mats:
            return []
        # A B matrix that is still exactly 0 (its initial value: the checkpoint alone proves it), or all-zero and
        # unchanged over the live monitor's window.
        idle_b = [e for e in b_mats if e.constant_value == 0.0 or (e.has_reference and e.unchanged and e.ref_norm == 0)]
        unchanged = [e for e in adapters if e.has_reference and e.unchanged]
        every_adapter_unchanged = bool(adapters) and len(unchanged) == len(adapters)
        if not idle_b and not every_adapter_unchanged:
            return []
        # A zero B makes its adapter's output zero whatever its A holds: the pair is idle.
        partners = {
            LORA_B.sub(lambda m: f"{m.group(1)}lora_{m.group(2).replace('B', 'A')}{m.group(3)}", e.name) for e in idle_b
        }
        names = {e.name for e in adapters}
        idle = sorted({e.name for e in idle_b} | (partners & names) | (names if every_adapter_unchanged else set()))
        group = [e for e in adapters if e.name in idle]
        all_idle = len(idle_b) == len(b_mats) or every_adapter_unchanged
        why = {
            "not_in_an_optimizer": sum(1 for e in group if e.optimizer is None),
            "learning_rate_0": sum(1 for e in group if e.optimizer is not None and e.lr == 0.0),
            "no_gradient": sum(1 for e in group if e.optimizer is not None and (not e.has_state or e.moments_zero)),
        }
        return [
            self.finding(
                "critical" if all_idle else "warning",
                idle,
                {
                    "n_lora_B": len(b_mats),
                    "lora_B_all_zero": len(idle_b),
                    "adapters_unchanged_since_reference": len(unchanged)
                    if any(e.has_reference for e in adapters)
                    else None,
                    "n_adapters": len(adapters),
                    "optimizer_steps": ev.steps,
                    "why": why,
                    "reference": ev.reference,
                },
            )
        ]

    def summarize(self, f: Finding) -> str:
        ev = f.evidence
        steps = ev["optimizer_steps"] if ev.get("optimizer_steps") is not None else "some"
        head = (
            f"{ev['lora_B_all_zero']} of {ev['n_lora_B']} LoRA B matrices are still all zero after {steps} "
            "optimizer steps"
        )
        if ev.get("adapters_unchanged_since_reference") == ev["n_adapters"]:
            head = f"all {ev['n_adapters']} adapter tensors are unchanged since the reference after {steps} steps"
        reasons = [f"{n} {k.replace('_', ' ')}" for k, n in ev["why"].items() if n]
        tail = ": the adapters add nothing and the run trains nothing" if f.severity == "critical" else ""
        return head + (f" ({', '.join(reasons)})" if reasons else "") + tail

    def alert(self, f: Finding, step: int, window: int, tensors: list[str]) -> str:
        reasons = [f"{n} {k.replace('_', ' ')}" for k, n in f.evidence["why"].items() if n]
        return (
            f"step {step}: {len(tensors)} LoRA adapter tensors ({describe(tensors)}) did not change in {window} "
            f"optimizer steps" + (f" ({', '.join(reasons)})" if reasons else "") + ": the adapters train nothing"
        )

    def explain(self, f: Finding) -> str:
        return (
            "LoRA initialises B to zero so that the adapted model starts as the base; a B that is still zero "
            f"(or an adapter bitwise unchanged) after optimizer steps never learned: {fmt(f.evidence['why'])}."
        )


# ---------------------------------------------------------------------------------------------- skipped steps
@register
class SkippedSteps(CheckpointCause):
    name = "skipped_steps"
    order, rank = 33, 1
    severity = (
        f"critical when a loss scaler (or nan_policy: skip) shows no optimizer step was applied or >= "
        f"{SKIPPED_CRITICAL:.0%} were skipped; warning when >= {SKIPPED_WARNING:.0%} were, or when a GradScaler's "
        "scale fell below 1"
    )
    never_trained = True
    recommendation = (
        "the optimizer skipped its steps (a GradScaler skips every step whose gradients overflow fp16): find the "
        "overflow source (moe-arch: train.nan_policy: stop names the first module producing NaN/Inf; elsewhere "
        "torch.autograd.detect_anomaly), lower the GradScaler's init_scale (e.g. 2**10), or train in bf16, "
        "which needs no loss scaling"
    )
    short_fix = (
        "find the overflow source (torch.autograd.detect_anomaly), lower the GradScaler's init_scale, or use bf16"
    )

    def live(self, trainer_steps: int, applied: int, tensors: list[str]) -> Finding | None:
        """The monitor's window: ``trainer_steps`` loop steps, of which ``applied`` ran ``optimizer.step`` (its
        step hooks fired); ``tensors``: what never moved when none did."""
        skipped = trainer_steps - applied
        frac = skipped / trainer_steps if trainer_steps > 0 else 0.0
        if skipped <= 0 or frac < SKIPPED_WARNING:
            return None
        critical = applied == 0 or frac >= SKIPPED_CRITICAL
        evidence = {
            "trainer_steps": trainer_steps,
            "optimizer_steps_applied": applied,
            "skipped_steps": skipped,
            "fraction_skipped": round(frac, 4),
            "source": "live: optimizer.step hooks against the loop's step",
        }
        f = self.finding("critical" if critical else "warning", tensors if applied == 0 else [], evidence)
        f.summary = self.summarize(f)
        return f

    def detect(self, ev: CheckpointEvidence) -> list[Finding]:
        if ev.view is None:
            return []
        meta = ev.view.meta
        scaler = meta.get("scaler") if isinstance(meta.get("scaler"), dict) else None
        scale = _number(scaler.get("scale")) if scaler else None
        counter = _steps_counter(ev)
        nan_skips = _number(meta.get("nan_skips"))
        if ev.unmapped_optimizer and not (scaler or nan_skips):
            return []  # whose state it is is unknown (an optimizer of another model, re-created): no count to compare
        counts = [e.state_step for e in ev.params if e.state_step is not None]
        applied: int | None = None
        if counts:
            applied = int(max(counts))
        elif ev.view.optimizers and not any(o.state_dict.get("state") for o in ev.view.optimizers):
            applied = 0  # no parameter has any state: no step was ever applied
        trainer_steps, skipped = counter, None
        if nan_skips and counter is not None:  # ours counts the steps it took; the skips are beside them
            trainer_steps, skipped = counter + int(nan_skips), int(nan_skips)
        elif counter and applied is not None and applied < counter:
            accum = _accumulation(meta.get("config"))
            if not (accum and applied and counter == accum * applied):
                skipped = counter - applied
        frac = skipped / trainer_steps if skipped and trainer_steps else 0.0
        low_scale = scale is not None and scale < 1.0
        if not (frac >= SKIPPED_WARNING or low_scale):
            return []
        # What says a step was skipped rather than taken without effect: a loss scaler or our skip counter. Without
        # one, an optimizer with no state at all is one that never got a gradient (no_gradient explains it), and a
        # step count below the trainer's may be an optimizer re-created on resume: a warning, never a claim.
        skip_mechanism = bool(scaler or nan_skips)
        if not skip_mechanism and not applied:
            return []
        none_applied = applied == 0 and bool(counter)
        critical = skip_mechanism and (none_applied or frac >= SKIPPED_CRITICAL)
        tensors = []
        if critical:
            # The tensors that never moved because no step was applied: every unclaimed tensor of an optimizer
            # that shows it (no state, or unchanged since the reference).
            tensors = [
                e.name
                for e in ev.in_optimizer()
                if not e.has_state or e.moments_zero or (e.has_reference and e.unchanged)
            ]
        evidence = {
            "trainer_steps": trainer_steps,
            "optimizer_steps_applied": applied,
            "skipped_steps": skipped,
            "fraction_skipped": round(frac, 4) if skipped is not None else None,
            "grad_scaler_scale": scale,
            "grad_scaler_growth_tracker": _number(scaler.get("_growth_tracker")) if scaler else None,
            "scale_halvings_from_default_init": round(math.log2(DEFAULT_INIT_SCALE / scale), 1)
            if scale and 0 < scale < DEFAULT_INIT_SCALE
            else None,
            "source": "nan_policy: skip" if nan_skips else ("GradScaler" if scaler else "optimizer step count"),
            "unchanged_since_reference": all(e.unchanged for e in ev.params if e.has_reference)
            if any(e.has_reference for e in ev.params)
            else None,
        }
        if not scaler and not nan_skips:
            evidence["alternative"] = (
                "an optimizer re-created on resume also restarts its step count; the weights tell (pass --against "
                "the run's initial checkpoint)"
            )
        return [self.finding("critical" if critical else "warning", tensors, evidence)]

    def summarize(self, f: Finding) -> str:
        ev = f.evidence
        parts = []
        if ev.get("skipped_steps") is not None:
            parts.append(
                f"{ev['skipped_steps']} of {ev['trainer_steps']} optimizer steps were skipped "
                f"({ev['fraction_skipped']:.0%}; {ev['optimizer_steps_applied']} applied)"
            )
        if ev.get("grad_scaler_scale") is not None:
            parts.append(f"the GradScaler's scale is {ev['grad_scaler_scale']:.3g}")
        head = "; ".join(parts)
        if ev.get("optimizer_steps_applied") == 0:
            return (
                head
                + ": no optimizer step was applied, so the weights"
                + (f" ({describe(f.tensors)})" if f.tensors else "")
                + " never moved"
            )
        if f.severity == "critical":
            return head + ": the weights barely moved"
        return head

    def explain(self, f: Finding) -> str:
        ev = f.evidence
        steps = [f"the trainer counted {ev.get('trainer_steps')} steps"]
        if ev.get("optimizer_steps_applied") is not None:
            steps.append(f"the optimizer state records {ev['optimizer_steps_applied']} applied")
        if ev.get("grad_scaler_scale") is not None:
            steps.append(
                f"the GradScaler's scale is {fmt(ev['grad_scaler_scale'])}"
                + (
                    f", {ev['scale_halvings_from_default_init']} halvings below the default 65536: it backs off "
                    "once per overflowing step"
                    if ev.get("scale_halvings_from_default_init")
                    else ""
                )
            )
        return " \u2192 ".join(steps) + "."

    def alert(self, f: Finding, step: int, window: int, tensors: list[str]) -> str:
        return f"step {step}: {f.summary}"


# ---------------------------------------------------------------------------------------------- warmup no-ops
def _scheduler_lrs(ev: CheckpointEvidence) -> tuple[list[float], list[float]]:
    """(peak lrs, last lrs) from the saved LR schedulers' states (``base_lrs``, ``_last_lr``)."""
    peaks, last = [], []
    for s in ev.view.meta.get("schedulers") or []:
        peaks += [float(x) for x in s.get("base_lrs") or [] if _number(x) is not None]
        last += [float(x) for x in s.get("_last_lr") or [] if _number(x) is not None]
    return peaks, last


def _warmup_and_length(ev: CheckpointEvidence) -> tuple[int | None, int | None]:
    """The warmup and the run's length in optimizer steps, where the checkpoint says (HF Trainer: its
    TrainingArguments and trainer_state; ours: the saved config)."""
    meta = ev.view.meta
    warmup, total = _number(meta.get("warmup_steps")), _number(meta.get("max_steps"))
    train = (meta.get("config") or {}).get("train") if isinstance(meta.get("config"), dict) else None
    if isinstance(train, dict) and warmup is None:
        warmup, total = _number(train.get("warmup_steps")), _number(train.get("steps"))
    return (int(warmup) if warmup else None), (int(total) if total and total > 0 else None)


@register
class WarmupNoOp(CheckpointCause):
    name = "warmup_no_op"
    order, rank = 36, 4
    severity = (
        "critical when every group's saved lr is 0 below a non-zero scheduled peak and the tensors show the "
        "steps did nothing; warning when the warmup is as long as the run (its peak lr is never reached)"
    )
    never_trained = True
    recommendation = (
        "check the schedule's warmup: it is counted in optimizer steps (not samples, tokens, epochs or micro-steps), "
        "must be shorter than the run, and a warmup that starts at lr 0 wastes its first step"
    )
    short_fix = "check the schedule: no optimizer step should run at lr 0 (warmup in optimizer steps, float division)"

    def live(self, window_steps: int, zero_steps: int, peak: float, tensors: list[str], unchanged: bool):
        """The monitor's window: ``zero_steps`` of its ``window_steps`` optimizer steps ran with lr 0 in every param
        group below the scheduled ``peak``. One such step is a warmup that starts at 0 (the Hugging Face default):
        not reported; more are steps that did not move the weights (Adam's moments still moved). Critical when
        every step of the window ran at lr 0 and ``tensors`` are all unchanged over it."""
        if zero_steps < LIVE_ZERO_LR_STEPS:
            return None
        critical = zero_steps >= window_steps and unchanged
        evidence = {
            "kind": "lr_zero_live",
            "optimizer_steps_at_lr_0": zero_steps,
            "window_steps": window_steps,
            "scheduled_peak_lr": peak,
            "unchanged_over_window": unchanged,
            "source": "live: each param group's lr when optimizer.step ran",
        }
        f = self.finding("critical" if critical else "warning", tensors, evidence)
        f.summary = self.summarize(f)
        return f

    def detect(self, ev: CheckpointEvidence) -> list[Finding]:
        if ev.view is None or not ev.trained:
            return []
        out = []
        peaks, last = _scheduler_lrs(ev)
        group = ev.in_optimizer()
        peak = max([e.initial_lr or 0.0 for e in group] + peaks, default=0.0)
        if group and peak > 0 and all(e.lr == 0.0 for e in group) and (not last or max(last) == 0.0):
            # lr 0 now is also where a schedule decays to at its end: the tensors must show the steps did nothing.
            # With a reference, every tensor is unchanged; without one, tensors stored in fp32 (no rounding can
            # explain them) still at an initial constant (1.0, 0.0) although their moments are non-zero.
            with_ref = [e for e in group if e.has_reference]
            proof = None
            if with_ref and all(e.unchanged for e in with_ref) and not ev.reference_identical:
                proof = "unchanged since the reference"
            elif not with_ref:
                at_init = [
                    e
                    for e in group
                    if e.constant_value in (0.0, 1.0)
                    and not e.low_precision
                    and e.dtype == "float32"
                    and e.has_state
                    and e.moments_zero is False
                ]
                if at_init:
                    proof = f"{len(at_init)} fp32 tensors still at their initial constant with non-zero moments"
            if proof:
                out.append(
                    self.finding(
                        "critical",
                        [e.name for e in group],
                        {
                            "kind": "lr_zero_at_steps_taken",
                            "saved_lr": 0.0,
                            "scheduled_peak_lr": peak,
                            "optimizer_steps": ev.steps,
                            "evidence": proof,
                            "reference": ev.reference,
                        },
                    )
                )
        warmup, total = _warmup_and_length(ev)
        if warmup and total and warmup > total:
            out.append(
                self.finding(
                    "warning",
                    [],
                    {
                        "kind": "warmup_longer_than_run",
                        "warmup_steps": warmup,
                        "run_steps": total,
                        "scheduled_peak_lr": peak or None,
                        "lr_at_last_step": max(last) if last else None,
                        "fraction_of_peak_reached": round(min(total / warmup, 1.0), 3),
                    },
                )
            )
        return out

    def summarize(self, f: Finding) -> str:
        ev = f.evidence
        if ev["kind"] == "lr_zero_live":
            did = (
                f"the weights ({describe(f.tensors)}) did not move"
                if f.severity == "critical"
                else "those steps did not move the weights"
            )
            return (
                f"{ev['optimizer_steps_at_lr_0']} of the last {ev['window_steps']} optimizer steps ran with lr 0 in "
                f"every param group while the schedule's peak is {fmt(ev['scheduled_peak_lr'])}: {did}"
            )
        if ev["kind"] == "warmup_longer_than_run":
            return (
                f"the warmup ({ev['warmup_steps']} steps) is as long as the run ({ev['run_steps']} steps): the "
                f"learning rate never reaches its peak {fmt(ev.get('scheduled_peak_lr'))} (at most "
                f"{ev['fraction_of_peak_reached']:.0%} of it)"
            )
        return (
            f"every param group's learning rate is 0 at step {ev.get('optimizer_steps')} while the schedule's peak is "
            f"{fmt(ev['scheduled_peak_lr'])}, and {len(f.tensors)} tensors ({describe(f.tensors)}) show the steps "
            f"did nothing ({ev['evidence']})"
        )


# ---------------------------------------------------------------------------------------------- moments' dtype
@register
class LowPrecisionOptimizerState(CheckpointCause):
    name = "low_precision_optimizer_state"
    order, rank = 55, 8
    severity = "warning"
    claims = False
    recommendation = (
        "keep the optimizer's moments in fp32: keep the parameters in fp32 and compute under bf16 autocast (fp32 "
        "master weights), or use an optimizer whose state dtype is fp32 (apex FusedAdam master_weights, DeepSpeed's "
        "fp32 optimizer states)"
    )
    fixes = {
        "moe_arch": "keep the optimizer's moments in fp32: --train.precision bf16-mixed (fp32 master weights and "
        "moments) instead of bf16-pure",
        "hf-trainer": "keep the optimizer's moments in fp32: load the model in float32 (torch_dtype=torch.float32) "
        "and set TrainingArguments(bf16=True), which computes in bf16 under autocast",
        "peft": "keep the optimizer's moments in fp32: load the base model in float32 (or cast the adapters to "
        "float32) and set TrainingArguments(bf16=True)",
        "accelerate": "keep the optimizer's moments in fp32: load the model in float32 and use "
        "Accelerator(mixed_precision='bf16')",
        "lightning": 'keep the optimizer\'s moments in fp32: L.Trainer(precision="bf16-mixed") instead of "bf16-true"',
        "deepspeed": "keep the optimizer's moments in fp32: enable bf16 with fp32 master weights and optimizer states "
        '("bf16": {"enabled": true}, without bf16_master_weights_and_grads / bf16_optimizer_states)',
    }
    short_fix = "keep the moments in fp32 (fp32 weights under bf16 autocast, or an optimizer with fp32 state)"

    def live(self, names: list[str], dtypes: set[str], zero: int, total: int) -> Finding:
        """The monitor's view of the optimizer's state (its dtypes are fixed once it is created)."""
        f = self._found(names, dtypes, zero, total)
        f.evidence["source"] = "live: the optimizer's state tensors"
        f.summary = self.summarize(f)
        return f

    def detect(self, ev: CheckpointEvidence) -> list[Finding]:
        if ev.view is None or not ev.view.optimizers:
            return []
        # torchao's and optimi's AdamW keep bf16 moments by design (with stochastic rounding / Kahan summation of the
        # weights, tested against fp32 state by their authors): a finding there would fire on every healthy run.
        if optimizer_library(ev.view) in LOW_PRECISION_STATE_BY_DESIGN:
            return []
        # Cheap first: the dtypes of the saved moments (no element is read unless some are low precision).
        if not any(
            isinstance(st, dict) and _low(st.get("exp_avg_sq")) is not None
            for o in ev.view.optimizers
            for st in (o.state_dict.get("state") or {}).values()
        ):
            return []
        slots, _ = map_optimizers(ev.view)
        names, dtypes, zero, total = [], set(), 0, 0
        for name, slot in slots.items():
            v = slot.state.get("exp_avg_sq")
            if _low(v) is None:
                continue
            names.append(name)
            dtypes |= {str(getattr(x, "dtype", "")).replace("torch.", "") for x in (v, slot.state.get("exp_avg"))}
            zero += int((v == 0).sum())
            total += v.numel()
            release(v)
        if not names:
            return []
        return [self._found(names, dtypes, zero, total)]

    def _found(self, names: list[str], dtypes: set[str], zero: int, total: int) -> Finding:
        return self.finding(
            "warning",
            names,
            {
                "moment_dtypes": sorted(dtypes - {""}),
                "n_tensors": len(names),
                "fraction_exp_avg_sq_zero": round(zero / total, 4) if total else None,
                "exp_avg_sq_elements": total,
            },
        )

    def summarize(self, f: Finding) -> str:
        ev = f.evidence
        return (
            f"the Adam moments of {ev['n_tensors']} tensors ({describe(f.tensors)}) are stored in "
            f"{'/'.join(ev['moment_dtypes'])}; {ev['fraction_exp_avg_sq_zero']:.1%} of exp_avg_sq is exactly 0 "
            "(its small increments round away, so the update sizes drift or blow up)"
        )


def _low(v) -> torch.Tensor | None:
    return v if isinstance(v, torch.Tensor) and v.dim() > 0 and v.dtype in LOW_PRECISION else None
