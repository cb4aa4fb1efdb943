"""Findings from a run's history: the loss, learning-rate, gradient, throughput and routing curves.

Each finding uses the checkpoint doctor's schema (:class:`~moe_arch.doctor.engine.Finding`): a cause, a severity,
the series it is about (in ``tensors``), the steps and numbers (``evidence``, always with ``first_step``), one fix.

================================  ==========================================================================
cause                             rule
================================  ==========================================================================
``not_learning``                  the loss of the last 10% of steps stays within 2% of ln(vocab) (uniform
                                  guessing), or settles within 2% of the data's unigram entropy (the model
                                  learned token frequencies only); needs ≥ 50 logged steps
``divergence``                    a non-finite loss (its first step), or the loss leaves its running minimum by
                                  more than max(0.5 nats, 25%) and the last 10% never comes back within it
``loss_spike``                    robust z-score (MAD) of a step-to-step loss rise ≥ 6 (the monitor's
                                  threshold); recovered or not (back under the pre-spike level within 10% of
                                  the run)
``plateau``                       over the last third of the run (≥ 30 points) the loss fell by < 1% while the
                                  learning rate stayed above half its peak (so not the schedule's decay)
``lr_schedule``                   lr 0 at every logged step (≥ 3); lr still rising at the last step (warmup longer
                                  than the run); param groups whose lrs differ by ≥ 10^3
``gradient_norm``                 grad norm growing ≥ 100x from the first to the last 10% (exploding), or
                                  falling ≥ 10^4x (vanishing); clipping on ≥ 90% of steps
``throughput_collapse``           tokens/s falls to ≤ half its earlier median for ≥ 10% of the run, sustained
``moe_collapse``                  an MoE layer's max/mean expert load rises ≥ 2x and ends ≥ half the way to
                                  all tokens on one expert
``mod_drift``                     an MoD layer's selected fraction ends ≥ 0.1 away from its capacity
================================  ==========================================================================
"""

from __future__ import annotations

import math
import statistics

from moe_arch.config import MonitorConfig
from moe_arch.doctor.engine import Finding
from moe_arch.doctor.history import History, Series
from moe_arch.doctor.rules import robust_z

RECOMMENDATIONS = {
    "not_learning": ("the model is not learning beyond guessing (or beyond token frequencies): check that the labels "
                     "are the inputs shifted by one, that the loss is not masked everywhere, that the learning rate "
                     "is not 0 and the weights can move (run moe-arch diagnose on a checkpoint)"),
    "divergence": ("lower the peak learning rate (or lengthen warmup), clip gradients, and resume from the last "
                   "checkpoint before the divergence"),
    "loss_spike": "inspect the batches at the spike; lower the learning rate or clip harder if spikes repeat",
    "plateau": ("the loss stopped improving while the learning rate is still high: check for frozen tensors (moe-arch "
                "diagnose on a checkpoint from this window), data that repeats, or a learning rate too high to settle"),
    "lr_schedule": "check the scheduler: warmup steps, total steps, and each param group's lr multiplier",
    "gradient_norm": ("exploding: lower the learning rate, clip gradients; vanishing: check for saturated activations "
                      "or a broken graph; clipping on every step: the clip threshold, not the schedule, sets the "
                      "effective learning rate (raise the threshold or lower the lr)"),
    "throughput_collapse": ("throughput dropped and stayed down: check for memory pressure (swapping, allocator "
                            "fragmentation), data loading stalls, or recompilation"),
    "moe_collapse": ("tokens concentrate on few experts: raise the load-balance loss weight or use bias balancing "
                     "(--model.router_bias_balancing true)"),
    "mod_drift": "the MoD router's selected fraction drifted from its capacity: check the router's auxiliary loss",
}


def _tail(s: Series, frac: float = 0.1) -> list[float]:
    n = max(1, int(len(s.values) * frac))
    return s.values[-n:]


def _head(s: Series, frac: float = 0.1) -> list[float]:
    n = max(1, int(len(s.values) * frac))
    return s.values[:n]


def _finite(xs: list[float]) -> list[float]:
    return [x for x in xs if math.isfinite(x)]


def _f(cause: str, severity: str, series: list[str], evidence: dict, summary: str) -> Finding:
    return Finding(cause, severity, series, evidence, RECOMMENDATIONS[cause], summary=summary)


def _loss(h: History) -> Series | None:
    return h.get("lm_loss") or h.get("loss")


def not_learning(h: History, vocab_size: int | None) -> list[Finding]:
    s = _loss(h)
    if s is None or len(s.values) < 50:
        return []
    tail = _finite(_tail(s))
    if not tail:
        return []
    end = statistics.median(tail)
    out = []
    if vocab_size:
        uniform = math.log(vocab_size)
        if abs(end - uniform) <= 0.02 * uniform:
            out.append(_f("not_learning", "critical", [s.name],
                          {"first_step": s.steps[0], "last_step": s.steps[-1], "final_loss": end,
                           "uniform_loss_ln_vocab": uniform, "vocab_size": vocab_size},
                          f"the {s.name} stays at {end:.3f} through step {s.steps[-1]}, the loss of uniform guessing "
                          f"over {vocab_size} tokens (ln V = {uniform:.3f})"))
            return out
    unigram = h.meta.get("unigram_loss")
    ev = h.get("eval_loss")
    if unigram and ev is not None and len(ev.values) >= 2:
        end_eval = ev.values[-1]
        if abs(end_eval - unigram) <= 0.02 * unigram:
            out.append(_f("not_learning", "warning", [ev.name],
                          {"first_step": ev.steps[0], "last_step": ev.steps[-1], "final_eval_loss": end_eval,
                           "unigram_loss": unigram},
                          f"the eval loss settled at {end_eval:.3f}, the data's unigram entropy ({unigram:.3f}): the "
                          "model learned token frequencies only"))
    return out


def divergence(h: History) -> list[Finding]:
    s = _loss(h)
    if s is None:
        return []
    for st, v in zip(s.steps, s.values):
        if not math.isfinite(v):
            return [_f("divergence", "critical", [s.name], {"first_step": st, "value": v},
                       f"the {s.name} became non-finite ({v}) at step {st}")]
    if len(s.values) < 20:
        return []
    run_min, min_step, left_at = math.inf, None, None
    for st, v in zip(s.steps, s.values):
        if v < run_min:
            run_min, min_step = v, st
    margin = max(0.5, 0.25 * run_min)
    tail = _tail(s)
    if min(tail) > run_min + margin:
        floor = run_min + margin
        left_at = next(st for st, v in zip(s.steps, s.values) if st > min_step and v > floor)
        return [_f("divergence", "critical", [s.name],
                   {"first_step": left_at, "running_min": run_min, "min_step": min_step, "margin": margin,
                    "final_loss": statistics.median(tail)},
                   f"the {s.name} left its minimum ({run_min:.3f} at step {min_step}) by more than {margin:.2f} at "
                   f"step {left_at} and never came back (ends at {statistics.median(tail):.3f})")]
    return []


def loss_spikes(h: History, zscore: float | None = None) -> list[Finding]:
    zscore = zscore if zscore is not None else MonitorConfig.spike_zscore  # the live monitor's threshold
    s = _loss(h)
    if s is None or len(s.values) < 20:
        return []
    vals = s.values
    diffs = [b - a for a, b in zip(vals, vals[1:])]
    if not all(math.isfinite(d) for d in diffs):
        return []
    z = robust_z(diffs)
    spikes = []
    window = max(5, len(vals) // 10)
    for i, (d, zi) in enumerate(zip(diffs, z)):
        if d > 0 and zi >= zscore:
            before = vals[i]
            after = vals[i + 2:i + 2 + window]
            recovered = any(v <= before for v in after)
            spikes.append({"step": s.steps[i + 1], "loss": vals[i + 1], "before": before, "z": zi,
                           "recovered": recovered})
    if not spikes:
        return []
    unrecovered = [x for x in spikes if not x["recovered"]]
    return [_f("loss_spike", "warning", [s.name],
               {"first_step": spikes[0]["step"], "spikes": spikes[:20], "n_spikes": len(spikes),
                "n_unrecovered": len(unrecovered)},
               f"{len(spikes)} loss spike(s) (robust z ≥ {zscore:g}), first at step {spikes[0]['step']} "
               f"({spikes[0]['before']:.3f} -> {spikes[0]['loss']:.3f})"
               + (f"; {len(unrecovered)} did not recover" if unrecovered else "; all recovered"))]


def _lr_series(h: History) -> list[Series]:
    groups = [s for n, s in h.series.items() if n.startswith("lr/") and s.values]
    total = h.get("lr")
    return groups or ([total] if total else [])


def _value_at(s: Series, step: int) -> float | None:
    best = None
    for st, v in zip(s.steps, s.values):
        if st <= step:
            best = v
        else:
            break
    return best


def plateau(h: History) -> list[Finding]:
    s = _loss(h)
    lrs = _lr_series(h)
    if s is None or len(s.values) < 90 or not lrs:
        return []
    start = len(s.values) - len(s.values) // 3
    window = s.values[start:]
    head, tail = statistics.median(window[:len(window) // 5]), statistics.median(window[-(len(window) // 5):])
    if not (math.isfinite(head) and math.isfinite(tail)) or head - tail >= 0.01 * abs(head):
        return []
    lr = lrs[0]
    peak = max(lr.values)
    lows = [_value_at(lr, st) for st in s.steps[start:]]
    if peak <= 0 or any(v is None or v < 0.5 * peak for v in lows):
        return []
    return [_f("plateau", "warning", [s.name, lr.name],
               {"first_step": s.steps[start], "last_step": s.steps[-1], "loss_at_start": head, "loss_at_end": tail,
                "lr_min_in_window": min(lows), "lr_peak": peak},
               f"the {s.name} is flat from step {s.steps[start]} to {s.steps[-1]} ({head:.3f} -> {tail:.3f}) while the "
               f"learning rate stays ≥ {min(lows):.2e} (peak {peak:.2e})")]


def lr_schedule(h: History) -> list[Finding]:
    lrs = _lr_series(h)
    out = []
    if not lrs:
        return out
    zero = [s for s in lrs if len(s.values) >= 3 and all(v == 0 for v in s.values)]
    if zero:
        out.append(_f("lr_schedule", "critical", [s.name for s in zero],
                      {"first_step": zero[0].steps[0], "issue": "zero"},
                      f"the learning rate is 0 at every logged step ({', '.join(s.name for s in zero)})"))
    for s in lrs:
        if s in zero or len(s.values) < 10:
            continue
        tail = s.values[-max(3, len(s.values) // 10):]
        if all(b > a for a, b in zip(tail, tail[1:])):
            out.append(_f("lr_schedule", "warning", [s.name],
                          {"first_step": s.steps[0], "issue": "warmup_longer_than_run", "last_lr": s.values[-1],
                           "last_step": s.steps[-1]},
                          f"{s.name} is still rising at the last logged step ({s.steps[-1]}, lr {s.values[-1]:.2e}): "
                          "the warmup is longer than the run"))
    peaks = {s.name: max(s.values) for s in lrs if max(s.values) > 0}
    if len(peaks) >= 2 and max(peaks.values()) / min(peaks.values()) >= 1e3:
        out.append(_f("lr_schedule", "warning", sorted(peaks),
                      {"first_step": lrs[0].steps[0], "issue": "group_ratio", "peaks": peaks},
                      f"param groups' peak learning rates differ by {max(peaks.values()) / min(peaks.values()):.0e}x "
                      f"({', '.join(f'{k} {v:.1e}' for k, v in peaks.items())})"))
    return out


def gradient_norm(h: History, grad_clip: float | None) -> list[Finding]:
    s = h.get("grad_norm")
    out = []
    if s is not None and len(s.values) >= 20:
        head, tail = _finite(_head(s)), _finite(_tail(s))
        if head and tail:
            a, b = statistics.median(head), statistics.median(tail)
            if a > 0 and b / a >= 100:
                out.append(_f("gradient_norm", "warning", [s.name],
                              {"first_step": s.steps[0], "issue": "exploding", "start": a, "end": b},
                              f"the gradient norm grew {b / a:.0f}x over the run ({a:.3g} -> {b:.3g})"))
            elif a > 0 and b / a <= 1e-4:
                out.append(_f("gradient_norm", "warning", [s.name],
                              {"first_step": s.steps[0], "issue": "vanishing", "start": a, "end": b},
                              f"the gradient norm fell {a / max(b, 1e-30):.0e}x over the run ({a:.3g} -> {b:.3g})"))
    clip = h.get("clip_rate")
    if clip is not None and len(clip.values) >= 10:
        rate = statistics.mean(clip.values)
        if rate >= 0.9:
            out.append(_f("gradient_norm", "warning", [clip.name],
                          {"first_step": clip.steps[0], "issue": "always_clipped", "clip_rate": rate},
                          f"gradients were clipped on {rate:.0%} of steps: the clip threshold sets the effective "
                          "learning rate"))
    elif s is not None and grad_clip and len(s.values) >= 10:
        rate = sum(v > grad_clip for v in s.values) / len(s.values)
        if rate >= 0.9:
            out.append(_f("gradient_norm", "warning", [s.name],
                          {"first_step": s.steps[0], "issue": "always_clipped", "clip_rate": rate,
                           "grad_clip": grad_clip},
                          f"the gradient norm exceeded the clip threshold {grad_clip:g} on {rate:.0%} of steps: the "
                          "clip threshold sets the effective learning rate"))
    return out


def throughput(h: History) -> list[Finding]:
    s = h.get("tokens_per_s")
    if s is None or len(s.values) < 20:
        return []
    vals = s.values
    need = max(2, len(vals) // 10)
    base = statistics.median(vals[:max(3, len(vals) // 5)])
    run = 0
    for i, v in enumerate(vals):
        run = run + 1 if v <= 0.5 * base else 0
        if run >= need:  # sustained: a tenth of the run in a row at half the baseline or less
            first = i - run + 1
            return [_f("throughput_collapse", "warning", [s.name],
                       {"first_step": s.steps[first], "baseline": base,
                        "median_after": statistics.median(vals[first:])},
                       f"tokens/s fell from a median of {base:.4g} to {statistics.median(vals[first:]):.4g} from "
                       f"step {s.steps[first]} on")]
    return []


def routing(h: History, n_experts: int | None, mod_capacity: float | None) -> list[Finding]:
    out = []
    for name, s in sorted(h.series.items()):
        if not s.values or len(s.values) < 10:
            continue
        if name.startswith("moe_imbalance/") and n_experts:
            a, b = statistics.median(_head(s, 0.2)), statistics.median(_tail(s, 0.2))
            if b >= 2 * a and b >= 1 + 0.5 * (n_experts - 1):
                out.append(_f("moe_collapse", "warning", [name],
                              {"first_step": s.steps[0], "start": a, "end": b, "n_experts": n_experts},
                              f"{name}: max/mean expert load rose from {a:.2f} to {b:.2f} (all tokens on one expert: "
                              f"{n_experts})"))
        if name.startswith("mod_fraction/") and mod_capacity:
            end = statistics.median(_tail(s, 0.2))
            if abs(end - mod_capacity) >= 0.1:
                out.append(_f("mod_drift", "warning", [name],
                              {"first_step": s.steps[0], "end": end, "capacity": mod_capacity},
                              f"{name}: selected fraction ends at {end:.2f}, capacity {mod_capacity:.2f}"))
    return out


def curve_findings(h: History, vocab_size: int | None = None, n_experts: int | None = None,
                   mod_capacity: float | None = None, grad_clip: float | None = None) -> list[Finding]:
    vocab_size = vocab_size or h.meta.get("vocab_size")
    found = (divergence(h) + not_learning(h, vocab_size) + loss_spikes(h) + plateau(h) + lr_schedule(h)
             + gradient_norm(h, grad_clip or h.meta.get("grad_clip")) + throughput(h)
             + routing(h, n_experts or h.meta.get("n_experts"), mod_capacity or h.meta.get("mod_capacity")))
    if any(f.cause == "divergence" for f in found):  # spikes leading into a divergence are part of it
        found = [f for f in found if f.cause != "loss_spike" or f.evidence["n_unrecovered"] == 0]
    found.sort(key=lambda f: (f.severity != "critical", f.evidence.get("first_step", 0)))
    return found
