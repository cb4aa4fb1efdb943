"""Fused output projection + cross-entropy.

``F.cross_entropy(F.linear(h, W), y)`` writes the [N, V] logits to memory, reads them back for the log-softmax,
writes that, and reads both again in the backward. Here the logits are turned in place into
d(loss)/d(logits) = softmax - onehot while the loss is reduced, and the backward is two matrix products with that
stored gradient. On CPU the softmax rows run in one compiled kernel (``kernels/cross_entropy_cpu.c``: each row
finished in L1, after one matrix product for all rows); without it, in row chunks of PyTorch ops (amax, exp,
sum, scale), each chunk still in cache. Same numbers either way (tested against the unfused path). Used for
float32 inputs outside autocast; other dtypes take the unfused path (the same math).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_arch.model import cpu_kernels


def _softmax_grad_chunked(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int,
                          grad_logits: torch.Tensor) -> torch.Tensor:
    """PyTorch-ops path: fills grad_logits, returns the float64 loss sum."""
    N = h.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    rows = torch.arange(chunk, device=h.device)
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        logits = torch.mm(h[s:e], weight.t(), out=grad_logits[s:e])
        tgt = target[s:e]
        picked = logits.gather(1, tgt[:, None]).squeeze(1)
        # softmax in place with one exp per element (torch.logsumexp followed by exp(logits - lse) costs
        # two, and logsumexp alone is ~4x slower than amax + exp + sum on this CPU)
        m = logits.amax(dim=-1, keepdim=True)
        z = logits.sub_(m).exp_().sum(dim=-1, keepdim=True)
        total += (m.squeeze(1) + z.log().squeeze(1) - picked).sum(dtype=torch.float64)
        logits.mul_(z.reciprocal_())
        logits[rows[:e - s], tgt] -= 1.0
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int):
        N, V = h.shape[0], weight.shape[0]
        grad_logits = torch.empty(N, V, dtype=h.dtype, device=h.device)
        if h.device.type == "cpu" and cpu_kernels.available():
            if N and (int(target.min()) < 0 or int(target.max()) >= V):
                bad = target[(target < 0) | (target >= V)][0]
                raise IndexError(f"cross-entropy target {int(bad)} is out of range for a vocabulary of {V}")
            torch.mm(h, weight.t(), out=grad_logits)
            total = cpu_kernels.xent_rows_(grad_logits, target.long().contiguous()).sum()
        else:
            total = _softmax_grad_chunked(h, weight, target, chunk, grad_logits)
        ctx.save_for_backward(h, weight, grad_logits)
        return (total / N).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, weight, grad_logits = ctx.saved_tensors
        scale = grad_out / h.shape[0]
        dh = torch.mm(grad_logits, weight) * scale if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            # as (h^T G)^T: MKL runs this orientation ~10% faster than G^T h at vocabulary-sized G (bench/RESULTS.md)
            dw = torch.mul(torch.mm(h.t(), grad_logits).t(), scale, out=torch.empty_like(weight))
        return dh, dw, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """mean(cross_entropy(h @ weight.T, target)) for h [..., d], target [...]."""
    h2 = h.reshape(-1, h.shape[-1])
    t2 = target.reshape(-1)
    if h2.dtype == torch.float32 and weight.dtype == torch.float32 and not torch.is_autocast_enabled(h2.device.type):
        return _LinearCrossEntropy.apply(h2, weight, t2, chunk)
    return F.cross_entropy(F.linear(h2, weight).float(), t2)
