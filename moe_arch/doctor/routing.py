"""Routing health of a mixture-of-experts layer, from its per-expert loads (tokens routed to each expert).

One set of numbers wherever loads come from: the model-aware probe (one real batch through the checkpoint's
model), our trainer's logged ``moe_load_L<k>`` (each log row's share per expert), and Megatron-LM's
tokens-per-expert log (``--save-tokens-per-experts-interval``: ``<save>/tokens_per_expert/rank<N>.jsonl``, rows
``{"iter", "block", "layer", "tpe": [[count per expert] per micro-batch]}``). Per layer: load percentiles over
experts (p50 / p90 / max, as multiples of the mean load), max/mean and min/mean, the normalised routing entropy,
the effective number of experts exp(H), the Gini coefficient and the experts that got no token.

Collapse (the rule of :func:`collapse_reasons`) is judged against what a top-k router can do: a router that sends
every token to the same k experts has entropy ln k, a balanced one ln E. ``entropy_above_top_k`` =
(H - ln k) / (ln E - ln k) places the layer on that scale (1: balanced, 0: every token on the same k experts).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import yaml

# Collapse when the load is nearer "every token on the same k experts" than balanced on the entropy scale above:
# below 0.5 the effective number of experts exp(H) is under sqrt(k * E), the geometric middle between the k a
# collapsed router uses and the E a balanced one uses. Healthy routers sit far above it: our small runs with the
# Switch load-balance loss measure 0.93-1.0 at every logged step (max/mean <= 1.42; tests/test_routing_health.py).
ENTROPY_ABOVE_TOP_K_COLLAPSE = 0.5
# One expert carrying 4x its fair share of the tokens: load-balanced routers (Switch / Mixtral-style auxiliary
# loss, DeepSeek's bias balancing) keep the busiest expert within ~1.1-2x the mean; 4x means that layer's
# capacity is spent on a few experts (only reachable where E / k >= 4).
MAX_OVER_MEAN_COLLAPSE = 4.0


def gini(x: torch.Tensor) -> float:
    x = x.double().sort().values
    n = x.numel()
    if n == 0 or x.sum() == 0:
        return 0.0
    idx = torch.arange(1, n + 1, dtype=torch.float64)
    return float((2 * (idx * x).sum() / (n * x.sum())) - (n + 1) / n)


def routing_stats(load, top_k: int | None = None) -> dict:
    """The routing numbers of one layer from its per-expert loads (counts or shares)."""
    load = torch.as_tensor(load, dtype=torch.float64).reshape(-1)
    n = load.numel()
    frac = load / load.sum().clamp_min(1e-300)
    rel = frac * n  # load as a multiple of the mean
    nz = frac[frac > 0]
    h = float(-(nz * nz.log()).sum())
    k = min(max(1, top_k or 1), n)
    return {
        "n_experts": n,
        "share": [round(float(x), 4) for x in frac],
        "load_p50": float(rel.quantile(0.5)),
        "load_p90": float(rel.quantile(0.9)),
        "load_max": float(rel.max()),
        "max_over_mean": float(rel.max()),
        "min_over_mean": float(rel.min()),
        "entropy_normalised": h / math.log(n) if n > 1 else 1.0,
        "entropy_above_top_k": (h - math.log(k)) / (math.log(n) - math.log(k)) if n > k else 1.0,
        "effective_experts": math.exp(h),
        "top_k": top_k,
        "gini": gini(load),
        "dead_experts": [i for i, x in enumerate(load.tolist()) if x == 0],
    }


def collapse_reasons(stats: dict) -> list[str]:
    """Why a layer's load has collapsed (empty: it has not)."""
    out = []
    if stats["n_experts"] > 1 and stats["entropy_above_top_k"] < ENTROPY_ABOVE_TOP_K_COLLAPSE:
        out.append(
            f"routing entropy {stats['entropy_above_top_k']:.2f} of the way from top-{stats['top_k'] or 1} "
            f"collapse to balanced (< {ENTROPY_ABOVE_TOP_K_COLLAPSE}): {stats['effective_experts']:.1f} effective "
            f"experts of {stats['n_experts']}"
        )
    if stats["max_over_mean"] >= MAX_OVER_MEAN_COLLAPSE:
        out.append(f"the busiest expert gets {stats['max_over_mean']:.1f}x the mean load (>= {MAX_OVER_MEAN_COLLAPSE})")
    return out


# ---------------------------------------------------------------------------------------------- logged loads
_OURS = re.compile(r"^moe_load_L(\d+)$")


def logged_loads(history: Path | None) -> tuple[dict[str, list[tuple[int, list[float]]]], str | None]:
    """Per-expert loads a run logged, ``{"L<k>": [(step, loads), ...]}`` in step order, and their source: our
    ``metrics.jsonl`` (the history file itself), else Megatron's ``tokens_per_expert/rank*.jsonl`` beside it."""
    if history is None:
        return {}, None
    p = Path(history)
    if p.is_file() and p.suffix == ".jsonl":
        found = _ours(p)
        if found:
            return found, str(p)
    for folder in (p, p.parent, p.parent.parent) if p.is_dir() else (p.parent, p.parent.parent):
        files = sorted((folder / "tokens_per_expert").glob("rank*.jsonl"))
        if files:
            found = _megatron(files)
            if found:
                return found, str(folder / "tokens_per_expert")
    return {}, None


def _rows(path: Path):
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            yield row


def _numbers(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def _ours(path: Path) -> dict[str, list[tuple[int, list[float]]]]:
    out: dict[str, list[tuple[int, list[float]]]] = {}
    for row in _rows(path):
        step = row.get("step")
        if row.get("kind", "train") != "train" or not isinstance(step, int):
            continue
        for k, v in row.items():
            m = _OURS.match(k)
            if m and _numbers(v):
                out.setdefault(f"L{m.group(1)}", []).append((step, [float(x) for x in v]))
    return {k: sorted(v) for k, v in out.items()}


def _megatron(files: list[Path]) -> dict[str, list[tuple[int, list[float]]]]:
    """Counts summed over micro-batches and over the ranks' files (data-parallel ranks see different tokens;
    files whose expert count differs, expert-parallel slices, are concatenated in rank order)."""
    per: dict[tuple[str, int], dict[str, list[float]]] = {}
    for f in sorted(files, key=lambda q: int(re.sub(r"\D", "", q.stem) or 0)):
        for row in _rows(f):
            it, layer, tpe = row.get("iter"), row.get("layer"), row.get("tpe")
            if row.get("block", "decoder") != "decoder" or not isinstance(it, int) or not isinstance(tpe, list):
                continue
            mbs = [mb for mb in tpe if _numbers(mb)]
            if not mbs or len({len(mb) for mb in mbs}) != 1:
                continue
            summed = [float(sum(col)) for col in zip(*mbs)]
            ranks = per.setdefault((f"L{layer}", it), {})
            prev = ranks.get(f.name)
            ranks[f.name] = [a + b for a, b in zip(prev, summed)] if prev else summed
    out: dict[str, list[tuple[int, list[float]]]] = {}
    for (layer, it), by_file in per.items():
        loads = list(by_file.values())
        if len({len(x) for x in loads}) == 1:
            total = [sum(col) for col in zip(*loads)]
        else:
            total = [x for part in loads for x in part]
        out.setdefault(layer, []).append((it, total))
    return {k: sorted(v) for k, v in out.items()}


def top_k_near(history: Path | None) -> int | None:
    """The router's k from the run's config.yaml beside the history (ours), when there is one."""
    if history is None:
        return None
    p = Path(history)
    for folder in (p, p.parent, p.parent.parent) if p.is_dir() else (p.parent, p.parent.parent):
        if (folder / "config.yaml").is_file():
            try:
                cfg = yaml.safe_load((folder / "config.yaml").read_text())
            except (yaml.YAMLError, UnicodeDecodeError, OSError):
                return None
            k = (cfg.get("model") or {}).get("top_k") if isinstance(cfg, dict) else None
            return k if isinstance(k, int) and not isinstance(k, bool) else None
    return None
