"""Expert parallelism: each MoE layer's experts split across the N ranks of an expert-parallel (EP) group; every
token row is sent to the rank holding its expert and its output sent back, with ``all_to_all_single``.

Mesh ``(dp_mod_ep, ep) = (world / N, N)``: an EP group is N consecutive ranks. The stacked expert tensors
[E, in, out] become DTensors sharded on dim 0 over ``ep`` (each rank owns E/N whole experts), so their global shape
and names are unchanged and DCP reshards checkpoints between EP sizes. FSDP2 then shards a rank's own experts over
``dp_mod_ep`` and everything else over all ranks, as torchtitan does.

Per MoE layer (dropless; the router runs on each rank's own tokens, as without EP):
  1. counts [E] of this rank's rows per expert -> all_to_all -> recv [N, E/N]: rows each rank sends to each of
     my experts (host sync: the splits must be known to size the buffers, as in every all-to-all MoE).
  2. rows (sorted by global expert, hence grouped by destination rank) -> all_to_all -> my experts' rows, ordered
     by source rank then expert; a stable sort groups them by local expert for one grouped GEMM per projection.
  3. outputs back in arrival order -> the reverse all_to_all -> this rank's rows in their original order.
Both exchanges are autograd functions whose backward is the reverse exchange. A rank's expert gradient thus sums
the losses of its whole EP group, N ranks' tokens; FSDP's reduction over ``dp_mod_ep`` averages over the other
groups. The experts' weight gradients are scaled by 1/N in the forward's autograd graph (``Experts.grad_scale``):
together, the gradient of the global mean loss, like every other parameter's. (FSDP2's
``set_gradient_divide_factor`` would do it in the reduction, but needs PREMUL_SUM, which gloo lacks.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from moe_arch.model.moe import MoE


class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` in ``send`` chunks go to the group's ranks; ``recv`` rows come back. Backward: the reverse."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, recv: list[int], send: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (recv, send), group
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        recv, send = ctx.splits
        gx = g.new_empty(sum(send), *g.shape[1:])
        dist.all_to_all_single(gx, g.contiguous(), send, recv, group=ctx.group)
        return gx, None, None, None


class AllToAllExchange:
    """The MoE layer's expert call under EP: ``(experts, rows sorted by global expert, counts [E]) -> outputs``
    in the same order, computed by the ranks that hold the experts."""

    def __init__(self, group, n_experts: int):
        self.group = group
        self.size = dist.get_world_size(group)
        self.n_local = n_experts // self.size

    def __call__(self, experts: nn.Module, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        send_counts = counts.view(self.size, self.n_local)  # [N, E/N]: my rows for each rank's each expert
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.group)
        splits = torch.cat([send_counts.sum(1), recv_counts.sum(1)]).tolist()  # the layer's one host sync
        send, recv = splits[: self.size], splits[self.size :]
        rows = _AllToAll.apply(xs, recv, send, self.group)  # [R, d]: by source rank, then local expert
        expert_of = torch.arange(self.n_local, device=xs.device).repeat(self.size)
        expert_of = expert_of.repeat_interleave(recv_counts.flatten(), output_size=sum(recv))
        order = torch.argsort(expert_of, stable=True)
        out = experts(rows.index_select(0, order), recv_counts.sum(0))  # grouped by local expert
        out = out.index_select(0, torch.argsort(order))  # back to arrival order
        return _AllToAll.apply(out, send, recv, self.group)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's experts over ``ep_mesh`` (dim 0: each rank keeps its E/N experts, every rank having
    built the same full model from the same seed) and route its tokens through the all-to-all exchange."""
    from torch.distributed.tensor import Shard, distribute_tensor  # lazy: ~0.5 s to import; EP runs only

    for moe in moe_layers(model):
        if moe.n_experts % ep_mesh.size():
            raise ValueError(f"train.expert_parallel={ep_mesh.size()}: must divide model.n_experts={moe.n_experts}")
        for name, p in list(moe.experts.named_parameters(recurse=False)):
            shard = distribute_tensor(p.detach(), ep_mesh, [Shard(0)], src_data_rank=None)
            setattr(moe.experts, name, nn.Parameter(shard, requires_grad=p.requires_grad))
        moe.exchange = AllToAllExchange(ep_mesh.get_group(), moe.n_experts)
        moe.experts.grad_scale = 1.0 / ep_mesh.size()
