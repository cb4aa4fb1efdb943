"""Forward+backward tokens/s of the tiny preset and of each layer kind, next to the same configuration in
Hugging Face transformers (LlamaAttention, MixtralSparseMoeBlock, MambaMixer slow path, LlamaMLP), measured in
one run. Ratio > 1 means moe_arch is faster.

    python bench/bench_layers.py [--tokens 4096] [--d 128]
"""

from __future__ import annotations

import argparse

import torch
from common import fwd_bwd, header, timeit, timeit_pair

from moe_arch.config import load_config
from moe_arch.model.attention import Attention, SeqContext
from moe_arch.model.layers import Rotary, SwiGLU
from moe_arch.model.mamba import Mamba
from moe_arch.model.moe import MoE
from moe_arch.model.transformer import build_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    header("layer forward+backward throughput vs transformers (CPU, fp32)")
    import transformers
    from transformers import LlamaConfig, MambaConfig, MixtralConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRotaryEmbedding
    from transformers.models.mamba.modeling_mamba import MambaMixer
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    transformers.logging.set_verbosity_error()

    tiny = load_config("tiny")
    m = tiny.model
    B, T, d = args.batch, args.seq, m.d_model
    ntok = B * T
    rows = []

    # Whole tiny model
    model = build_model(m, seed=0).train()
    tok = torch.randint(0, m.vocab_size, (B, T + m.n_predict))

    def step():
        out = model(tok[:, :T], tok[:, 1:])
        out.loss.backward()

    t = timeit(step, repeat=args.repeat)
    rows.append(("tiny preset (whole model)", ntok / t, None))

    x = torch.randn(B, T, d, requires_grad=True)
    pos = torch.arange(T)[None].expand(B, -1)

    # Attention (GQA + RoPE)
    ours = Attention(m, 0)
    ctx = SeqContext(pos, Rotary(m.resolved_head_dim, m.rope_theta))
    hf_cfg = LlamaConfig(
        hidden_size=d,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads,
        head_dim=m.resolved_head_dim,
        max_position_embeddings=4096,
        attention_bias=False,
    )
    hf_cfg._attn_implementation = "sdpa"
    ref = LlamaAttention(hf_cfg, 0)
    rope = LlamaRotaryEmbedding(hf_cfg)
    t_ours, t_ref = timeit_pair(
        fwd_bwd(lambda x: ours(x, ctx), x), fwd_bwd(lambda x: ref(x, rope(x, pos), None)[0], x), rounds=args.repeat
    )
    rows.append((f"attention GQA {m.n_heads}/{m.n_kv_heads} vs LlamaAttention(sdpa)", ntok / t_ours, ntok / t_ref))

    # MoE
    moe = MoE(m, 1)
    moe.init_weights(0.02, 0.02, torch.Generator().manual_seed(0))
    for impl in ("eager", "grouped_mm"):
        mc = MixtralConfig(
            hidden_size=d, intermediate_size=m.d_ff_expert, num_local_experts=m.n_experts, num_experts_per_tok=m.top_k
        )
        mc._experts_implementation = impl
        ref = MixtralSparseMoeBlock(mc)
        for p in ref.parameters():
            torch.nn.init.normal_(p, 0, 0.02)
        try:
            t_ours, t_ref = timeit_pair(fwd_bwd(moe, x), fwd_bwd(ref, x), rounds=args.repeat)
        except Exception as e:  # an implementation this transformers build lacks
            print(f"  (Mixtral experts '{impl}' unavailable: {type(e).__name__}: {str(e)[:80]})")
            continue
        rows.append((f"MoE {m.n_experts} experts top-{m.top_k} vs Mixtral block ({impl})", ntok / t_ours, ntok / t_ref))

    # Mamba
    mam = Mamba(m, 2)
    mam.init_weights(0.02, 0.02, torch.Generator().manual_seed(0))
    hf_m = MambaConfig(
        hidden_size=d,
        state_size=m.mamba_d_state,
        expand=m.mamba_expand,
        conv_kernel=m.mamba_d_conv,
        time_step_rank=m.resolved_dt_rank,
        use_bias=False,
        use_conv_bias=True,
        use_mambapy=False,
    )
    ref = MambaMixer(hf_m, 0)
    ref.load_state_dict(mam.state_dict())
    ref.train()
    t_ours = timeit(fwd_bwd(lambda x: mam(x, ctx), x), repeat=args.repeat)
    t_ref = timeit(fwd_bwd(ref, x), warmup=1, repeat=max(2, args.repeat // 2))
    rows.append((f"Mamba d_state {m.mamba_d_state} vs MambaMixer slow path", ntok / t_ours, ntok / t_ref))

    # Dense SwiGLU
    mlp = SwiGLU(d, m.d_ff)
    ref = LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=m.d_ff))
    t_ours, t_ref = timeit_pair(fwd_bwd(mlp, x), fwd_bwd(ref, x), rounds=args.repeat)
    rows.append(("dense SwiGLU vs LlamaMLP", ntok / t_ours, ntok / t_ref))

    print(f"# batch {B} x seq {T} = {ntok} tokens, d_model {d}")
    print(f"{'layer':<58} {'moe_arch tok/s':>15} {'transformers tok/s':>19} {'ratio':>7}")
    for name, ours_tps, ref_tps in rows:
        ratio = f"{ours_tps / ref_tps:6.2f}x" if ref_tps else "      -"
        print(f"{name:<58} {ours_tps:>15,.0f} {ref_tps or 0:>19,.0f} {ratio:>7}")


if __name__ == "__main__":
    main()
