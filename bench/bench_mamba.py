"""Mamba layer forward+backward time against sequence length (512 -> 4096: it should grow linearly), the compiled
CPU scan kernel against the chunked PyTorch scan, and Mamba against an attention layer of the same width at 2048
tokens, measured in one run.

    python bench/bench_mamba.py [--d 256] [--batch 1]
"""

from __future__ import annotations

import argparse

import torch
from common import fwd_bwd, header, timeit

from moe_arch.config import ModelConfig
from moe_arch.model import cpu_kernels
from moe_arch.model.attention import Attention, SeqContext
from moe_arch.model.layers import Rotary
from moe_arch.model.mamba import Mamba


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    header("Mamba scan scaling and Mamba vs attention (forward+backward)")
    d, B = args.d, args.batch
    cfg = ModelConfig(
        d_model=d, n_layers=1, n_heads=d // 64, n_kv_heads=max(1, d // 128), mamba_layers=[0], max_seq_len=8192
    )
    mamba = Mamba(cfg, 0)
    mamba.init_weights(0.02, 0.02, torch.Generator().manual_seed(0))
    attn = Attention(cfg, 0)
    attn.init_weights(0.02, 0.02, torch.Generator().manual_seed(0))
    rot = Rotary(cfg.resolved_head_dim, cfg.rope_theta)

    def layer_time(layer, L, impl="auto"):
        x = torch.randn(B, L, d, requires_grad=True)
        ctx = SeqContext(torch.arange(L)[None].expand(B, -1), rot)
        mamba.scan_impl = impl
        try:
            return timeit(fwd_bwd(lambda x: layer(x, ctx), x), repeat=5)
        finally:
            mamba.scan_impl = "auto"

    kernel = cpu_kernels.available()
    print(
        f"# d_model {d} (Mamba d_inner {cfg.mamba_expand * d}, d_state {cfg.mamba_d_state}), batch {B}, "
        f"CPU scan kernel: {'yes' if kernel else 'NO (' + str(cpu_kernels._error) + ')'}"
    )
    print(f"{'L':>6} {'Mamba ms':>10} {'us/token':>9} {'vs L=512 per token':>19} {'chunked-scan ms':>16} {'ratio':>6}")
    base = None
    for L in (512, 1024, 2048, 4096):
        t = layer_time(mamba, L)
        tc = layer_time(mamba, L, "chunked")
        per = t / (B * L)
        base = base or per
        print(f"{L:>6} {t * 1e3:>10.1f} {per * 1e6:>9.2f} {per / base:>19.2f} {tc * 1e3:>16.1f} {tc / t:>5.1f}x")
    tm, ta = layer_time(mamba, 2048), layer_time(attn, 2048)
    print(f"at 2048 tokens: Mamba {tm * 1e3:.1f} ms, attention {ta * 1e3:.1f} ms, ratio {tm / ta:.2f}x")


if __name__ == "__main__":
    main()
