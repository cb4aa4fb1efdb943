"""Mamba-1 selective state-space layer in pure PyTorch.

Per channel d and state n the layer runs the linear recurrence

    h_t = exp(dt_t[d] * A[d, n]) * h_{t-1} + dt_t[d] * u_t[d] * B_t[n]
    y_t[d] = sum_n C_t[n] h_t[d, n] + D[d] u_t[d]

with input-dependent dt, B, C (the "selective" part). The names and layout follow the reference
implementation (``in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj``) so weights map one to one onto
Hugging Face's ``MambaMixer``, which the parity test compares against.

The scan is *chunked*: a sequence of length L is cut into L/c chunks of c ~ sqrt(L) steps; all chunks are
scanned at once (c vectorised steps), then chunk boundary states are carried across chunks (L/c small
steps) and added back with the within-chunk decay exp(A * cumsum(dt)). That is O(L) work in ~2 sqrt(L)
vectorised steps rather than L Python-level steps. Autograd does not record the steps: ``SelectiveScan``
is a custom Function whose backward is the reverse scan of the adjoint (the same kernel run backwards),
as in the CUDA kernels of ``mamba_ssm``. Those kernels are not used here: on a GPU the Triton scan of
``triton_kernels.py`` runs (the same chunked form, the state in registers), and this pure path where Triton is
missing (a slower, documented path, never a different model).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from moe_arch.config import ModelConfig
from moe_arch.model import cpu_kernels
from moe_arch.model.fused import causal_conv_silu, shifted_conv_silu, triton, triton_use
from moe_arch.model.roles import register_roles


def _chunk_len(L: int, chunk: int) -> int:
    """``chunk`` if given; else a divisor of L near sqrt(L) (no padding copies), else ceil(sqrt(L))."""
    if chunk > 0:
        return max(1, min(L, chunk))
    root = math.sqrt(L)
    for c in range(math.ceil(root), int(2 * root) + 1):
        if L % c == 0:
            return c
    return max(1, math.ceil(root))


def _pad_time(x: torch.Tensor, Lp: int, value: float) -> torch.Tensor:
    L = x.shape[0]
    if Lp == L:
        return x
    return torch.cat([x, x.new_full((Lp - L, *x.shape[1:]), value)], 0)


def _chunk_major(x: torch.Tensor, c: int, pad: float = 0.0) -> torch.Tensor:
    """[L, ...] -> [c, nc, ...]: step j of every chunk is one contiguous slice. Padding steps have dt = 0 (decay 1)
    and input 0, so they leave the state unchanged in both directions."""
    nc = math.ceil(x.shape[0] / c)
    return _pad_time(x, nc * c, pad).view(nc, c, *x.shape[1:]).transpose(0, 1).contiguous()


def _time_major(x: torch.Tensor, L: int) -> torch.Tensor:
    """[c, nc, ...] -> [L, ...]."""
    return x.transpose(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])[:L]


def chunked_scan(
    dA: torch.Tensor,
    b: torch.Tensor,
    cdt: torch.Tensor,
    A: torch.Tensor,
    h0: torch.Tensor | None,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve h_t = dA_t * h_{t-1} + b_t for all t (or, with ``reverse``, h_t = b_t + dA_{t+1} * h_{t+1}).

    Chunk-major tensors: dA, b [c, nc, B, D, N] with dA = exp(dt * A); cdt [c, nc, B, D] the cumulative sum of dt
    within each chunk; A [D, N]; h0 [B, D, N] or None (zeros). All chunks are scanned at once (c vectorised steps),
    then chunk boundary states are carried across the nc chunks and added back with the within-chunk decay
    exp(A * cumsum(dt)). Returns all states (same layout) and the state after the last step.
    """
    c, nc = b.shape[:2]
    h = torch.empty_like(b)
    carry = h0 if h0 is not None else torch.zeros_like(b[0, 0])
    carries = torch.empty_like(b[0])
    if not reverse:
        h[0] = b[0]
        for j in range(1, c):
            torch.addcmul(b[j], dA[j], h[j - 1], out=h[j])
        decay = (cdt.unsqueeze(-1) * A).exp_()  # prod_{m<=j} dA_m within the chunk
        for k in range(nc):
            carries[k] = carry
            carry = torch.addcmul(h[c - 1, k], decay[c - 1, k], carry)
        start = 0 if h0 is not None else 1  # chunk 0 starts from zeros: nothing to add
        if nc > start:
            h[:, start:].addcmul_(decay[:, start:], carries[start:])
        return h, carry
    h[c - 1] = b[c - 1]
    for j in range(c - 2, -1, -1):
        torch.addcmul(b[j], dA[j + 1], h[j + 1], out=h[j])
    decay = ((cdt[c - 1 :] - cdt).unsqueeze(-1) * A).exp_()  # prod_{j<m<=c-1} dA_m
    for k in range(nc - 1, -1, -1):
        carries[k] = carry
        carry = dA[0, k] * torch.addcmul(h[0, k], decay[0, k], carry)
    end = nc if h0 is not None else nc - 1  # the last chunk has nothing after it
    if end > 0:
        h[:, :end].addcmul_(decay[:, :end], carries[:end])
    return h, carry


def chunked_scan_functional(
    dA: torch.Tensor,
    b: torch.Tensor,
    cdt: torch.Tensor,
    A: torch.Tensor,
    h0: torch.Tensor | None,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`chunked_scan` without in-place writes (steps collected, then stacked): the form torch.compile can fuse.
    Eagerly it is ~30% slower than the in-place form, which is why both exist; tests hold both to the recurrence."""
    c, nc = b.shape[:2]
    carry = h0 if h0 is not None else torch.zeros_like(b[0, 0])
    if not reverse:
        steps = [b[0]]
        for j in range(1, c):
            steps.append(torch.addcmul(b[j], dA[j], steps[-1]))
        h = torch.stack(steps)
        decay = torch.exp(cdt.unsqueeze(-1) * A)
        carries = []
        for k in range(nc):
            carries.append(carry)
            carry = torch.addcmul(h[c - 1, k], decay[c - 1, k], carry)
        return h + decay * torch.stack(carries), carry
    steps = [b[c - 1]]
    for j in range(c - 2, -1, -1):
        steps.append(torch.addcmul(b[j], dA[j + 1], steps[-1]))
    h = torch.stack(steps[::-1])
    decay = torch.exp((cdt[c - 1 :] - cdt).unsqueeze(-1) * A)
    carries = [None] * nc
    for k in range(nc - 1, -1, -1):
        carries[k] = carry
        carry = dA[0, k] * torch.addcmul(h[0, k], decay[0, k], carry)
    return h + decay * torch.stack(carries), carry


# Elements per [L, B, D, N] working tensor of one block on the CPU: small enough to stay in cache, large enough
# that the ~2 sqrt(L) vectorised steps per block are not dominated by Python overhead.
CPU_BLOCK_ELEMENTS = 1 << 20


def _blocks(L: int, B: int, D: int, N: int, device: torch.device) -> list[tuple[int, int, int, int]]:
    """(b0, b1, d0, d1) blocks of batch x channels; the scan of each (batch, channel) pair is independent."""
    if device.type != "cpu":
        return [(0, B, 0, D)]
    per_bd = L * N
    db = max(1, min(D, CPU_BLOCK_ELEMENTS // max(1, per_bd * B)))
    bb = B if db > 1 or per_bd * B * 8 <= CPU_BLOCK_ELEMENTS else max(1, CPU_BLOCK_ELEMENTS // (per_bd * 8))
    if bb < B:
        db = max(1, min(D, CPU_BLOCK_ELEMENTS // (per_bd * bb)))
    return [(b0, min(B, b0 + bb), d0, min(D, d0 + db)) for b0 in range(0, B, bb) for d0 in range(0, D, db)]


def _bmv(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Batched matrix-vector product over leading dims: m [..., P, Q], v [..., Q] -> [..., P]."""
    lead = m.shape[:-2]
    out = torch.bmm(m.reshape(-1, m.shape[-2], m.shape[-1]), v.reshape(-1, v.shape[-1], 1))
    return out.view(*lead, m.shape[-2])


def scan_block_forward(u, dt, A, Bm, Cm, h0, c: int, scan=chunked_scan):
    """One block, time-major in and out: u, dt [L, B, D]; Bm, Cm [L, B, N] -> y [L, B, D], last state."""
    L = u.shape[0]
    dtc, uc, Bc, Cc = (_chunk_major(x, c) for x in (dt, u, Bm, Cm))
    dA = torch.exp(dtc.unsqueeze(-1) * A)
    h, last = scan(dA, (dtc * uc).unsqueeze(-1) * Bc.unsqueeze(-2), dtc.cumsum(0), A, h0)
    return _time_major(_bmv(h, Cc), L), last


def scan_block_backward(u, dt, A, Bm, Cm, h0, gy, c: int, scan=chunked_scan):
    """Gradients of one block (states recomputed): returns du, d_dt, dA, dB, dC (time-major)."""
    L = u.shape[0]
    dtc, uc, Bc, Cc, gyc = (_chunk_major(x, c) for x in (dt, u, Bm, Cm, gy))
    cdt = dtc.cumsum(0)
    dA = torch.exp(dtc.unsqueeze(-1) * A)
    dtu = dtc * uc
    h, _ = scan(dA, dtu.unsqueeze(-1) * Bc.unsqueeze(-2), cdt, A, h0)
    lam, _ = scan(dA, gyc.unsqueeze(-1) * Cc.unsqueeze(-2), cdt, A, None, reverse=True)  # dL/dh_t, total
    # dL/d(dA_t) = lam_t * h_{t-1}: the previous step is one step back in the same chunk, or the previous
    # chunk's last step (h0 before the first).
    first = h0.unsqueeze(0) if h0 is not None else torch.zeros_like(h[-1, :1])
    h_prev = torch.cat([torch.cat([first, h[-1, :-1]]).unsqueeze(0), h[:-1]])
    q = lam * dA * h_prev
    s1 = _bmv(lam, Bc)  # dL/d(dt * u)
    d_A = (q * dtc.unsqueeze(-1)).sum((0, 1, 2))
    d_dt = s1 * uc + (q * A).sum(-1)
    d_u = s1 * dtc
    d_B = _bmv(lam.transpose(-1, -2), dtu)
    d_C = _bmv(h.transpose(-1, -2), gyc)
    return (_time_major(d_u, L), _time_major(d_dt, L), d_A, _time_major(d_B, L), _time_major(d_C, L))


# train.compile replaces these with torch.compile'd versions of the same functions (see use_compiled_scan).
_KERNELS = {"forward": scan_block_forward, "backward": scan_block_backward}


def use_compiled_scan(enabled: bool = True) -> None:
    """Run the scan's block kernels through torch.compile (inductor fuses the element-wise chains; on the CPU the
    scan runs ~2.5x faster after ~20 s of compilation per shape). Same functions, same results (tested)."""
    if enabled:
        _KERNELS["forward"] = torch.compile(partial(scan_block_forward, scan=chunked_scan_functional), dynamic=False)
        _KERNELS["backward"] = torch.compile(partial(scan_block_backward, scan=chunked_scan_functional), dynamic=False)
    else:
        _KERNELS.update(forward=scan_block_forward, backward=scan_block_backward)


class SelectiveScan(torch.autograd.Function):
    """y = C . h with h from the selective recurrence; time-major inputs.

    u, dt [L, B, D]; A [D, N]; Bm, Cm [L, B, N]; h0 [B, D, N] or None. Returns y [L, B, D], h_last.
    States are not saved: the backward recomputes them block by block. Measured on the tiny preset's shapes,
    keeping them saves no time (a block is recomputed from cache) and would cost O(L * D * N) memory per layer.
    """

    @staticmethod
    def forward(ctx, u, dt, A, Bm, Cm, h0, chunk: int):
        L, B, D = u.shape
        N = A.shape[1]
        c = _chunk_len(L, chunk)
        y = u.new_empty(L, B, D)
        h_last = u.new_empty(B, D, N)
        for b0, b1, d0, d1 in _blocks(L, B, D, N, u.device):
            yb, hl = _KERNELS["forward"](
                u[:, b0:b1, d0:d1],
                dt[:, b0:b1, d0:d1],
                A[d0:d1],
                Bm[:, b0:b1],
                Cm[:, b0:b1],
                h0[b0:b1, d0:d1] if h0 is not None else None,
                c,
            )
            y[:, b0:b1, d0:d1] = yb
            h_last[b0:b1, d0:d1] = hl
        ctx.chunk = c
        ctx.save_for_backward(u, dt, A, Bm, Cm, h0)
        ctx.mark_non_differentiable(h_last)
        return y, h_last

    @staticmethod
    def backward(ctx, gy, _gh_last):
        u, dt, A, Bm, Cm, h0 = ctx.saved_tensors
        L, B, D = u.shape
        N = A.shape[1]
        d_u, d_dt = torch.empty_like(u), torch.empty_like(dt)
        d_A = torch.zeros_like(A)
        d_B, d_C = torch.zeros_like(Bm), torch.zeros_like(Cm)
        gy = gy.contiguous()
        for b0, b1, d0, d1 in _blocks(L, B, D, N, u.device):
            du, ddt, dA, dB, dC = _KERNELS["backward"](
                u[:, b0:b1, d0:d1],
                dt[:, b0:b1, d0:d1],
                A[d0:d1],
                Bm[:, b0:b1],
                Cm[:, b0:b1],
                h0[b0:b1, d0:d1] if h0 is not None else None,
                gy[:, b0:b1, d0:d1],
                ctx.chunk,
            )
            d_u[:, b0:b1, d0:d1] = du
            d_dt[:, b0:b1, d0:d1] = ddt
            d_A[d0:d1] += dA
            d_B[:, b0:b1] += dB
            d_C[:, b0:b1] += dC
        return d_u, d_dt, d_A, d_B, d_C, None, None


class CpuSelectiveScan(torch.autograd.Function):
    """The same function through the compiled CPU kernel (``kernels/selective_scan_cpu.c``): one pass per direction
    with the state in registers, instead of the chunked scan's ~25 passes over a [L, B, D, N] tensor; the skip
    term and the output gate fused in, as in mamba_ssm's ``selective_scan_fn``. Batch-major contiguous float32
    inputs; states recomputed in the backward as in :class:`SelectiveScan`."""

    @staticmethod
    def forward(ctx, u, dt, A, Bm, Cm, Dskip, z, h0):
        AT = A.t().contiguous()
        out, h_last = cpu_kernels.scan_forward(u, dt, AT, Bm, Cm, Dskip, z, h0)
        ctx.save_for_backward(u, dt, AT, Bm, Cm, Dskip, z, h0)
        ctx.mark_non_differentiable(h_last)
        return out, h_last

    @staticmethod
    def backward(ctx, gout, _gh_last):
        u, dt, AT, Bm, Cm, Dskip, z, h0 = ctx.saved_tensors
        du, ddt, dAT, dB, dC, dD, dz = cpu_kernels.scan_backward(u, dt, AT, Bm, Cm, Dskip, z, h0, gout.contiguous())
        return du, ddt, dAT.t(), dB, dC, dD, dz, None


def selective_scan(u, dt, A, Bm, Cm, h0=None, chunk: int = 0, impl: str = "auto", D=None, z=None):
    """Batch-major: u, dt [B, L, D]; Bm, Cm [B, L, N] -> out [B, L, D], h_last [B, D, N], where
    out = C.h (+ D * u if ``D`` [D] is given) (* silu(z) if ``z`` [B, L, D] is given).

    ``impl="auto"`` runs the CPU kernel for float32 CPU tensors when it is available, the Triton kernel for float32
    CUDA tensors (``triton_kernels.selective_scan``), else the chunked scan."""
    extra = tuple(t for t in (h0, D, z) if t is not None)
    if impl == "auto" and cpu_kernels.supports(u, dt, A, Bm, Cm, *extra, d_state=A.shape[1]):
        c = lambda t: None if t is None else t.contiguous()
        return CpuSelectiveScan.apply(c(u), c(dt), A, c(Bm), c(Cm), c(D), c(z), c(h0))
    if (
        impl == "auto"
        and triton_use(u, dt, A, Bm, Cm, *extra, dtypes=(torch.float32,))
        and A.shape[1] <= triton().MAX_STATE
    ):
        return triton().selective_scan(u, dt, A, Bm, Cm, D, z, h0)  # CUDA: the Triton scan, the same fusion
    y, h_last = _chunked_selective_scan(u, dt, A, Bm, Cm, h0, chunk)
    if D is not None:
        y = y + u * D
    if z is not None:
        y = y * F.silu(z)
    return y, h_last


def _chunked_selective_scan(u, dt, A, Bm, Cm, h0, chunk):
    y, h_last = SelectiveScan.apply(
        u.transpose(0, 1).contiguous(),
        dt.transpose(0, 1).contiguous(),
        A,
        Bm.transpose(0, 1).contiguous(),
        Cm.transpose(0, 1).contiguous(),
        h0,
        chunk,
    )
    return y.transpose(0, 1), h_last


def reference_scan(u, dt, A, Bm, Cm, h0=None):
    """Step-by-step recurrence (tests only): same signature as ``selective_scan``."""
    Bsz, L, D = u.shape
    h = torch.zeros(Bsz, D, A.shape[1], dtype=u.dtype, device=u.device) if h0 is None else h0
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[:, :, None] * Bm[:, t, None, :]
        ys.append((h * Cm[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1), h


class MambaCache:
    """Recurrent state of one Mamba layer: the last d_conv-1 conv inputs [B, d_conv-1, D] and the SSM state
    [B, D, N]. Allocated once per generation and updated in place.

    Speculative decoding verifies several tokens in one call and then keeps only some of them. While
    ``recording``, a call keeps the state after each of its rows and its conv inputs, so ``rollback`` can
    restore the state after any prefix (a recurrent state cannot be "un-scanned")."""

    def __init__(self, batch: int, d_inner: int, d_state: int, d_conv: int, device, dtype):
        self.conv = torch.zeros(batch, d_conv - 1, d_inner, device=device, dtype=dtype)
        # the scan runs in float32 at least (bf16 models) and in float64 for float64 models
        self.ssm = torch.zeros(batch, d_inner, d_state, device=device, dtype=torch.promote_types(dtype, torch.float32))
        self.recording = False
        self._states: torch.Tensor | None = None  # [B, T + 1, D, N]: before the call, then after each row
        self._conv_in: torch.Tensor | None = None  # [B, d_conv - 1 + T, D]

    def row(self, b: int) -> "MambaCache":
        """A cache of batch 1 that reads and writes row ``b`` of this one (for one prompt's prefill)."""
        view = MambaCache.__new__(MambaCache)
        view.conv, view.ssm = self.conv[b : b + 1], self.ssm[b : b + 1]
        view.recording, view._states, view._conv_in = False, None, None
        return view

    def rollback(self, rows: torch.Tensor) -> None:
        """Keep the first ``rows[b]`` rows of sequence b's last recorded call (0: none of them)."""
        if self._states is None:
            return
        idx = rows.to(torch.long)
        ar = torch.arange(idx.shape[0], device=idx.device)
        self.ssm.copy_(self._states[ar, idx])
        k1 = self.conv.shape[1]
        take = idx[:, None] + torch.arange(k1, device=idx.device)[None, :]
        self.conv.copy_(self._conv_in.gather(1, take[:, :, None].expand(-1, -1, self.conv.shape[2])))
        self._states = self._conv_in = None


@register_roles({"A_log": "ssm", "D": "ssm"})
class Mamba(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        d = cfg.d_model
        self.d_inner = cfg.mamba_expand * d
        self.d_state = cfg.mamba_d_state
        self.d_conv = cfg.mamba_d_conv
        self.dt_rank = cfg.resolved_dt_rank
        self.chunk = cfg.mamba_chunk_size
        self.scan_impl = cfg.mamba_scan
        self.in_proj = nn.Linear(d, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, self.d_conv, groups=self.d_inner, padding=self.d_conv - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d, bias=False)

    @torch.no_grad()
    def init_weights(
        self,
        std: float,
        out_std: float,
        gen: torch.Generator,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_floor: float = 1e-4,
    ) -> None:
        """Mamba-1 initialisation: S4D-real A, D = 1, dt log-uniform in [dt_min, dt_max] through the bias."""
        nn.init.normal_(self.in_proj.weight, 0.0, std, generator=gen)
        nn.init.normal_(self.x_proj.weight, 0.0, std, generator=gen)
        nn.init.normal_(self.out_proj.weight, 0.0, out_std, generator=gen)
        bound = 1.0 / math.sqrt(self.d_conv)  # PyTorch's default Conv1d bound for fan_in = d_conv (depthwise)
        nn.init.uniform_(self.conv1d.weight, -bound, bound, generator=gen)
        nn.init.uniform_(self.conv1d.bias, -bound, bound, generator=gen)
        dt_std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -dt_std, dt_std, generator=gen)
        u = torch.rand(self.d_inner, generator=gen, device=self.dt_proj.bias.device)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(A).expand(self.d_inner, -1))
        self.D.fill_(1.0)

    def new_cache(self, batch: int, max_len: int, device, dtype) -> MambaCache:
        return MambaCache(batch, self.d_inner, self.d_state, self.d_conv, device, dtype)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        valid = ctx.valid
        cache: MambaCache | None = ctx.cache
        xz = self.in_proj(x)
        xi, z = xz.chunk(2, dim=-1)
        k = self.d_conv
        w = self.conv1d.weight.squeeze(1).t()  # [k, D]
        if cache is None:
            xc = causal_conv_silu(xi, w, self.conv1d.bias)  # [B, T, D]
        else:
            # Generation: the cached inputs stand in front of the new ones instead of zeros.
            conv_in = torch.cat([cache.conv.to(xi.dtype), xi], dim=1)
            xc = shifted_conv_silu(conv_in, w, self.conv1d.bias)
        sdt = torch.promote_types(x.dtype, torch.float32)  # bf16 models scan in float32, float64 ones in float64
        dt_low, Bm, Cm = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt_low).to(sdt))
        if valid is not None:
            dt = dt * valid.unsqueeze(-1)  # padding: dt = 0 leaves the state untouched
        A = -torch.exp(self.A_log.to(sdt))
        u, Bm, Cm, z, Dskip = xc.to(sdt), Bm.to(sdt), Cm.to(sdt), z.to(sdt), self.D.to(sdt)
        if cache is not None and cache.recording and T > 1:
            # Speculative verification: one scan step per row (the arithmetic of one-token decoding), keeping the
            # state after each row for the rollback.
            states = [cache.ssm.clone()]
            ys = []
            for t in range(T):
                y_t, h = selective_scan(
                    u[:, t : t + 1],
                    dt[:, t : t + 1],
                    A,
                    Bm[:, t : t + 1],
                    Cm[:, t : t + 1],
                    states[-1],
                    self.chunk,
                    self.scan_impl,
                    D=Dskip,
                    z=z[:, t : t + 1],
                )
                ys.append(y_t)
                states.append(h)
            y, h_last = torch.cat(ys, 1), states[-1]
            cache._states, cache._conv_in = torch.stack(states, 1), conv_in
        else:
            h0 = cache.ssm if cache is not None else None
            y, h_last = selective_scan(u, dt, A, Bm, Cm, h0, self.chunk, self.scan_impl, D=Dskip, z=z)
            if cache is not None:
                cache._states = cache._conv_in = None
        y = y.to(x.dtype)
        if cache is not None:
            cache.ssm.copy_(h_last)
            # Keep the last d_conv-1 *valid* conv inputs of each sequence (padding sits at the end).
            n_valid = torch.full((B,), T, device=x.device) if valid is None else valid.sum(1)
            idx = n_valid[:, None] + torch.arange(k - 1, device=x.device)[None, :]  # in conv_in coordinates
            cache.conv.copy_(conv_in.gather(1, idx[:, :, None].expand(-1, -1, self.d_inner)))
        return self.out_proj(y)
