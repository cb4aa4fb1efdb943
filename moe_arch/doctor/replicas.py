"""The live replica check: do the ranks still hold one model?

Under DDP every parameter is replicated on every rank; under FSDP2/HSDP a DTensor is replicated over each mesh
dimension whose placement is ``Replicate`` (pure ``fully_shard`` replicates nothing, and then this costs nothing).
Replicas are copies of one tensor updated by the same computation, so they must stay bitwise equal: the first
step at which they differ is a bug (an update that skips the all-reduce, DDP that stopped synchronising after the
model was moved or re-wrapped, an in-place edit on one rank), however normal the loss looks.

What makes it cheap: each replicated tensor is fingerprinted by the float64 sum and sum of squares of a strided
sample of at most ``sample_size`` of its local elements, and one all-reduce (MAX over ``[fp, -fp]``) per process
group gives the largest and smallest fingerprint across ranks; they are equal exactly when every rank's sample
sums to the same bits. Only when they differ are the samples all-gathered to name the ranks and the largest
difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from moe_arch.parallel.parallelize import local


@dataclass
class Divergence:
    """One replicated tensor whose copies differ at a check."""

    name: str
    ranks: list[int]  # global ranks whose copy differs from the majority's (the lowest rank's on a tie)
    reference_rank: int
    max_abs_diff: float  # over the sampled elements
    elements_differing: int  # of the sampled elements
    sampled: int


@dataclass
class _Group:
    group: object  # a ProcessGroup (None: the default group)
    names: list[str] = field(default_factory=list)
    params: list[torch.Tensor] = field(default_factory=list)
    strides: list[int] = field(default_factory=list)


def replica_groups(p: torch.Tensor) -> list[object]:
    """The process groups over which ``p``'s local tensor is replicated (None: the whole world)."""
    if not hasattr(p, "device_mesh"):
        return [None]
    mesh = p.device_mesh
    return [mesh.get_group(d) for d, pl in enumerate(p.placements) if pl.is_replicate() and mesh.size(d) > 1]


class ReplicaCheck:
    """Fingerprints of the replicated parameters of ``model``, compared across ranks by :meth:`check`."""

    def __init__(self, model: nn.Module, sample_size: int):
        """Collective (every rank builds it at the same point, after the model was wrapped): tensors whose copies
        already differ here are not replicas of one tensor (the shards of a hand-written tensor-parallel layer,
        per-rank heads) and are left out, named in ``excluded``; DDP and FSDP2 make their replicas equal when they
        wrap the model, so nothing they replicate is left out."""
        self.groups: dict[int, _Group] = {}
        self.excluded: list[str] = []
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        for name, p in model.named_parameters():
            for g in replica_groups(p):
                entry = self.groups.setdefault(id(g), _Group(g))
                entry.names.append(name)
                entry.params.append(p)
                entry.strides.append(max(1, math.ceil(local(p).numel() / sample_size)))
        for key, g in list(self.groups.items()):
            differ = set(self._differing(g))
            if differ:
                self.excluded += [g.names[i] for i in sorted(differ)]
                keep = [i for i in range(len(g.names)) if i not in differ]
                g.names, g.params, g.strides = ([xs[i] for i in keep] for xs in (g.names, g.params, g.strides))
            if not g.names:
                del self.groups[key]

    @property
    def n_tensors(self) -> int:
        return sum(len(g.names) for g in self.groups.values())

    @staticmethod
    def _sample(p: torch.Tensor, stride: int) -> torch.Tensor:
        return local(p.detach()).reshape(-1)[::stride]

    @torch.no_grad()
    def fingerprints(self, g: _Group) -> torch.Tensor:
        """[sum, sum of squares] of each tensor's sample, float64, NaN mapped to +inf (so equal NaNs compare
        equal: a non-finite value is the non_finite cause's business, not a divergence)."""
        rows = []
        for p, stride in zip(g.params, g.strides):
            x = self._sample(p, stride).double()
            rows.append(torch.stack([x.sum(), (x * x).sum()]))
        fp = torch.stack(rows).reshape(-1)
        return torch.where(torch.isnan(fp), torch.full_like(fp, math.inf), fp)

    @torch.no_grad()
    def _differing(self, g: _Group, fp: torch.Tensor | None = None) -> list[int]:
        """Indices of the group's tensors whose fingerprints differ across its ranks (one all-reduce)."""
        fp = self.fingerprints(g) if fp is None else fp
        both = torch.cat([fp, -fp])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=g.group)
        n = fp.numel()
        bad = (both[:n] != -both[n:]).reshape(-1, 2).any(1)
        return [i for i, b in enumerate(bad.tolist()) if b]

    @torch.no_grad()
    def check(self) -> list[Divergence]:
        """Collective: every rank of each group must call it at the same step."""
        out: list[Divergence] = []
        for g in self.groups.values():
            fp = self.fingerprints(g)
            idx = self._differing(g, fp)
            if idx:
                out += self._name_ranks(g, idx, fp)
        return out

    def _name_ranks(self, g: _Group, idx: list[int], fp: torch.Tensor) -> list[Divergence]:
        """Which ranks differ (from the majority's fingerprint) and by how much: rare, so the samples of the
        diverged tensors are all-gathered."""
        size = dist.get_world_size(g.group)
        ranks = [dist.get_global_rank(g.group, i) if g.group is not None else i for i in range(size)]
        fps = [torch.empty_like(fp) for _ in range(size)]
        dist.all_gather(fps, fp, group=g.group)
        samples = torch.cat([self._sample(g.params[i], g.strides[i]).double().reshape(-1) for i in idx])
        gathered = [torch.empty_like(samples) for _ in range(size)]
        dist.all_gather(gathered, samples, group=g.group)
        out, pos = [], 0
        for i in idx:
            k = self._sample(g.params[i], g.strides[i]).numel()
            keys = [tuple(f.reshape(-1, 2)[i].tolist()) for f in fps]
            counts = {key: keys.count(key) for key in keys}
            ref = max(range(size), key=lambda r: (counts[keys[r]], -r))
            differ = [r for r in range(size) if keys[r] != keys[ref]]
            refv = gathered[ref][pos : pos + k]
            diffs = [(gathered[r][pos : pos + k] - refv).abs() for r in differ]
            out.append(
                Divergence(
                    g.names[i],
                    [ranks[r] for r in differ],
                    ranks[ref],
                    max((float(torch.nan_to_num(d, nan=math.inf).max()) for d in diffs), default=0.0),
                    max((int((d != 0).sum()) for d in diffs), default=0),
                    k,
                )
            )
            pos += k
        return out
