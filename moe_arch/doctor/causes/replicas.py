"""Replicas out of sync: copies of one replicated tensor, saved (or held) by different ranks, that differ.

A replicated tensor (every LayerNorm under Megatron-style tensor parallelism, every parameter under DDP) is
updated on each rank by the same computation on the same all-reduced gradient, so its copies are bitwise equal;
the loss looks normal when they drift (BLOOM-176B's TP LayerNorm replicas diverged for 15 days through a
grad-clipping sync bug; DDP stops synchronising after ``model.cpu(); model.cuda()``, pytorch#104336). In a
checkpoint the copies are each rank's file (DeepSpeed ``mp_rank_XX_model_states.pt``, or a folder of per-rank
``torch.save`` files such as a DDP loop's ``ckpt_rank{r}.pt``); live, the monitor fingerprints them across ranks
(:mod:`moe_arch.doctor.replicas`).

Which copies are replicas: tensors the checkpoint declares replicated (Megatron-DeepSpeed's universal checkpoint
info, ``tp_replicated_parameter_patterns``); in per-rank saves of a whole model (the reader vouches that they are
one run's ranks 0..n-1 at one step, with the same tensors), every tensor but the buffers (data parallelism
replicates them; running statistics are each rank's own between broadcasts), unless the set turns out to be
model-parallel: when any non-buffer tensor of two dimensions or more differs with a cosine similarity to the
reference rank's copy below 0.5, it started from another initialisation on each rank (a hand-written
tensor-parallel shard), and the set's other tensors may be shards too that merely started equal (zero-initialised
biases), so only the norms are compared. Otherwise (model-parallel rank names, DeepSpeed ``mp_rank_XX`` files) the
norms (1-D, named like a norm), which every tensor-parallel scheme replicates. Other tensors with a copy per rank
are shards of one tensor (a column-parallel weight has the same name and shape on every rank and different values
by design) and are never compared.
"""

from __future__ import annotations

import re

import torch

from moe_arch.checkpoint.readers import BUFFER_PATTERNS, release
from moe_arch.doctor.analyze import infer_role
from moe_arch.doctor.causes.base import CheckpointCause, CheckpointEvidence, Finding, describe, register

SHARD_COSINE = 0.5  # below it, two copies are different tensors (own initialisations), not a drifted replica
CHUNK = 1 << 22  # elements per float64 chunk of a comparison: memory bounded by the chunk, not the tensor


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: bitwise equality (NaN equals the same NaN; -0.0 differs from 0.0)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _chunks(a: torch.Tensor, b: torch.Tensor):
    """Float64 slices of the flattened ``a`` and ``b``, CHUNK elements at a time (exact differences of any float
    dtype without a float64 copy of a whole tensor)."""
    a, b = a.detach().reshape(-1), b.detach().reshape(-1)
    for i in range(0, a.numel(), CHUNK):
        yield a[i : i + CHUNK].double(), b[i : i + CHUNK].double()


def _difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """max |a - b| (NaN against a number: inf) and the number of differing elements."""
    worst, count = 0.0, 0
    for x, y in _chunks(a, b):
        d = torch.nan_to_num((x - y).abs(), nan=float("inf"))
        worst = max(worst, float(d.max()) if d.numel() else 0.0)
        count += int((d != 0).sum())
    return worst, count


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    dot = na = nb = 0.0
    for x, y in _chunks(a, b):
        dot, na, nb = dot + float(x @ y), na + float(x @ x), nb + float(y @ y)
    return dot / max((na * nb) ** 0.5, 1e-300)


def compare_copies(copies: dict[int, torch.Tensor]) -> dict | None:
    """Ranks whose copy differs bitwise from the lowest rank's, the largest |difference| and the number of
    differing elements (None: all equal)."""
    ranks = sorted(copies)
    ref = copies[ranks[0]]
    differ = [r for r in ranks[1:] if copies[r].shape != ref.shape or not torch.equal(_bits(copies[r]), _bits(ref))]
    if not differ:
        return None
    diffs = [_difference(copies[r], ref) for r in differ if copies[r].shape == ref.shape]
    return {
        "ranks": differ,
        "reference_rank": ranks[0],
        "max_abs_diff": max((m for m, _ in diffs), default=None),
        "elements_differing": max((n for _, n in diffs), default=None),
        "numel": ref.numel(),
    }


@register
class ReplicasDiverged(CheckpointCause):
    name = "replicas_diverged"
    # Runs after the per-tensor causes and claims nothing: a fact about ranks beside each tensor's own findings.
    order, rank = 150, 8
    severity = "critical"
    claims = False
    before_training = True  # copies that differ at step 0 are a missing broadcast of the initial weights
    recommendation = (
        "the ranks no longer hold one model: some update of these replicated tensors skips the all-reduce over "
        "their group (gradient clipping or a custom step computed per rank, DDP whose hooks were lost when the "
        "model was moved or re-wrapped) or a rank changes them outside the optimizer; fix that update, then "
        "resume from the last checkpoint whose copies are equal (or broadcast rank 0's copy)"
    )
    short_fix = "find the update that skips the all-reduce (clipping, re-wrapped DDP, a per-rank edit)"

    def detect(self, ev: CheckpointEvidence) -> list[Finding]:
        view = ev.view
        if view is None or not view.replicas:
            return []
        patterns = view.meta.get("replicated_patterns")
        whole_model = view.meta.get("replicated") == "per_rank_saves"
        if patterns:
            replicated = [n for n in view.replicas if any(re.match(p, n) for p in patterns)]
            rule = f"declared replicated by the checkpoint ({', '.join(patterns[:4])})"
        elif whole_model:
            replicated = [n for n in view.replicas if not BUFFER_PATTERNS.search(n)]
            rule = (
                "every tensor of the per-rank saves but buffers (data parallelism replicates them; no tensor of 2+ "
                f"dimensions differs like a shard, cosine similarity < {SHARD_COSINE})"
            )
        else:
            replicated = [n for n, c in view.replicas.items() if _is_norm(n, c)]
            rule = "norms (every tensor-parallel scheme replicates them; other per-rank tensors are shards)"
        diverged: dict[str, dict] = {}
        shard: tuple[str, float] | None = None  # the first tensor whose copies are different tensors
        for name in replicated:
            copies = {r: ti.get() for r, ti in view.replicas[name].items()}
            d = compare_copies(copies)
            if d is not None and whole_model and shard is None:
                cos = _shard_cosine(name, copies, d)
                shard = (name, cos) if cos is not None else None
            for t in copies.values():
                release(t)
            if d is not None:
                diverged[name] = d
        shards: list[str] = []
        if shard is not None:
            # One tensor that is a shard per rank makes the set model-parallel (hand-written TP saved per rank):
            # its other tensors may be shards that started equal (zero-initialised biases), so only the norms,
            # which every tensor-parallel scheme replicates, stay compared.
            shards = [n for n in replicated if not _is_norm(n, view.replicas[n])]
            replicated = [n for n in replicated if n not in shards]
            diverged = {n: d for n, d in diverged.items() if n in replicated}
            rule = (
                f"norms only: the per-rank saves are model-parallel shards ({shard[0]}'s copies have cosine "
                f"similarity {shard[1]:.2f} < {SHARD_COSINE}: each rank's own initialisation)"
            )
        if not diverged:
            return []
        files = view.meta.get("per_rank_files")
        worst = max(diverged, key=lambda n: diverged[n]["max_abs_diff"] or 0.0)
        return [
            self.finding(
                "critical",
                list(diverged),
                {
                    "source": "each rank's torch.save file" if files else "per-rank copies in the checkpoint",
                    "replicated": rule,
                    "n_replicated_compared": len(replicated),
                    "left_out_as_shards": shards,
                    "ranks": sorted({r for d in diverged.values() for r in d["ranks"]}),
                    "max_abs_diff": diverged[worst]["max_abs_diff"],
                    "worst": worst,
                    "tensors": diverged,
                },
            )
        ]

    def summarize(self, f: Finding) -> str:
        ev = f.evidence
        where = f"at step {ev['step']} " if ev.get("step") is not None else ""
        return (
            f"{len(f.tensors)} replicated tensors ({describe(f.tensors)}) differ {where}between ranks: ranks "
            f"{ev['ranks']} hold other values than rank {_reference_rank(ev)} (max |difference| "
            f"{ev['max_abs_diff']:.2e} in {ev['worst']}); copies of one tensor updated by the same computation "
            "must be bitwise equal"
        )

    def explain(self, f: Finding) -> str:
        ev = f.evidence
        per = "; ".join(
            f"{n}: ranks {d['ranks']} vs {d['reference_rank']}, max |diff| {d['max_abs_diff']:.2e}, "
            f"{d['elements_differing']} elements"
            for n, d in list(ev["tensors"].items())[:6]
        )
        return f"{ev['source']}; compared: {ev['n_replicated_compared']} tensors, {ev['replicated']}; {per}."

    def alert(self, f: Finding, step: int, window: int, tensors: list[str]) -> str:
        return f"step {step}: {f.summary}"


def _is_norm(name: str, copies: dict) -> bool:
    return infer_role(name, tuple(copies[min(copies)].shape), None) == "norm"


def _shard_cosine(name: str, copies: dict[int, torch.Tensor], d: dict) -> float | None:
    """The largest cosine similarity of a differing copy to the reference rank's when every one is below
    SHARD_COSINE: the copies are different tensors (each rank's own initialisation), not a replica that drifted.
    Only tensors of two dimensions or more: a 1-D copy (a bias, a gate) can start equal and move apart by training
    on a shard, and norms are replicated by every scheme."""
    ref = copies[d["reference_rank"]]
    if ref.dim() < 2 or infer_role(name, tuple(ref.shape), None) == "norm":
        return None
    cosines = [_cosine(copies[r], ref) for r in d["ranks"] if copies[r].shape == ref.shape]
    if not cosines or not all(c < SHARD_COSINE for c in cosines):  # NaN (non-finite copies) is no evidence
        return None
    return max(cosines)


def _reference_rank(ev: dict) -> int:
    refs = sorted({d["reference_rank"] for d in ev["tensors"].values()})
    return refs[0] if refs else 0
