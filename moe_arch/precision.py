"""Precision policies: how weights are stored and how a step computes. Below ``parallel`` (FSDP2's mixed precision
follows the policy), ``evaluation`` and ``training`` (whose ``training/precision.py`` holds the compensated
updates and the preflight).

| policy               | weights stored | fwd/bwd       | optimizer update                                             |
|----------------------|----------------|---------------|--------------------------------------------------------------|
| ``fp32``             | fp32           | fp32          | plain (CPU default)                                          |
| ``bf16-mixed``       | fp32 (master)  | bf16 autocast | plain, on fp32 weights (GPU default)                         |
| ``bf16-compensated`` | bf16           | bf16          | Kahan-compensated: a bf16 buffer keeps what rounding dropped |
| ``bf16-pure``        | bf16           | bf16          | plain, on bf16 weights: small updates round away             |
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrecisionPolicy:
    name: str
    param_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    compensated: bool

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


POLICIES = {
    "fp32": PrecisionPolicy("fp32", torch.float32, None, False),
    "bf16-mixed": PrecisionPolicy("bf16-mixed", torch.float32, torch.bfloat16, False),
    "bf16-compensated": PrecisionPolicy("bf16-compensated", torch.bfloat16, None, True),
    "bf16-pure": PrecisionPolicy("bf16-pure", torch.bfloat16, None, False),
}


def resolve_policy(name: str, device: torch.device) -> PrecisionPolicy:
    if name == "auto":
        name = "bf16-mixed" if device.type == "cuda" else "fp32"
    return POLICIES[name]
