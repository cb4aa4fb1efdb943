"""The live monitor: the doctor's analysis, run on the training state every few optimizer steps.

It does not implement a second analysis. Every ``interval`` optimizer steps it builds the same per-tensor
evidence the checkpoint doctor builds (:class:`~moe_arch.doctor.analyze.TensorEvidence`), with the weights of
``window`` steps ago as the reference, and hands it to the doctor's root-cause engine. What makes it cheap:

- each tensor (and each expert slice of a stacked expert tensor) is *fingerprinted* by a fixed sample of up to
  ``sample_size`` element positions; "unchanged" means every sampled element is bitwise unchanged, and the
  rounding rule is evaluated on the same elements;
- gradient presence is recorded in an optimizer pre-step hook (an ``is None`` check, no reduction);
- gradient norms per tensor group are computed on check steps only.

Besides the doctor's causes it watches the loss (robust z-score spikes over a window; the first non-finite
value, after which forward hooks are armed for one pass to name the module where it first appears), the
update/parameter RMS ratio and gradient norm per group, MoE expert load and MoD selection.

Use in any PyTorch loop::

    monitor = Monitor(model, optimizer)        # installs optimizer hooks; checks run after optimizer.step()
    ...
    monitor.after_step(loss=loss.item())       # optional: feeds the loss-spike / non-finite watch
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from torch import nn

from moe_arch.config import MonitorConfig
from moe_arch.doctor.analyze import TensorEvidence, infer_role, is_stacked
from moe_arch.doctor.causes import REGISTRY, Finding, describe
from moe_arch.doctor.causes.training_state import LOW_PRECISION_STATE_BY_DESIGN
from moe_arch.doctor.engine import diagnose
from moe_arch.doctor.nonfinite import _has_nonfinite
from moe_arch.doctor.optim_map import OptimizerSummary
from moe_arch.doctor.replicas import ReplicaCheck
from moe_arch.doctor.rules import spike_window, spike_z
from moe_arch.model.roles import named_parameter_roles
from moe_arch.numerics import LOW_PRECISION, adam_update, fraction_lost, half_ulp, half_ulp_at, muon_update_rms
from moe_arch.parallel.parallelize import global_grad_norm, local

GROUP_OF_ROLE = {
    "hidden_matrix": "matrices",
    "expert_matrix": "experts",
    "router": "routers",
    "norm": "norms",
    "embedding": "embeddings",
    "output_head": "heads",
    "conv": "mamba",
    "ssm": "mamba",
    "bias": "biases",
}


class CriticalAlert(RuntimeError):
    """Raised (by default) when ``stop_on_critical`` is set and a critical alert fires."""


@dataclass
class Alert:
    step: int
    cause: str
    severity: str
    tensors: list[str]
    message: str
    evidence: dict = field(default_factory=dict)
    experts: dict | None = None

    def to_dict(self) -> dict:
        d = {
            "step": self.step,
            "cause": self.cause,
            "severity": self.severity,
            "tensors": self.tensors,
            "message": self.message,
            "evidence": self.evidence,
            "time": time.time(),
        }
        if self.experts:
            d["experts"] = self.experts
        return d


@dataclass
class _Tracked:
    name: str
    param: nn.Parameter
    role: str
    idx: torch.Tensor  # flat positions sampled in this rank's shard (the whole tensor when not sharded)
    slices: int  # expert slices of the whole tensor (0 when not stacked)
    slice_of: torch.Tensor | None = None  # global expert slice of each sampled element
    optimizer: str | None = None
    group_index: int | None = None
    had_grad: int = 0  # optimizer steps (in the current window) at which .grad was not None


def _shard_offset(p: torch.Tensor) -> int:
    """Global index, along dim 0, of the first row of this rank's shard (0 when not sharded)."""
    if not hasattr(p, "device_mesh"):
        return 0
    # lazy: torch.distributed.tensor is absent from builds without torch.distributed (sharded tensors imply it)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return int(offset[0]) if offset else 0


def _unwrap(opt):
    """accelerate / Lightning wrap the torch optimizer; hooks must go on the one whose step() runs."""
    inner = getattr(opt, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else opt


def _as_dict(optimizers) -> dict[str, torch.optim.Optimizer]:
    if optimizers is None:
        return {}
    if isinstance(optimizers, torch.optim.Optimizer) or hasattr(optimizers, "param_groups"):
        return {"optimizer": _unwrap(optimizers)}
    if isinstance(optimizers, dict):
        return {k: _unwrap(v) for k, v in optimizers.items()}
    return {f"optimizer{i}": _unwrap(o) for i, o in enumerate(optimizers)}


def _found_inf(opt) -> torch.Tensor | None:
    """The GradScaler's overflow flag set on an optimizer that skips inside its own step (fused AdamW), during
    that step; None for the others (the GradScaler does not call their step when it skips)."""
    found_inf = getattr(opt, "found_inf", None)
    return found_inf if isinstance(found_inf, torch.Tensor) else None


@dataclass
class _Counts:
    """The monitor's step counters at one snapshot (see Monitor.__init__)."""

    applied: dict[str, int]
    fused_skips: dict[str, Any]
    iterations: int
    iterations_applied: Any
    zero_lr: Any


class Monitor:
    def __init__(
        self,
        model: nn.Module,
        optimizers,
        config: MonitorConfig | None = None,
        run_dir: str | Path | None = None,
        enabled_output: bool = True,
        auto_check: bool = True,
        print_fn: Callable[[str], None] | None = None,
        on_critical: Callable[[Alert], None] | None = None,
        roles: dict[str, str] | None = None,
        start_step: int = 0,
    ):
        self.cfg = config or MonitorConfig()
        self.model = model
        self.optimizers = _as_dict(optimizers)
        self.run_dir = Path(run_dir) if run_dir else None
        self.output = enabled_output
        self.auto_check = auto_check
        if print_fn is None:
            console = Console(highlight=False, soft_wrap=True)
            print_fn = console.print
        self.print = print_fn
        self.on_critical = on_critical
        self.logger = None
        self.step = start_step
        self.alerts: list[Alert] = []
        self.preflight_alerts: list[Alert] = []
        self._alerted: set[tuple[str, str]] = set()
        self._losses: deque[float] = deque(maxlen=spike_window(self.cfg.window))
        self._nonfinite_seen = False
        self._hooks_armed: list = []
        self._last_checked = -1
        self._stats: dict[str, Any] = {}
        self._dead_window: dict[int, deque] = {}
        # optimizer.step calls that ran (their post hooks fired), per optimizer, by step of the snapshot: a GradScaler
        # or a skip-step optimizer skips the call while the loop's step advances (skipped_steps, said once per run);
        # and the loop's iterations (after_step calls that advanced its step), which say what that step counts
        self._applied: dict[str, int] = dict.fromkeys(self.optimizers, 0)
        # A GradScaler calls step() on every step of an optimizer that skips inside its kernel (fused AdamW, the
        # Hugging Face default): both hooks fire, and the step was skipped when ``opt.found_inf`` is non-zero.
        # Those skips are summed on the device (no host sync per step) and read at check time.
        self._fused_skips: dict[str, Any] = dict.fromkeys(self.optimizers, 0)
        self._iterations = 0
        # iterations in which at least one optimizer step was applied (an optimizer that steps every other batch,
        # a GAN's generator, skips nothing); the hook calls and fused skips of the iteration under way
        self._iterations_applied: Any = 0
        self._calls_in_iteration = 0
        self._skips_in_iteration: Any = 0
        self._loop_step: int | None = None
        self._skips_alerted = False
        # The loop's step counts every optimizer.step call, not iterations (Lightning's global_step under manual
        # optimization, which its callback sets): the applied steps are then summed over the optimizers.
        self.loop_counts_each_optimizer_step = False
        # optimizer steps that ran with lr 0 in every param group below a non-zero scheduled peak (warmup_no_op);
        # and whether the optimizer state's dtypes were looked at (once)
        self._zero_lr = 0
        # the counters above as they stood at each snapshot's step (a window's counts are differences)
        self._counts_at: dict[int, _Counts] = {}
        self._zero_lr_alerted = False
        self._state_checked = False
        gen = torch.Generator().manual_seed(0)
        self.tracked: list[_Tracked] = []
        role_of = roles
        if role_of is None:
            try:
                role_of = {n: r for n, _, r in named_parameter_roles(model)}
            except TypeError:
                role_of = {}
        self._dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            role = role_of.get(name) or infer_role(name, tuple(p.shape), None)
            loc = local(p)  # under FSDP2, fingerprint this rank's shard only: nothing is gathered
            n = loc.numel()
            stacked = is_stacked(role, tuple(p.shape))
            k = self.cfg.sample_size
            slice_of = None
            if stacked and n:
                rows = loc.shape[0]
                per = n // rows
                take = min(per, max(1, k // p.shape[0]) if p.numel() > k else per)
                idx = torch.cat([e * per + torch.randperm(per, generator=gen)[:take] for e in range(rows)])
                idx = idx.sort().values
                slice_of = idx // per + _shard_offset(p)
            else:
                idx = torch.arange(n) if n <= k else torch.randperm(n, generator=gen)[:k].sort().values
            self.tracked.append(
                _Tracked(
                    name,
                    p,
                    role,
                    idx.to(loc.device),
                    p.shape[0] if stacked else 0,
                    slice_of.to(loc.device) if slice_of is not None else None,
                )
            )
        by_id = {id(t.param): t for t in self.tracked}
        for oname, opt in self.optimizers.items():
            for gi, g in enumerate(opt.param_groups):
                for p in g["params"]:
                    t = by_id.get(id(p))
                    if t is not None:
                        t.optimizer, t.group_index = oname, gi
        self._trained_groups = sorted({(t.optimizer, t.group_index) for t in self.tracked if t.optimizer is not None})
        self._snapshots: deque[tuple[int, dict[str, torch.Tensor]]] = deque()
        self._hooks = []
        opts = list(self.optimizers.values())
        if opts:
            self._hooks.append(opts[0].register_step_pre_hook(self._pre_step))
            # counted before _post_step runs the checks (hooks run in the order they were registered)
            for name, opt in self.optimizers.items():
                self._hooks.append(opt.register_step_post_hook(partial(self._count_applied, name)))
            self._hooks.append(opts[-1].register_step_post_hook(self._post_step))
        self._snapshot(start_step)
        # Cross-rank fingerprints of replicated parameters (nothing to do on one rank or under pure FSDP2).
        self._replicas = ReplicaCheck(model, self.cfg.sample_size) if self.cfg.replica_check_every else None
        self._replicas_checked = -1

    # ---------------------------------------------------------------------------------------------- wiring
    def attach(self, logger, trainer=None) -> None:
        """Our trainer: alerts go to its metrics logger and console; a critical alert can stop it cleanly."""
        self.logger = logger
        self.auto_check = False
        if trainer is not None:
            self.print = lambda s: trainer.ui.print(s)
            if self.cfg.stop_on_critical:

                def stop(alert: Alert):
                    trainer.stop_reason = f"monitor: critical alert at step {alert.step}: {alert.message}"
                    trainer.request_stop()

                self.on_critical = stop

    @torch.no_grad()
    def preflight(self, threshold: float = 0.5) -> list[Alert]:
        """Before the first optimizer step: the tensors stored in bf16/fp16 whose first update at their group's
        (peak) lr is below half a ULP for more than ``threshold`` of their elements, so they cannot move (the
        half-ULP rule of the doctor and of moe-arch's own trainer preflight). One warning at step 0 naming them, in
        ``preflight_alerts`` (``alerts`` keeps what the checks observe: the window confirms the prediction)."""
        frozen: list[tuple[str, float, float, float]] = []  # name, expected update, half-ULP at |w|, share lost
        for t in self.tracked:
            if t.optimizer is None or t.param.dtype not in LOW_PRECISION:
                continue
            g = self.optimizers[t.optimizer].param_groups[t.group_index]
            lr = float(g.get("initial_lr", g["lr"]))  # a warmup starts below the peak the tensors must survive
            if "ns_steps" in g and t.param.ndim >= 2:
                upd = muon_update_rms(lr, tuple(t.param.shape), g.get("adjust_lr_fn"))
            else:  # Adam's first step is ~lr per element (|m_hat| / sqrt(v_hat) = 1), as adam_update without moments
                upd = lr
            w = local(t.param.detach())
            lost = fraction_lost(w, upd) if w.numel() else None
            if lost is not None and lost > threshold:
                frozen.append((t.name, upd, half_ulp_at(float(w.abs().float().median()), w.dtype), lost))
        self.preflight_alerts = []
        if not frozen:
            return []
        names = [n for n, *_ in frozen]
        dtypes = sorted({str(t.param.dtype).replace("torch.", "") for t in self.tracked if t.name in set(names)})
        upd = sorted(u for _, u, _, _ in frozen)[len(frozen) // 2]
        hu = sorted(h for *_, h, _ in frozen)[len(frozen) // 2]
        c = REGISTRY["precision_underflow"]
        msg = (
            f"step {self.step} (preflight, before the first optimizer step): {len(names)} tensors "
            f"({describe(names)}) are stored in {'/'.join(dtypes)} and their first update (\u2248{upd:.1e}) is "
            f"below half a ULP at their values (\u2248{hu:.1e}) for most elements: they cannot move \u2014 cause "
            f"{c.name}; {c.short_fix}"
        )
        evidence = {
            "preflight": True,
            "expected_update": {n: u for n, u, _, _ in frozen},
            "half_ulp": {n: h for n, _, h, _ in frozen},
            "fraction_lost": {n: x for n, *_, x in frozen},
        }
        alert = Alert(self.step, c.name, "warning", names, msg, evidence)
        self.preflight_alerts = self._emit([alert], dedupe=False, observed=False)
        return self.preflight_alerts

    def close(self) -> None:
        for h in self._hooks + self._hooks_armed:
            h.remove()
        self._hooks, self._hooks_armed = [], []

    def _pre_step(self, opt, args, kwargs) -> None:
        for t in self.tracked:
            if t.param.grad is not None:
                t.had_grad += 1
        if self._lr_zero_everywhere() is not None:
            # only steps that apply: a fused optimizer under a GradScaler also runs this on the steps it skips
            found_inf = _found_inf(opt)
            self._zero_lr = self._zero_lr + (1 if found_inf is None else (found_inf == 0).long())
        if (self.step + 1) % self.cfg.interval == 0:
            self._stats["grad_norm_groups"] = self._group_grad_norms()

    def _count_applied(self, name: str, opt, args, kwargs) -> None:
        self._applied[name] += 1
        self._calls_in_iteration += 1
        found_inf = _found_inf(opt)
        if found_inf is not None:
            skipped = (found_inf != 0).long()
            self._fused_skips[name] = self._fused_skips[name] + skipped
            self._skips_in_iteration = self._skips_in_iteration + skipped

    def _post_step(self, opt, args, kwargs) -> None:
        self.step += 1
        if self.auto_check:
            self._check_replicas()
        if self.auto_check and self.step % self.cfg.interval == 0:
            self._check()

    # ---------------------------------------------------------------------------------------------- inputs
    def after_step(self, step: int | None = None, stats: dict | None = None, loss: float | None = None) -> list[Alert]:
        """Feed what a loop knows after an optimizer step (our trainer passes its step stats)."""
        if step is not None:
            self.step = step
            if step != self._loop_step:
                self._iterations += 1
                self._loop_step = step
                applied = self._calls_in_iteration - self._skips_in_iteration
                self._iterations_applied = self._iterations_applied + (applied > 0)
                self._calls_in_iteration, self._skips_in_iteration = 0, 0
        new: list[Alert] = self._check_replicas()
        if stats:
            loss = stats.get("loss", loss)
            self._stats.update(
                {k: stats[k] for k in ("moe_load", "mod_frac", "mod_weight", "clipped", "grad_norm") if k in stats}
            )
            for i, load in (stats.get("moe_load") or {}).items():
                self._dead_window.setdefault(i, deque(maxlen=max(1, self.cfg.window))).append(
                    torch.as_tensor(load).float()
                )
        if loss is not None:
            new += self._watch_loss(float(loss))
        if self.step % self.cfg.interval == 0 and self._last_checked != self.step:
            new += self._check()
        return new

    def _watch_loss(self, loss: float) -> list[Alert]:
        if not math.isfinite(loss):
            if self._nonfinite_seen:
                return []
            self._nonfinite_seen = True
            self.arm_nonfinite_hooks()
            return self._emit(
                [
                    Alert(
                        self.step,
                        "non_finite",
                        "critical",
                        [],
                        f"step {self.step}: the loss is {loss}; "
                        "forward hooks are armed to name the first module producing NaN/Inf on the next "
                        f"forward pass — {REGISTRY['non_finite'].short_fix}",
                        {"loss": str(loss)},
                    )
                ]
            )
        alerts = []
        z = spike_z(list(self._losses), loss)
        if z is not None:
            if z > self.cfg.spike_zscore:
                med = sorted(self._losses)[len(self._losses) // 2]
                alerts = self._emit(
                    [
                        Alert(
                            self.step,
                            "loss_spike",
                            "warning",
                            [],
                            f"step {self.step}: loss spike {loss:.4f} (window median {med:.4f}, robust "
                            f"z {z:.1f}) — {REGISTRY['loss_spike'].short_fix}",
                            {"loss": loss, "median": med, "z": z},
                        )
                    ],
                    dedupe=False,
                )
        self._losses.append(loss)
        return alerts

    def arm_nonfinite_hooks(self) -> None:
        """Watch the next forward pass for the first module whose output is non-finite (one pass only)."""
        if self._hooks_armed:
            return
        names = {m: n for n, m in self.model.named_modules()}

        def hook(module, args, output):
            if _has_nonfinite(output) and self._hooks_armed:
                where = names.get(module) or "<model>"
                for h in self._hooks_armed:
                    h.remove()
                self._hooks_armed = []
                self._emit(
                    [
                        Alert(
                            self.step,
                            "non_finite",
                            "critical",
                            [where],
                            f"step {self.step}: the first non-finite output appears in module {where!r}",
                            {"module": where},
                        )
                    ],
                    dedupe=False,
                )

        self._hooks_armed = [m.register_forward_hook(hook) for m in self.model.modules()]

    # ---------------------------------------------------------------------------------------------- checks
    @torch.no_grad()
    def _snapshot(self, step: int) -> None:
        snap = {t.name: local(t.param.detach()).reshape(-1).index_select(0, t.idx).clone() for t in self.tracked}
        self._snapshots.append((step, snap))
        # device sums are replaced, never added in place: the copies of the dicts keep their values
        self._counts_at[step] = _Counts(
            dict(self._applied), dict(self._fused_skips), self._iterations, self._iterations_applied, self._zero_lr
        )
        # Keep what the next check needs: the snapshot taken exactly `window` steps before it.
        while self._snapshots[0][0] < step + self.cfg.interval - self.cfg.window:
            self._counts_at.pop(self._snapshots.popleft()[0], None)

    def _group_grad_norms(self) -> dict[str, float]:
        groups: dict[str, list[torch.Tensor]] = {}
        for t in self.tracked:
            groups.setdefault(GROUP_OF_ROLE.get(t.role, "other"), []).append(t.param)
        # The trainer's global norm, per group: shards summed across ranks, replicated gradients counted once.
        return {g: float(global_grad_norm(ps)) for g, ps in sorted(groups.items())}

    @torch.no_grad()
    def _check(self) -> list[Alert]:
        self._last_checked = self.step
        step = self.step
        ref_step, ref = self._snapshots[0]
        prev_step, prev = self._snapshots[-1]
        full_window = step - ref_step >= self.cfg.window
        per_tensor = [self._local_stats(t, ref[t.name], prev[t.name]) for t in self.tracked]
        # One all-reduce for every tensor's counts (FSDP2: each rank measured its own shard).
        flat = torch.cat([v for v, _ in per_tensor]) if per_tensor else torch.zeros(0, dtype=torch.float64)
        if self._dist and flat.numel():
            # NCCL reduces device tensors only: the counts travel on the parameters' device and come back.
            flat = flat.to(self.tracked[0].param.device)
            torch.distributed.all_reduce(flat)
            flat = flat.cpu()
        evidence: list[TensorEvidence] = []
        ratio_by_group: dict[str, list[float]] = {}
        pos = 0
        for t, (vec, medians) in zip(self.tracked, per_tensor):
            stats = flat[pos : pos + vec.numel()]
            pos += vec.numel()
            ev = self._finalize(t, stats, medians, full_window)
            evidence.append(ev)
            n, cur_sq, step_sq = float(stats[0]), float(stats[4]), float(stats[8])
            if n > 0 and cur_sq > 0 and step > prev_step:
                ratio = math.sqrt(step_sq / n) / math.sqrt(cur_sq / n) / (step - prev_step)
                ratio_by_group.setdefault(GROUP_OF_ROLE.get(t.role, "other"), []).append(ratio)
        summaries = [OptimizerSummary(n, "live", "live", 0, 0, 0, []) for n in self.optimizers]
        findings = diagnose(evidence, summaries, bool(self.optimizers), f"step {ref_step}") if full_window else []
        skips = self._skipped_steps(step - ref_step, ref_step, evidence) if full_window else None
        # Only a critical finding (no step moved the weights) explains the tensors that never moved; a warning's
        # steps still moved them, so the tensors' own findings stay.
        no_op = self._warmup_no_op(step - ref_step, ref_step, evidence) if full_window else None
        for explains in (skips, no_op):
            if explains is not None and explains.severity == "critical":
                findings = [f for f in findings if not f.tensors or not set(f.tensors) <= set(explains.tensors)]
        findings += self._router_findings()
        # The optimizer state's dtypes, once, beside the window's first findings (a fact about the state, not a
        # cause of the tensors' own findings)
        state = None
        # not before some state exists (every step so far skipped by a GradScaler creates none)
        if full_window and not self._state_checked and any(o.state for o in self.optimizers.values()):
            self._state_checked = True
            state = self._low_precision_state()
        alerts = []
        for f in findings:
            fresh = [t for t in f.tensors if (f.cause, t) not in self._alerted]
            if fresh or f.experts:
                alerts.append(self._alert_from(f, step, step - ref_step, fresh or f.tensors))
        if skips is not None and not self._skips_alerted:  # said once; later windows still explain the tensors
            self._skips_alerted = True
            alerts.insert(0, self._alert_from(skips, step, step - ref_step, skips.tensors))
        if no_op is not None and not self._zero_lr_alerted:
            self._zero_lr_alerted = True
            alerts.insert(0, self._alert_from(no_op, step, step - ref_step, no_op.tensors))
        if state is not None:
            alerts.append(self._alert_from(state, step, step - ref_step, state.tensors))
        for t in self.tracked:
            t.had_grad = 0
        self._snapshot(step)
        metrics = {f"update_ratio_{g}": sorted(v)[len(v) // 2] for g, v in ratio_by_group.items() if v}
        metrics.update({f"monitor_grad_norm_{g}": v for g, v in self._stats.get("grad_norm_groups", {}).items()})
        for layer, loads in self._dead_window.items():
            total = torch.stack(list(loads)).sum(0)
            frac = total / total.sum().clamp_min(1)
            nz = frac[frac > 0]
            metrics[f"moe_entropy_L{layer}"] = (
                float(-(nz * nz.log()).sum() / math.log(len(frac))) if len(frac) > 1 else 1.0
            )
            metrics[f"moe_dead_L{layer}"] = int((total == 0).sum())
        for layer, (wm, ws) in (self._stats.get("mod_weight") or {}).items():
            metrics[f"mod_weight_spread_L{layer}"] = ws
        if self.logger is not None and self.output:
            self.logger.log(step, metrics, "monitor")
        return self._emit(alerts)

    def _expected_update(self, t: _Tracked, cur: torch.Tensor):
        """The optimizer's next step at the sampled elements (the doctor's rule), and the optimizer's kind."""
        opt = self.optimizers[t.optimizer]
        g = opt.param_groups[t.group_index]
        st = opt.state.get(t.param, {})
        kind = "muon" if "ns_steps" in g else ("adam" if "betas" in g else "sgd")
        lr = max(float(g["lr"]), float(g.get("initial_lr", 0.0) or 0.0))

        def sample(x):
            x = local(x) if isinstance(x, torch.Tensor) else None
            return (
                x.reshape(-1).index_select(0, t.idx) if x is not None and x.numel() == local(t.param).numel() else None
            )

        m = sample(st.get("exp_avg", st.get("momentum_buffer")))
        if kind == "muon" and t.param.ndim >= 2:
            upd = muon_update_rms(lr, tuple(t.param.shape), g.get("adjust_lr_fn"))
        elif kind == "adam":
            step = st.get("step", 0)
            upd = adam_update(
                lr,
                m,
                sample(st.get("exp_avg_sq")),
                float(step) if step is not None else 0.0,
                tuple(g["betas"]),
                float(g["eps"]),
            )
        else:
            upd = lr if m is None else lr * m.float().abs()
        upd = upd if isinstance(upd, torch.Tensor) else torch.full((cur.numel(),), float(upd), device=cur.device)
        return upd.float(), m, kind

    def _local_stats(self, t: _Tracked, ref_vals: torch.Tensor, prev_vals: torch.Tensor):
        """Additive counts over this rank's sampled elements (so shards reduce by summing), plus local medians.

        [n, n_equal, diff_sq, ref_sq, cur_sq, n_moment_nonzero, n_live_updates, n_lost, step_sq, n_nonfinite,
        per-slice n..., per-slice equal...]"""
        cur = local(t.param.detach()).reshape(-1).index_select(0, t.idx)
        same = cur == ref_vals
        c, r = cur.float(), ref_vals.float()
        vec = [
            cur.numel(),
            float(same.sum()),
            float((c - r).pow(2).sum()),
            float(r.pow(2).sum()),
            float(c.pow(2).sum()),
            0.0,
            0.0,
            0.0,
            float((c - prev_vals.float()).pow(2).sum()),
            float((~torch.isfinite(cur)).sum()),  # a loop that never reports its loss still shows NaN weights
        ]
        medians = {"abs": float(c.abs().median()) if cur.numel() else None}
        if t.optimizer is not None and cur.numel():
            upd, m, kind = self._expected_update(t, cur)
            medians["kind"] = kind
            if m is not None:
                vec[5] = float((m != 0).sum())
                medians["has_moment"] = True
            if t.param.dtype in LOW_PRECISION:
                hu = half_ulp(cur)
                live = upd > 0
                vec[6], vec[7] = float(live.sum()), float(((upd < hu) & live).sum())
                medians["update"] = float(upd[live].median()) if bool(live.any()) else None
                medians["half_ulp"] = float(hu.median())
        slices = [0.0] * (2 * t.slices)
        if t.slices and t.slice_of is not None:
            counts = torch.bincount(t.slice_of, minlength=t.slices).double()
            eq = torch.bincount(t.slice_of, weights=same.double(), minlength=t.slices)
            slices = counts.tolist() + eq.tolist()
        return torch.tensor(vec + slices, dtype=torch.float64), medians

    def _finalize(self, t: _Tracked, s: torch.Tensor, med: dict, full_window: bool) -> TensorEvidence:
        p = t.param
        ev = TensorEvidence(t.name, list(p.shape), str(p.dtype).replace("torch.", ""), p.numel(), t.role)
        n = float(s[0])
        ev.has_reference = full_window
        ev.unchanged = bool(s[1] == s[0])
        ev.frac_unchanged = float(s[1] / s[0]) if n else 1.0
        ev.ref_norm = math.sqrt(float(s[3]))
        ev.rel_change = math.sqrt(float(s[2])) / ev.ref_norm if ev.ref_norm > 0 else None
        ev.update_rms = math.sqrt(float(s[2]) / n) if n else None
        ev.median_abs = med.get("abs")
        ev.nonfinite = int(s[9])
        if ev.nonfinite:  # judged before any other cause (causes/weights.py NonFinite), as in a checkpoint
            ev.fact = "non_finite"
        if t.slices:
            counts, eq = s[10 : 10 + t.slices], s[10 + t.slices : 10 + 2 * t.slices]
            ev.slice_unchanged = [bool(c > 0 and e == c) for c, e in zip(counts.tolist(), eq.tolist())]
        if t.optimizer is None:
            return ev
        g = self.optimizers[t.optimizer].param_groups[t.group_index]
        ev.optimizer, ev.group_index = t.optimizer, t.group_index
        ev.lr = float(g["lr"])
        ev.initial_lr = float(g["initial_lr"]) if "initial_lr" in g else None
        ev.weight_decay = float(g.get("weight_decay", 0.0))
        ev.optimizer_kind = med.get("kind")
        # "has state" for the live engine = received a gradient at some optimizer step of the window.
        ev.has_state = t.had_grad > 0
        if med.get("has_moment"):
            ev.moments_zero = float(s[5]) == 0
        if p.dtype in LOW_PRECISION and float(s[6]) > 0:
            ev.low_precision = True
            ev.frac_lost = float(s[7] / s[6])
            ev.median_update = med.get("update")
            ev.median_half_ulp = med.get("half_ulp")
        return ev

    def _check_replicas(self) -> list[Alert]:
        """Every ``replica_check_every`` steps (a collective: every rank reaches it at the same step)."""
        every, rc = self.cfg.replica_check_every, self._replicas
        if not every or rc is None or not rc.groups or self.step % every or self._replicas_checked == self.step:
            return []
        self._replicas_checked = self.step
        diverged = self._replicas.check()
        if not diverged:
            return []
        c = REGISTRY["replicas_diverged"]
        worst = max(diverged, key=lambda d: d.max_abs_diff)
        f = c.finding(
            "critical",
            [d.name for d in diverged],
            {
                "source": f"live fingerprints of the replicated parameters, every {every} steps",
                "step": self.step,
                "ranks": sorted({r for d in diverged for r in d.ranks}),
                "max_abs_diff": worst.max_abs_diff,
                "worst": worst.name,
                "tensors": {
                    d.name: {
                        "ranks": d.ranks,
                        "reference_rank": d.reference_rank,
                        "max_abs_diff": d.max_abs_diff,
                        "elements_differing": d.elements_differing,
                        "sampled": d.sampled,
                    }
                    for d in diverged
                },
            },
        )
        f.summary = c.summarize(f)
        return self._emit([self._alert_from(f, self.step, every, f.tensors)])

    def _skipped_steps(self, loop_steps: int, ref_step: int, evidence: list[TensorEvidence]) -> Finding | None:
        """Optimizer steps skipped over the window: fewer ``optimizer.step`` calls ran than the loop's step advanced.
        When none ran, every tracked tensor must also be bitwise unchanged (an optimizer whose step bypasses the
        hooks still moves the weights).

        A fused optimizer under a GradScaler runs its hooks on the steps it skips (``found_inf`` set): those are
        not applied.

        Several optimizers: a loop whose step counts every optimizer's step (Lightning's ``global_step`` under
        manual optimization, ``loop_counts_each_optimizer_step``, or seen advancing more than once per iteration) is
        compared with the sum of their applied steps; a loop fed through ``after_step`` with the iterations in which
        at least one optimizer applied a step (a GAN alternating its optimizers skips nothing); hooks alone (no loop
        step) with the most active optimizer."""
        at = self._counts_at.get(ref_step)
        if not self.optimizers or at is None:
            return None
        # one host read per check for the fused skips (device sums)
        skipped = {n: int(self._fused_skips[n] - at.fused_skips.get(n, 0)) for n in self._applied}
        per = {n: self._applied[n] - at.applied.get(n, 0) - skipped[n] for n in self._applied}
        iterations = self._iterations - at.iterations
        if self.loop_counts_each_optimizer_step or 0 < iterations < loop_steps:  # the latter: a loop not told
            applied = sum(per.values())
        elif iterations > 0 and len(per) > 1:
            applied = int(self._iterations_applied - at.iterations_applied)
        else:
            applied = max(per.values())
        tracked = [e for e in evidence if e.optimizer is not None]
        if applied == 0 and not (tracked and all(e.unchanged for e in tracked)):
            return None
        f = REGISTRY["skipped_steps"].live(loop_steps, applied, [e.name for e in tracked])
        if f is not None and len(per) > 1:
            f.evidence["applied_by_optimizer"] = per
        return f

    def _lr_zero_everywhere(self) -> float | None:
        """The scheduled peak lr when every param group that holds a tracked tensor is at lr 0 below a non-zero
        peak (``initial_lr``, which torch's schedulers set); None otherwise (an lr of 0 with no scheduled peak is
        zero_learning_rate's)."""
        groups = [self.optimizers[o].param_groups[gi] for o, gi in self._trained_groups]
        if not groups or any(float(g["lr"]) != 0.0 for g in groups):
            return None
        peak = self._scheduled_peak()
        return peak if peak > 0 else None

    def _scheduled_peak(self) -> float:
        """The largest ``initial_lr`` (torch's schedulers set it) of the param groups holding tracked tensors."""
        groups = [self.optimizers[o].param_groups[gi] for o, gi in self._trained_groups]
        return max((float(g.get("initial_lr", 0.0) or 0.0) for g in groups), default=0.0)

    def _warmup_no_op(self, loop_steps: int, ref_step: int, evidence: list[TensorEvidence]) -> Finding | None:
        """Optimizer steps of the window that ran at lr 0 in every group (warmup_no_op)."""
        at = self._counts_at.get(ref_step)
        if at is None:
            return None
        zero = int(self._zero_lr - at.zero_lr)  # a device sum under a fused optimizer
        tracked = [e for e in evidence if e.optimizer is not None]
        peak = self._scheduled_peak()
        unchanged = bool(tracked) and all(e.unchanged for e in tracked)
        return REGISTRY["warmup_no_op"].live(loop_steps, zero, peak, [e.name for e in tracked], unchanged)

    @torch.no_grad()
    def _low_precision_state(self) -> Finding | None:
        """Adam second moments stored in bf16/fp16 (low_precision_optimizer_state), except in the optimizers that
        keep them so by design (torchao's, optimi's)."""
        names, dtypes, zero, total = [], set(), 0, 0
        for t in self.tracked:
            if t.optimizer is None:
                continue
            opt = self.optimizers[t.optimizer]
            if type(opt).__module__.split(".")[0] in LOW_PRECISION_STATE_BY_DESIGN:
                continue
            st = opt.state.get(t.param) or {}
            v = st.get("exp_avg_sq")
            if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.dtype not in LOW_PRECISION:
                continue
            names.append(t.name)
            dtypes |= {
                str(x.dtype).replace("torch.", "") for x in (v, st.get("exp_avg")) if isinstance(x, torch.Tensor)
            }
            v = local(v)
            zero += int((v == 0).sum())
            total += v.numel()
        return REGISTRY["low_precision_optimizer_state"].live(names, dtypes, zero, total) if names else None

    def _router_findings(self) -> list[Finding]:
        """MoE layers where some experts received no token over the whole window (from the trainer's stats)."""
        dead = {}
        for layer, loads in self._dead_window.items():
            if len(loads) < self.cfg.window:
                continue
            total = torch.stack(list(loads)).sum(0)
            ids = [i for i, x in enumerate(total.tolist()) if x == 0]
            if ids and len(ids) < len(total):
                dead[f"layers.{layer}.ffn"] = ids
        if not dead:
            return []
        tensors = [f"{m}.experts.{w}" for m in dead for w in ("w_gate", "w_up", "w_down")]
        return [
            REGISTRY["dead_experts"].finding(
                "warning",
                tensors,
                {"source": "router load over the window", "n_dead": sum(map(len, dead.values()))},
                experts=dead,
                summary=f"experts received no token in {self.cfg.window} steps: {dead}",
            )
        ]

    def _alert_from(self, f: Finding, step: int, window: int, tensors: list[str]) -> Alert:
        c = REGISTRY[f.cause]
        msg = f"{c.alert(f, step, window, tensors)} \u2014 cause {f.cause}; {c.short_fix}"
        return Alert(step, f.cause, f.severity, tensors, msg, f.evidence, f.experts)

    def _emit(self, alerts: list[Alert], dedupe: bool = True, observed: bool = True) -> list[Alert]:
        out = []
        for a in alerts:
            if dedupe:
                keys = {(a.cause, t) for t in (a.tensors or [""])}
                if a.experts:
                    keys = {(a.cause, f"{m}:{i}") for m, ids in a.experts.items() for i in ids}
                fresh = keys - self._alerted
                if not fresh:
                    continue
                self._alerted |= fresh
            out.append(a)
            if observed:  # a preflight prediction is not an observation
                self.alerts.append(a)
            if self.output:
                color = "red" if a.severity == "critical" else "yellow"
                try:
                    self.print(f"[bold {color}]monitor {a.severity}:[/] {a.message}")
                except Exception:
                    pass
                if self.run_dir is not None:
                    self.run_dir.mkdir(parents=True, exist_ok=True)
                    with open(self.run_dir / "alerts.jsonl", "a") as f:
                        f.write(json.dumps(a.to_dict(), default=str) + "\n")
                if self.logger is not None:
                    self.logger.log(
                        a.step,
                        {
                            "alert_cause": a.cause,
                            "alert_severity": a.severity,
                            "alert_tensors": len(a.tensors),
                            "alert_message": a.message,
                        },
                        "alert",
                    )
                    self.logger.log_text(a.step, f"alerts/{a.cause}", a.message)
            if a.severity == "critical" and self.cfg.stop_on_critical:
                if self.on_critical is not None:
                    self.on_critical(a)
                else:
                    raise CriticalAlert(a.message)
        return out
