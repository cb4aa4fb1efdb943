"""The fused CPU kernels (kernels/fused_cpu.c, kernels/cross_entropy_cpu.c through model/fused.py and losses.py)
against their PyTorch definitions evaluated in float64: values and gradients within the float32 error bound of
each computation (tests/numerics.py), odd sizes (vector tails), strided inputs, one and two threads, both threading
paths (PyTorch's OpenMP threads and the fallback thread pool), and every SIMD path this CPU runs (kernel_isa)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_within, causal_conv_silu_bounds, rms_norm_bounds, rope_bounds, swiglu_bounds

from moe_arch.model import cpu_kernels, fused

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: the CPU kernels cannot be built")


@pytest.fixture(params=["openmp", "pool"])
def threading_path(request, monkeypatch):
    if request.param == "pool":
        monkeypatch.setattr(cpu_kernels, "_omp", lambda lib: False)
    elif not cpu_kernels._omp(cpu_kernels.load()):
        pytest.skip("the library was built without OpenMP here")
    return request.param


@pytest.fixture(params=[1, 2])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def _check(kernel_fn, reference_fn, inputs, bounds_fn, seed=0):
    """kernel_fn on the float32 inputs against reference_fn on float64 copies: the output and the gradients of
    sum(out * g) for a random g, each within the bounds bounds_fn(*inputs, g) returns (output, [gradients])."""
    wants = [t for t in inputs if t.requires_grad]
    ins64 = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    ref = reference_fn(*ins64)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = kernel_fn(*inputs)
    grads = torch.autograd.grad(y, wants, g.float())
    grads_ref = torch.autograd.grad(ref, [t for t in ins64 if t.requires_grad], g)
    y_bound, grad_bounds = bounds_fn(*[t.detach() for t in inputs], g)
    assert_within(y.detach(), ref.detach(), y_bound, "output")
    for k, (a, b, bound) in enumerate(zip(grads, grads_ref, grad_bounds, strict=True)):
        assert_within(a, b, bound, f"gradient {k}")


def _uses_kernel(monkeypatch, name):
    """Make the named kernel entry point record that it ran."""
    calls = []
    real = getattr(cpu_kernels, name)
    monkeypatch.setattr(cpu_kernels, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("shape", [(16, 128, 128), (3, 7, 37), (1, 1, 5)])
def test_rms_norm_kernel_matches_torch(shape, threads, threading_path, kernel_isa, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen) * 3).requires_grad_()
    w = (torch.rand(shape[-1], generator=gen) + 0.5).requires_grad_()
    calls = _uses_kernel(monkeypatch, "rmsnorm_backward")
    _check(
        lambda a, b: fused.rms_norm(a, b, 1e-6),
        lambda a, b: torch.nn.functional.rms_norm(a, (a.shape[-1],), eps=1e-6) * b,
        (x, w),
        rms_norm_bounds,
    )
    assert calls, "the kernel path did not run"


@pytest.mark.parametrize("shape", [(16, 128, 384), (3, 5, 7), (1000,)])
def test_swiglu_kernel_matches_torch(shape, threads, threading_path, kernel_isa, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    a = (torch.randn(shape, generator=gen) * 4).requires_grad_()
    b = torch.randn(shape, generator=gen).requires_grad_()
    calls = _uses_kernel(monkeypatch, "swiglu_backward")
    _check(fused.swiglu, lambda p, q: F.silu(p) * q, (a, b), swiglu_bounds)
    assert calls


@pytest.mark.parametrize("B, T, D, K", [(16, 128, 256, 4), (2, 5, 21, 3), (3, 2, 16, 4), (2, 9, 40, 1)])
def test_causal_conv_silu_kernel_matches_torch_and_conv1d(B, T, D, K, threads, threading_path, kernel_isa, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    xz = torch.randn(B, T, 2 * D, generator=gen, requires_grad=True)  # x is a strided half, as in the Mamba layer
    w = torch.randn(K, D, generator=gen, requires_grad=True)
    bias = torch.randn(D, generator=gen, requires_grad=True)
    calls = _uses_kernel(monkeypatch, "conv_silu_backward")

    def conv_pre(x, w, bias):  # the depthwise causal conv1d the kernel replaces, before the silu
        return F.conv1d(x.transpose(1, 2), w.t().unsqueeze(1), bias, padding=K - 1, groups=D)[..., :T].transpose(1, 2)

    def bounds(t, p, q, g):
        y_bound, (gx, gw, gb) = causal_conv_silu_bounds(t.chunk(2, dim=-1)[0], p, q, g, conv_pre)
        return y_bound, [torch.cat((gx, torch.zeros_like(gx)), dim=-1), gw, gb]  # z's half gets no gradient

    _check(
        lambda t, p, q: fused.causal_conv_silu(t.chunk(2, dim=-1)[0], p, q),
        lambda t, p, q: F.silu(conv_pre(t.chunk(2, dim=-1)[0], p, q)),
        (xz, w, bias),
        bounds,
    )
    assert calls


def test_kernels_step_aside_for_other_dtypes_and_inside_compile(monkeypatch):
    """float64 tensors, and anything traced by torch.compile (which fuses these chains itself), take the PyTorch
    definitions: the kernels must not be called."""
    for name in ("rmsnorm_forward", "swiglu_forward", "conv_silu_forward"):
        monkeypatch.setattr(cpu_kernels, name, lambda *a, **k: pytest.fail("kernel called"))
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    w = torch.rand(8, dtype=torch.float64)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-6), F.rms_norm(x.float(), (8,), eps=1e-6) * w.float())
    torch.testing.assert_close(fused.swiglu(x, x), F.silu(x) * x)
    fused.causal_conv_silu(x, torch.rand(4, 8, dtype=torch.float64), w)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    fused.rms_norm(x.float(), w.float(), 1e-6)
    fused.swiglu(x.float(), x.float())


def test_inference_calls_the_forward_kernels_directly(monkeypatch):
    """Under no_grad (evaluation, generation) the chains call the forward kernels without an autograd.Function:
    the same kernels, so the same bits as with gradients."""
    if not cpu_kernels.available():
        pytest.skip(f"the CPU kernels cannot be built here: {cpu_kernels._error}")
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 5, 16, generator=gen), torch.rand(16, generator=gen) + 0.5
    q = torch.randn(2, 4, 5, 16, generator=gen)
    cos, sin = torch.randn(5, 16, generator=gen), torch.randn(5, 16, generator=gen)
    calls = (
        ("rms_norm", lambda t: fused.rms_norm(t, w, 1e-6), x),
        ("swiglu", lambda t: fused.swiglu(t, t * 2), x),
        ("rope", lambda t: fused.rope(t, cos, sin), q),
    )
    with_grad = {name: f(t.clone().requires_grad_()).detach() for name, f, t in calls}
    for cls in (fused._RMSNorm, fused._SwiGLU, fused._Rope):
        monkeypatch.setattr(cls, "apply", lambda *a: pytest.fail("autograd.Function used under no_grad"))
    with torch.no_grad():
        for name, f, t in calls:
            assert torch.equal(f(t), with_grad[name]), name


def test_library_shares_pytorchs_openmp_runtime():
    """When PyTorch runs on GNU OpenMP, the kernels bind to the same runtime (one mapped), so their parallel
    regions run on PyTorch's threads instead of competing with them."""
    if not cpu_kernels._openmp_runtimes() or "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("PyTorch is not using an OpenMP runtime here")
    lib = cpu_kernels.load()
    runtimes = cpu_kernels._openmp_runtimes()
    assert len(runtimes) == 1, runtimes
    if "libgomp" in next(iter(runtimes)):
        assert lib.moe_arch_openmp() == 1


@pytest.mark.parametrize("B, H, T, D, per_row", [(16, 4, 128, 32, False), (3, 2, 5, 6, True), (2, 3, 7, 34, False)])
def test_rope_kernel_matches_torch_on_qkv_views(B, H, T, D, per_row, threads, threading_path, kernel_isa, monkeypatch):
    """q read in place out of a fused QKV projection (strided view), cos/sin shared [T, D] or per row [B, T, D]
    (Mixture-of-Depths gathers tokens with their own positions); the gradient lands back in the projection."""
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(B, T, (H + 2) * D, generator=gen, requires_grad=True)
    cos = torch.randn((B, T, D) if per_row else (T, D), generator=gen)
    sin = torch.randn(cos.shape, generator=gen)
    calls = _uses_kernel(monkeypatch, "rope")

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
    assert len(calls) == 2  # forward and backward


def test_cross_entropy_kernel_propagates_nan_and_inf_logits():
    """A non-finite logit anywhere in a row must make that row's loss non-finite (the trainer's NaN stop relies on
    it), also when it is not the target's logit; other rows stay exact."""
    from moe_arch.model.losses import linear_cross_entropy

    h = torch.randn(3, 8)
    w = torch.randn(40, 8)
    w[5, 0] = float("nan")  # every row's logit for token 5 is NaN; no row targets token 5
    y = torch.tensor([1, 2, 3])
    assert torch.isnan(linear_cross_entropy(h, w, y))
    w[5, 0] = float("inf")
    h[:, 0] = 1.0
    assert not torch.isfinite(linear_cross_entropy(h, w, y))
    w[5, 0] = 0.0
    torch.testing.assert_close(linear_cross_entropy(h, w, y), F.cross_entropy(h @ w.t(), y))


EXP_PROBE = r"""
#include <math.h>
#include <stdio.h>
#include "simd.h"
int main(void) {
    double worst = 0.0;
    for (int i = 0; i < 200000; i++) {
        vf x;
        for (int k = 0; k < W; k++) x[k] = -87.0f + 175.0f * (float)(i * W + k) / (200000.0f * W);
        vf e = vexp(x);
        for (int k = 0; k < W; k++) {
            double ref = exp((double)x[k]), rel = fabs(e[k] - ref) / ref;
            if (rel > worst) worst = rel;
        }
    }
    vf special = splat(0.0f);
    special[0] = NAN; special[1] = -1000.0f; special[2] = 0.0f;
    vf e = vexp(special);
    printf("%g %d %g %g\n", worst, isnan(e[0]) ? 1 : 0, e[1], e[2]);
    return 0;
}
"""


@pytest.mark.parametrize("isa", list(cpu_kernels.ISAS))
def test_vector_exp_matches_libm_on_every_code_path(isa, tmp_path):
    """simd.h's vexp has an AVX-512 path (vscalefps) and a portable one (compiled with FMA for avx2, without for
    portable): each within a few ulp of exp over the range the kernels use (numerics.EXP_ULPS, which the kernel
    tests' bounds assume), NaN stays NaN, very negative inputs stop at exp(-87.3) (no denormals), exp(0) = 1.
    Built with the kernels' own flags for that path."""
    import shutil
    import subprocess

    from numerics import EXP_ULPS, U

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    if isa not in cpu_kernels.supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} path")
    (tmp_path / "probe.c").write_text(EXP_PROBE)
    exe = tmp_path / "probe"
    flags = [f for f in cpu_kernels.FLAGS if f not in ("-shared", "-fPIC")] + cpu_kernels.ISAS[isa][0]
    subprocess.run([cc, *flags, str(tmp_path / "probe.c"), "-o", str(exe), "-lm"], check=True)
    worst, nan_ok, tiny, one = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    assert float(worst) < EXP_ULPS * U
    assert nan_ok == "1"
    assert float(tiny) == pytest.approx(math.exp(-87.3), rel=1e-5)
    assert float(one) == 1.0


def test_kernel_isa_is_explicit_and_checked(monkeypatch):
    """The SIMD path is named, never -march=native; a path this CPU lacks, or an unknown name, is a one-line
    error naming the variable, and auto takes the widest path this CPU supports."""
    assert not any("native" in f for flags, _ in cpu_kernels.ISAS.values() for f in flags + cpu_kernels.FLAGS)
    supported = cpu_kernels.supported_isas()
    assert supported[-1] == "portable" and supported == [k for k in cpu_kernels.ISAS if k in supported]
    monkeypatch.setenv("MOE_ARCH_KERNEL_ISA", "auto")
    assert cpu_kernels.requested_isa() == supported[0]
    monkeypatch.setenv("MOE_ARCH_KERNEL_ISA", "sse9")
    with pytest.raises(ValueError, match="MOE_ARCH_KERNEL_ISA='sse9'.*auto, avx512, avx2, portable"):
        cpu_kernels.requested_isa()
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: "fpu sse2 avx avx2 fma bmi1 bmi2 f16c movbe")
    assert cpu_kernels.supported_isas() == ["avx2", "portable"]
    monkeypatch.setenv("MOE_ARCH_KERNEL_ISA", "avx512")
    with pytest.raises(ValueError, match="MOE_ARCH_KERNEL_ISA=avx512: this CPU lacks avx512bw"):
        cpu_kernels.requested_isa()
    with pytest.raises(ValueError, match="cannot run the avx512 kernels"):
        with cpu_kernels.use_isa("avx512"):
            pass


def test_each_isa_builds_its_own_library(kernel_isa):
    lib = cpu_kernels.load()
    assert lib.moe_arch_isa == kernel_isa == cpu_kernels.isa()
    assert f"moe_arch_cpu-{kernel_isa}-" in lib._name


def test_fused_head_under_no_grad_computes_only_the_loss(monkeypatch):
    """Evaluation: under no_grad the kernel path must not form the gradients of h and W (an autograd.Function
    still reports needs_input_grad there), and the loss equals the training-mode loss."""
    from moe_arch.model import losses

    h = torch.randn(70, 16)
    w = torch.randn(33, 16, requires_grad=True)
    y = torch.randint(0, 33, (70,))
    asked = []
    real = losses._kernel_loss_and_grads
    monkeypatch.setattr(losses, "_kernel_loss_and_grads", lambda *a: asked.append(a[3:]) or real(*a))
    train_loss = losses.linear_cross_entropy(h, w, y)
    with torch.no_grad():
        eval_loss = losses.linear_cross_entropy(h, w, y)
    assert asked == [(False, True), (False, False)]
    torch.testing.assert_close(eval_loss, train_loss.detach())
