"""The paths that only run on a GPU, against their references: each Triton kernel on CUDA tensors (through the
model's own dispatch) against its PyTorch definition in float64 on the CPU, within the float32 bounds of
tests/numerics.py, at sizes that span several tiles; a model on CUDA against the CPU in float64; grouped_mm, SDPA
with GQA, cached and speculative generation on the device. Skipped without CUDA (so in CI);
bench/gpu_check.py runs them first.

Run on its own (``pytest -m cuda tests/test_cuda.py``): tests/test_triton.py switches on Triton's interpreter for
its whole process, and compiled kernels cannot run under it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from numerics import (
    assert_within,
    causal_conv_silu_bounds,
    rms_norm_bounds,
    rope_bounds,
    selective_scan_bounds,
    softmax_xent_bounds,
    swiglu_bounds,
)

from moe_arch.model import fused

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        reason="Triton's interpreter is on in this process: run tests/test_cuda.py on its own",
    ),
]
DEV = torch.device("cuda")


def _tk():
    tk = fused.triton()
    assert tk is not None, f"the Triton kernels do not load on this GPU machine: {fused._triton['error']}"
    return tk


def _calls(monkeypatch, name):
    tk = _tk()
    calls = []
    real = getattr(tk, name)
    monkeypatch.setattr(tk, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _check(fn, ref_fn, inputs, bounds_fn, wants=None, seed=0, dtype=None):
    """fn on CUDA copies of the (CPU) inputs against ref_fn on float64 CPU copies: the output and the gradients of
    sum(out * g), within bounds_fn(*inputs, g) = (output bound, [gradient bounds])."""
    wants = list(range(len(inputs))) if wants is None else wants
    xs = [
        t.to(DEV, dtype if dtype and t.is_floating_point() else t.dtype).requires_grad_(i in wants)
        for i, t in enumerate(inputs)
    ]
    base = [x.detach().cpu() for x in xs]  # what the kernel sees (after a cast to dtype)
    x64 = [(t.double() if t.is_floating_point() else t).requires_grad_(i in wants) for i, t in enumerate(base)]
    ref = ref_fn(*x64)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = fn(*xs)
    grads = torch.autograd.grad(y, [xs[i] for i in wants], g.to(y.dtype).to(DEV))
    grads_ref = torch.autograd.grad(ref, [x64[i] for i in wants], g)
    y_bound, grad_bounds = bounds_fn(*base, g)
    assert_within(y.detach().cpu(), ref.detach(), y_bound, "output")
    for k, (a, b, bound) in enumerate(zip(grads, grads_ref, grad_bounds, strict=True)):
        assert_within(a.cpu(), b, bound, f"gradient {k}")


def test_the_triton_kernels_load():
    tk = _tk()
    assert not tk.INTERPRET


@pytest.mark.parametrize(
    "B, L, D, N, with_h0",
    [(2, 37, 20, 5, False), (1, 1, 17, 16, True), (2, 300, 70, 16, True), (1, 2100, 40, 16, False)],
)
def test_scan_matches_the_recurrence(B, L, D, N, with_h0, monkeypatch):
    """Default tiles: several 64-step chunks (the last partial) and channel blocks (the last partial)."""
    from moe_arch.model.mamba import reference_scan, selective_scan

    g = torch.Generator().manual_seed(L)
    u, z = torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)
    dt = torch.rand(B, L, D, generator=g) * 0.5 + 0.01
    A = -(torch.rand(D, N, generator=g) * 4 + 0.1)
    Bm, Cm, Dp = torch.randn(B, L, N, generator=g), torch.randn(B, L, N, generator=g), torch.randn(D, generator=g)
    h0 = torch.randn(B, D, N, generator=g) if with_h0 else None
    calls = _calls(monkeypatch, "selective_scan")
    h0d = h0.to(DEV) if h0 is not None else None
    h0r = h0.double() if h0 is not None else None

    def bounds(u, dt, A, Bm, Cm, Dp, z, gy):
        yb, _, gb = selective_scan_bounds(u, dt, A, Bm, Cm, h0, Dp, z, gy)
        return yb, [gb[k] for k in ("u", "dt", "A", "B", "C", "D", "z")]

    _check(
        lambda *a: selective_scan(*a[:5], h0d, D=a[5], z=a[6])[0],
        lambda u, dt, A, Bm, Cm, Dp, z: (reference_scan(u, dt, A, Bm, Cm, h0r)[0] + u * Dp) * F.silu(z),
        [u, dt, A, Bm, Cm, Dp, z],
        bounds,
    )
    assert calls
    _, h = selective_scan(*(t.to(DEV) for t in (u, dt, A, Bm, Cm)), h0d, D=Dp.to(DEV), z=z.to(DEV))
    _, h_ref = reference_scan(*(t.double() for t in (u, dt, A, Bm, Cm)), h0r)
    h_bound = selective_scan_bounds(u, dt, A, Bm, Cm, h0, Dp, z, torch.zeros(B, L, D, dtype=torch.float64))[1]
    assert_within(h.cpu(), h_ref, h_bound, "h_last")


@pytest.mark.parametrize("B, T, D, K", [(2, 5, 21, 3), (2, 130, 300, 4), (1, 33, 16, 1)])
def test_causal_conv_silu(B, T, D, K, monkeypatch):
    g = torch.Generator().manual_seed(3)
    xz, w, bias = torch.randn(B, T, 2 * D, generator=g), torch.randn(K, D, generator=g), torch.randn(D, generator=g)
    calls = _calls(monkeypatch, "causal_conv_silu")

    def conv_pre(x, w, bias):
        return F.conv1d(x.transpose(1, 2), w.t().unsqueeze(1), bias, padding=K - 1, groups=D)[..., :T].transpose(1, 2)

    def bounds(t, p, q, gy):
        y_bound, (gx, gw, gb) = causal_conv_silu_bounds(t.chunk(2, dim=-1)[0], p, q, gy, conv_pre)
        return y_bound, [torch.cat((gx, torch.zeros_like(gx)), dim=-1), gw, gb]

    _check(
        lambda t, p, q: fused.causal_conv_silu(t.chunk(2, dim=-1)[0], p, q),
        lambda t, p, q: F.silu(conv_pre(t.chunk(2, dim=-1)[0], p, q)),
        [xz, w, bias],
        bounds,
    )
    assert calls


@pytest.mark.parametrize("shape", [(3, 7, 37), (2048, 1792), (1, 5)])
def test_rms_norm(shape, monkeypatch):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(shape, generator=g) * 3, torch.rand(shape[-1], generator=g) + 0.5
    calls = _calls(monkeypatch, "rms_norm")
    _check(
        lambda a, b: fused.rms_norm(a, b, 1e-6),
        lambda a, b: F.rms_norm(a, (a.shape[-1],), eps=1e-6) * b,
        [x, w],
        rms_norm_bounds,
    )
    assert calls


@pytest.mark.parametrize(
    "shape, dtype", [((3, 5, 7), torch.float32), ((2048, 4608), torch.float32), ((300, 129), torch.bfloat16)]
)
def test_swiglu(shape, dtype, monkeypatch):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(shape, generator=g) * 4, torch.randn(shape, generator=g)
    calls = _calls(monkeypatch, "swiglu")

    def bounds(p, q, gy):
        yb, (da, db) = swiglu_bounds(p, q, gy)
        if dtype == torch.float32:
            return yb, [da, db]
        ulp = 2.0**-7  # one rounding to bf16 (of the result, and of the incoming gradient): one ulp, any mode
        p, q = p.double(), q.double()
        s = torch.sigmoid(p)
        return (
            yb + ulp * (p * s * q).abs(),
            [da + 2 * ulp * (gy * q * s * (1 + p * (1 - s))).abs(), db + 2 * ulp * (gy * p * s).abs()],
        )

    _check(fused.swiglu, lambda p, q: F.silu(p) * q, [a, b], bounds, dtype=dtype)
    assert calls


@pytest.mark.parametrize("B, H, T, D, per_row", [(3, 2, 5, 6, True), (2, 16, 64, 112, False)])
def test_rope_on_qkv_views(B, H, T, D, per_row, monkeypatch):
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(B, T, (H + 2) * D, generator=g)
    cos = torch.randn((B, T, D) if per_row else (T, D), generator=g)
    sin = torch.randn(cos.shape, generator=g)
    calls = _calls(monkeypatch, "rope")

    def q_of(t):
        return t[..., : H * D].view(B, T, H, D).transpose(1, 2)

    def bounds(t, c, s, gy):
        y_bound, dq_bound = rope_bounds(q_of(t), c, s, gy)
        d_qkv = torch.zeros(t.shape, dtype=torch.float64)
        q_of(d_qkv).copy_(dq_bound)
        return y_bound, [d_qkv]

    _check(
        lambda t, c, s: fused.rope(q_of(t), c, s),
        lambda t, c, s: fused.rope_reference(q_of(t), c, s),
        [qkv, cos, sin],
        bounds,
        wants=[0],
    )
    assert calls


def test_linear_cross_entropy_fp32_and_nan_rows(monkeypatch):
    """V = 5000 > one 4096-wide piece of a row; a NaN logit makes the loss NaN."""
    from moe_arch.model.losses import linear_cross_entropy

    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(300, 64, generator=g), torch.randn(5000, 64, generator=g) * 0.3
    y = torch.randint(0, 5000, (300,), generator=g)
    calls = _calls(monkeypatch, "linear_cross_entropy")

    def bounds(h, w, y, _g):
        lb, dhb, dwb = softmax_xent_bounds(h, w, y)
        return lb, [dhb, dwb]

    _check(linear_cross_entropy, lambda h, w, y: F.cross_entropy(h @ w.t(), y), [h, w, y], bounds, wants=[0, 1])
    assert calls
    w_nan = w.clone()
    w_nan[7, 0] = float("nan")
    assert torch.isnan(linear_cross_entropy(h.to(DEV), w_nan.to(DEV), y.to(DEV)))


def test_linear_cross_entropy_under_autocast_close_to_the_unfused_head():
    """bf16 autocast: the fused head against F.cross_entropy(F.linear(h, W).float()) under the same autocast
    (both round the logits to bf16): losses within a few bf16 ulps of the logits, gradients close."""
    from moe_arch.model.losses import linear_cross_entropy

    g = torch.Generator().manual_seed(6)
    h = torch.randn(512, 256, generator=g).to(DEV).requires_grad_()
    w = (torch.randn(4000, 256, generator=g) * 0.05).to(DEV).requires_grad_()
    y = torch.randint(0, 4000, (512,), generator=g).to(DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, y)
        with fused.triton_disabled():
            ref = linear_cross_entropy(h, w, y)
    dh, dw = torch.autograd.grad(loss, (h, w))
    dh_ref, dw_ref = torch.autograd.grad(ref, (h, w))
    logits = (h.detach() @ w.detach().t()).abs()
    assert abs(float(loss) - float(ref)) <= 4 * 2.0**-8 * float(logits.amax(1).mean())
    for a, b in ((dh, dh_ref), (dw, dw_ref)):
        assert float((a - b).abs().max()) <= 4 * 2.0**-8 * float(b.abs().max()) + 1e-7


def test_model_on_cuda_matches_the_cpu_in_float64(monkeypatch):
    """A hybrid model with every feature, float32 on the GPU (Triton paths, cuBLAS, SDPA, grouped_mm where it
    runs in float32, else the loop) against the CPU in float64, within bench/gpu_check.py's model_bound."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from conftest import small_overrides
    from gpu_check import model_bound

    from moe_arch.config import ModelConfig
    from moe_arch.model import transformer

    cfg = ModelConfig(**small_overrides())
    tok = torch.randint(0, 512, (4, 34), generator=torch.Generator().manual_seed(0))
    state = transformer.build_model(cfg, seed=0).state_dict()
    names = ("selective_scan", "causal_conv_silu", "rms_norm", "swiglu", "rope", "linear_cross_entropy")
    calls = {n: _calls(monkeypatch, n) for n in names}

    def run(device, dtype):
        model, _, _ = transformer.materialize(cfg, {k: v.to(dtype) for k, v in state.items()}, device=device)
        out = model.train()(tok[:, :32].to(device), tok[:, 1:].to(device))
        out.loss.backward()
        return out.loss.detach().double().cpu(), {n: p.grad.double().cpu() for n, p in model.named_parameters()}

    head = transformer.linear_cross_entropy  # float64 reference: the unfused head casts logits to float32
    monkeypatch.setattr(
        transformer,
        "linear_cross_entropy",
        lambda h, w, t: F.cross_entropy(F.linear(h.reshape(-1, h.shape[-1]), w), t.reshape(-1)),
    )
    loss64, g64 = run("cpu", torch.float64)
    monkeypatch.setattr(transformer, "linear_cross_entropy", head)
    loss, grads = run(DEV, torch.float32)
    assert all(calls.values()), {n: len(c) for n, c in calls.items()}
    rel = model_bound(cfg, 32)
    assert abs(loss - loss64) <= rel * abs(loss64), (float(loss), float(loss64))
    for n, g in g64.items():
        assert (grads[n] - g).abs().max() <= 2 * rel * g.abs().max() + 1e-30, n


def test_grouped_mm_bf16_runs_on_cuda_without_the_loop():
    import warnings

    from moe_arch.model.moe import grouped_matmul

    g = torch.Generator().manual_seed(7)
    counts = torch.tensor([5, 0, 17, 9])
    x = torch.randn(31, 64, generator=g).to(DEV, torch.bfloat16)
    w = torch.randn(4, 64, 48, generator=g).to(DEV, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback warns
        out = grouped_matmul(x, w, counts.to(DEV), counts.cumsum(0).to(torch.int32).to(DEV))
    ref = torch.cat([x[a:b].double() @ w[e].double() for e, (a, b) in enumerate(zip([0, 5, 5, 22], [5, 5, 22, 31]))])
    bound = (2.0**-8 + 64 * 2.0**-24) * (x.double().abs() @ w.double().abs().amax(0))
    assert ((out.double() - ref).abs() <= bound).all()


def test_sdpa_gqa_bf16_matches_float64():
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 8, 256, 112, generator=g).to(DEV, torch.bfloat16)
    k, v = (torch.randn(2, 2, 256, 112, generator=g).to(DEV, torch.bfloat16) for _ in range(2))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True)
    assert float((out.double() - ref).abs().max()) <= 2 * 2.0**-8 * float(v.double().abs().max())


def test_speculative_generation_on_cuda_gives_the_plain_greedy_tokens():
    """Caches, rollbacks and MoD scores on the device: float64 (the reference paths), so greedy decoding is exact."""
    from conftest import small_overrides

    from moe_arch.config import ModelConfig
    from moe_arch.model.generation import generate
    from moe_arch.model.transformer import build_model

    model = build_model(ModelConfig(**small_overrides(n_predict=3)), seed=0).double().to(DEV).eval()
    prompt = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(1)).to(DEV)
    with torch.no_grad():
        plain = generate(model, prompt, 24, temperature=0)
        spec = generate(model, prompt, 24, temperature=0, draft_tokens=2)
    from test_generation import assert_clear_greedy

    for b in range(prompt.shape[0]):  # every compared token decided by a margin far above float64 rounding
        assert_clear_greedy(model, prompt[b], plain.tokens[b])
    assert torch.equal(plain.tokens, spec.tokens)


def test_mamba_layer_bf16_autocast_triton_vs_chunked_scan():
    """The training configuration: bf16 autocast, the Triton conv and scan against the chunked PyTorch scan, same
    weights and input: outputs and input gradients within bf16 rounding of the projections."""
    from moe_arch.config import ModelConfig
    from moe_arch.model.attention import SeqContext
    from moe_arch.model.layers import Rotary
    from moe_arch.model.mamba import Mamba

    cfg = ModelConfig(d_model=256, n_layers=1, n_heads=4, n_kv_heads=2, mamba_layers=[0], max_seq_len=1024)
    layer = Mamba(cfg, 0).to(DEV)
    layer.init_weights(0.02, 0.02, torch.Generator(device=DEV).manual_seed(0))
    x = torch.randn(2, 700, 256, device=DEV, requires_grad=True)
    ctx = SeqContext(torch.arange(700, device=DEV)[None].expand(2, -1), Rotary(cfg.resolved_head_dim, 1e4))
    outs = []
    for off in (False, True):
        with fused.triton_disabled(off), torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x, ctx)
        (gx,) = torch.autograd.grad(y.float().square().sum(), x)
        outs.append((y.float(), gx))
    (y, gx), (y_ref, gx_ref) = outs
    assert float((y - y_ref).abs().max()) <= 4 * 2.0**-8 * float(y_ref.abs().max())
    assert float((gx - gx_ref).abs().max()) <= 4 * 2.0**-8 * float(gx_ref.abs().max())
