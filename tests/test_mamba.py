import pytest
import torch

from moe_arch.model.mamba import reference_scan, selective_scan


def _inputs(B, L, D, N, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, L, D, dtype=dtype, generator=g)
    dt = torch.rand(B, L, D, dtype=dtype, generator=g) * 0.5 + 0.01
    A = -(torch.rand(D, N, dtype=dtype, generator=g) * 4 + 0.1)
    Bm = torch.randn(B, L, N, dtype=dtype, generator=g)
    Cm = torch.randn(B, L, N, dtype=dtype, generator=g)
    return [t.requires_grad_() for t in (u, dt, A, Bm, Cm)]


@pytest.mark.parametrize("L, chunk", [(1, 0), (7, 1), (13, 0), (16, 4), (21, 8), (40, 40)])
def test_chunked_scan_equals_the_recurrence(L, chunk):
    args = _inputs(2, L, 3, 4)
    h0 = torch.randn(2, 3, 4, dtype=torch.float64)
    for init in (None, h0):
        y, h = selective_scan(*args, init, chunk)
        y_ref, h_ref = reference_scan(*args, init)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [0, 3])
def test_custom_backward_passes_gradcheck(chunk):
    args = _inputs(2, 11, 3, 2, seed=1)
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, None, chunk)[0], args)


def test_long_sequences_stay_finite_with_large_decay():
    u, dt, A, Bm, Cm = [t.detach().float() for t in _inputs(1, 2048, 8, 4, seed=2)]
    dt = dt * 20  # exp(dt * A) underflows to 0 for many steps: must not produce inf/nan
    y, h = selective_scan(u, dt, A, Bm, Cm)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    y_ref, _ = reference_scan(
        *(t[:, :300].double() for t in (u, dt)), A.double(), Bm[:, :300].double(), Cm[:, :300].double()
    )
    from numerics import assert_within, selective_scan_bounds

    y_bound, _, _ = selective_scan_bounds(
        u[:, :300],
        dt[:, :300],
        A,
        Bm[:, :300],
        Cm[:, :300],
        None,
        torch.zeros(u.shape[-1]),
        None,
        torch.zeros_like(u[:, :300]),
    )
    assert_within(y[:, :300], y_ref, y_bound, "y")


# ------------------------------------------------------------------------------------------ CPU kernel
from moe_arch.model import cpu_kernels  # noqa: E402

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: the CPU scan kernel is not built")


def test_kernel_is_built_where_a_compiler_exists():
    import shutil

    if shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"):
        assert cpu_kernels.available(), cpu_kernels._error


def _gated_reference(u, dt, A, Bm, Cm, h0, D, z):
    y, h = reference_scan(u, dt, A, Bm, Cm, h0)
    return (y + u * D) * torch.nn.functional.silu(z), h


@needs_kernel
@pytest.mark.parametrize(
    "B, L, D, N, with_h0", [(2, 37, 20, 5, False), (3, 50, 48, 16, True), (1, 1, 17, 16, True), (2, 64, 33, 64, False)]
)
def test_cpu_kernel_matches_the_recurrence_with_skip_and_gate(B, L, D, N, with_h0, kernel_isa):
    """float32 kernel on each SIMD path (odd channel counts exercise the partial lane block) against the float64
    recurrence, within the float32 error bounds of the scan and its gradients (tests/numerics.py)."""
    from numerics import assert_within, selective_scan_bounds

    u, dt, A, Bm, Cm = _inputs(B, L, D, N, seed=3)
    g = torch.Generator().manual_seed(4)
    Dp = torch.randn(D, dtype=torch.float64, generator=g).requires_grad_()
    z = torch.randn(B, L, D, dtype=torch.float64, generator=g).requires_grad_()
    h0 = torch.randn(B, D, N, dtype=torch.float64, generator=g) if with_h0 else None
    f32 = [t.detach().float().requires_grad_() for t in (u, dt, A, Bm, Cm, Dp, z)]
    # the float32 inputs are what the kernel sees: the reference and the bounds start from the same values
    ins = [t.detach().double().requires_grad_() for t in f32]
    h0 = None if h0 is None else h0.float().double()
    y_ref, h_ref = _gated_reference(*ins[:5], h0, ins[5], ins[6])
    y, h = selective_scan(*f32[:5], None if h0 is None else h0.float(), D=f32[5], z=f32[6])
    assert y.grad_fn is not None and type(y.grad_fn).__name__.startswith("CpuSelectiveScan")
    gy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    y_bound, h_bound, grad_bounds = selective_scan_bounds(
        *[t.detach() for t in f32[:5]], h0, f32[5].detach(), f32[6].detach(), gy
    )
    assert_within(y.detach(), y_ref.detach(), y_bound, "y")
    assert_within(h, h_ref.detach(), h_bound, "h_last")
    grads_ref = torch.autograd.grad(y_ref, ins, gy)
    grads = torch.autograd.grad(y, f32, gy.float())
    for name, a, b in zip(["u", "dt", "A", "B", "C", "D", "z"], grads, grads_ref):
        assert_within(a, b, grad_bounds[name], name)


@needs_kernel
def test_cpu_kernel_threads_agree(kernel_isa):
    """dB, dC, dA, dD are summed from per-thread buffers: one thread and several give the same gradients, up to
    the order of those sums (each run within the float32 bound of the exact value, so within twice it of the
    other)."""
    from numerics import assert_within, selective_scan_bounds

    u, dt, A, Bm, Cm = [t.detach().float().requires_grad_() for t in _inputs(4, 96, 64, 16, seed=5)]
    z = torch.randn(4, 96, 64, requires_grad=True)
    Dp = torch.randn(64, requires_grad=True)
    ins = [u, dt, A, Bm, Cm, Dp, z]
    results = []
    old = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y, _ = selective_scan(u, dt, A, Bm, Cm, D=Dp, z=z)
            results.append([y] + list(torch.autograd.grad(y.square().sum(), ins)))
    finally:
        torch.set_num_threads(old)
    y_bound, _, grad_bounds = selective_scan_bounds(
        *[t.detach() for t in ins[:5]], None, Dp.detach(), z.detach(), 2 * results[0][0].detach()
    )
    bounds = [y_bound] + [grad_bounds[k] for k in ("u", "dt", "A", "B", "C", "D", "z")]
    for name, a, b, bound in zip(["y", "u", "dt", "A", "B", "C", "D", "z"], *results, bounds):
        assert_within(a.detach(), b.detach(), 2 * bound, name)


@pytest.mark.parametrize("env, warns", [({"CC": "/nonexistent/cc"}, True), ({"MOE_ARCH_NO_KERNELS": "1"}, False)])
def test_without_the_kernel_the_chunked_scan_runs_with_a_warning(tmp_path, env, warns):
    """No compiler: one RuntimeWarning naming the reason, and the Mamba layer runs the chunked scan (same model).
    MOE_ARCH_NO_KERNELS=1 chooses that path silently."""
    import os
    import subprocess
    import sys

    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "from moe_arch.model.mamba import selective_scan\n"
        "from moe_arch.model import cpu_kernels\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    x = torch.randn(1, 5, 3, requires_grad=True)\n"
        "    y, _ = selective_scan(x, torch.rand(1, 5, 3), -torch.rand(3, 2), "
        "torch.randn(1, 5, 2), torch.randn(1, 5, 2))\n"
        "print('GRAD_FN', type(y.grad_fn).__name__)\n"
        "print('WARNINGS', [str(m.message) for m in w if issubclass(m.category, RuntimeWarning)])\n"
    )
    full_env = {**os.environ, "MOE_ARCH_KERNEL_CACHE": str(tmp_path), **env}
    out = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "GRAD_FN SelectiveScanBackward" in out.stdout or "GRAD_FN TransposeBackward" in out.stdout, out.stdout
    if warns:
        assert "could not be built" in out.stdout and "/nonexistent/cc" in out.stdout, out.stdout
    else:
        assert "WARNINGS []" in out.stdout, out.stdout
