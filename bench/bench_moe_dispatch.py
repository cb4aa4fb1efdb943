"""MoE dispatch: the dropless sorted/grouped path against a dense "every expert on every token" baseline and a
per-expert loop (Mixtral's eager implementation), at 8, 14 and 64 experts with top-2 routing, forward+backward,
measured in one run. With top-k fixed, the routed FLOPs do not depend on the number of experts: the grouped
path's time should stay flat while the dense baseline grows with the number of experts.

    python bench/bench_moe_dispatch.py [--tokens 4096] [--d 256] [--f 512]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import fwd_bwd, header, timeit

from moe_arch.config import ModelConfig
from moe_arch.model.moe import MoE


def dense_all_experts(m: MoE, x: torch.Tensor) -> torch.Tensor:
    _, _, idx, w = m.route(x)
    e = m.experts
    h = F.silu(torch.einsum("nd,edf->enf", x, e.w_gate)) * torch.einsum("nd,edf->enf", x, e.w_up)
    out = torch.einsum("enf,efd->end", h, e.w_down)
    gate = torch.zeros(x.shape[0], m.n_experts).scatter(1, idx, w)
    return torch.einsum("ne,end->nd", gate, out)


def per_expert_loop(m: MoE, x: torch.Tensor) -> torch.Tensor:
    _, _, idx, w = m.route(x)
    e = m.experts
    out = torch.zeros_like(x)
    for k in range(m.n_experts):
        tok, slot = torch.where(idx == k)
        if tok.numel() == 0:
            continue
        xs = x[tok]
        h = F.silu(xs @ e.w_gate[k]) * (xs @ e.w_up[k])
        out.index_add_(0, tok, (h @ e.w_down[k]) * w[tok, slot, None])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--f", type=int, default=512)
    args = ap.parse_args()
    header("MoE dispatch: sorted/grouped vs dense vs per-expert loop (top-2, forward+backward)")
    N, d, f = args.tokens, args.d, args.f
    routed = 2 * 3 * 2 * N * d * f * 3  # top-2 x 3 matmuls x (2 FLOPs) x tokens x d x f, forward+backward (x3)
    print(f"# {N} tokens, d_model {d}, d_ff_expert {f}; routed FLOPs per call {routed / 1e9:.1f} GFLOP at every E")
    print(
        f"{'experts':>8} {'grouped ms':>11} {'loop ms':>9} {'dense ms':>9} {'grouped GFLOP/s':>16} "
        f"{'dense/grouped':>14} {'loop/grouped':>13}"
    )
    for E in (8, 14, 64):
        m = MoE(ModelConfig(d_model=d, n_layers=1, moe_layers=[0], n_experts=E, top_k=2, d_ff_expert=f), 0)
        m.init_weights(0.02, 0.02, torch.Generator().manual_seed(0))
        x = torch.randn(N, d, requires_grad=True)
        g = torch.randn(N, d)

        t_g = timeit(fwd_bwd(m, x, g), repeat=5)
        t_l = timeit(fwd_bwd(lambda x: per_expert_loop(m, x), x, g), repeat=5)
        t_d = timeit(fwd_bwd(lambda x: dense_all_experts(m, x), x, g), repeat=3) if E <= 14 else float("nan")
        print(
            f"{E:>8} {t_g * 1e3:>11.1f} {t_l * 1e3:>9.1f} {t_d * 1e3:>9.1f} {routed / t_g / 1e9:>16.1f} "
            f"{t_d / t_g:>14.2f} {t_l / t_g:>13.2f}"
        )
    print("# dense at 64 experts is skipped: it would do 32x the routed work")


if __name__ == "__main__":
    main()
