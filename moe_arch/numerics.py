"""Rounding and update-size numerics shared by training (the precision preflight, Muon's lr) and the doctor
(the checkpoint analysis and the live monitor): the layer below both.

*Rounding*: a tensor stored in a floating format with p bits of precision (bf16: 8, fp16: 11, fp32: 24)
represents values in [2^e, 2^(e+1)) with spacing ULP = 2^(e - p + 1). An update smaller than half that
spacing rounds back to the stored value: the weight cannot move. At 1.0 in bf16 the spacing is 2^-7, so
the smallest surviving update is 2^-8 = 3.9e-3; an AdamW step of lr = 3e-4 is lost every time.

*Expected update size*: AdamW's step is lr * m_hat / (sqrt(v_hat) + eps) per element (about lr on the first
step, when |m_hat| / sqrt(v_hat) = 1). Muon's step is the orthogonalised momentum scaled by the adjusted
learning rate; an orthogonalised m x n matrix has RMS entry 1 / sqrt(max(m, n)).
"""

from __future__ import annotations

import math

import torch

# Bits of precision (significand incl. the implicit bit) of the floating formats checkpoints use.
PRECISION_BITS = {torch.float32: 24, torch.float64: 53, torch.bfloat16: 8, torch.float16: 11}
LOW_PRECISION = (torch.bfloat16, torch.float16)


def half_ulp(w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Half the spacing of ``dtype`` (default: w's dtype) at each element's magnitude, as float32.

    Zeros (and subnormals) get the spacing at the smallest normal number: an update of any realistic size
    moves them, which is what the rule should say.
    """
    dtype = dtype or w.dtype
    bits = PRECISION_BITS.get(dtype)
    if bits is None:
        raise TypeError(f"half_ulp: unsupported dtype {dtype}")
    tiny = torch.finfo(dtype).tiny
    mag = w.detach().abs().float().clamp_min(tiny)
    _, exp = torch.frexp(mag)  # mag = m * 2^exp with m in [0.5, 1): the binade is [2^(exp-1), 2^exp)
    return torch.ldexp(torch.ones_like(mag), exp - 1 - bits)  # 2^(e - p) with e = exp - 1


def half_ulp_at(value: float, dtype: torch.dtype) -> float:
    return float(half_ulp(torch.tensor([value], dtype=torch.float32), dtype)[0])


def adam_update(
    lr: float,
    exp_avg: torch.Tensor | None,
    exp_avg_sq: torch.Tensor | None,
    step: float,
    betas: tuple[float, float],
    eps: float,
) -> torch.Tensor | float:
    """Per-element magnitude of the next AdamW step from its moments; ``lr`` when the moments are unknown."""
    if exp_avg is None or exp_avg_sq is None or step <= 0:
        return lr
    b1, b2 = betas
    m_hat = exp_avg.float().abs() / (1 - b1**step)
    v_hat = exp_avg_sq.float() / (1 - b2**step)
    return lr * m_hat / (v_hat.sqrt() + eps)


def muon_adjusted_lr(lr: float, shape: tuple[int, ...], adjust_lr_fn: str | None) -> float:
    """torch.optim.Muon's learning-rate adjustment for a matrix of ``shape`` (last two dims)."""
    a, b = shape[-2], shape[-1]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, a / b))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(a, b))
    return lr


def muon_update_rms(lr: float, shape: tuple[int, ...], adjust_lr_fn: str | None) -> float:
    """Typical per-element size of a Muon step: adjusted lr times the RMS entry of an orthogonal matrix."""
    return muon_adjusted_lr(lr, shape, adjust_lr_fn) / math.sqrt(max(shape[-2], shape[-1]))


def fraction_lost(w: torch.Tensor, update: torch.Tensor | float, dtype: torch.dtype | None = None) -> float | None:
    """Share of the elements that *get* an update (> 0) whose update is below half a ULP of their stored value,
    so it rounds away. ``None`` when no element gets an update (that is a missing gradient, not rounding)."""
    hu = half_ulp(w, dtype)
    upd = update if isinstance(update, torch.Tensor) else torch.full_like(hu, float(update))
    upd = upd.float()
    live = upd > 0
    n = int(live.sum())
    return float(((upd < hu) & live).sum()) / n if n else None
