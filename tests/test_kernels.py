"""The fused CPU kernels (kernels/fused_cpu.c, kernels/cross_entropy_cpu.c through model/fused.py and losses.py)
against their PyTorch definitions: values and gradients, odd sizes (vector tails), strided inputs, one and two
threads, and both threading paths (PyTorch's OpenMP threads and the fallback thread pool)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

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


def _grads(fn, inputs, g):
    out = fn(*inputs)
    return out, torch.autograd.grad(out, [t for t in inputs if torch.is_tensor(t) and t.requires_grad], g)


def _check(kernel_fn, reference_fn, inputs, seed=0):
    ref = reference_fn(*inputs)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed))
    y, gk = _grads(kernel_fn, inputs, g)
    y2, gr = _grads(reference_fn, inputs, g)
    torch.testing.assert_close(y, y2, atol=2e-5, rtol=2e-5)
    for a, b in zip(gk, gr):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _uses_kernel(monkeypatch, name):
    """Make the named kernel entry point record that it ran."""
    calls = []
    real = getattr(cpu_kernels, name)
    monkeypatch.setattr(cpu_kernels, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("shape", [(16, 128, 128), (3, 7, 37), (1, 1, 5)])
def test_rms_norm_kernel_matches_torch(shape, threads, threading_path, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen) * 3).requires_grad_()
    w = (torch.rand(shape[-1], generator=gen) + 0.5).requires_grad_()
    calls = _uses_kernel(monkeypatch, "rmsnorm_backward")
    _check(lambda a, b: fused.rms_norm(a, b, 1e-6), lambda a, b: fused.rms_norm_reference(a, b, 1e-6), (x, w))
    assert calls, "the kernel path did not run"


@pytest.mark.parametrize("shape", [(16, 128, 384), (3, 5, 7), (1000,)])
def test_swiglu_kernel_matches_torch(shape, threads, threading_path, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    a = (torch.randn(shape, generator=gen) * 4).requires_grad_()
    b = torch.randn(shape, generator=gen).requires_grad_()
    calls = _uses_kernel(monkeypatch, "swiglu_backward")
    _check(fused.swiglu, lambda p, q: F.silu(p) * q, (a, b))
    assert calls


@pytest.mark.parametrize("B, T, D, K", [(16, 128, 256, 4), (2, 5, 21, 3), (3, 2, 16, 4), (2, 9, 40, 1)])
def test_causal_conv_silu_kernel_matches_torch_and_conv1d(B, T, D, K, threads, threading_path, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    xz = torch.randn(B, T, 2 * D, generator=gen, requires_grad=True)  # x is a strided half, as in the Mamba layer
    w = torch.randn(K, D, generator=gen, requires_grad=True)
    bias = torch.randn(D, generator=gen, requires_grad=True)
    calls = _uses_kernel(monkeypatch, "conv_silu_backward")
    _check(lambda t, p, q: fused.causal_conv_silu(t.chunk(2, dim=-1)[0], p, q),
           lambda t, p, q: fused.causal_conv_silu_reference(t.chunk(2, dim=-1)[0], p, q), (xz, w, bias))
    assert calls
    # and the reference is the depthwise causal conv1d it replaces
    x = xz.detach().chunk(2, dim=-1)[0]
    conv = F.conv1d(x.transpose(1, 2), w.detach().t().unsqueeze(1), bias.detach(), padding=K - 1, groups=D)
    torch.testing.assert_close(fused.causal_conv_silu(x, w.detach(), bias.detach()),
                               F.silu(conv[..., :T]).transpose(1, 2), atol=2e-5, rtol=2e-5)


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
def test_rope_kernel_matches_torch_on_qkv_views(B, H, T, D, per_row, threads, threading_path, monkeypatch):
    """q read in place out of a fused QKV projection (strided view), cos/sin shared [T, D] or per row [B, T, D]
    (Mixture-of-Depths gathers tokens with their own positions); the gradient lands back in the projection."""
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(B, T, (H + 2) * D, generator=gen, requires_grad=True)
    cos = torch.randn((B, T, D) if per_row else (T, D), generator=gen)
    sin = torch.randn(cos.shape, generator=gen)
    calls = _uses_kernel(monkeypatch, "rope")

    def q_of(t):
        return t[..., :H * D].view(B, T, H, D).transpose(1, 2)

    _check(lambda t: fused.rope(q_of(t), cos, sin), lambda t: fused.rope_reference(q_of(t), cos, sin), (qkv,))
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


@pytest.mark.parametrize("isa", ["portable", "avx512"])
def test_vector_exp_matches_libm_on_both_code_paths(isa, tmp_path):
    """simd.h's vexp has an AVX-512 path (vscalefps) and a portable one: both within a few ulp of exp over the
    range the kernels use, NaN stays NaN, very negative inputs stop at exp(-87.3) (no denormals), exp(0) = 1."""
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    if isa == "avx512" and "avx512f" not in cpu_kernels._cpu_flags():
        pytest.skip("this CPU has no AVX-512")
    (tmp_path / "probe.c").write_text(EXP_PROBE)
    arch = ["-mavx512f", "-mfma"] if isa == "avx512" else ["-mno-avx512f"]
    exe = tmp_path / "probe"
    subprocess.run([cc, "-O2", "-std=c11", "-ffp-contract=fast", "-Wno-psabi", f"-I{cpu_kernels.KERNEL_DIR}", *arch,
                    str(tmp_path / "probe.c"), "-o", str(exe), "-lm"], check=True)
    worst, nan_ok, tiny, one = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    assert float(worst) < 5e-7
    assert nan_ok == "1"
    assert float(tiny) == pytest.approx(math.exp(-87.3), rel=1e-5)
    assert float(one) == 1.0


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
