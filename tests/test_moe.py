import pytest
import torch
from numerics import assert_within, moe_experts_bound

from moe_arch.config import ModelConfig
from moe_arch.model import moe as moe_mod
from moe_arch.model.moe import MoE
from moe_arch.model.transformer import Aux


def make(E=6, k=2, balancing=False, seed=0):
    cfg = ModelConfig(
        d_model=32,
        n_layers=1,
        moe_layers=[0],
        n_experts=E,
        top_k=k,
        d_ff_expert=48,
        router_bias_balancing=balancing,
        router_bias_update_rate=0.01,
    )
    m = MoE(cfg, 0)
    m.init_weights(0.2, 0.2, torch.Generator().manual_seed(seed))
    return m


def dense_reference(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by the (renormalised) top-k gate: the definition of the layer."""
    flat = x.reshape(-1, x.shape[-1])
    _, _, idx, w = m.route(flat)
    e = m.experts
    h = torch.nn.functional.silu(torch.einsum("nd,edf->enf", flat, e.w_gate)) * torch.einsum(
        "nd,edf->enf", flat, e.w_up
    )
    out = torch.einsum("enf,efd->end", h, e.w_down)  # [E, N, d]
    gate = torch.zeros(flat.shape[0], m.n_experts).scatter(1, idx, w)
    return torch.einsum("ne,end->nd", gate, out).reshape(x.shape)


def test_sorted_grouped_dispatch_equals_dense_definition():
    m = make()
    x = torch.randn(3, 11, 32)
    torch.testing.assert_close(m(x), dense_reference(m, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k,tokens", [(2, 1), (2, 4), (3, 2)])
def test_decoding_path_equals_the_grouped_dispatch(k, tokens, monkeypatch):
    """Without gradient and with few assignments (decoding), experts run as plain matmuls: the same products as
    the sorted grouped dispatch, but other GEMM kernels (a 1-row matmul vs a grouped GEMM over sorted rows), so
    the two agree within the float32 bound of the layer's dot products, not bit for bit: whether their bits match
    depends on the BLAS kernel the CPU gets (MKL's AVX-512 path differs, its AVX2 and COMPATIBLE paths do not)."""
    m = make(k=k)
    x = torch.randn(1, tokens, 32)
    with torch.no_grad():
        fast = m(x)
        monkeypatch.setattr(moe_mod, "DECODE_ASSIGNMENTS", 0)
        grouped = m(x)
        _, _, idx, weights = m.route(x.reshape(-1, 32))
    e = m.experts
    ref, bound = moe_experts_bound(x.reshape(-1, 32), e.w_gate, e.w_up, e.w_down, idx, weights)
    assert_within(fast.reshape(-1, 32), ref, bound, "plain matmuls")
    assert_within(grouped.reshape(-1, 32), ref, bound, "grouped dispatch")
    assert_within(fast, grouped, 2 * bound.reshape(fast.shape), "plain matmuls vs grouped dispatch")


def test_loop_fallback_equals_grouped_gemm(monkeypatch):
    m = make()
    x = torch.randn(2, 9, 32, requires_grad=True)
    y1 = m(x)
    g1 = torch.autograd.grad(y1.sum(), [x, m.experts.w_down])  # sum(): a stride-0 gradient reaches grouped_mm
    monkeypatch.setattr(moe_mod, "_GROUPED_MM", None)
    y2 = m(x)
    g2 = torch.autograd.grad(y2.sum(), [x, m.experts.w_down])
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_experts_with_no_tokens_are_fine():
    m = make(E=8, k=1)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[3] = 5.0  # everything routes to expert 3 (positive inputs)
    x = torch.rand(2, 5, 32) + 0.1
    aux = Aux()
    y = m(x, aux=aux)
    assert aux.moe_load[0].tolist() == [0, 0, 0, 10, 0, 0, 0, 0]
    torch.testing.assert_close(y, dense_reference(m, x), rtol=1e-5, atol=1e-6)


def test_experts_given_no_row_at_all_get_a_zero_gradient():
    """An expert-parallel rank can receive no row in a step; its experts still take part in the backward (every
    rank reduces the same gradients), each with an all-zero gradient."""
    e = make(E=2).experts
    x = torch.zeros(0, 32, requires_grad=True)
    y = e(x, torch.zeros(2, dtype=torch.long))
    y.sum().backward()
    assert y.shape == (0, 32) and x.grad.shape == (0, 32)
    for p in e.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any()


def test_aux_losses():
    m = make(E=4)
    with torch.no_grad():
        m.router.weight.zero_()  # uniform probabilities; top-k ties split the load evenly enough
    aux = Aux()
    m(torch.randn(64, 32), aux=aux)
    # Switch loss = E * sum_i f_i P_i with P_i = 1/E for uniform probs -> exactly 1 whatever the assignment.
    assert aux.moe_lb[0].item() == pytest.approx(1.0, abs=1e-6)
    # z-loss = mean(logsumexp(logits)^2) = log(E)^2 for zero logits.
    assert aux.moe_z[0].item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2, rel=1e-6)


def test_padding_rows_are_not_routed():
    m = make()
    x = torch.randn(2, 6, 32)
    valid = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    aux = Aux()
    y = m(x, valid, aux)
    assert int(aux.moe_load[0].sum()) == int(valid.sum()) * m.top_k
    assert torch.equal(y[0, 4:], torch.zeros(2, 32))
    torch.testing.assert_close(y[1], m(x[1:2])[0], rtol=1e-5, atol=1e-6)


def test_bias_balancing_moves_selection_not_weights():
    m = make(E=4, balancing=True)
    load = torch.tensor([100, 10, 10, 0])
    m.update_bias(load)
    assert m.expert_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])
    # The bias changes which experts are picked, but gate weights still come from the softmax alone.
    x = torch.randn(10, 32)
    with torch.no_grad():
        m.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
        _, probs, idx, w = m.route(x)
    assert (idx == 3).any(dim=1).all()
    torch.testing.assert_close(w, probs.gather(1, idx) / probs.gather(1, idx).sum(1, keepdim=True))
    assert "expert_bias" in m.state_dict()
    assert "expert_bias" not in make(balancing=False).state_dict()
