import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, small_overrides

from moe_arch.config import ModelConfig, load_config
from moe_arch.model.mod import causal_capacity_select
from moe_arch.model.params import count_parameters
from moe_arch.model.transformer import HybridLM, build_model, materialize


@pytest.fixture
def model():
    return build_model(ModelConfig(**small_overrides()), seed=0).eval()


def test_every_feature_is_on(model):
    kinds = [(b.seq_kind, b.ffn_kind, b.mod_router is not None) for b in model.layers]
    assert ("mamba", "dense", False) in kinds and ("attention", "moe", True) in kinds
    assert len(model.mtp_heads) == 1


@pytest.mark.parametrize("t", [0, 7, 20, 39])
def test_causality_with_mod_moe_mamba(model, t):
    """Changing token t leaves every earlier output unchanged. In float64: a GEMM's rounding may depend on how
    many rows it multiplies (MKL's AVX2 kernels block by the row count), and changing token t changes how many
    tokens each expert and MoD block gets, so float32 outputs are bitwise equal only on some CPUs. In float64
    that rounding is ~1e-16 relative, far below any real leak (the change moves later outputs by > 1e-3)."""
    model = model.double()
    torch.manual_seed(0)
    tok = torch.randint(0, 512, (3, 40))
    with torch.no_grad():
        base = model(tok, return_logits=True).logits
        changed = tok.clone()
        changed[:, t] = (changed[:, t] + 17) % 512
        out = model(changed, return_logits=True).logits
    assert base.dtype == torch.float64
    scale = base.abs().max().item()
    leak = (out[:, :t] - base[:, :t]).abs().max().item() if t else 0.0
    assert leak <= 1e-12 * scale, f"outputs before the changed token moved by {leak:.3g}"
    assert (out[:, t:] - base[:, t:]).abs().max().item() > 1e-3 * scale, "the change had no effect at all"


def test_mod_selection_is_causal_and_near_capacity():
    torch.manual_seed(0)
    s = torch.randn(4, 512)
    sel = causal_capacity_select(s, 0.75)
    for t in (1, 100, 300):
        s2 = s.clone()
        s2[:, t:] = torch.randn(4, 512 - t)
        assert torch.equal(causal_capacity_select(s2, 0.75)[:, :t], sel[:, :t])
    assert 0.74 <= sel.float().mean() <= 0.78
    # Decoding one position at a time with the past scores gives the same choices.
    steps = [causal_capacity_select(s[:, t : t + 1], 0.75, s[:, :t]) for t in range(64)]
    assert torch.equal(torch.cat(steps, 1), sel[:, :64])


def test_cached_generation_equals_full_forward(model):
    torch.manual_seed(1)
    tok = torch.randint(0, 512, (2, 48))
    with torch.no_grad():
        full = model(tok, return_logits=True).logits
        caches = model.new_caches(2, 64)
        parts = [model.lm_head(model.hidden_states(tok[:, :11], caches=caches))]
        for p in range(11, 48):
            parts.append(model.lm_head(model.hidden_states(tok[:, p : p + 1], caches=caches, start=p)))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


def test_greedy_generate_agrees_with_forward(model):
    """Greedy decoding with caches picks the full forward's best token at every position. The cached path is
    another float32 computation (one-row GEMMs, the MoE decoding path), within 1e-4 of the full forward's logits
    (test_cached_generation_equals_full_forward): where the two best logits are closer than twice that, either is
    a correct pick; everywhere else the pick must be the argmax."""
    prompt = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, 20, temperature=0)
    with torch.no_grad():
        logits = model(out[:, :-1], return_logits=True).logits[:, 5:]
    picked = out[:, 6:]
    top2 = logits.topk(2, dim=-1).values
    tol = 2 * (1e-4 + 1e-4 * top2[..., 0].abs())
    clear = top2[..., 0] - top2[..., 1] > tol
    assert clear.float().mean() > 0.5  # the check below is not vacuous
    assert torch.equal(logits.argmax(-1)[clear], picked[clear])
    assert bool((logits.gather(-1, picked[..., None]).squeeze(-1) >= top2[..., 0] - tol).all())


def test_train_and_eval_compute_the_same_function(model):
    # MoD selection is causal top-k in both modes (no predictor): the train/eval gap is exactly zero.
    tok = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ev = model.eval()(tok, return_logits=True).logits
        tr = model.train()(tok, return_logits=True).logits
    assert torch.equal(ev, tr)


def test_one_backward_reaches_every_parameter():
    cfg = ModelConfig(**small_overrides())
    model = build_model(cfg, seed=0).train()
    tok = torch.randint(0, 512, (4, 32 + cfg.n_predict), generator=torch.Generator().manual_seed(5))
    out = model(tok[:, :32], tok[:, 1:])
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.any())]
    assert missing == []
    assert {"moe_load_balance", "moe_z_loss", "mod_router"} <= set(out.aux_losses)
    assert len(out.mtp_losses) == 1


def test_loss_parts_are_reported_separately():
    cfg = ModelConfig(**small_overrides(n_predict=3))
    model = build_model(cfg, seed=0)
    tok = torch.randint(0, 512, (2, 20 + 3), generator=torch.Generator().manual_seed(6))
    out = model(tok[:, :20], tok[:, 1:])
    expected = (
        out.lm_loss
        + cfg.mtp_loss_weight * torch.stack(out.mtp_losses).mean()
        + sum(
            c * out.aux_losses[k]
            for k, c in (
                ("moe_load_balance", cfg.router_aux_loss_coef),
                ("moe_z_loss", cfg.router_z_loss_coef),
                ("mod_router", cfg.mod_aux_loss_coef),
            )
        )
    )
    torch.testing.assert_close(out.loss, expected)
    assert len(out.mtp_losses) == 2
    logits = model(tok[:, :20], return_logits=True).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), tok[:, 1:21].reshape(-1))
    torch.testing.assert_close(out.lm_loss, ce)


def test_same_seed_same_weights_and_depth_scaled_outputs():
    cfg = ModelConfig(**small_overrides())
    a, b, c = build_model(cfg, seed=7), build_model(cfg, seed=7), build_model(cfg, seed=8)
    torch.manual_seed(123)  # the global RNG must not matter
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.embed.weight, c.embed.weight)
    q_std = a.layers[0].seq_layer.q_proj.weight.std().item()
    o_std = a.layers[0].seq_layer.o_proj.weight.std().item()
    assert o_std == pytest.approx(q_std / (2 * cfg.n_layers) ** 0.5, rel=0.15)


def test_tied_embeddings_share_one_tensor():
    model = build_model(ModelConfig(**small_overrides(tie_embeddings=True)), seed=0)
    assert model.lm_head.weight is model.embed.weight
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_materialize_roundtrip(model):
    twin, missing, unexpected = materialize(model.cfg, model.state_dict())
    assert not missing and not unexpected
    tok = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(twin.eval()(tok, return_logits=True).logits, model(tok, return_logits=True).logits)


def test_seed_3b_counts_match_the_seed_report():
    cfg = load_config("seed-3b").model
    with torch.device("meta"):
        model = HybridLM(cfg)
    c = count_parameters(model)
    assert c["n_norms"] == 49
    assert abs(c["total"] / 3.09e9 - 1) < 0.01
    assert abs(c["active"] / 1.31e9 - 1) < 0.01


def test_info_cli_json():
    out = subprocess.run(
        [sys.executable, "-m", "moe_arch", "info", "seed-3b", "--json", "--optimizer"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    info = json.loads(out.stdout)
    assert info["n_norms"] == 49 and info["total"] > 3e9
    opt = {p["name"]: p for p in info["optimizer"]}
    assert opt["layers.0.seq_norm.weight"]["optimizer"] == "adamw"
    assert opt["layers.0.seq_norm.weight"]["weight_decay"] == 0
    assert opt["layers.2.ffn.experts.w_gate"]["optimizer"] == "expert_muon"
    assert opt["layers.0.seq_layer.q_proj.weight"]["optimizer"] == "muon"
    assert opt["layers.2.ffn.router.weight"]["optimizer"] == "adamw"


def test_info_cli_bad_config_is_one_line_exit_2():
    out = subprocess.run(
        [sys.executable, "-m", "moe_arch", "info", "tiny", "--model.top_k", "9"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "model.top_k=9" in out.stderr


def _fused_head_against_float64(N, V, chunk, scale, int32_targets):
    """Loss and both gradients of the fused head against the float64 unfused loss, within the float32 error bound
    of the reductions involved (tests/numerics.py): the kernel's SIMD sums and the GEMMs' blocking differ between
    CPUs, so no fixed tolerance holds on all of them."""
    from numerics import assert_within, softmax_xent_bounds

    from moe_arch.model.losses import linear_cross_entropy

    g = torch.Generator().manual_seed(N)
    h = (torch.randn(N, 16, generator=g) * scale).requires_grad_()
    w = torch.randn(V, 16, generator=g, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g, dtype=torch.int32 if int32_targets else torch.int64)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h64 @ w64.t(), y.long())
    got = linear_cross_entropy(h, w, y, chunk)
    loss_bound, dh_bound, dw_bound = softmax_xent_bounds(h.detach(), w.detach(), y)
    assert_within(got.detach(), ref.detach(), loss_bound, "loss")
    gr = torch.autograd.grad(ref, (h64, w64))
    gg = torch.autograd.grad(got, (h, w))
    assert_within(gg[0], gr[0], dh_bound, "dh")
    assert_within(gg[1], gr[1], dw_bound, "dW")


@pytest.mark.parametrize("N, V, chunk, scale", [(7, 50, 3, 1.0), (300, 64, 256, 1.0), (64, 1000, 64, 30.0)])
def test_fused_linear_cross_entropy_kernel_path(N, V, chunk, scale, kernel_isa, monkeypatch):
    """The compiled row kernel on each SIMD path, in blocks of 7 rows: several blocks, a partial last one, the dW
    accumulation across blocks; vocabularies that are and are not multiples of the kernel's 16 lanes, and logits
    spread wide enough (scale 30) that most softmax terms underflow."""
    from moe_arch.model import losses

    monkeypatch.setattr(losses, "KERNEL_BLOCK_ELEMENTS", 7 * V)
    _fused_head_against_float64(N, V, chunk, scale, int32_targets=True)


@pytest.mark.parametrize("N, V, chunk, scale", [(7, 50, 3, 1.0), (300, 64, 256, 1.0), (64, 1000, 64, 30.0)])
def test_fused_linear_cross_entropy_torch_ops_path(N, V, chunk, scale, monkeypatch):
    """The chunked PyTorch-ops softmax (no compiler, or not on a CPU)."""
    from moe_arch.model import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    _fused_head_against_float64(N, V, chunk, scale, int32_targets=False)


def test_fused_linear_cross_entropy_rejects_out_of_range_targets():
    from moe_arch.model.losses import linear_cross_entropy

    h, w = torch.randn(4, 8), torch.randn(10, 8)
    for bad in (10, -1):
        y = torch.tensor([1, 2, bad, 3])
        with pytest.raises((IndexError, RuntimeError), match=str(bad) if bad > 0 else "out of"):
            linear_cross_entropy(h, w, y)
