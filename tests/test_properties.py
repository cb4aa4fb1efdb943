"""Property-based checks (hypothesis) of the two pieces whose correctness rests on an algorithm rather than a
library call: the chunked selective scan and the causal Mixture-of-Depths selection."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_arch.model.mamba import reference_scan, selective_scan
from moe_arch.model.mod import causal_capacity_select


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 3),
    L=st.integers(1, 40),
    D=st.integers(1, 5),
    N=st.integers(1, 4),
    chunk=st.integers(0, 12),
    with_h0=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunked_scan_matches_the_recurrence_for_any_shape_and_chunk(B, L, D, N, chunk, with_h0, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, L, D, dtype=torch.float64, generator=g)
    dt = torch.rand(B, L, D, dtype=torch.float64, generator=g) * 2
    A = -torch.rand(D, N, dtype=torch.float64, generator=g) * 8
    Bm = torch.randn(B, L, N, dtype=torch.float64, generator=g)
    Cm = torch.randn(B, L, N, dtype=torch.float64, generator=g)
    h0 = torch.randn(B, D, N, dtype=torch.float64, generator=g) if with_h0 else None
    y, h = selective_scan(u, dt, A, Bm, Cm, h0, chunk)
    y_ref, h_ref = reference_scan(u, dt, A, Bm, Cm, h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)


@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(1, 64),
    capacity=st.floats(0.05, 1.0),
    cut=st.integers(0, 63),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_mod_selection_never_depends_on_later_tokens(T, capacity, cut, seed, ties):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, T, generator=g)
    if ties:
        scores = scores.round()  # many equal scores: ties must still be broken causally
    cut = min(cut, T)
    other = scores.clone()
    other[:, cut:] = torch.randn(2, T - cut, generator=g) * 5
    a, b = causal_capacity_select(scores, capacity), causal_capacity_select(other, capacity)
    assert torch.equal(a[:, :cut], b[:, :cut])
    assert bool(a[:, 0].all())  # the first token ranks first in its own prefix
    # Only ranks matter: a strictly increasing transform of the scores selects the same tokens. Piecewise
    # scaling in float64 is exact for float32 inputs (24 significant bits), so no rounding can create a tie.
    s64 = scores.double()
    assert torch.equal(causal_capacity_select(torch.where(s64 > 0, s64 * 3, s64 / 2), capacity), a)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 80), capacity=st.floats(0.05, 1.0))
def test_mod_selection_closed_forms(T, capacity):
    import math

    up = torch.arange(T, dtype=torch.float32)[None]
    assert bool(causal_capacity_select(up, capacity).all())  # each token is the best of its prefix
    down = -up  # every earlier token is better: token t has rank t in its prefix
    expected = torch.tensor([t < math.ceil(capacity * (t + 1) - 1e-9) for t in range(T)])
    assert torch.equal(causal_capacity_select(down, capacity)[0], expected)
