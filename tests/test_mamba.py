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
    y_ref, _ = reference_scan(u[:, :300], dt[:, :300], A, Bm[:, :300], Cm[:, :300])
    torch.testing.assert_close(y[:, :300], y_ref, rtol=1e-4, atol=1e-4)
