"""Measured matmul peak of this machine, the denominator of MFU."""

from __future__ import annotations

import time

import torch


def measure_matmul_peak(
    device: torch.device, dtype: torch.dtype | None = None, n: int = 2048, seconds: float = 0.5
) -> float:
    """FLOP/s of an n x n x n matmul in ``dtype`` (fp32 on CPU, bf16 on GPU by default), best of a short run."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b
    sync()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return 2 * n**3 / best
