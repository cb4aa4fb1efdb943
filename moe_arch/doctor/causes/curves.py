"""Curve causes: findings from a run's history (the loss, learning-rate, gradient, throughput and routing curves).

Each finding uses the checkpoint causes' schema (:class:`~moe_arch.doctor.causes.base.Finding`): a cause, a
severity, the series it is about (in ``tensors``), the steps and numbers (``evidence``, always with
``first_step``), one fix. The curve loop (:func:`moe_arch.doctor.curves.curve_findings`) runs them in ``order``.

================================  ==========================================================================
cause                             rule
================================  ==========================================================================
``divergence``                    a non-finite loss (its first step), or the loss leaves its running minimum by
                                  more than max(0.5 nats, 25%) and the last 10% never comes back within it
``not_learning``                  the loss of the last 10% of steps stays within 2% of ln(vocab) (uniform
                                  guessing), or settles within 2% of the data's unigram entropy (the model
                                  learned token frequencies only); needs ≥ 50 logged steps
``loss_spike``                    the live monitor's rule, replayed: robust z-score of a loss against the
                                  previous 2 x monitor.window losses > monitor.spike_zscore; recovered or not
                                  (back under the pre-spike median within 10% of the run); spikes that did not
                                  recover are part of a divergence when there is one
``overfitting``                   the eval loss rises ≥ max(0.1, 10%) above its minimum while the training
                                  loss keeps falling
``plateau``                       over the last third of the run (≥ 30 points) the loss fell by < 1% while the
                                  learning rate stayed above half its peak (so not the schedule's decay)
``lr_schedule``                   lr 0 at every logged step (≥ 3); lr still rising at the last step (warmup longer
                                  than the run); param groups whose lrs differ by ≥ 10^3
``gradient_norm``                 grad norm growing ≥ 100x from the first to the last 10% (exploding), or
                                  falling ≥ 10^4x (vanishing); clipping on ≥ 90% of steps by a median factor
                                  ≥ 10 (a small factor is ordinary: Adam and Muon ignore the gradient's scale)
``throughput_collapse``           tokens/s falls to ≤ half its earlier median for ≥ 10% of the run, sustained
``mod_drift``                     an MoD layer's selected fraction ends ≥ 0.1 away from its capacity
``moe_collapse``                  an MoE layer's max/mean expert load rises ≥ 2x and ends ≥ half the way to
                                  all tokens on one expert
================================  ==========================================================================
"""

from __future__ import annotations

import bisect
import math
import statistics

import numpy as np
import torch

from moe_arch.config import MonitorConfig
from moe_arch.doctor.causes.base import CurveCause, CurveEvidence, Finding, register
from moe_arch.doctor.history import History, Series
from moe_arch.doctor.routing import collapse_reasons, logged_loads, routing_stats, top_k_near
from moe_arch.doctor.rules import spike_window, spike_z


def _tail(s: Series, frac: float = 0.1) -> list[float]:
    n = max(1, int(len(s.values) * frac))
    return s.values[-n:]


def _head(s: Series, frac: float = 0.1) -> list[float]:
    n = max(1, int(len(s.values) * frac))
    return s.values[:n]


def _finite(xs: list[float]) -> list[float]:
    return [x for x in xs if math.isfinite(x)]


def _loss(h: History) -> Series | None:
    return h.get("lm_loss") or h.get("loss")


def _lr_series(h: History) -> list[Series]:
    groups = [s for n, s in h.series.items() if n.startswith("lr/") and s.values]
    total = h.get("lr")
    return groups or ([total] if total else [])


def _value_at(s: Series, step: int) -> float | None:
    """The series' value at ``step`` (its last logged value at or before it)."""
    i = bisect.bisect_right(s.steps, step)
    return s.values[i - 1] if i else None


def _spike_scores(vals: list[float], span: int) -> list[float | None]:
    """rules.spike_z of every loss against the ``span`` losses before it, as the monitor computes it live, with the
    full windows vectorised (a 1M-step history is judged in seconds). Full windows hold span + 1 values, an odd
    count, where the median is unambiguous and equals the monitor's torch.median."""
    out: list[float | None] = [spike_z(vals[max(0, i - span) : i], vals[i]) for i in range(min(span, len(vals)))]
    if len(vals) > span:
        x = np.asarray(vals, dtype=np.float64)
        for lo in range(span, len(vals), 1 << 16):  # chunks bound the window matrix's memory
            hi = min(len(vals), lo + (1 << 16))
            win = np.lib.stride_tricks.sliding_window_view(x[lo - span : hi], span + 1)
            med = np.median(win, axis=1)
            mad = np.median(np.abs(win - med[:, None]), axis=1) * 1.4826
            mad[mad == 0] = 1e-12
            out.extend(((win[:, -1] - med) / mad).tolist())
    return out


@register
class Divergence(CurveCause):
    """On the total loss and the next-token loss alike: auxiliary losses (router, MoD) can blow up alone."""

    name = "divergence"
    order = 10
    severity = "critical"
    recommendation = (
        "lower the peak learning rate (or lengthen warmup), clip gradients, and resume from the last "
        "checkpoint before the divergence"
    )

    def detect(self, ev: CurveEvidence) -> list[Finding]:
        for name in ("loss", "lm_loss", "eval_loss"):
            found = self._diverged(ev.history.get(name))
            if found:
                return found
        return []

    def _diverged(self, s: Series | None) -> list[Finding]:
        if s is None:
            return []
        for st, v in zip(s.steps, s.values):
            if not math.isfinite(v):
                return [
                    self.finding(
                        "critical",
                        [s.name],
                        {"first_step": st, "value": v},
                        summary=f"the {s.name} became non-finite ({v}) at step {st}",
                    )
                ]
        if len(s.values) < 20:
            return []
        run_min, min_step = math.inf, None
        for st, v in zip(s.steps, s.values):
            if v < run_min:
                run_min, min_step = v, st
        margin = max(0.5, 0.25 * run_min)
        tail = _tail(s)
        if min(tail) > run_min + margin:
            left_at = next(st for st, v in zip(s.steps, s.values) if st > min_step and v > run_min + margin)
            return [
                self.finding(
                    "critical",
                    [s.name],
                    {
                        "first_step": left_at,
                        "running_min": run_min,
                        "min_step": min_step,
                        "margin": margin,
                        "final_loss": statistics.median(tail),
                    },
                    summary=f"the {s.name} left its minimum ({run_min:.3f} at step {min_step}) by more "
                    f"than {margin:.2f} at step {left_at} and never came back (ends at "
                    f"{statistics.median(tail):.3g})",
                )
            ]
        return []


@register
class NotLearning(CurveCause):
    name = "not_learning"
    order = 20
    severity = "critical at ln(vocab) (uniform guessing); warning at the unigram entropy (token frequencies only)"
    flat_loss = True
    recommendation = (
        "the model is not learning beyond guessing (or beyond token frequencies): check that the "
        "labels are the inputs shifted by one, that the loss is not masked everywhere, that the "
        "learning rate is not 0 and the weights can move (run moe-arch diagnose on a checkpoint)"
    )

    def detect(self, ev: CurveEvidence) -> list[Finding]:
        h, vocab_size = ev.history, ev.vocab_size
        s = _loss(h)
        if s is None or len(s.values) < 50:
            return []
        tail = _finite(_tail(s))
        if not tail:
            return []
        end = statistics.median(tail)
        if vocab_size:
            uniform = math.log(vocab_size)
            if abs(end - uniform) <= 0.02 * uniform:
                return [
                    self.finding(
                        "critical",
                        [s.name],
                        {
                            "first_step": s.steps[0],
                            "last_step": s.steps[-1],
                            "final_loss": end,
                            "uniform_loss_ln_vocab": uniform,
                            "vocab_size": vocab_size,
                        },
                        summary=f"the {s.name} stays at {end:.3f} through step {s.steps[-1]}, the loss "
                        f"of uniform guessing over {vocab_size} tokens (ln V = {uniform:.3f})",
                    )
                ]
        unigram = h.meta.get("unigram_loss")
        el = h.get("eval_loss")
        if unigram and el is not None and len(el.values) >= 2:
            end_eval = el.values[-1]
            if abs(end_eval - unigram) <= 0.02 * unigram:
                return [
                    self.finding(
                        "warning",
                        [el.name],
                        {
                            "first_step": el.steps[0],
                            "last_step": el.steps[-1],
                            "final_eval_loss": end_eval,
                            "unigram_loss": unigram,
                        },
                        summary=f"the eval loss settled at {end_eval:.3f}, the data's unigram entropy "
                        f"({unigram:.3f}): the model learned token frequencies only",
                    )
                ]
        return []


@register
class LossSpike(CurveCause):
    """The live monitor's spike rule (rules.spike_z over its window of recent losses, its z threshold), replayed
    over the logged loss."""

    name = "loss_spike"
    order = 30
    severity = "warning"
    recommendation = "inspect the batches at the spike; lower the learning rate or clip harder if spikes repeat"
    short_fix = "inspect the batch; lower the lr or clip harder if spikes repeat"

    def detect(self, ev: CurveEvidence) -> list[Finding]:
        cfg = ev.monitor or MonitorConfig()
        s = _loss(ev.history)
        if s is None or len(s.values) < 20 or not all(math.isfinite(v) for v in s.values):
            return []
        vals, span = s.values, spike_window(cfg.window)
        spikes = []
        recover_within = max(5, len(vals) // 10)
        for i, z in enumerate(_spike_scores(vals, span)):
            if z is not None and z > cfg.spike_zscore:
                before = statistics.median(vals[max(0, i - span) : i])
                recovered = any(v <= before for v in vals[i + 1 : i + 1 + recover_within])
                spikes.append({"step": s.steps[i], "loss": vals[i], "before": before, "z": z, "recovered": recovered})
        if not spikes:
            return []
        unrecovered = [x for x in spikes if not x["recovered"]]
        if unrecovered and any(f.cause == "divergence" for f in ev.found):  # spikes leading into it are part of it
            return []
        return [
            self.finding(
                "warning",
                [s.name],
                {
                    "first_step": spikes[0]["step"],
                    "spikes": spikes[:20],
                    "n_spikes": len(spikes),
                    "n_unrecovered": len(unrecovered),
                },
                summary=f"{len(spikes)} loss spike(s) (robust z > {cfg.spike_zscore:g} against the last "
                f"{span} losses, the live monitor's rule), first at step {spikes[0]['step']} "
                f"({spikes[0]['before']:.3f} -> {spikes[0]['loss']:.3f})"
                + (f"; {len(unrecovered)} did not recover" if unrecovered else "; all recovered"),
            )
        ]


@register
class Overfitting(CurveCause):
    """The eval loss rises well above its minimum while the training loss keeps falling (memorising: e.g. a data
    pipeline that repeats the same batches)."""

    name = "overfitting"
    order = 40
    severity = "warning"
    recommendation = (
        "the model memorises its training batches: check that the data pipeline does not repeat the "
        "same examples (shuffling, epoch boundaries, a dataloader restarted at the same offset), and "
        "that train and eval data differ; add data or regularisation"
    )

    def detect(self, ev: CurveEvidence) -> list[Finding]:
        el, tr = ev.history.get("eval_loss"), _loss(ev.history)
        if el is None or tr is None or len(el.values) < 4:
            return []
        i_min = min(range(len(el.values)), key=el.values.__getitem__)
        best, last = el.values[i_min], el.values[-1]
        if i_min == len(el.values) - 1 or last < best + max(0.1, 0.1 * abs(best)):
            return []
        train_at_best, train_end = _value_at(tr, el.steps[i_min]), statistics.median(_tail(tr))
        if train_at_best is None or train_end > train_at_best:
            return []
        first = next(st for st, v in zip(el.steps[i_min:], el.values[i_min:]) if v >= best + 0.05 * abs(best))
        return [
            self.finding(
                "warning",
                [el.name, tr.name],
                {
                    "first_step": first,
                    "best_eval_loss": best,
                    "best_step": el.steps[i_min],
                    "final_eval_loss": last,
                    "train_loss_at_best": train_at_best,
                    "final_train_loss": train_end,
                },
                summary=f"the eval loss rose from {best:.3f} (step {el.steps[i_min]}) to {last:.3f} "
                f"while the training loss kept falling ({train_at_best:.3f} -> "
                f"{train_end:.3f}): the model memorises its training data",
            )
        ]


@register
class Plateau(CurveCause):
    name = "plateau"
    order = 50
    severity = "warning"
    flat_loss = True
    recommendation = (
        "the loss stopped improving while the learning rate is still high: check for frozen tensors "
        "(moe-arch diagnose on a checkpoint from this window), data that repeats, or a learning rate "
        "too high to settle"
    )

    def detect(self, ev: CurveEvidence) -> list[Finding]:
        s = _loss(ev.history)
        lrs = _lr_series(ev.history)
        if s is None or len(s.values) < 90 or not lrs:
            return []
        start = len(s.values) - len(s.values) // 3
        window = s.values[start:]
        head, tail = statistics.median(window[: len(window) // 5]), statistics.median(window[-(len(window) // 5) :])
        if not (math.isfinite(head) and math.isfinite(tail)) or head - tail >= 0.01 * abs(head):
            return []
        lr = lrs[0]
        peak = max(lr.values)
        lows = [_value_at(lr, st) for st in s.steps[start:]]
        if peak <= 0 or any(v is None or v < 0.5 * peak for v in lows):
            return []
        return [
            self.finding(
                "warning",
                [s.name, lr.name],
                {
                    "first_step": s.steps[start],
                    "last_step": s.steps[-1],
                    "loss_at_start": head,
                    "loss_at_end": tail,
                    "lr_min_in_window": min(lows),
                    "lr_peak": peak,
                },
                summary=f"the {s.name} is flat from step {s.steps[start]} to {s.steps[-1]} ({head:.3f} "
                f"-> {tail:.3f}) while the learning rate stays ≥ {min(lows):.2e} (peak "
                f"{peak:.2e})",
            )
        ]


@register
class LrSchedule(CurveCause):
    name = "lr_schedule"
    order = 60
    severity = "critical when the lr is 0 at every logged step; warning otherwise"
    recommendation = "check the scheduler: warmup steps, total steps, and each param group's lr multiplier"

    def detect(self, ev: CurveEvidence) -> list[Finding]:
        lrs = _lr_series(ev.history)
        out = []
        if not lrs:
            return out
        zero = [s for s in lrs if len(s.values) >= 3 and all(v == 0 for v in s.values)]
        if zero:
            out.append(
                self.finding(
                    "critical",
                    [s.name for s in zero],
                    {"first_step": zero[0].steps[0], "issue": "zero"},
                    summary=f"the learning rate is 0 at every logged step ({', '.join(s.name for s in zero)})",
                )
            )
        for s in lrs:
            if s in zero or len(s.values) < 10:
                continue
            tail = s.values[-max(3, len(s.values) // 10) :]
            if all(b > a for a, b in zip(tail, tail[1:])):
                out.append(
                    self.finding(
                        "warning",
                        [s.name],
                        {
                            "first_step": s.steps[0],
                            "issue": "warmup_longer_than_run",
                            "last_lr": s.values[-1],
                            "last_step": s.steps[-1],
                        },
                        summary=f"{s.name} is still rising at the last logged step ({s.steps[-1]}, lr "
                        f"{s.values[-1]:.2e}): the warmup is longer than the run",
                    )
                )
        peaks = {s.name: max(s.values) for s in lrs if max(s.values) > 0}
        if len(peaks) >= 2 and max(peaks.values()) / min(peaks.values()) >= 1e3:
            out.append(
                self.finding(
                    "warning",
                    sorted(peaks),
                    {"first_step": lrs[0].steps[0], "issue": "group_ratio", "peaks": peaks},
                    summary=f"param groups' peak learning rates differ by "
                    f"{max(peaks.values()) / min(peaks.values()):.0e}x "
                    f"({', '.join(f'{k} {v:.1e}' for k, v in peaks.items())})",
                )
            )
        return out


@register
class GradientNorm(CurveCause):
    name = "gradient_norm"
    order = 70
    severity = "warning"
    recommendation = (
        "exploding: lower the learning rate, clip gradients; vanishing: check for saturated "
        "activations or a broken graph; clipping on every step: the clip threshold, not the schedule, "
        "sets the effective learning rate (raise the threshold or lower the lr)"
    )

    def detect(self, ev: CurveEvidence) -> list[Finding]:
        h, grad_clip = ev.history, ev.grad_clip
        s = h.get("grad_norm")
        out = []
        if s is not None and len(s.values) >= 20:
            head, tail = _finite(_head(s)), _finite(_tail(s))
            if head and tail:
                a, b = statistics.median(head), statistics.median(tail)
                if a > 0 and b / a >= 100:
                    out.append(
                        self.finding(
                            "warning",
                            [s.name],
                            {"first_step": s.steps[0], "issue": "exploding", "start": a, "end": b},
                            summary=f"the gradient norm grew {b / a:.0f}x over the run ({a:.3g} -> {b:.3g})",
                        )
                    )
                elif a > 0 and b / a <= 1e-4:
                    out.append(
                        self.finding(
                            "warning",
                            [s.name],
                            {"first_step": s.steps[0], "issue": "vanishing", "start": a, "end": b},
                            summary=f"the gradient norm fell {a / max(b, 1e-30):.0e}x over the run "
                            f"({a:.3g} -> {b:.3g})",
                        )
                    )
        # Clipping on (nearly) every step by a large factor: the clip, not the schedule, sets SGD's step size, and for
        # Adam-type optimizers every gradient is rescaled to one norm (and can sink towards eps). Clipping by a small
        # factor is ordinary (Adam and Muon updates do not depend on the gradient's scale), so the ratio must be >= 10.
        clip = h.get("clip_rate")
        ratio = (statistics.median(s.values) / grad_clip) if s is not None and grad_clip else None
        rate = None
        if clip is not None and len(clip.values) >= 10:
            rate = statistics.mean(clip.values)
        elif s is not None and grad_clip and len(s.values) >= 10:
            rate = sum(v > grad_clip for v in s.values) / len(s.values)
        if rate is not None and rate >= 0.9 and (ratio is None or ratio >= 10):
            where = clip if clip is not None else s
            out.append(
                self.finding(
                    "warning",
                    [where.name],
                    {
                        "first_step": where.steps[0],
                        "issue": "always_clipped",
                        "clip_rate": rate,
                        "grad_clip": grad_clip,
                        "median_norm_over_clip": ratio,
                    },
                    summary=f"gradients were clipped on {rate:.0%} of steps"
                    + (
                        f", by a median factor of {ratio:.3g} (norm "
                        f"{statistics.median(s.values):.3g} against the threshold "
                        f"{grad_clip:g})"
                        if ratio
                        else ""
                    )
                    + ": the clip, not the schedule, sets the update",
                )
            )
        return out


@register
class ThroughputCollapse(CurveCause):
    name = "throughput_collapse"
    order = 80
    severity = "warning"
    recommendation = (
        "throughput dropped and stayed down: check for memory pressure (swapping, allocator "
        "fragmentation), data loading stalls, or recompilation"
    )

    def detect(self, ev: CurveEvidence) -> list[Finding]:
        s = ev.history.get("tokens_per_s") or ev.history.get("steps_per_s")
        if s is None or len(s.values) < 20:
            return []
        vals = s.values
        need = max(2, len(vals) // 10)
        base = statistics.median(vals[: max(3, len(vals) // 5)])
        run = 0
        for i, v in enumerate(vals):
            run = run + 1 if v <= 0.5 * base else 0
            if run >= need:  # sustained: a tenth of the run in a row at half the baseline or less
                first = i - run + 1
                return [
                    self.finding(
                        "warning",
                        [s.name],
                        {
                            "first_step": s.steps[first],
                            "baseline": base,
                            "median_after": statistics.median(vals[first:]),
                        },
                        summary=f"{s.name} fell from a median of {base:.4g} to "
                        f"{statistics.median(vals[first:]):.4g} from step {s.steps[first]} on",
                    )
                ]
        return []


def _routing_series(h: History, prefix: str) -> list[tuple[str, Series]]:
    return [(n, s) for n, s in sorted(h.series.items()) if n.startswith(prefix) and s.values and len(s.values) >= 10]


@register
class ModDrift(CurveCause):
    name = "mod_drift"
    order = 90
    severity = "warning"
    recommendation = "the MoD router's selected fraction drifted from its capacity: check the router's auxiliary loss"

    def detect(self, ev: CurveEvidence) -> list[Finding]:
        if not ev.mod_capacity:
            return []
        out = []
        for name, s in _routing_series(ev.history, "mod_fraction/"):
            end = statistics.median(_tail(s, 0.2))
            if abs(end - ev.mod_capacity) >= 0.1:
                out.append(
                    self.finding(
                        "warning",
                        [name],
                        {"first_step": s.steps[0], "end": end, "capacity": ev.mod_capacity},
                        summary=f"{name}: selected fraction ends at {end:.2f}, capacity {ev.mod_capacity:.2f}",
                    )
                )
        return out


@register
class MoeCollapse(CurveCause):
    name = "moe_collapse"
    order = 100
    severity = "warning"
    recommendation = (
        "tokens concentrate on few experts: raise the load-balance loss weight or use bias balancing "
        "(--model.router_bias_balancing true)"
    )

    def detect(self, ev: CurveEvidence) -> list[Finding]:
        out, judged = self._per_expert(ev)
        n_experts = ev.n_experts
        if not n_experts:
            return out
        for name, s in _routing_series(ev.history, "moe_imbalance/"):
            if name in judged:  # the per-expert loads said more
                continue
            a, b = statistics.median(_head(s, 0.2)), statistics.median(_tail(s, 0.2))
            if b >= 2 * a and b >= 1 + 0.5 * (n_experts - 1):
                out.append(
                    self.finding(
                        "warning",
                        [name],
                        {"first_step": s.steps[0], "start": a, "end": b, "n_experts": n_experts},
                        summary=f"{name}: max/mean expert load rose from {a:.2f} to {b:.2f} (all "
                        f"tokens on one expert: {n_experts})",
                    )
                )
        return out

    def _per_expert(self, ev: CurveEvidence) -> tuple[list[Finding], set[str]]:
        """Routing health from logged per-expert loads (ours, Megatron's tokens-per-expert log): the last fifth
        of the logged points pooled, judged by the probe's collapse rule (:mod:`moe_arch.doctor.routing`)."""
        loads, source = logged_loads(ev.history.path)
        k = top_k_near(ev.history.path)
        out, judged = [], set()
        for layer, points in sorted(loads.items(), key=lambda kv: int(kv[0][1:]) if kv[0][1:].isdigit() else 0):
            width = len(points[-1][1])
            points = [(st, v) for st, v in points if len(v) == width]
            if len(points) < 3 or width < 2:
                continue
            name = f"moe_imbalance/{layer}"
            judged.add(name)
            n = max(1, len(points) // 5)
            pooled = [
                torch.tensor([v for _, v in part], dtype=torch.float64).sum(0) for part in (points[:n], points[-n:])
            ]
            start, end = (routing_stats(x, k) for x in pooled)
            reasons = collapse_reasons(end)
            if not reasons:
                continue
            first = next((st for st, v in points if collapse_reasons(routing_stats(v, k))), points[-n][0])
            keys = ("load_p50", "load_p90", "load_max", "min_over_mean", "entropy_normalised", "entropy_above_top_k")
            out.append(
                self.finding(
                    "warning",
                    [name],
                    {
                        "first_step": first,
                        "source": source,
                        "n_experts": width,
                        "top_k": k,
                        "points_pooled": n,
                        "end": {key: end[key] for key in keys} | {"share": end["share"]},
                        "start": {key: start[key] for key in keys},
                        "effective_experts": end["effective_experts"],
                        "dead_experts": end["dead_experts"],
                        "reasons": reasons,
                    },
                    summary=f"{name}: routing collapsed by step {first}: {'; '.join(reasons)} (load p50/p90/max "
                    f"{end['load_p50']:.2f}/{end['load_p90']:.2f}/{end['load_max']:.2f}x the mean, min/mean "
                    f"{end['min_over_mean']:.2f}; normalised entropy {start['entropy_normalised']:.2f} at the "
                    f"start, {end['entropy_normalised']:.2f} at the end)",
                )
            )
        return out, judged
