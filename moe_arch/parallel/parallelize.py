"""Data parallelism with PyTorch's own stack: FSDP2 (``fully_shard``, one unit per block) or DDP.

FSDP2: every block is its own unit (its parameters are all-gathered just before its forward and freed after);
the root unit holds the embedding, final norm and heads. Parameters become DTensors sharded on dim 0; for the
stacked expert tensors [E, in, out] that is a split over experts. The mixed-precision policy follows
``train.precision``: ``bf16-mixed`` computes in bf16 and reduces gradients in fp32 on fp32 master shards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from moe_arch.parallel.expert_parallel import apply_expert_parallel, moe_layers
from moe_arch.precision import PrecisionPolicy


def resolve_mode(mode: str) -> str:
    return "fsdp" if mode == "auto" else mode


def parallelize(
    model: nn.Module, mode: str, policy: PrecisionPolicy, device: torch.device, expert_parallel: int = 1
) -> nn.Module:
    mode = resolve_mode(mode)
    world = dist.get_world_size()
    if expert_parallel > 1 and (mode != "fsdp" or world % expert_parallel):
        raise ValueError(
            f"train.expert_parallel={expert_parallel}: needs train.parallel fsdp (or auto) and a world size it "
            f"divides (torchrun --nproc-per-node x nodes = {world}); set it to a divisor of {world}, or 1"
        )
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP  # lazy: ~0.9 s with FSDP's; distributed only

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode != "fsdp":
        raise ValueError(f"train.parallel={mode!r}: allowed under torchrun: auto, ddp, fsdp, none")
    if policy.compensated:
        raise ValueError(
            "train.precision=bf16-compensated is not supported with train.parallel=fsdp (its "
            "compensation buffers are per full parameter); use bf16-mixed, which FSDP2 implements with "
            "fp32 master shards"
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # lazy: ~0.9 s to import; FSDP runs only

    mp = MixedPrecisionPolicy()
    if policy.autocast_dtype is not None:
        mp = MixedPrecisionPolicy(param_dtype=policy.autocast_dtype, reduce_dtype=torch.float32)
    if expert_parallel == 1:
        mesh = init_device_mesh(device.type, (world,))
    else:
        # One root mesh for both dimensions: FSDP2 composes with the experts' EP DTensors only on a shared root.
        grid = init_device_mesh(
            device.type, (world // expert_parallel, expert_parallel), mesh_dim_names=("dp_mod_ep", "ep")
        )
        mesh = grid["dp_mod_ep", "ep"]._flatten("dp")
        apply_expert_parallel(model, grid["ep"])
        for moe in moe_layers(model):  # each rank's experts sharded over the other EP groups' ranks
            fully_shard(moe.experts, mesh=grid["dp_mod_ep"], mp_policy=mp)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def is_fsdp(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def local(t: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds (the tensor itself when it is not a DTensor)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (all-gathered when it is a DTensor)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shard_like(full_value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full_value`` distributed with ``like``'s mesh and placements (each rank keeps its own slice, no traffic)."""
    if not hasattr(like, "device_mesh"):
        return full_value
    from torch.distributed.tensor import distribute_tensor  # lazy: slow to import; sharded runs only

    return distribute_tensor(full_value, like.device_mesh, like.placements, src_data_rank=None)


@torch.no_grad()
def global_grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients across every shard: local sums of squares of each rank's own shards,
    all-reduced once. Replicated gradients (DDP, or DTensors with a Replicate placement) count once.

    ``clip_grad_norm_`` on FSDP2 DTensors relies on DTensor reductions that break with mixed meshes or mixed
    DTensor / plain gradients; this computes the true global norm explicitly.
    """
    sharded, replicated = [], []
    for p in params:
        g = p.grad
        if g is None:
            continue
        if hasattr(g, "placements") and any(pl.is_shard() for pl in g.placements):
            sharded.append(g.to_local())
        else:
            replicated.append(local(g))
    dev = (sharded or replicated)[0].device if (sharded or replicated) else torch.device("cpu")

    def sum_sq(ts: list[torch.Tensor]) -> torch.Tensor:
        if not ts:
            return torch.zeros((), device=dev)
        norms = torch._foreach_norm(ts)  # one fused pass over all tensors
        return torch.stack([n.float() for n in norms]).pow(2).sum()

    sq_sharded, sq_repl = sum_sq(sharded), sum_sq(replicated)
    if dist.is_available() and dist.is_initialized() and sharded:
        dist.all_reduce(sq_sharded, op=dist.ReduceOp.SUM)
    return (sq_sharded + sq_repl).sqrt()


@torch.no_grad()
def clip_grads_(params: list[torch.Tensor], max_norm: float, total: float | None = None) -> float:
    """Scale gradients so their global norm is at most ``max_norm``; returns the norm before clipping
    (``total`` when the caller already computed it)."""
    total = float(global_grad_norm(params)) if total is None else total
    if max_norm > 0 and total > max_norm and total == total:
        coef = max_norm / (total + 1e-6)
        grads = [local(p.grad) for p in params if p.grad is not None]
        torch._foreach_mul_(grads, coef)
    return total
