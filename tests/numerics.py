"""Float32 error bounds for the kernel tests, derived from the computation they check instead of a default
tolerance (a default held on the CPU it was tuned on and failed on another, where the GEMMs and the kernels' SIMD
paths sum in other orders).

The standard bound for a float32 sum of n terms, in any order (recursive, pairwise, blocked, SIMD lanes), is
|computed - exact| <= gamma_n * sum|terms| with gamma_n = n u / (1 - n u) and u = 2^-24 (Higham, Accuracy and
Stability of Numerical Algorithms, 2nd ed., sections 3.1 and 4.2). Every check below compares a float32 result
with a float64 reference of the same inputs, so the reference's own error (~1e-16) does not count, and the bound
is formed from the sum of absolute terms of the reduction (computed in float64) times its length, plus a few
ulps per element-wise function on the way (the kernels' exp is within 9 ulp of libm: test_kernels' probe).
"""

from __future__ import annotations

import torch

U = 2.0**-24  # unit roundoff of float32 (round to nearest)
EXP_ULPS = 9  # the kernels' vexp: < 5e-7 relative to libm's exp (probe test), ~8.4 u
TINY = 2.0**-126  # results below float32's normal range may be flushed or rounded to 0 by either side
EXP_FLOOR = 1.2e-38  # the kernels' vexp stops at exp(-87.3) (no denormals): an absolute error up to this much


def gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u): the relative bound of n rounding errors compounded."""
    assert n * U < 0.5, n
    return n * U / (1 - n * U)


def sum_bound(abs_sum: torch.Tensor, n: int, extra: int = 0) -> torch.Tensor:
    """Bound on the float32 error of a sum of n terms whose absolute values add up to ``abs_sum`` (float64),
    each term itself carrying ``extra`` rounding errors (products, element-wise functions) before summation."""
    return gamma(n + extra) * abs_sum + TINY


def assert_within(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str = "") -> None:
    """Element-wise |got - ref| <= bound, with the worst element named when it fails."""
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    err = (got.double() - ref.double()).abs()
    bound = bound.double().expand_as(err)
    bad = ~(err <= bound)
    if bad.any():
        ratio = torch.where(bound > 0, err / bound, torch.full_like(err, float("inf")))
        i = int(torch.argmax(torch.where(bad, ratio, torch.zeros_like(ratio))))
        idx = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), err.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements exceed the float32 bound; worst "
            f"at {idx}: got {got.reshape(-1)[i].item():.9g}, "
            f"reference {ref.reshape(-1)[i].item():.9g}, "
            f"error {err.reshape(-1)[i].item():.3g} > bound {bound.reshape(-1)[i].item():.3g} "
            f"({ratio.reshape(-1)[i].item():.2f}x)"
        )


def softmax_xent_bounds(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor):
    """Bounds for mean(cross_entropy(h @ w.T, y)) in float32 and its gradients dh, dW (inputs as given, the
    reference in float64). Returns (loss_bound, dh_bound, dw_bound).

    logits: a length-d dot product, error e_l = gamma(d) * (|h| @ |w|.T). Softmax rows of length V: p = exp(l - m)
    / sum; each p gets its logits' errors (|dp| <= p * 2 max_row e_l) and gamma(V + EXP_ULPS + 2) relative
    error; G = p - onehot. dh = G @ W / N: a sum of V terms; dW = G.T @ h / N: a sum of N terms. Per-row loss
    lse - l_y: off by at most 2 max_row e_l + gamma(V + EXP_ULPS) (the log of a relative error), then a mean.
    """
    h64, w64 = h.double(), w.double()
    N, d = h.shape
    V = w.shape[0]
    logits = h64 @ w64.t()
    e_l = sum_bound(h64.abs() @ w64.abs().t(), d, 1)
    row_e = e_l.amax(dim=1, keepdim=True)
    p = torch.softmax(logits, dim=1)
    onehot = torch.nn.functional.one_hot(y.long(), V).double()
    g_abs = p + onehot
    # error of each softmax-minus-onehot entry; the target's entry p - 1 is formed by one more rounding of
    # something up to 1 in size, hence onehot * U
    e_g = p * (2 * row_e + gamma(V + EXP_ULPS + 2)) + onehot * U + EXP_FLOOR
    dh_bound = (sum_bound(g_abs @ w64.abs(), V, 2) + e_g @ w64.abs()) / N
    dw_bound = (sum_bound(g_abs.t() @ h64.abs(), N, 2) + e_g.t() @ h64.abs()) / N
    losses = torch.logsumexp(logits, 1) - logits.gather(1, y.long()[:, None]).squeeze(1)
    per_row = 2 * row_e.squeeze(1) + gamma(V + EXP_ULPS + 2) * (1 + logits.abs().amax(1))
    loss_bound = per_row.mean() + gamma(N) * losses.abs().mean() + TINY
    return loss_bound, dh_bound, dw_bound


def _vjp(fn, inputs, cotangent):
    """Vector-Jacobian products of fn at inputs (float64)."""
    ins = [t.detach().double().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*ins), ins, cotangent.double())


def rms_norm_bounds(x, w, dy):
    """y = x w r, r = (mean(x^2) + eps)^-1/2: the sum of squares (D positive terms) is off by gamma(D+2)
    relative, r by half that plus two roundings, y by two more. dx = r (g - n mean(g n)) with n = x r, g = dy w:
    a D-term dot, then the rows of dx; dw = sum over rows of dy n: an R-term sum (plus per-thread partials)."""
    x, w, dy = x.double(), w.double(), dy.double()
    D = x.shape[-1]
    r = x.square().mean(-1, keepdim=True).add(1e-6).rsqrt()
    n, g = x * r, dy * w
    rel_r = gamma(D + 2) / 2 + gamma(2)
    y_bound = (rel_r + gamma(2)) * (n * w).abs() + TINY
    m_abs = (g * n).abs().mean(-1, keepdim=True)
    dx_bound = (gamma(D + 4) + 3 * rel_r) * r * (g.abs() + n.abs() * m_abs) + TINY
    R = x.numel() // D
    dw_bound = (gamma(R + 2) + rel_r + gamma(1)) * (dy * n).abs().reshape(R, D).sum(0) + TINY
    return y_bound, [dx_bound, dw_bound]


def swiglu_bounds(a, b, dy):
    """silu(a) b = a b / (1 + exp(-a)): the kernels' exp (EXP_ULPS) and a few roundings per element; in the
    derivative s (1 + a (1 - s)) the error of s is multiplied by up to 1 + |a|."""
    a, b, dy = a.double(), b.double(), dy.double()
    s = torch.sigmoid(a)
    y_bound = gamma(EXP_ULPS + 4) * (a * s * b).abs() + TINY
    da_bound = gamma(EXP_ULPS + 8) * (dy * b).abs() * s * (1 + a.abs()) + TINY
    db_bound = gamma(EXP_ULPS + 4) * (dy * a * s).abs() + TINY
    return y_bound, [da_bound, db_bound]


def causal_conv_silu_bounds(x, w, bias, dy, conv_pre):
    """pre = bias + sum of K taps (K + 1 terms), y = silu(pre) (|silu'| <= 1.1). Backward: dpre = dy silu'(pre),
    off by |silu''| <= 0.5 times pre's error plus the sigmoid's; then dx (K-term sums), dw and dbias (B T-term
    sums). The sums of absolute terms are the same linear maps applied to absolute values (``conv_pre`` is the
    linear pre-activation in float64: bias + taps)."""
    x, w, bias, dy = x.double(), w.double(), bias.double(), dy.double()
    B, T, D = x.shape
    K = w.shape[0]
    pre = conv_pre(x, w, bias)
    pre_abs = conv_pre(x.abs(), w.abs(), bias.abs())
    e_pre = gamma(K + 2) * pre_abs
    s = torch.sigmoid(pre)
    y_bound = 1.1 * e_pre + gamma(EXP_ULPS + 3) * (pre * s).abs() + TINY
    dpre = dy * s * (1 + pre * (1 - s))
    e_dpre = dy.abs() * (0.5 * e_pre + gamma(EXP_ULPS + 8) * s * (1 + pre.abs()))
    gx_abs, gw_abs, gb_abs = _vjp(conv_pre, (x.abs(), w.abs(), bias.abs()), dpre.abs())
    ex, ew, eb = _vjp(conv_pre, (x.abs(), w.abs(), bias.abs()), e_dpre)
    n = B * T
    return y_bound, [
        gamma(K + 1) * gx_abs + ex + TINY,
        gamma(n + 2) * gw_abs + ew + TINY,
        gamma(n + 2) * gb_abs + eb + TINY,
    ]


def rope_bounds(x, cos, sin, dy):
    """x cos + rotate_half(x) sin: two products and one sum per element (the backward: the transposed
    rotation, the same count)."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x, cos, sin, dy = x.double(), cos.double(), sin.double(), dy.double()
    half = x.shape[-1] // 2

    def swap(t):
        return torch.cat((t[..., half:], t[..., :half]), dim=-1)

    y_bound = gamma(3) * (x.abs() * cos.abs() + swap(x.abs()) * sin.abs()) + TINY
    dx_bound = gamma(3) * (dy.abs() * cos.abs() + swap(dy.abs() * sin.abs())) + TINY
    return y_bound, dx_bound


def selective_scan_bounds(u, dt, A, Bm, Cm, h0, Dp, z, gy):
    """Bounds for the gated selective scan y = (C . h_t + D u_t) * silu(z_t), h_t = a_t h_{t-1} + dt_t u_t B_t with
    a_t = exp(dt_t A), and for its gradients, from majorants: the same recurrences over absolute values (a_t is in
    (0, 1] already). One step adds the errors of exp (EXP_ULPS) and four roundings, relative to that step's
    majorant; the majorant at t bounds every earlier one decayed to t, so after t steps the state is off by at
    most gamma(t (EXP_ULPS + 4)) times its majorant. Every gradient is then a sum of such terms (lengths N, D, or
    B L) and carries the errors of the states and adjoints it multiplies.

    u, dt, z (None: no gate), gy [B, L, D]; A [D, N]; Bm, Cm [B, L, N]; h0 [B, D, N] or None; Dp [D].
    Returns (y_bound, h_last_bound, {name: gradient bound} for u, dt, A, B, C, D, z)."""
    if z is None:  # no gate: silu(z) = 1 stands in (z s = 1, s (1 + |z|) = 0 for dz, which is not returned)
        z = torch.full_like(u, float("inf"))
    u, dt, A, Bm, Cm, Dp, z, gy = (t.double() for t in (u, dt, A, Bm, Cm, Dp, z, gy))
    Bsz, L, D = u.shape
    N = A.shape[1]
    a = torch.exp(dt[..., None] * A)  # [B, L, D, N]
    x_abs = (dt * u).abs()[..., None] * Bm.abs()[:, :, None, :]
    hbar = torch.zeros(Bsz, L + 1, D, N, dtype=torch.float64)
    if h0 is not None:
        hbar[:, 0] = h0.double().abs()
    for t in range(L):
        hbar[:, t + 1] = a[:, t] * hbar[:, t] + x_abs[:, t]
    step = EXP_ULPS + 4
    e_state = gamma(L * step)
    s = torch.sigmoid(z)
    gate = torch.where(torch.isinf(z), 1.0, (z * s).abs())
    zs = torch.where(torch.isinf(z), 1.0, z * s)
    y_pre_abs = (hbar[:, 1:] * Cm.abs()[:, :, None, :]).sum(-1) + (Dp * u).abs()
    y_bound = (gamma(L * step + N + 2) * y_pre_abs + gamma(EXP_ULPS + 4) * y_pre_abs) * gate + TINY
    h_bound = e_state * hbar[:, L] + TINY

    g_pre = (gy * zs).abs()  # d(out)/d(y_pre), in absolute value
    lam = torch.zeros(Bsz, L + 1, D, N, dtype=torch.float64)  # adjoint majorant; lam[:, L] = 0
    for t in range(L - 1, -1, -1):
        nxt = a[:, t + 1] * lam[:, t + 1] if t + 1 < L else 0.0
        lam[:, t] = Cm.abs()[:, t, None, :] * g_pre[:, t, :, None] + nxt
    lam = lam[:, :L]
    e_adj = gamma(L * (EXP_ULPS + 6))
    both = e_state + e_adj
    du = (e_adj + gamma(N + 4)) * (dt.abs() * (lam * Bm.abs()[:, :, None, :]).sum(-1)) + gamma(EXP_ULPS + 4) * (
        Dp * gy * zs
    ).abs()
    h_prev = hbar[:, :L]
    ddt_terms = lam * (A.abs() * a * h_prev + (u.abs()[..., None] * Bm.abs()[:, :, None, :]))
    ddt = (both + gamma(N + EXP_ULPS + 6)) * ddt_terms.sum(-1)
    dA = (both + gamma(Bsz * L + EXP_ULPS + 6)) * (lam * dt.abs()[..., None] * a * h_prev).sum((0, 1))
    dB = (e_adj + gamma(D + 4)) * (lam * (dt * u).abs()[..., None]).sum(2)
    dC = (e_state + gamma(D + EXP_ULPS + 4)) * (hbar[:, 1:] * g_pre[..., None]).sum(2)
    dD = gamma(Bsz * L + EXP_ULPS + 4) * (u * gy * zs).abs().sum((0, 1))
    dz = gamma(L * step + N + EXP_ULPS + 12) * (gy.abs() * y_pre_abs * s * (1 + z.abs()))
    grads = {"u": du, "dt": ddt, "A": dA, "B": dB, "C": dC, "D": dD, "z": dz}
    return y_bound, h_bound, {k: v + TINY for k, v in grads.items()}


def moe_experts_bound(x, w_gate, w_up, w_down, idx, weights):
    """Reference (float64) and bound for a top-k MoE layer's routed part, out_n = sum_k w_nk E_k(x_n) with
    E(x) = (silu(x Wg) * (x Wu)) Wd, whatever GEMMs compute it (one grouped GEMM over sorted tokens or one
    matmul per token). Gate and up projections: d-term dot products; the SwiGLU gate: exp's ulps and a few
    roundings, its inputs' errors amplified by |silu'| <= 1.1 and |silu|; the down projection: an f-term dot
    product of the gate's output, with its error carried through |Wd|; the combine: k scaled terms.

    x [N, d]; w_gate, w_up [E, d, f]; w_down [E, f, d]; idx, weights [N, k] (the router's choice, computed
    identically by every path). Returns (reference [N, d], bound [N, d])."""
    x, wg, wu, wd, w = (t.double() for t in (x, w_gate, w_up, w_down, weights))
    d, f = wg.shape[1], wg.shape[2]
    k = idx.shape[1]
    wg, wu, wd = wg[idx], wu[idx], wd[idx]  # [N, k, d, f], [N, k, d, f], [N, k, f, d]
    a = torch.einsum("nd,nkdf->nkf", x, wg)
    b = torch.einsum("nd,nkdf->nkf", x, wu)
    e_a = gamma(d) * torch.einsum("nd,nkdf->nkf", x.abs(), wg.abs())
    e_b = gamma(d) * torch.einsum("nd,nkdf->nkf", x.abs(), wu.abs())
    silu = torch.nn.functional.silu(a)
    h = silu * b
    e_h = 1.1 * e_a * (b.abs() + e_b) + silu.abs() * e_b + gamma(EXP_ULPS + 4) * h.abs()
    y = torch.einsum("nkf,nkfd->nkd", h, wd)
    e_y = gamma(f) * torch.einsum("nkf,nkfd->nkd", h.abs() + e_h, wd.abs()) + torch.einsum(
        "nkf,nkfd->nkd", e_h, wd.abs()
    )
    ref = torch.einsum("nk,nkd->nd", w, y)
    bound = (
        torch.einsum("nk,nkd->nd", w.abs(), e_y) * (1 + gamma(1))
        + gamma(k + 1) * torch.einsum("nk,nkd->nd", w.abs(), y.abs())
        + TINY
    )
    return ref, bound


def moe_experts_grad_bounds(x, w_gate, w_up, w_down, idx, weights, g):
    """Float64 references and first-order float32 bounds for the gradients of the routed part of a top-k MoE
    layer (see :func:`moe_experts_bound`) under the output cotangent g [N, d], whatever GEMMs and row orders compute
    them (grouped over sorted rows, exchanged between ranks, one matmul per token).

    Backward per (token n, slot k) with expert e = idx[n, k] and gy = w_nk g_n: dh = gy Wd^T (a d-term dot);
    da = dh silu'(a) b, db = dh silu(a) (|silu'| <= 1.1, |silu''| <= 0.5, plus the kernels' exp and roundings);
    dx = sum_k da Wg^T + db Wu^T (2f-term dots and k slots); dWg[e] = sum_n x^T da, dWu[e] = sum_n x^T db,
    dWd[e] = sum_n h^T gy (sums over the expert's rows, whose count bounds their length). Each error term is the
    rounding of that step on the majorant of its inputs plus its inputs' errors carried through |.| of the others.

    Returns (refs, bounds): dicts with keys x [N, d], w_gate, w_up [E, d, f], w_down [E, f, d]."""
    x, wg0, wu0, wd0, w, g = (t.detach().double() for t in (x, w_gate, w_up, w_down, weights, g))
    E, d, f = wg0.shape
    k = idx.shape[1]
    rows = torch.bincount(idx.reshape(-1), minlength=E).max().item()
    ins = [t.clone().requires_grad_() for t in (x, wg0, wu0, wd0)]
    xx, wg, wu, wd = ins
    a = torch.einsum("nd,nkdf->nkf", xx, wg[idx])
    b = torch.einsum("nd,nkdf->nkf", xx, wu[idx])
    y = torch.einsum("nkf,nkfd->nkd", torch.nn.functional.silu(a) * b, wd[idx])
    refs = dict(zip(("x", "w_gate", "w_up", "w_down"), torch.autograd.grad((w[..., None] * y).sum(1), ins, g)))
    wg, wu, wd = wg0[idx], wu0[idx], wd0[idx]
    a, b = a.detach(), b.detach()
    s = torch.sigmoid(a)
    silu, dsilu = a * s, s * (1 + a * (1 - s))
    h = silu * b
    e_a = gamma(d) * torch.einsum("nd,nkdf->nkf", x.abs(), wg.abs())
    e_b = gamma(d) * torch.einsum("nd,nkdf->nkf", x.abs(), wu.abs())
    e_h = 1.1 * e_a * (b.abs() + e_b) + silu.abs() * e_b + gamma(EXP_ULPS + 4) * h.abs()
    gy = w[..., None] * g[:, None, :]  # [N, k, d]
    dh = torch.einsum("nkd,nkfd->nkf", gy, wd)
    e_dh = gamma(d + 1) * torch.einsum("nkd,nkfd->nkf", gy.abs(), wd.abs())
    da, db = dh * dsilu * b, dh * silu
    e_da = (
        e_dh * 1.1 * b.abs()
        + dh.abs() * (0.5 * e_a * b.abs() + 1.1 * e_b)
        + gamma(EXP_ULPS + 8) * (dh * b).abs() * s * (1 + a.abs())
    )
    e_db = e_dh * silu.abs() + dh.abs() * 1.1 * e_a + gamma(EXP_ULPS + 4) * (dh * silu).abs()
    da_m, db_m = da.abs() + e_da, db.abs() + e_db  # majorants of the computed values
    dx = gamma(2 * f + k) * (
        torch.einsum("nkf,nkdf->nd", da_m, wg.abs()) + torch.einsum("nkf,nkdf->nd", db_m, wu.abs())
    ) + (torch.einsum("nkf,nkdf->nd", e_da, wg.abs()) + torch.einsum("nkf,nkdf->nd", e_db, wu.abs()))

    def per_expert(t: torch.Tensor) -> torch.Tensor:  # [N, k, p, q] -> [E, p, q] summed over each expert's rows
        out = t.new_zeros(E, *t.shape[2:])
        return out.index_add_(0, idx.reshape(-1), t.reshape(-1, *t.shape[2:]))

    xa = x.abs()[:, None, :, None]
    bounds = {
        "x": dx + TINY,
        "w_gate": per_expert(gamma(rows) * xa * da_m[:, :, None, :] + xa * e_da[:, :, None, :]) + TINY,
        "w_up": per_expert(gamma(rows) * xa * db_m[:, :, None, :] + xa * e_db[:, :, None, :]) + TINY,
        "w_down": per_expert(
            (gamma(rows + 1) * (h.abs() + e_h))[..., None] * gy.abs()[:, :, None, :]
            + e_h[..., None] * gy.abs()[:, :, None, :]
        )
        + TINY,
    }
    return refs, bounds
