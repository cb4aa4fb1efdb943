"""Parity with Hugging Face transformers' reference layers, weights copied, float32 tolerance."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe_arch.config import ModelConfig  # noqa: E402
from moe_arch.model.attention import Attention, SeqContext  # noqa: E402
from moe_arch.model.layers import Rotary  # noqa: E402
from moe_arch.model.mamba import Mamba  # noqa: E402
from moe_arch.model.moe import MoE  # noqa: E402


def _ctx(B, T, head_dim, theta=10000.0):
    pos = torch.arange(T)[None].expand(B, -1)
    return SeqContext(pos, Rotary(head_dim, theta))


def test_attention_matches_llama_attention_gqa_rope():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    torch.manual_seed(0)
    B, T, d, H, KV, hd = 2, 24, 64, 4, 2, 16
    hf_cfg = LlamaConfig(
        hidden_size=d,
        num_attention_heads=H,
        num_key_value_heads=KV,
        head_dim=hd,
        max_position_embeddings=128,
        rope_theta=10000.0,
        attention_bias=False,
    )
    hf_cfg._attn_implementation = "eager"  # the reference math, not SDPA
    ref = LlamaAttention(hf_cfg, layer_idx=0)
    ours = Attention(ModelConfig(d_model=d, n_heads=H, n_kv_heads=KV, head_dim=hd), 0)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(ours, name).weight.data.copy_(getattr(ref, name).weight.data)
    x = torch.randn(B, T, d, requires_grad=True)
    pos = torch.arange(T)[None].expand(B, -1)
    cos, sin = LlamaRotaryEmbedding(hf_cfg)(x, pos)
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None].expand(B, 1, T, T)
    y_ref, _ = ref(x, (cos, sin), mask)
    y = ours(x, _ctx(B, T, hd))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    (gx_ref, gq_ref) = torch.autograd.grad(y_ref, (x, ref.q_proj.weight), g)
    (gx, gq) = torch.autograd.grad(y, (x, ours.q_proj.weight), g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gq, gq_ref, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def _copy_routed_experts(ours, ref, f: int) -> None:
    """transformers' router and stacked experts (gate_up_proj [E, 2f, d]: gate rows then up rows; down_proj
    [E, d, f]) into ours (w_gate, w_up [E, d, f]; w_down [E, f, d])."""
    ours.router.weight.copy_(ref.gate.weight)
    gate_up = ref.experts.gate_up_proj
    ours.experts.w_gate.copy_(gate_up[:, :f, :].transpose(1, 2))
    ours.experts.w_up.copy_(gate_up[:, f:, :].transpose(1, 2))
    ours.experts.w_down.copy_(ref.experts.down_proj.transpose(1, 2))


def test_moe_matches_mixtral_sparse_moe_block_top2():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    d, f, E = 48, 80, 6
    hf_cfg = MixtralConfig(
        hidden_size=d, intermediate_size=f, num_local_experts=E, num_experts_per_tok=2, router_jitter_noise=0.0
    )
    hf_cfg._experts_implementation = "eager"
    ref = MixtralSparseMoeBlock(hf_cfg)
    for p in ref.parameters():
        torch.nn.init.normal_(p, 0.0, 0.2)
    ours = MoE(ModelConfig(d_model=d, n_layers=1, moe_layers=[0], n_experts=E, top_k=2, d_ff_expert=f), 0)
    _copy_routed_experts(ours, ref, f)
    x = torch.randn(3, 17, d)
    y_ref = ref(x)
    y = ours(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    # Gradients flow to the same places with the same values (router included).
    g = torch.randn_like(y)
    gr = torch.autograd.grad(y_ref, [ref.gate.weight, ref.experts.down_proj], g)
    go = torch.autograd.grad(y, [ours.router.weight, ours.experts.w_down], g)
    torch.testing.assert_close(go[0], gr[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(go[1], gr[1].transpose(1, 2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gate", [True, False])
def test_shared_and_fine_grained_experts_match_qwen2_moe_sparse_moe_block(gate):
    """16 fine-grained experts (d_ff_expert 16), top-4, 2 shared experts: transformers' Qwen2-MoE block, weights
    copied; outputs and gradients (router, experts, shared expert, its gate, input) equal. Without the gate
    (DeepSeekMoE), the reference's gate is pinned open (sigmoid -> 1) by a huge constant weight on a constant
    input feature."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    torch.manual_seed(0)
    d, f, E, k, S = 32, 16, 16, 4, 2
    hf_cfg = Qwen2MoeConfig(
        hidden_size=d,
        moe_intermediate_size=f,
        num_experts=E,
        num_experts_per_tok=k,
        shared_expert_intermediate_size=S * f,
        norm_topk_prob=True,
        hidden_act="silu",
    )
    hf_cfg._experts_implementation = "eager"
    ref = Qwen2MoeSparseMoeBlock(hf_cfg)
    for p in ref.parameters():
        torch.nn.init.normal_(p, 0.0, 0.2)
    cfg = ModelConfig(
        d_model=d,
        n_layers=1,
        moe_layers=[0],
        n_experts=E,
        top_k=k,
        d_ff_expert=f,
        n_shared_experts=S,
        shared_expert_gate=gate,
    )
    ours = MoE(cfg, 0)
    x = torch.randn(3, 17, d, requires_grad=True)
    _copy_routed_experts(ours, ref, f)
    with torch.no_grad():
        ours.shared.w1.weight.copy_(ref.shared_expert.gate_proj.weight)
        ours.shared.w3.weight.copy_(ref.shared_expert.up_proj.weight)
        ours.shared.w2.weight.copy_(ref.shared_expert.down_proj.weight)
        if gate:
            ours.shared_gate.weight.copy_(ref.shared_expert_gate.weight)
        else:
            assert ours.shared_gate is None
            ref.shared_expert_gate.weight.zero_()
            ref.shared_expert_gate.weight[0, 0] = 1e4
            x.data[..., 0] = 1.0
    y_ref = ref(x)
    y = ours(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    ref_w = [
        x,
        ref.gate.weight,
        ref.experts.down_proj,
        ref.shared_expert.down_proj.weight,
        ref.shared_expert.gate_proj.weight,
    ]
    our_w = [x, ours.router.weight, ours.experts.w_down, ours.shared.w2.weight, ours.shared.w1.weight]
    if gate:
        ref_w.append(ref.shared_expert_gate.weight)
        our_w.append(ours.shared_gate.weight)
    gr = torch.autograd.grad(y_ref, ref_w, g)
    go = torch.autograd.grad(y, our_w, g)
    for i, (a, b) in enumerate(zip(go, gr)):
        torch.testing.assert_close(a, b.transpose(1, 2) if i == 2 else b, rtol=1e-4, atol=1e-5)


def test_info_counts_shared_experts_as_active():
    from moe_arch.model.params import count_parameters
    from moe_arch.model.transformer import build_model

    base = dict(
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        vocab_size=64,
        moe_layers=[1],
        n_experts=8,
        top_k=2,
        d_ff_expert=16,
    )
    a = count_parameters(build_model(ModelConfig(**base), device="meta"))
    cfg = ModelConfig(**base, n_shared_experts=2)
    b = count_parameters(build_model(cfg, device="meta"))
    shared = 2 * 3 * 32 * 16 + 32  # two experts' SwiGLU + the gate
    assert b["total"] - a["total"] == shared == b["active"] - a["active"]
    assert cfg.estimated_parameters() == b["total"]


@pytest.mark.parametrize("T, chunk", [(19, 0), (32, 5)])
def test_mamba_matches_hf_mamba_mixer_slow_path(T, chunk):
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    torch.manual_seed(0)
    d, N, expand, k, rank = 32, 8, 2, 4, 4
    hf_cfg = MambaConfig(
        hidden_size=d,
        state_size=N,
        expand=expand,
        conv_kernel=k,
        time_step_rank=rank,
        use_bias=False,
        use_conv_bias=True,
        use_mambapy=False,
    )
    ref = MambaMixer(hf_cfg, layer_idx=0)
    ours = Mamba(
        ModelConfig(
            d_model=d,
            n_layers=1,
            mamba_layers=[0],
            mamba_d_state=N,
            mamba_expand=expand,
            mamba_d_conv=k,
            mamba_dt_rank=rank,
            mamba_chunk_size=chunk,
        ),
        0,
    )
    ours.init_weights(0.1, 0.1, torch.Generator().manual_seed(1))
    ref.load_state_dict(ours.state_dict())  # identical names and shapes by design
    ref.train()
    x = torch.randn(2, T, d, requires_grad=True)
    y_ref = ref(x)
    y = ours(x, _ctx(2, T, 2))
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(y)
    names = ["A_log", "D", "dt_proj.weight", "x_proj.weight", "conv1d.weight", "in_proj.weight"]
    ref_params = dict(ref.named_parameters())
    our_params = dict(ours.named_parameters())
    gr = torch.autograd.grad(y_ref, [x] + [ref_params[n] for n in names], g)
    go = torch.autograd.grad(y, [x] + [our_params[n] for n in names], g)
    for name, a, b in zip(["x"] + names, go, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


def test_muon_2d_is_torch_muon_and_expert_muon_matches_it_per_expert():
    from moe_arch.training.optim import BatchedMuon

    torch.manual_seed(0)
    E, m, n = 3, 12, 20
    w = torch.randn(E, m, n)
    stacked = torch.nn.Parameter(w.clone())
    slices = [torch.nn.Parameter(w[e].clone()) for e in range(E)]
    ours = BatchedMuon([stacked], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ref = torch.optim.Muon(slices, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(4):
        g = torch.randn(E, m, n)
        stacked.grad = g.clone()
        for e in range(E):
            slices[e].grad = g[e].clone()
        ours.step()
        ref.step()
    for e in range(E):
        torch.testing.assert_close(stacked.data[e], slices[e].data, rtol=0, atol=1e-6)
    assert not torch.equal(stacked.data, w)


def test_batched_muon_on_a_matrix_equals_torch_muon():
    from moe_arch.training.optim import BatchedMuon

    torch.manual_seed(1)
    w = torch.randn(24, 16)
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours = BatchedMuon([a], lr=0.01, weight_decay=0.05, adjust_lr_fn="match_rms_adamw")
    ref = torch.optim.Muon([b], lr=0.01, weight_decay=0.05, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        g = torch.randn(24, 16)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a.data, b.data, rtol=0, atol=1e-6)
    assert ours.state_dict()["param_groups"][0].keys() == ref.state_dict()["param_groups"][0].keys()
