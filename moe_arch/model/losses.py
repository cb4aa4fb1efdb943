"""Fused output projection + cross-entropy.

``F.cross_entropy(F.linear(h, W), y)`` writes the [N, V] logits to memory, reads them back for the log-softmax,
writes that, and reads both again in the backward. Here the logits are turned in place into
d(loss)/d(logits) = softmax - onehot while the loss is reduced. On CPU the softmax rows run in one compiled kernel
(``kernels/cross_entropy_cpu.c``, each row finished in L1) and the gradients of h and W are formed in the forward,
block by block (see ``_LinearCrossEntropy``); without the kernel, the softmax runs in row chunks of PyTorch ops
(amax, exp, sum, scale) and the backward does two matrix products with the stored logit gradient. Same numbers
either way (tested against the unfused path). Used for float32 inputs outside autocast; other dtypes take the
unfused path (the same math). On CUDA (with Triton) every dtype and autocast take the blocked form with a Triton row
kernel (``triton_kernels.linear_cross_entropy``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_arch.model import cpu_kernels
from moe_arch.model.fused import triton, triton_use


def _softmax_grad_chunked(
    h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int, grad_logits: torch.Tensor
) -> torch.Tensor:
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
        logits[rows[: e - s], tgt] -= 1.0
    return total


# Logits per block on the kernel path (16 MB: 1024 rows at a 4096 vocabulary): the block stays in the last-level
# cache between the projection, the softmax kernel and the two gradient products (bench/RESULTS.md), and memory
# stays bounded at large vocabularies.
KERNEL_BLOCK_ELEMENTS = 1024 * 4096


def _kernel_loss_and_grads(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, want_h: bool, want_w: bool):
    """CPU kernel path: float64 loss sum, and (when asked) d(sum)/dh [N, d] and d(sum)/dW transposed [d, V]."""
    N, V = h.shape[0], weight.shape[0]
    if N and (int(target.min()) < 0 or int(target.max()) >= V):
        bad = target[(target < 0) | (target >= V)][0]
        raise IndexError(f"cross-entropy target {int(bad)} is out of range for a vocabulary of {V}")
    target = target.long().contiguous()
    rows = max(1, min(N, KERNEL_BLOCK_ELEMENTS // V))
    block = h.new_empty(rows, V)
    dh = torch.empty_like(h) if want_h else None
    dwt = h.new_empty(h.shape[1], V) if want_w else None  # d(loss)/dW transposed: h^T G is the fast form
    total = torch.zeros((), dtype=torch.float64)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        g = torch.mm(h[s:e], weight.t(), out=block[: e - s])
        total += cpu_kernels.xent_rows_(g, target[s:e]).sum()
        if want_h:
            torch.mm(g, weight, out=dh[s:e])
        if want_w:
            if s == 0:
                torch.mm(h[s:e].t(), g, out=dwt)
            else:
                dwt.addmm_(h[s:e].t(), g)
    return total, dh, dwt


class _LinearCrossEntropy(torch.autograd.Function):
    """Two paths with the same result. With the CPU kernel, each block of rows is projected, turned into
    softmax - onehot, and immediately multiplied into d(loss)/dh and d(loss)/dW (as Liger-Kernel's fused linear
    cross-entropy does): the [N, V] logits never exist whole and the backward only scales the stored gradients.
    Without it, the logit gradient [N, V] is stored and the backward does the two products."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int):
        N, V = h.shape[0], weight.shape[0]
        if h.device.type == "cpu" and cpu_kernels.available():
            total, dh, dwt = _kernel_loss_and_grads(h, weight, target, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
            ctx.fused = True
            ctx.save_for_backward(dh, dwt)
        else:
            grad_logits = torch.empty(N, V, dtype=h.dtype, device=h.device)
            total = _softmax_grad_chunked(h, weight, target, chunk, grad_logits)
            ctx.fused = False
            ctx.save_for_backward(h, weight, grad_logits)
        ctx.n_rows = N
        return (total / N).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        scale = grad_out / ctx.n_rows
        if ctx.fused:
            dh, dwt = ctx.saved_tensors
            return (
                dh * scale if dh is not None else None,
                torch.mul(dwt.t(), scale, out=dwt.new_empty(dwt.shape[::-1])) if dwt is not None else None,
                None,
                None,
            )
        h, weight, grad_logits = ctx.saved_tensors
        dh = torch.mm(grad_logits, weight) * scale if ctx.needs_input_grad[0] else None
        dw = (
            torch.mul(torch.mm(h.t(), grad_logits).t(), scale, out=torch.empty_like(weight))
            if ctx.needs_input_grad[1]
            else None
        )
        return dh, dw, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """mean(cross_entropy(h @ weight.T, target)) for h [..., d], target [...]."""
    h2 = h.reshape(-1, h.shape[-1])
    t2 = target.reshape(-1)
    if triton_use(h2, weight):  # CUDA: the same blocked form with a Triton softmax row kernel, autocast included
        return triton().linear_cross_entropy(h2, weight, t2)
    if h2.dtype == torch.float32 and weight.dtype == torch.float32 and not torch.is_autocast_enabled(h2.device.type):
        if (
            h2.device.type == "cpu"
            and cpu_kernels.available()
            and not (torch.is_grad_enabled() and (h2.requires_grad or weight.requires_grad))
        ):
            # evaluation: an autograd.Function would still see needs_input_grad under no_grad and form the grads
            total, _, _ = _kernel_loss_and_grads(h2, weight, t2, False, False)
            return (total / h2.shape[0]).to(h2.dtype)
        return _LinearCrossEntropy.apply(h2, weight, t2, chunk)
    return F.cross_entropy(F.linear(h2, weight).float(), t2)
