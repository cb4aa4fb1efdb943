"""Dropless token-choice Mixture-of-Experts feed-forward layer.

Router: softmax over experts, top-k, weights renormalised over the chosen k (Mixtral). Auxiliary terms:
Switch load-balance loss and ST-MoE router z-loss; optionally DeepSeek-V3's auxiliary-loss-free balancing,
where a per-expert bias (a buffer, not trained by gradient) shifts only the *selection* scores and is nudged
after each optimizer step towards under-loaded experts.

Dispatch: the (token, expert) assignments are sorted by expert, so each expert's tokens are one contiguous
slice; one grouped GEMM per projection runs every expert over its own slice (``torch.nn.functional.grouped_mm``),
with no padding to the largest expert load and no token dropped. Where the grouped GEMM is unavailable for
the device/dtype, a loop over the experts' slices computes the same numbers (with a warning).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from moe_arch.config import ModelConfig
from moe_arch.model import fused
from moe_arch.model.layers import SwiGLU
from moe_arch.model.roles import RouterLinear, register_roles

_GROUPED_MM = getattr(F, "grouped_mm", None)
# Below this many (token, expert) assignments without gradient (decoding), experts run as plain matmuls.
DECODE_ASSIGNMENTS = 8
_grouped_mm_broken: set[tuple[str, torch.dtype]] = set()


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` are grouped by expert (``counts[e]`` rows for expert e); returns x_e @ w[e] per group."""
    key = (x.device.type, x.dtype)
    # No rows at all (an expert-parallel rank none of whose experts was chosen): grouped_mm's backward can reject the
    # empty input; the loop's matmuls give the weights their zero gradient, so every rank reduces the same tensors.
    if _GROUPED_MM is not None and key not in _grouped_mm_broken and x.shape[0] > 0:
        try:
            return _GROUPED_MM(x, w.to(x.dtype), offs=offsets)
        except (RuntimeError, NotImplementedError) as e:
            _grouped_mm_broken.add(key)
            warnings.warn(
                f"grouped_mm is unavailable for {key} ({str(e).splitlines()[0]}); MoE experts run as a "
                "loop over expert slices instead (same result, slower)",
                RuntimeWarning,
                stacklevel=2,
            )
    outs = []
    start = 0
    for e, n in enumerate(counts.tolist()):
        outs.append(x[start : start + n] @ w[e].to(x.dtype))
        start += n
    return torch.cat(outs, 0)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


@register_roles({"w_gate": "expert_matrix", "w_up": "expert_matrix", "w_down": "expert_matrix"})
class Experts(nn.Module):
    """n_experts SwiGLU experts stored as stacked tensors: w_gate, w_up [E, d, f]; w_down [E, f, d]."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        # Expert parallelism sets 1/N: a rank's expert gradient then sums N ranks' token losses (see
        # moe_arch/parallel/expert_parallel.py), which data parallelism's mean would otherwise count N times.
        # Exact for N a power of two; otherwise one more rounding of a gradient already in the compute dtype.
        self.grad_scale = 1.0

    def init_weights(self, std: float, out_std: float, gen: torch.Generator) -> None:
        nn.init.normal_(self.w_gate, 0.0, std, generator=gen)
        nn.init.normal_(self.w_up, 0.0, std, generator=gen)
        nn.init.normal_(self.w_down, 0.0, out_std, generator=gen)

    def forward(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [A, d]: rows grouped by expert, counts[e] rows for expert e of this module's (local) experts."""
        w_gate, w_up, w_down = (_local(w, self.grad_scale) for w in (self.w_gate, self.w_up, self.w_down))
        offsets = counts.cumsum(0).to(torch.int32)
        h = fused.swiglu(grouped_matmul(xs, w_gate, counts, offsets), grouped_matmul(xs, w_up, counts, offsets))
        return grouped_matmul(h, w_down, counts, offsets)


def _local(w: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """Under expert parallelism the stacked weights are DTensors sharded over experts: this rank's experts."""
    w = w.to_local() if hasattr(w, "to_local") else w
    return w if grad_scale == 1.0 else _ScaleGrad.apply(w, grad_scale)


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward scales the gradient (the weights' only: the rows' gradients are untouched)."""

    @staticmethod
    def forward(ctx, w, scale: float):
        ctx.scale = scale
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_experts = cfg.n_experts
        self.top_k = cfg.top_k
        self.router = RouterLinear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = Experts(cfg.n_experts, cfg.d_model, cfg.d_ff_expert)
        # How sorted rows reach the experts: None calls them here; expert parallelism installs an exchange
        # (moe_arch.parallel.expert_parallel) that runs them on the ranks holding them.
        self.exchange = None
        self.bias_balancing = cfg.router_bias_balancing
        self.bias_update_rate = cfg.router_bias_update_rate
        # Selection-only bias for auxiliary-loss-free balancing (saved with the model, never trained by gradient).
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts), persistent=cfg.router_bias_balancing)
        # Shared experts: n_shared SwiGLUs of width d_ff_expert on the same input sum to one SwiGLU of their
        # total width, so they run as one dense layer (every token, no routing).
        self.shared = SwiGLU(cfg.d_model, cfg.n_shared_experts * cfg.d_ff_expert) if cfg.n_shared_experts else None
        self.shared_gate = (
            RouterLinear(cfg.d_model, 1, bias=False) if cfg.n_shared_experts and cfg.shared_expert_gate else None
        )

    def init_weights(self, std: float, out_std: float, gen: torch.Generator) -> None:
        nn.init.normal_(self.router.weight, 0.0, std, generator=gen)
        self.experts.init_weights(std, out_std, gen)
        self.expert_bias.zero_()
        if self.shared is not None:
            self.shared.init_weights(std, out_std, gen)
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, 0.0, std, generator=gen)

    def route(self, x: torch.Tensor):
        """x [N, d] -> router logits [N, E] (fp32), chosen experts [N, k], their renormalised weights [N, k]."""
        logits = self.router(x).float()
        probs = logits.softmax(dim=-1)
        select = probs + self.expert_bias if self.bias_balancing else probs
        idx = torch.topk(select, self.top_k, dim=-1).indices
        weights = probs.gather(1, idx)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, probs, idx, weights

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None, aux=None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        keep = None
        if valid is not None:  # MoD padding rows are not tokens: they must not be routed or counted
            keep = valid.reshape(-1).nonzero().squeeze(1)
            flat = flat.index_select(0, keep)
        logits, probs, idx, weights = self.route(flat)
        n_tok = flat.shape[0]
        few = n_tok * self.top_k <= DECODE_ASSIGNMENTS and not torch.is_grad_enabled()
        if aux is None and few and self.exchange is None:
            y = self._few_tokens(flat, idx, weights)
        else:
            assign = idx.reshape(-1)
            order = torch.argsort(assign, stable=True)
            counts = torch.bincount(assign, minlength=self.n_experts)
            token_of = order // self.top_k
            xs = flat.index_select(0, token_of)
            if self.exchange is None:
                out = _ContiguousGrad.apply(self.experts(xs, counts))
            else:  # the exchange's backward hands the experts contiguous gradients
                out = self.exchange(self.experts, xs, counts)
            out = out * weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(out.dtype)
            y = torch.zeros_like(flat).index_add_(0, token_of, out.to(flat.dtype))
        if self.shared is not None:
            shared = self.shared(flat)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared
            y = y + shared
        if aux is not None and n_tok > 0:
            frac = counts.float() / (n_tok * self.top_k)  # share of assignments per expert (sums to 1)
            load_balance = self.n_experts * (frac * probs.mean(0)).sum()  # 1.0 when perfectly balanced
            z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
            aux.add_moe(self.layer_idx, load_balance, z_loss, counts.detach())
        if keep is not None:
            y = torch.zeros(valid.numel(), shape[-1], dtype=y.dtype, device=y.device).index_copy_(0, keep, y)
        return y.view(shape)

    def _few_tokens(self, flat: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Decoding (a handful of tokens, no gradient): each chosen expert as plain matmuls on views of its weights,
        ~40% less time than sorting, counting and three grouped GEMMs for one token (same products)."""
        ex = self.experts
        y = torch.zeros_like(flat)
        for t, (experts, ws) in enumerate(zip(idx.tolist(), weights.tolist())):
            row = flat[t : t + 1]
            for e, w in zip(experts, ws):
                h = fused.swiglu(row @ ex.w_gate[e].to(row.dtype), row @ ex.w_up[e].to(row.dtype))
                y[t : t + 1] += (w * (h @ ex.w_down[e].to(row.dtype))).to(y.dtype)
        return y

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """DeepSeek-V3 balancing step: raise the bias of under-loaded experts, lower over-loaded ones."""
        if self.bias_balancing and load.sum() > 0:
            self.expert_bias += self.bias_update_rate * torch.sign(load.float().mean() - load.float())
