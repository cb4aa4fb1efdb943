"""The Triton kernels (model/triton_kernels.py) under Triton's interpreter on CPU tensors, against their PyTorch
definitions evaluated in float64: values and gradients within the float32 error bounds of tests/numerics.py, odd
sizes (partial tiles in every dimension, several chunks / blocks), strided inputs; and the dispatch: CUDA tensors
only, never a CPU tensor, the PyTorch definitions (with one warning) where Triton cannot be imported.

TRITON_INTERPRET=1 must be set before a kernel is defined (triton.jit reads it at decoration), so before
moe_arch.model.triton_kernels is first imported; it is set here at collection time, for this pytest process (no
other test compiles Triton code: the CPU paths never import it). The interpreter is slow (its scans run one
element at a time in Python), hence the small shapes and tiles.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from numerics import (  # noqa: E402
    assert_within,
    causal_conv_silu_bounds,
    rms_norm_bounds,
    rope_bounds,
    selective_scan_bounds,
    softmax_xent_bounds,
    swiglu_bounds,
)

from moe_arch.model import cpu_kernels, fused  # noqa: E402
from moe_arch.model import triton_kernels as tk  # noqa: E402
from moe_arch.model.mamba import reference_scan, selective_scan  # noqa: E402

if not tk.INTERPRET:  # imported earlier in this process without the interpreter: define the kernels again
    tk = importlib.reload(tk)

pytestmark = pytest.mark.triton


@pytest.fixture(autouse=True)
def triton_on_cpu(monkeypatch):
    """CPU tensors take the Triton dispatch, and the CPU kernels step aside so that dispatch is what runs."""
    monkeypatch.setattr(fused, "TRITON_ON_CPU", True)
    monkeypatch.setattr(fused, "_kernel_ok", lambda *t: False)
    monkeypatch.setattr(cpu_kernels, "supports", lambda *t, **k: False)


def _calls(monkeypatch, name):
    """Record calls of one triton_kernels entry point."""
    calls = []
    real = getattr(tk, name)
    monkeypatch.setattr(tk, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _check(fn, reference_fn, inputs, bounds_fn, seed=0):
    """fn on the float32 inputs against reference_fn on float64 copies: the output and the gradients of sum(out * g)
    for a random g, each within the bounds bounds_fn(*inputs, g) returns (output bound, [gradient bounds])."""
    ins64 = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    ref = reference_fn(*ins64)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = fn(*inputs)
    grads = torch.autograd.grad(y, [t for t in inputs if t.requires_grad], g.to(y.dtype))
    grads_ref = torch.autograd.grad(ref, [t for t in ins64 if t.requires_grad], g)
    y_bound, grad_bounds = bounds_fn(*[t.detach() for t in inputs], g)
    assert_within(y.detach(), ref.detach(), y_bound, "output")
    for k, (a, b, bound) in enumerate(zip(grads, grads_ref, grad_bounds, strict=True)):
        assert_within(a, b, bound, f"gradient {k}")


# ------------------------------------------------------------------------------------------------ selective scan
def _scan_inputs(B, L, D, N, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, L, D, generator=g)
    dt = torch.rand(B, L, D, generator=g) * 0.5 + 0.01
    A = -(torch.rand(D, N, generator=g) * 4 + 0.1)
    Bm, Cm = torch.randn(B, L, N, generator=g), torch.randn(B, L, N, generator=g)
    Dp, z = torch.randn(D, generator=g), torch.randn(B, L, D, generator=g)
    h0 = torch.randn(B, D, N, generator=g)
    return u, dt, A, Bm, Cm, Dp, z, h0


@pytest.mark.parametrize(
    "B, L, D, N, gated, with_h0, block_t, block_d",
    [
        (2, 37, 20, 5, True, False, 16, 8),  # 3 chunks (the last partial), 3 channel blocks (the last partial)
        (1, 1, 17, 16, True, True, 16, 16),  # one step from a given state (decoding)
        (2, 21, 6, 3, False, True, 8, 8),  # no skip term, no gate
    ],
)
def test_scan_matches_the_recurrence(B, L, D, N, gated, with_h0, block_t, block_d):
    u, dt, A, Bm, Cm, Dp, z, h0 = _scan_inputs(B, L, D, N, seed=L)
    f32 = [t.requires_grad_() for t in (u, dt, A, Bm, Cm)] + (
        [Dp.requires_grad_(), z.requires_grad_()] if gated else []
    )
    h0 = h0 if with_h0 else None
    ins = [t.detach().double().requires_grad_() for t in f32]
    y_ref, h_ref = reference_scan(*ins[:5], None if h0 is None else h0.double())
    if gated:
        y_ref = (y_ref + ins[0] * ins[5]) * F.silu(ins[6])
    y, h = tk.selective_scan(*f32[:5], *(f32[5:] if gated else [None, None]), h0, block_t=block_t, block_d=block_d)
    assert type(y.grad_fn).__name__ == "SelectiveScanBackward"
    gy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y_bound, h_bound, gb = selective_scan_bounds(
        *[t.detach() for t in f32[:5]], h0, Dp.detach() if gated else torch.zeros(D), z.detach() if gated else None, gy
    )
    assert_within(y.detach(), y_ref.detach(), y_bound, "y")
    assert_within(h, h_ref.detach(), h_bound, "h_last")
    names = ["u", "dt", "A", "B", "C", "D", "z"][: len(f32)]
    for name, a, b in zip(names, torch.autograd.grad(y, f32, gy.float()), torch.autograd.grad(y_ref, ins, gy)):
        assert_within(a, b, gb[name], name)


def test_scan_dispatch_from_the_mamba_entry_point(monkeypatch):
    """mamba.selective_scan sends float32 tensors of the Triton device to the kernel (strided views included: the
    Mamba layer's z and B, C are slices of projections), the chunked scan otherwise; under no_grad the forward
    kernel runs alone."""
    calls = _calls(monkeypatch, "selective_scan")
    u, dt, A, Bm, Cm, Dp, z, h0 = _scan_inputs(1, 5, 3, 2, seed=7)
    zz = torch.cat([z, z], -1)[..., :3]  # a strided view
    y, h = selective_scan(u, dt, A, Bm, Cm, h0, D=Dp, z=zz)
    assert calls == [1]
    ref, h_ref = reference_scan(*(t.double() for t in (u, dt, A, Bm, Cm, h0)))
    ref = (ref + u.double() * Dp.double()) * F.silu(zz.double())
    y_bound, h_bound, _ = selective_scan_bounds(u, dt, A, Bm, Cm, h0, Dp, zz, torch.zeros_like(u))
    assert_within(y, ref, y_bound, "y")
    assert_within(h, h_ref, h_bound, "h")
    selective_scan(*(t.double() for t in (u, dt, A, Bm, Cm)))  # float64: the chunked scan
    selective_scan(u, dt, A, Bm, Cm, impl="chunked")
    assert calls == [1]


# ------------------------------------------------------------------------------------------------ element-wise chains
@pytest.mark.parametrize("B, T, D, K", [(2, 5, 21, 3), (3, 2, 16, 4), (2, 9, 40, 1), (1, 70, 33, 4)])
def test_causal_conv_silu_matches_conv1d(B, T, D, K, monkeypatch):
    monkeypatch.setattr(tk, "CONV_BLOCK_D", 16)  # several channel blocks; T = 70 spans three time blocks of 32
    gen = torch.Generator().manual_seed(3)
    xz = torch.randn(B, T, 2 * D, generator=gen, requires_grad=True)  # x is a strided half, as in the Mamba layer
    w = torch.randn(K, D, generator=gen, requires_grad=True)
    bias = torch.randn(D, generator=gen, requires_grad=True)
    calls = _calls(monkeypatch, "causal_conv_silu")

    def conv_pre(x, w, bias):
        return F.conv1d(x.transpose(1, 2), w.t().unsqueeze(1), bias, padding=K - 1, groups=D)[..., :T].transpose(1, 2)

    def bounds(t, p, q, g):
        y_bound, (gx, gw, gb) = causal_conv_silu_bounds(t.chunk(2, dim=-1)[0], p, q, g, conv_pre)
        return y_bound, [torch.cat((gx, torch.zeros_like(gx)), dim=-1), gw, gb]

    _check(
        lambda t, p, q: fused.causal_conv_silu(t.chunk(2, dim=-1)[0], p, q),
        lambda t, p, q: F.silu(conv_pre(t.chunk(2, dim=-1)[0], p, q)),
        (xz, w, bias),
        bounds,
    )
    assert calls


@pytest.mark.parametrize("shape", [(3, 7, 37), (1, 1, 5), (21, 130)])
def test_rms_norm_matches_torch(shape, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen) * 3).requires_grad_()
    w = (torch.rand(shape[-1], generator=gen) + 0.5).requires_grad_()
    calls = _calls(monkeypatch, "rms_norm")
    _check(
        lambda a, b: fused.rms_norm(a, b, 1e-6),
        lambda a, b: F.rms_norm(a, (a.shape[-1],), eps=1e-6) * b,
        (x, w),
        rms_norm_bounds,
    )
    assert calls


@pytest.mark.parametrize("shape", [(3, 5, 7), (2050,)])
def test_swiglu_matches_torch(shape, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    a = (torch.randn(shape, generator=gen) * 4).requires_grad_()
    b = torch.randn(shape, generator=gen).requires_grad_()
    calls = _calls(monkeypatch, "swiglu")
    _check(fused.swiglu, lambda p, q: F.silu(p) * q, (a, b), swiglu_bounds)
    assert calls


def test_swiglu_in_bfloat16_rounds_once():
    """bf16 storage (MoE experts under autocast): computed in float32, rounded once to bf16. The interpreter's
    float32 -> bf16 conversion truncates, so the bound is one bf16 ulp (2^-7 relative) on top of the float32 one."""
    gen = torch.Generator().manual_seed(6)
    a = (torch.randn(4, 33, generator=gen) * 4).bfloat16().requires_grad_()
    b = torch.randn(4, 33, generator=gen).bfloat16().requires_grad_()

    def bounds(p, q, g):
        y_bound, (da, db) = swiglu_bounds(p, q, g)
        ref_y = (F.silu(p.double()) * q.double()).abs()
        s = torch.sigmoid(p.double())
        ref_da = (g * q.double() * s * (1 + p.double() * (1 - s))).abs()
        ref_db = (g * p.double() * s).abs()
        ulp = 2.0**-7
        # the gradient g enters as bf16 too (its rounding: another ulp of each gradient)
        return y_bound + ulp * ref_y, [da + 2 * ulp * ref_da, db + 2 * ulp * ref_db]

    _check(fused.swiglu, lambda p, q: F.silu(p) * q, (a, b), bounds)


@pytest.mark.parametrize("B, H, T, D, per_row", [(3, 2, 5, 6, True), (2, 3, 7, 34, False), (1, 17, 2, 8, False)])
def test_rope_matches_torch_on_qkv_views(B, H, T, D, per_row, monkeypatch):
    """q read in place out of a fused QKV projection (strided), cos/sin [T, D] or per row [B, T, D] (MoD gathers
    tokens with their own positions); the gradient lands back in the projection. H = 17: two head blocks."""
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(B, T, (H + 2) * D, generator=gen, requires_grad=True)
    cos = torch.randn((B, T, D) if per_row else (T, D), generator=gen)
    sin = torch.randn(cos.shape, generator=gen)
    calls = _calls(monkeypatch, "rope")

    def q_of(t):
        return t[..., : H * D].view(B, T, H, D).transpose(1, 2)

    def bounds(t, g):
        y_bound, dq_bound = rope_bounds(q_of(t), cos, sin, g)
        d_qkv = torch.zeros(t.shape, dtype=torch.float64)
        q_of(d_qkv).copy_(dq_bound)
        return y_bound, [d_qkv]

    _check(
        lambda t: fused.rope(q_of(t), cos, sin),
        lambda t: fused.rope_reference(q_of(t), cos.double(), sin.double()),
        (qkv,),
        bounds,
    )
    assert calls


# ------------------------------------------------------------------------------------------------ head cross-entropy
def test_linear_cross_entropy_matches_torch(monkeypatch):
    """Blocks of rows (several, the last partial) and rows read in several pieces (V = 33 over 16-wide pieces)."""
    from moe_arch.model.losses import linear_cross_entropy

    monkeypatch.setattr(tk, "XENT_BLOCK_V", 16)
    monkeypatch.setattr(tk, "XENT_BLOCK_ELEMENTS", 33 * 20)
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(70, 16, generator=gen, requires_grad=True)
    w = torch.randn(33, 16, generator=gen, requires_grad=True)
    y = torch.randint(0, 33, (70,), generator=gen)
    calls = _calls(monkeypatch, "linear_cross_entropy")
    loss = linear_cross_entropy(h, w, y)
    assert calls
    ref = F.cross_entropy(h.double() @ w.double().t(), y)
    loss_bound, dh_bound, dw_bound = softmax_xent_bounds(h.detach(), w.detach(), y)
    assert_within(loss.detach(), ref.detach(), loss_bound, "loss")
    dh, dw = torch.autograd.grad(loss, (h, w))
    dh_ref, dw_ref = torch.autograd.grad(ref, (h, w))
    assert_within(dh, dh_ref, dh_bound, "dh")
    assert_within(dw, dw_ref, dw_bound, "dW")
    with torch.no_grad():
        assert_within(linear_cross_entropy(h, w, y), ref.detach(), loss_bound, "loss under no_grad")


def test_linear_cross_entropy_under_autocast_runs_the_products_in_bf16():
    """Under bf16 autocast the logits come from a bf16 product, as F.linear's would: within the float32 bounds of
    the bf16-rounded inputs plus what rounding the logits, the softmax gradient and the products to bf16 adds (one
    bf16 ulp each, 2^-7: the interpreter truncates)."""
    from moe_arch.model.losses import linear_cross_entropy

    gen = torch.Generator().manual_seed(8)
    h = torch.randn(40, 24, generator=gen, requires_grad=True)
    w = (torch.randn(37, 24, generator=gen) * 0.5).requires_grad_()
    y = torch.randint(0, 37, (40,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, y)
    dh, dw = torch.autograd.grad(loss, (h, w))
    assert loss.dtype == torch.float32 and dh.dtype == h.dtype and dw.dtype == w.dtype
    hb, wb = h.detach().bfloat16().double().requires_grad_(), w.detach().bfloat16().double().requires_grad_()
    logits = hb @ wb.t()
    ref = F.cross_entropy(logits, y)
    dh_ref, dw_ref = torch.autograd.grad(ref, (hb, wb))
    ulp = 2.0**-7
    loss_bound, dh_bound, dw_bound = softmax_xent_bounds(hb.detach().float(), wb.detach().float(), y)
    e_logit = ulp * logits.detach().abs().amax(1)  # per row
    p = torch.softmax(logits.detach(), 1)
    g_abs = p + F.one_hot(y, 37).double()
    e_g = p * 2 * e_logit[:, None] + ulp * g_abs  # the softmax's response to the logits' error, then its rounding
    n = h.shape[0]
    assert_within(loss.detach(), ref.detach(), loss_bound + 2 * e_logit.mean(), "loss")
    assert_within(dh, dh_ref, dh_bound + (e_g @ wb.detach().abs() + ulp * g_abs @ wb.detach().abs()) / n, "dh")
    assert_within(dw, dw_ref, dw_bound + (e_g.t() @ hb.detach().abs() + ulp * g_abs.t() @ hb.detach().abs()) / n, "dW")


def test_cross_entropy_rows_propagate_nan_and_inf():
    """A non-finite logit anywhere in a row makes that row's loss non-finite (the trainer's NaN stop relies on it),
    also when it is not the target's logit."""
    logits = torch.randn(3, 40)
    logits[0, 5] = float("nan")
    logits[1, 7] = float("inf")
    loss = tk.xent_rows_(logits.clone(), torch.tensor([1, 2, 3]))
    assert torch.isnan(loss[0]) and not torch.isfinite(loss[1]) and torch.isfinite(loss[2])


# ------------------------------------------------------------------------------------------------ the whole model
def test_every_chain_of_a_model_dispatches_and_matches_the_reference(monkeypatch):
    """A small hybrid model (attention, Mamba, MoE, MoD, MTP heads) with every Triton chain on: each entry point
    runs, and the loss and every gradient are those of the PyTorch definitions (both float32, against float64)
    within the model's rounding bound (bench/gpu_check.py: model_bound)."""
    sys.path.insert(0, str(os.path.join(os.path.dirname(__file__), "..", "bench")))
    from conftest import small_overrides
    from gpu_check import model_bound

    from moe_arch.config import ModelConfig
    from moe_arch.model import transformer

    cfg = ModelConfig(
        **small_overrides(d_model=16, n_heads=2, n_kv_heads=1, d_ff=24, d_ff_expert=16, mamba_d_state=4, vocab_size=48)
    )
    tok = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(0))
    names = ("selective_scan", "causal_conv_silu", "rms_norm", "swiglu", "rope", "linear_cross_entropy")
    calls = {n: _calls(monkeypatch, n) for n in names}

    def run(dtype, triton_on):
        model = transformer.build_model(cfg, seed=0).to(dtype)
        with fused.triton_disabled(not triton_on):
            out = model(tok[:, :8], tok[:, 1:])
            out.loss.backward()
        return out.loss.detach().double(), {
            n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None
        }

    head = transformer.linear_cross_entropy  # float64 reference: the unfused head casts logits to float32
    monkeypatch.setattr(
        transformer,
        "linear_cross_entropy",
        lambda h, w, t: F.cross_entropy(F.linear(h.reshape(-1, h.shape[-1]), w), t.reshape(-1)),
    )
    loss64, grads64 = run(torch.float64, False)
    monkeypatch.setattr(transformer, "linear_cross_entropy", head)
    loss_ref, grads_ref = run(torch.float32, False)
    assert not any(calls.values())
    loss_t, grads_t = run(torch.float32, True)
    assert all(calls.values()), {n: len(c) for n, c in calls.items()}
    rel = model_bound(cfg, 8)
    for name, loss in (("triton", loss_t), ("reference", loss_ref)):
        assert abs(loss - loss64) <= rel * abs(loss64), (name, float(loss), float(loss64))
    assert grads64.keys() == grads_t.keys() == grads_ref.keys()
    for n, g in grads64.items():
        scale = rel * g.abs().max() + 1e-30
        assert (grads_t[n] - g).abs().max() <= 2 * scale, n  # the backward doubles the chain
        assert (grads_ref[n] - g).abs().max() <= 2 * scale, n


# ------------------------------------------------------------------------------------------------ dispatch rules
def test_cpu_tensors_never_reach_triton(monkeypatch):
    """Without the test switch, CPU tensors take the CPU kernels or the PyTorch definitions, whatever is installed:
    the CPU path is exactly as it was."""
    monkeypatch.setattr(fused, "TRITON_ON_CPU", False)
    monkeypatch.setattr(fused, "triton", lambda: pytest.fail("Triton looked up for CPU tensors"))
    x = torch.randn(2, 3, 8, requires_grad=True)
    fused.rms_norm(x, torch.ones(8), 1e-6)
    fused.swiglu(x, x)
    from moe_arch.model.losses import linear_cross_entropy

    linear_cross_entropy(x.reshape(6, 8), torch.randn(5, 8), torch.zeros(6, dtype=torch.long))
    selective_scan(
        torch.randn(1, 3, 2), torch.rand(1, 3, 2), -torch.rand(2, 2), torch.randn(1, 3, 2), torch.randn(1, 3, 2)
    )


def test_disabled_inside_compile_and_for_float64(monkeypatch):
    calls = _calls(monkeypatch, "swiglu")
    a = torch.randn(5, 3)
    with fused.triton_disabled():
        fused.swiglu(a, a)
    fused.swiglu(a.double(), a.double())
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    fused.swiglu(a, a)
    assert not calls


@pytest.mark.parametrize("env, warns", [({"PYTHONPATH_FAKE": "1"}, True), ({"MOE_ARCH_NO_TRITON": "1"}, False)])
def test_without_triton_the_pytorch_definitions_run_with_one_warning(tmp_path, env, warns):
    """An import of Triton that fails: one RuntimeWarning naming the reason, and the PyTorch definitions (the same
    numbers); MOE_ARCH_NO_TRITON=1 chooses them silently."""
    fake = tmp_path / "fake"
    (fake / "triton").mkdir(parents=True)
    (fake / "triton" / "__init__.py").write_text("raise ImportError('no triton here (test)')\n")
    code = (
        "import warnings, torch, torch.nn.functional as F\n"
        "warnings.simplefilter('always')\n"
        "from moe_arch.model import fused\n"
        "fused.TRITON_ON_CPU = True\n"
        "a = torch.randn(4, 5)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    y = fused.swiglu(a, a); fused.swiglu(a, a)\n"
        "assert torch.equal(y, F.silu(a) * a)\n"
        "print('WARNINGS', [str(m.message) for m in w if issubclass(m.category, RuntimeWarning)])\n"
    )
    paths = [str(fake)] if "PYTHONPATH_FAKE" in env else []
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full_env.update(
        {k: v for k, v in env.items() if k != "PYTHONPATH_FAKE"},
        MOE_ARCH_NO_KERNELS="1",
        PYTHONPATH=os.pathsep.join(paths + [os.path.dirname(os.path.dirname(__file__))]),
    )
    out = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("WARNINGS"))
    if warns:
        assert line.count("Triton kernels are unavailable") == 1 and "no triton here" in line, line
    else:
        assert line == "WARNINGS []", line
    warnings.simplefilter("default")
