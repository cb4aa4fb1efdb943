"""Triton kernels for the GPU: the Mamba-1 selective scan (skip term and gate fused), Mamba's causal conv + silu,
RMSNorm, the SwiGLU gate, RoPE and the output heads' softmax cross-entropy rows, forward and backward each.

Each is a faster form of a PyTorch definition that stays the reference: ``mamba.reference_scan`` (the recurrence)
for the scan, ``fused.*_reference`` for the element-wise chains, ``F.cross_entropy(h @ W.T)`` for the head. The
tests (tests/test_triton.py) run every kernel under Triton's interpreter on CPU tensors against those definitions
in float64, within the float32 error bounds of tests/numerics.py; tests/test_cuda.py does the same on a GPU.
Dispatch (``fused.triton_use``): CUDA tensors only; the CPU paths are untouched.

Why our own kernels rather than Liger-Kernel's (which has RMSNorm, SwiGLU, RoPE and fused linear cross-entropy):
Liger is not on the GPU machine this project is measured on (and gpu_check runs there with no install step); its
RMSNorm and SwiGLU kernels fail under Triton 3.9's interpreter, so CI could not test them; and they compute other
functions in bf16 (its "llama" RMSNorm rounds x/rms(x) to bf16 before the weight multiply), write their gradients
into the saved inputs in place (SwiGLU), or need q and k in one call (RoPE). What is left is ~300 lines.

Precision: all arithmetic in float32 whatever the storage dtype. ``exp``/``log`` are libdevice's (<= 2 ulp; Triton's
``tl.exp`` is ``ex2.approx`` of a rounded ``x * log2(e)``, whose error grows with |x|), divisions and square roots
round to nearest (``div_rn``, ``sqrt_rn``), so the bounds of tests/numerics.py hold on the GPU too. The interpreter
computes with numpy, where ``tl.exp`` is libm's exp (libdevice has no interpreter implementation).

The scan, as in mamba_ssm's ``selective_scan_fn``: one program per (batch row, block of channels) walks the sequence
in chunks of BLOCK_T steps; for each state n the chunk is solved by a parallel associative scan over time of the
affine maps h -> a_t h + x_t (``tl.associative_scan``) and the state carried between chunks stays in registers. The
forward keeps each chunk's starting state ([B, chunks, D, N]: 1/BLOCK_T of the states) so the backward can recompute
a chunk's states, walking the chunks last to first with the reverse scan of the adjoint.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# what triton.jit reads when it defines a kernel (Triton >= 3.4 through triton.knobs, earlier the variable itself)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
MAX_STATE = 256  # d_state the scan accepts (a [BLOCK_D, next_pow2(N)] state tile per program)
MAX_NORM_DIM = 1 << 16  # RMSNorm keeps one row in registers

if INTERPRET:

    @triton.jit
    def _exp(x):
        return tl.exp(x)

    @triton.jit
    def _log(x):
        return tl.log(x)
else:

    @triton.jit
    def _exp(x):
        return libdevice.exp(x)

    @triton.jit
    def _log(x):
        return libdevice.log(x)


@triton.jit
def _sigmoid(x):
    return tl.math.div_rn(1.0, 1.0 + _exp(-x))


def _device(t: torch.Tensor):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _pow2(n: int, lo: int = 1, hi: int = 1 << 30) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


_SMS: dict[int, int] = {}


def _sm_count(t: torch.Tensor) -> int:
    if not t.is_cuda:
        return 4
    i = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def _grad_needed(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ============================================================================================ selective scan
@triton.jit
def _affine(a1, x1, a2, x2):
    # (h -> a1 h + x1) then (h -> a2 h + x2), the earlier step on the left
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _col(tile, idx, n):
    # column n of a [R, BLOCK_N] tile as an [R] vector (a selection: exact)
    return tl.sum(tl.where(idx[None, :] == n, tile, 0.0), 1)


@triton.jit
def _scan_fwd(
    u_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    h0_ptr,
    out_ptr,
    hlast_ptr,
    st_ptr,
    su_b,
    su_t,
    sdt_b,
    sdt_t,
    sB_b,
    sB_t,
    sC_b,
    sC_t,
    sz_b,
    sz_t,
    L,
    D,
    N,
    n_chunks,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_H0: tl.constexpr,
    SAVE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    nidx = tl.arange(0, BLOCK_N)
    md = offs_d < D
    mdn = md[:, None] & (nidx[None, :] < N)
    dn = offs_d[:, None] * N + nidx[None, :]  # [BD, BN] offsets in a [D, N] matrix
    A = tl.load(A_ptr + dn, mask=mdn, other=0.0)
    if HAS_H0:
        h = tl.load(h0_ptr + b * D * N + dn, mask=mdn, other=0.0)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=md, other=0.0)
    for c in range(n_chunks):
        t = c * BLOCK_T + offs_t
        mt = t < L
        m2 = mt[:, None] & md[None, :]
        mtn = mt[:, None] & (nidx[None, :] < N)
        # padding steps (t >= L) load dt = 0: decay 1, input 0, so the last row holds the state after step L-1
        u = tl.load(u_ptr + b * su_b + t[:, None] * su_t + offs_d[None, :], mask=m2, other=0.0)  # [BT, BD]
        dt = tl.load(dt_ptr + b * sdt_b + t[:, None] * sdt_t + offs_d[None, :], mask=m2, other=0.0)
        Bt = tl.load(B_ptr + b * sB_b + t[:, None] * sB_t + nidx[None, :], mask=mtn, other=0.0)  # [BT, BN]
        Ct = tl.load(C_ptr + b * sC_b + t[:, None] * sC_t + nidx[None, :], mask=mtn, other=0.0)
        if SAVE:
            tl.store(st_ptr + (b * n_chunks + c) * D * N + dn, h, mask=mdn)  # the chunk's starting state
        dtu = dt * u
        y = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        h_next = h
        for n in range(N):
            a = _exp(dt * _col(A, nidx, n)[None, :])  # [BT, BD]
            acum, hs = tl.associative_scan((a, dtu * _col(Bt, nidx, n)[:, None]), 0, _affine)
            hs = hs + acum * _col(h, nidx, n)[None, :]  # h_t = (prod a) h_start + (scan of the inputs)
            y += hs * _col(Ct, nidx, n)[:, None]
            last = tl.sum(tl.where(offs_t[:, None] == BLOCK_T - 1, hs, 0.0), 0)
            h_next = tl.where(nidx[None, :] == n, last[:, None], h_next)
        h = h_next
        if HAS_D:
            y += Dv[None, :] * u
        if HAS_Z:
            z = tl.load(z_ptr + b * sz_b + t[:, None] * sz_t + offs_d[None, :], mask=m2, other=0.0)
            y = y * (z * _sigmoid(z))
        tl.store(out_ptr + b * L * D + t[:, None] * D + offs_d[None, :], y, mask=m2)
    tl.store(hlast_ptr + b * D * N + dn, h, mask=mdn)


@triton.jit
def _scan_bwd(
    u_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    st_ptr,
    g_ptr,
    du_ptr,
    ddt_ptr,
    dz_ptr,
    dA_ptr,
    dB_ptr,
    dC_ptr,
    dD_ptr,
    su_b,
    su_t,
    sdt_b,
    sdt_t,
    sB_b,
    sB_t,
    sC_b,
    sC_t,
    sz_b,
    sz_t,
    sg_b,
    sg_t,
    Bsz,
    L,
    D,
    N,
    n_chunks,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    nidx = tl.arange(0, BLOCK_N)
    md = offs_d < D
    mdn = md[:, None] & (nidx[None, :] < N)
    dn = offs_d[:, None] * N + nidx[None, :]
    A = tl.load(A_ptr + dn, mask=mdn, other=0.0)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=md, other=0.0)
    lam_in = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # adjoint of the state at the next chunk's first step
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    part = (pid_d * Bsz + b) * L * N  # this program's slice of the per-channel-block dB, dC partial sums
    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        t = c * BLOCK_T + offs_t
        mt = t < L
        m2 = mt[:, None] & md[None, :]
        mtn = mt[:, None] & (nidx[None, :] < N)
        mp = ((offs_t > 0) & mt)[:, None] & md[None, :]  # step t-1 within the chunk (the first row: identity)
        mnx = (t + 1 < L)[:, None] & md[None, :]  # step t+1 (past the end: a = 1, nothing flows back)
        u = tl.load(u_ptr + b * su_b + t[:, None] * su_t + offs_d[None, :], mask=m2, other=0.0)
        dt = tl.load(dt_ptr + b * sdt_b + t[:, None] * sdt_t + offs_d[None, :], mask=m2, other=0.0)
        up = tl.load(u_ptr + b * su_b + (t - 1)[:, None] * su_t + offs_d[None, :], mask=mp, other=0.0)
        dtp = tl.load(dt_ptr + b * sdt_b + (t - 1)[:, None] * sdt_t + offs_d[None, :], mask=mp, other=0.0)
        dtn = tl.load(dt_ptr + b * sdt_b + (t + 1)[:, None] * sdt_t + offs_d[None, :], mask=mnx, other=0.0)
        Bt = tl.load(B_ptr + b * sB_b + t[:, None] * sB_t + nidx[None, :], mask=mtn, other=0.0)
        Bp = tl.load(
            B_ptr + b * sB_b + (t - 1)[:, None] * sB_t + nidx[None, :], mask=(offs_t > 0)[:, None] & mtn, other=0.0
        )
        Ct = tl.load(C_ptr + b * sC_b + t[:, None] * sC_t + nidx[None, :], mask=mtn, other=0.0)
        g = tl.load(g_ptr + b * sg_b + t[:, None] * sg_t + offs_d[None, :], mask=m2, other=0.0)
        if HAS_Z:
            z = tl.load(z_ptr + b * sz_b + t[:, None] * sz_t + offs_d[None, :], mask=m2, other=0.0)
            s = _sigmoid(z)
            gy = g * (z * s)  # d(loss)/d(C.h + D u)
        else:
            gy = g
        h_start = tl.load(st_ptr + (b * n_chunks + c) * D * N + dn, mask=mdn, other=0.0)
        dtu = dt * u
        dtup = dtp * up
        y = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        s_lb = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)  # sum_n lam B: d(loss)/d(dt u)
        ddt = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        lam_out = lam_in
        for n in range(N):
            An = _col(A, nidx, n)[None, :]
            Bn = _col(Bt, nidx, n)[:, None]
            Cn = _col(Ct, nidx, n)[:, None]
            a = _exp(dt * An)
            # h_{t-1}: the scan of the steps shifted by one (h_prev of the first row is the chunk's start)
            pa, ph = tl.associative_scan((_exp(dtp * An), dtup * _col(Bp, nidx, n)[:, None]), 0, _affine)
            h_prev = ph + pa * _col(h_start, nidx, n)[None, :]
            h = a * h_prev + dtu * Bn
            y += h * Cn
            # lam_t = C_t gy_t + a_{t+1} lam_{t+1}: the reverse scan, plus what flows in from the next chunk
            ra, rl = tl.associative_scan((_exp(dtn * An), gy * Cn), 0, _affine, reverse=True)
            lam = rl + ra * _col(lam_in, nidx, n)[None, :]
            first = tl.sum(tl.where(offs_t[:, None] == 0, lam, 0.0), 0)
            lam_out = tl.where(nidx[None, :] == n, first[:, None], lam_out)
            q = lam * a * h_prev  # d(loss)/d(a_t) * a_t
            ddt += q * An + lam * u * Bn
            s_lb += lam * Bn
            dA_acc += tl.where(nidx[None, :] == n, tl.sum(q * dt, 0)[:, None], 0.0)
            tl.store(dB_ptr + part + t * N + n, tl.sum(lam * dtu, 1), mask=mt)
            tl.store(dC_ptr + part + t * N + n, tl.sum(h * gy, 1), mask=mt)
        lam_in = lam_out
        du = s_lb * dt
        if HAS_D:
            du += Dv[None, :] * gy
            y += Dv[None, :] * u
            dD_acc += tl.sum(gy * u, 0)
        io = b * L * D + t[:, None] * D + offs_d[None, :]
        tl.store(du_ptr + io, du, mask=m2)
        tl.store(ddt_ptr + io, ddt, mask=m2)
        if HAS_Z:
            tl.store(dz_ptr + io, g * y * s * (1.0 + z * (1.0 - s)), mask=m2)
    tl.store(dA_ptr + b * D * N + dn, dA_acc, mask=mdn)
    if HAS_D:
        tl.store(dD_ptr + b * D + offs_d, dD_acc, mask=md)


# Tile sizes: a program holds [BLOCK_T, BLOCK_D] tiles (about 15 live in the backward). Tests pass smaller ones.
SCAN_BLOCK_T = 64
SCAN_BLOCK_D = 32


def _scan_blocks(u: torch.Tensor, block_t: int, block_d: int) -> tuple[int, int]:
    Bsz, L, D = u.shape
    bt = block_t or _pow2(L, 16, SCAN_BLOCK_T)
    bd = block_d or SCAN_BLOCK_D
    if not block_d and Bsz * triton.cdiv(D, bd) < 2 * _sm_count(u):
        bd = 16  # at micro-batch 1 a wide block leaves SMs idle
    return bt, bd


def _bt_strides(t):
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def _scan_forward(u, dt, A, Bm, Cm, Dskip, z, h0, save: bool, block_t: int = 0, block_d: int = 0):
    Bsz, L, D = u.shape
    N = A.shape[1]
    bt, bd = _scan_blocks(u, block_t, block_d)
    n_chunks = triton.cdiv(L, bt)
    out = torch.empty(Bsz, L, D, device=u.device, dtype=torch.float32)
    h_last = torch.empty(Bsz, D, N, device=u.device, dtype=torch.float32)
    st = torch.empty(Bsz, n_chunks, D, N, device=u.device, dtype=torch.float32) if save else h_last
    with _device(u):
        _scan_fwd[(Bsz, triton.cdiv(D, bd))](
            u,
            dt,
            A,
            Bm,
            Cm,
            Dskip if Dskip is not None else A,
            z if z is not None else u,
            h0 if h0 is not None else h_last,
            out,
            h_last,
            st,
            *_bt_strides(u),
            *_bt_strides(dt),
            *_bt_strides(Bm),
            *_bt_strides(Cm),
            *_bt_strides(z),
            L,
            D,
            N,
            n_chunks,
            HAS_D=Dskip is not None,
            HAS_Z=z is not None,
            HAS_H0=h0 is not None,
            SAVE=save,
            BLOCK_T=bt,
            BLOCK_D=bd,
            BLOCK_N=_pow2(N),
            num_warps=4,
        )
    return out, h_last, (st if save else None), (bt, bd)


class SelectiveScan(torch.autograd.Function):
    """out = (C.h + D u) * silu(z) over the selective recurrence; batch-major float32 inputs (see selective_scan)."""

    @staticmethod
    def forward(ctx, u, dt, A, Bm, Cm, Dskip, z, h0, block_t, block_d):
        out, h_last, st, blocks = _scan_forward(u, dt, A, Bm, Cm, Dskip, z, h0, True, block_t, block_d)
        ctx.blocks = blocks
        ctx.save_for_backward(u, dt, A, Bm, Cm, Dskip, z, st)
        ctx.mark_non_differentiable(h_last)
        return out, h_last

    @staticmethod
    def backward(ctx, gout, _gh_last):
        u, dt, A, Bm, Cm, Dskip, z, st = ctx.saved_tensors
        bt, bd = ctx.blocks
        Bsz, L, D = u.shape
        N = A.shape[1]
        n_db = triton.cdiv(D, bd)
        gout = _unit_last(gout)
        f32 = dict(device=u.device, dtype=torch.float32)
        du, ddt = torch.empty(Bsz, L, D, **f32), torch.empty(Bsz, L, D, **f32)
        dz = torch.empty(Bsz, L, D, **f32) if z is not None else None
        # sums over channel blocks (dB, dC) and over the batch (dA, dD) from partial buffers, added up below:
        # deterministic, unlike atomics
        dA = torch.empty(Bsz, D, N, **f32)
        dB, dC = torch.empty(n_db, Bsz, L, N, **f32), torch.empty(n_db, Bsz, L, N, **f32)
        dD = torch.empty(Bsz, D, **f32) if Dskip is not None else None
        with _device(u):
            _scan_bwd[(Bsz, n_db)](
                u,
                dt,
                A,
                Bm,
                Cm,
                Dskip if Dskip is not None else A,
                z if z is not None else u,
                st,
                gout,
                du,
                ddt,
                dz if dz is not None else du,
                dA,
                dB,
                dC,
                dD if dD is not None else dA,
                *_bt_strides(u),
                *_bt_strides(dt),
                *_bt_strides(Bm),
                *_bt_strides(Cm),
                *_bt_strides(z),
                *_bt_strides(gout),
                Bsz,
                L,
                D,
                N,
                st.shape[1],
                HAS_D=Dskip is not None,
                HAS_Z=z is not None,
                BLOCK_T=bt,
                BLOCK_D=bd,
                BLOCK_N=_pow2(N),
                num_warps=4,
            )
        return (du, ddt, dA.sum(0), dB.sum(0), dC.sum(0), dD.sum(0) if dD is not None else None, dz, None, None, None)


def selective_scan(u, dt, A, Bm, Cm, Dskip=None, z=None, h0=None, block_t: int = 0, block_d: int = 0):
    """u, dt, z [B, L, D]; A [D, N]; Bm, Cm [B, L, N]; Dskip [D]; h0 [B, D, N] (float32; any batch / time strides)
    -> out [B, L, D], h_last [B, D, N]: what ``mamba.selective_scan`` computes, in one kernel per direction."""
    u, dt, Bm, Cm = (_unit_last(t) for t in (u, dt, Bm, Cm))
    z = _unit_last(z) if z is not None else None
    A = A.contiguous()
    Dskip = Dskip.contiguous() if Dskip is not None else None
    h0 = h0.contiguous() if h0 is not None else None
    if _grad_needed(u, dt, A, Bm, Cm, Dskip, z):
        return SelectiveScan.apply(u, dt, A, Bm, Cm, Dskip, z, h0, block_t, block_d)
    out, h_last, _, _ = _scan_forward(u, dt, A, Bm, Cm, Dskip, z, h0, False, block_t, block_d)
    return out, h_last


# ============================================================================================ causal conv + silu
@triton.jit
def _conv_pre(
    x_ptr,
    w_ptr,
    bias_ptr,
    b,
    t,
    offs_d,
    sx_b,
    sx_t,
    T,
    D,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # bias + sum_j w[j] x[t - K + 1 + j] over a [BT, BD] tile, zeros before the sequence start
    md = offs_d < D
    acc = (
        tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        + tl.load(bias_ptr + offs_d, mask=md, other=0.0).to(tl.float32)[None, :]
    )
    for j in tl.static_range(K):
        src = t - (K - 1) + j
        m = ((src >= 0) & (src < T))[:, None] & md[None, :]
        xv = tl.load(x_ptr + b * sx_b + src[:, None] * sx_t + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
        acc += xv * tl.load(w_ptr + j * D + offs_d, mask=md, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _conv_fwd(
    x_ptr, w_ptr, bias_ptr, y_ptr, sx_b, sx_t, T, D, n_tb, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr
):
    pid = tl.program_id(0)
    b = (pid // n_tb).to(tl.int64)
    t = (pid % n_tb) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    pre = _conv_pre(x_ptr, w_ptr, bias_ptr, b, t, offs_d, sx_b, sx_t, T, D, K, BLOCK_T, BLOCK_D)
    m = (t < T)[:, None] & (offs_d < D)[None, :]
    y = pre * _sigmoid(pre)
    tl.store(y_ptr + b * T * D + t[:, None] * D + offs_d[None, :], y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _conv_bwd_pre(
    x_ptr,
    w_ptr,
    bias_ptr,
    dy_ptr,
    dpre_ptr,
    dw_ptr,
    db_ptr,
    sx_b,
    sx_t,
    sdy_b,
    sdy_t,
    T,
    D,
    n_tb,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # dpre = dy * silu'(pre), and this time block's partial sums of dw and dbias
    pid = tl.program_id(0)
    b = (pid // n_tb).to(tl.int64)
    t = (pid % n_tb) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    md = offs_d < D
    m = (t < T)[:, None] & md[None, :]
    pre = _conv_pre(x_ptr, w_ptr, bias_ptr, b, t, offs_d, sx_b, sx_t, T, D, K, BLOCK_T, BLOCK_D)
    s = _sigmoid(pre)
    dy = tl.load(dy_ptr + b * sdy_b + t[:, None] * sdy_t + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
    dpre = tl.where(m, dy * s * (1.0 + pre * (1.0 - s)), 0.0)
    tl.store(dpre_ptr + b * T * D + t[:, None] * D + offs_d[None, :], dpre, mask=m)
    tl.store(db_ptr + pid * D + offs_d, tl.sum(dpre, 0), mask=md)
    for j in tl.static_range(K):
        src = t - (K - 1) + j
        mx = ((src >= 0) & (src < T))[:, None] & md[None, :]
        xv = tl.load(x_ptr + b * sx_b + src[:, None] * sx_t + offs_d[None, :], mask=mx, other=0.0).to(tl.float32)
        tl.store(dw_ptr + (pid * K + j) * D + offs_d, tl.sum(xv * dpre, 0), mask=md)


@triton.jit
def _conv_bwd_x(dpre_ptr, w_ptr, dx_ptr, T, D, n_tb, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # dx[t] = sum_j w[j] dpre[t + K - 1 - j] (dpre of later steps: hence a second pass)
    pid = tl.program_id(0)
    b = (pid // n_tb).to(tl.int64)
    t = (pid % n_tb) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    md = offs_d < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(K):
        dst = t + (K - 1) - j
        m = (dst < T)[:, None] & md[None, :]
        g = tl.load(dpre_ptr + b * T * D + dst[:, None] * D + offs_d[None, :], mask=m, other=0.0)
        acc += g * tl.load(w_ptr + j * D + offs_d, mask=md, other=0.0).to(tl.float32)[None, :]
    m = (t < T)[:, None] & md[None, :]
    tl.store(dx_ptr + b * T * D + t[:, None] * D + offs_d[None, :], acc.to(dx_ptr.dtype.element_ty), mask=m)


CONV_BLOCK_T, CONV_BLOCK_D = 32, 128


class CausalConvSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias):
        x = _unit_last(x)
        w, bias = w.contiguous(), bias.contiguous()
        ctx.save_for_backward(x, w, bias)
        return _conv_forward(x, w, bias)

    @staticmethod
    def backward(ctx, dy):
        x, w, bias = ctx.saved_tensors
        B, T, D = x.shape
        K = w.shape[0]
        dy = _unit_last(dy)
        n_tb = triton.cdiv(T, CONV_BLOCK_T)
        grid = (B * n_tb, triton.cdiv(D, CONV_BLOCK_D))
        f32 = dict(device=x.device, dtype=torch.float32)
        dpre = torch.empty(B, T, D, **f32)
        dw, db = torch.empty(B * n_tb, K, D, **f32), torch.empty(B * n_tb, D, **f32)
        dx = torch.empty(B, T, D, device=x.device, dtype=x.dtype)
        with _device(x):
            _conv_bwd_pre[grid](
                x,
                w,
                bias,
                dy,
                dpre,
                dw,
                db,
                x.stride(0),
                x.stride(1),
                dy.stride(0),
                dy.stride(1),
                T,
                D,
                n_tb,
                K=K,
                BLOCK_T=CONV_BLOCK_T,
                BLOCK_D=CONV_BLOCK_D,
                num_warps=4,
            )
            _conv_bwd_x[grid](dpre, w, dx, T, D, n_tb, K=K, BLOCK_T=CONV_BLOCK_T, BLOCK_D=CONV_BLOCK_D, num_warps=4)
        return dx, dw.sum(0).to(w.dtype), db.sum(0).to(bias.dtype)


def _conv_forward(x, w, bias):
    B, T, D = x.shape
    K = w.shape[0]
    y = torch.empty(
        B, T, D, device=x.device, dtype=torch.promote_types(torch.promote_types(x.dtype, w.dtype), bias.dtype)
    )
    n_tb = triton.cdiv(T, CONV_BLOCK_T)
    with _device(x):
        _conv_fwd[(B * n_tb, triton.cdiv(D, CONV_BLOCK_D))](
            x,
            w,
            bias,
            y,
            x.stride(0),
            x.stride(1),
            T,
            D,
            n_tb,
            K=K,
            BLOCK_T=CONV_BLOCK_T,
            BLOCK_D=CONV_BLOCK_D,
            num_warps=4,
        )
    return y


def causal_conv_silu(x, weight, bias):
    """x [B, T, D] (unit last stride; rows at any stride, e.g. a half of Mamba's in_proj output), weight [K, D],
    bias [D] -> silu(causal depthwise conv) [B, T, D] in the promoted dtype of the inputs (as the reference)."""
    if _grad_needed(x, weight, bias):
        return CausalConvSilu.apply(x, weight, bias)
    return _conv_forward(_unit_last(x), weight.contiguous(), bias.contiguous())


# ============================================================================================ RMSNorm
@triton.jit
def _rmsnorm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, sx, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(x_ptr + row * sx + cols, mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(tl.sum(x * x, 0), D * 1.0) + eps))
    tl.store(rstd_ptr + row, rstd)
    tl.store(y_ptr + row * D + cols, x * rstd * w, mask=m)


@triton.jit
def _rmsnorm_bwd(x_ptr, w_ptr, rstd_ptr, dy_ptr, dx_ptr, dw_ptr, sx, sdy, R, D, rows_per_prog, BLOCK: tl.constexpr):
    # rows [pid * rows_per_prog, ...): dx per row, and this program's partial sum of dw
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    r0 = pid * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, R)
    for r in range(r0, r1):
        row = tl.cast(r, tl.int64)
        x = tl.load(x_ptr + row * sx + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * sdy + cols, mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        n = x * rstd
        g = dy * w
        mean_gn = tl.math.div_rn(tl.sum(g * n, 0), D * 1.0)
        tl.store(dx_ptr + row * D + cols, (rstd * (g - n * mean_gn)).to(dx_ptr.dtype.element_ty), mask=m)
        dw += dy * n
    tl.store(dw_ptr + pid * D + cols, dw, mask=m)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [R, D] with unit last stride and one row stride (a copy only when that cannot be a view)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _rmsnorm_forward(x2, w, eps):
    R, D = x2.shape
    y = torch.empty(R, D, device=x2.device, dtype=torch.float32)
    rstd = torch.empty(R, device=x2.device, dtype=torch.float32)
    block = _pow2(D)
    with _device(x2):
        _rmsnorm_fwd[(R,)](x2, w, y, rstd, x2.stride(0), D, eps, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return y, rstd


class RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = _rows(x)
        w = weight.contiguous()
        y, rstd = _rmsnorm_forward(x2, w, eps)
        ctx.save_for_backward(x2, w, rstd)
        ctx.x_shape, ctx.w_dtype = x.shape, weight.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        R, D = x2.shape
        dy2 = _rows(dy)
        progs = max(1, min(R, 4 * _sm_count(x2)))
        per = triton.cdiv(R, progs)
        progs = triton.cdiv(R, per)
        dx = torch.empty(R, D, device=x2.device, dtype=x2.dtype)
        dw = torch.empty(progs, D, device=x2.device, dtype=torch.float32)
        block = _pow2(D)
        with _device(x2):
            _rmsnorm_bwd[(progs,)](
                x2,
                w,
                rstd,
                dy2,
                dx,
                dw,
                x2.stride(0),
                dy2.stride(0),
                R,
                D,
                per,
                BLOCK=block,
                num_warps=min(16, max(1, block // 256)),
            )
        return dx.view(ctx.x_shape), dw.sum(0).to(ctx.w_dtype), None


def rms_norm_supported(x, weight) -> bool:
    return x.shape[-1] == weight.shape[0] and 0 < x.shape[-1] <= MAX_NORM_DIM and x.numel() > 0


def rms_norm(x, weight, eps: float):
    """x / rms(x) * weight over the last dim, float32 out (as fused.rms_norm_reference)."""
    if _grad_needed(x, weight):
        return RMSNorm.apply(x, weight, eps)
    return _rmsnorm_forward(_rows(x), weight.contiguous(), eps)[0].view(x.shape)


# ============================================================================================ SwiGLU gate
@triton.jit
def _swiglu_fwd(a_ptr, b_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (a * _sigmoid(a) * b).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd(a_ptr, b_ptr, dy_ptr, da_ptr, db_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s = _sigmoid(a)
    tl.store(da_ptr + offs, (dy * b * s * (1.0 + a * (1.0 - s))).to(da_ptr.dtype.element_ty), mask=m)
    tl.store(db_ptr + offs, (dy * a * s).to(db_ptr.dtype.element_ty), mask=m)


SWIGLU_BLOCK = 1024


def _swiglu_forward(a, b):
    y = torch.empty_like(a, memory_format=torch.contiguous_format)
    n = a.numel()
    with _device(a):
        _swiglu_fwd[(triton.cdiv(n, SWIGLU_BLOCK),)](a, b, y, n, BLOCK=SWIGLU_BLOCK, num_warps=4)
    return y


class SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        a, b = a.contiguous(), b.contiguous()
        ctx.save_for_backward(a, b)
        return _swiglu_forward(a, b)

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        dy = dy.contiguous()
        da, db = torch.empty_like(a), torch.empty_like(b)
        n = a.numel()
        with _device(a):
            _swiglu_bwd[(triton.cdiv(n, SWIGLU_BLOCK),)](a, b, dy, da, db, n, BLOCK=SWIGLU_BLOCK, num_warps=4)
        return da, db


def swiglu(a, b):
    """silu(a) * b (same shape and dtype), computed in float32 and rounded once."""
    if _grad_needed(a, b):
        return SwiGLU.apply(a, b)
    return _swiglu_forward(a.contiguous(), b.contiguous())


# ============================================================================================ RoPE
@triton.jit
def _rope(
    x_ptr,
    cos_ptr,
    sin_ptr,
    y_ptr,
    sx_b,
    sx_h,
    sx_t,
    sc_b,
    sy_b,
    sy_h,
    sy_t,
    H,
    T,
    half,
    BACKWARD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # one (batch, position) per program, BLOCK_H heads: y = x cos + rotate_half(x) sin, or its transpose
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    mi = i < half
    m = (h < H)[:, None] & mi[None, :]
    cs = b * sc_b + t * 2 * half
    c1 = tl.load(cos_ptr + cs + i, mask=mi, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + cs + half + i, mask=mi, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + cs + i, mask=mi, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + cs + half + i, mask=mi, other=0.0).to(tl.float32)[None, :]
    xb = x_ptr + b * sx_b + t * sx_t + h[:, None] * sx_h + i[None, :]
    x1 = tl.load(xb, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xb + half, mask=m, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    yb = y_ptr + b * sy_b + t * sy_t + h[:, None] * sy_h + i[None, :]
    tl.store(yb, y1.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(yb + half, y2.to(y_ptr.dtype.element_ty), mask=m)


def _rope_apply(x, cos, sin, backward: bool):
    """x [B, H, T, D] (unit last stride) -> same shape, laid out [B, T, H, D] (a transpose from the projection)."""
    B, H, T, D = x.shape
    y = torch.empty(B, T, H, D, device=x.device, dtype=torch.promote_types(x.dtype, cos.dtype)).transpose(1, 2)
    cb = cos.stride(0) if cos.dim() == 3 else 0
    bh = min(16, _pow2(H))
    with _device(x):
        _rope[(B * T, triton.cdiv(H, bh))](
            x,
            cos,
            sin,
            y,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            cb,
            y.stride(0),
            y.stride(1),
            y.stride(2),
            H,
            T,
            D // 2,
            BACKWARD=backward,
            BLOCK_H=bh,
            BLOCK_HALF=_pow2(D // 2),
            num_warps=4,
        )
    return y


class Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return _rope_apply(x, cos, sin, False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rope_apply(_unit_last(dy), cos, sin, True).to(ctx.x_dtype), None, None


def rope_supported(x, cos, sin) -> bool:
    B, H, T, D = x.shape
    return (
        D % 2 == 0
        and x.stride(-1) == 1
        and not cos.requires_grad
        and not sin.requires_grad
        and cos.is_contiguous()
        and sin.is_contiguous()
        and cos.shape == sin.shape
        and tuple(cos.shape[-2:]) == (T, D)
        and (cos.dim() == 2 or (cos.dim() == 3 and cos.shape[0] == B))
    )


def rope(x, cos, sin):
    if _grad_needed(x):
        return Rope.apply(x, cos, sin)
    return _rope_apply(x, cos, sin, False)


# ============================================================================================ head cross-entropy
@triton.jit
def _xent_rows(logits_ptr, target_ptr, loss_ptr, V, stride, BLOCK_V: tl.constexpr):
    # in place: the row becomes softmax - onehot(target); loss = logsumexp(row) - row[target]
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    cols = tl.arange(0, BLOCK_V)
    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), 0)
    s = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)
    for v0 in range(0, V, BLOCK_V):  # online max and sum of exp: one read of the row
        lv = tl.load(base + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(lv, 0))
        s = s * _exp(m - m_new) + tl.sum(_exp(lv - m_new), 0)
        m = m_new
    tgt = tl.load(target_ptr + row)
    picked = tl.load(base + tgt).to(tl.float32)
    tl.store(loss_ptr + row, m + _log(s) - picked)  # NaN / inf anywhere in the row reach s, hence the loss
    inv = tl.math.div_rn(1.0, s)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        lv = tl.load(base + c, mask=c < V, other=0.0).to(tl.float32)
        p = _exp(lv - m) * inv
        p = tl.where(c == tgt, p - 1.0, p)
        tl.store(base + c, p.to(logits_ptr.dtype.element_ty), mask=c < V)


XENT_BLOCK_V = 4096
# Logits per block of rows: large enough that a [N, V] head usually takes one or two blocks (each block's dW is
# rounded in the compute dtype once, as the unfused GEMM rounds it), bounded so memory stays bounded.
XENT_BLOCK_ELEMENTS = 1 << 26


def xent_rows_(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """In place: logits [R, V] (unit last stride) become softmax - onehot(target); returns float32 losses [R]."""
    R, V = logits.shape
    loss = torch.empty(R, device=logits.device, dtype=torch.float32)
    if R:
        with _device(logits):
            _xent_rows[(R,)](
                logits, target, loss, V, logits.stride(0), BLOCK_V=min(XENT_BLOCK_V, _pow2(V)), num_warps=8
            )
    return loss


def _xent_blocks(h, w, target, want_h: bool, want_w: bool, block_elements: int):
    """Float64 loss sum, d(sum)/dh [N, d] (h's dtype) and d(sum)/dW transposed [d, V] (float32), a block of rows
    at a time: project (cuBLAS), turn into softmax - onehot (the kernel), multiply into the gradients."""
    N, V = h.shape[0], w.shape[0]
    if N:
        torch._assert_async(((target >= 0) & (target < V)).all())  # out-of-range targets: a device-side error
    target = target.long().contiguous()
    rows = max(1, min(N, block_elements // max(1, V)))
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    dh = torch.empty_like(h) if want_h else None
    dwt = torch.zeros(h.shape[1], V, device=h.device, dtype=torch.float32) if want_w else None
    for s in range(0, N, rows):
        e = min(N, s + rows)
        g = torch.mm(h[s:e], w.t())
        total += xent_rows_(g, target[s:e]).sum(dtype=torch.float64)
        if want_h:
            torch.mm(g, w, out=dh[s:e])
        if want_w:
            if g.dtype == torch.float32:
                dwt.addmm_(h[s:e].t(), g)
            else:
                dwt += torch.mm(h[s:e].t(), g)
    return total, dh, dwt


class LinearCrossEntropy(torch.autograd.Function):
    """mean(cross_entropy(h @ W.T, target)) with the gradients of h and W formed in the forward, block by block
    (losses._LinearCrossEntropy's CPU-kernel form): the [N, V] logits never exist whole, nor in float32."""

    @staticmethod
    def forward(ctx, h, weight, target, compute_dtype, block_elements):
        with torch.autocast(device_type=h.device.type, enabled=False):
            total, dh, dwt = _xent_blocks(
                h.to(compute_dtype),
                weight.to(compute_dtype),
                target,
                ctx.needs_input_grad[0],
                ctx.needs_input_grad[1],
                block_elements,
            )
        ctx.save_for_backward(dh, dwt)
        ctx.n, ctx.dtypes = h.shape[0], (h.dtype, weight.dtype)
        return (total / h.shape[0]).float()

    @staticmethod
    def backward(ctx, grad_out):
        dh, dwt = ctx.saved_tensors
        scale = grad_out / ctx.n
        return (
            (dh * scale).to(ctx.dtypes[0]) if dh is not None else None,
            (dwt.t() * scale).to(ctx.dtypes[1]).contiguous() if dwt is not None else None,
            None,
            None,
            None,
        )


def linear_cross_entropy(h, weight, target, block_elements: int = 0):
    """mean(cross_entropy(h @ weight.T, target)) for h [N, d], target [N], as a float32 scalar. Under autocast the
    products run in the autocast dtype (as F.linear would), the softmax in float32."""
    if torch.is_autocast_enabled(h.device.type):
        cdt = torch.get_autocast_dtype(h.device.type)
    else:
        cdt = torch.promote_types(h.dtype, weight.dtype)
    block = block_elements or XENT_BLOCK_ELEMENTS
    if _grad_needed(h, weight):
        return LinearCrossEntropy.apply(h, weight, target, cdt, block)
    with torch.autocast(device_type=h.device.type, enabled=False):
        total, _, _ = _xent_blocks(h.to(cdt), weight.to(cdt), target, False, False, block)
    return (total / max(1, h.shape[0])).float()
