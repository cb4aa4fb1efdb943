"""How optimizer updates reach the weights under the precision policies (``moe_arch/precision.py``: the table).

``bf16-pure`` exists to reproduce the seed bug: an AdamW step of 3e-4 on a norm weight of 1.0 is below half a
bf16 ULP (2^-8 = 3.9e-3) and is lost every step. Before training, :func:`preflight` computes for every tensor
whether its expected first update survives rounding and lists the tensors that cannot move.

``bf16-compensated`` stores bf16 weights plus a bf16 compensation buffer (4 bytes per parameter instead of fp32
master + bf16 copy). At each step the optimizer works on w = bf16(w) + comp in fp32 (so its states are fp32),
then the result is split again into its bf16 rounding and the new remainder: no update is lost, only delayed.
The remainder is itself stored in bf16, so the pair carries ~16 significant bits (vs fp32's 24): updates as small
as ~2^-16 of the weight survive, and a perfectly regular update stream can drift by a few percent of what it
accumulates (tested). Use ``bf16-mixed`` when memory allows exact fp32 master weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import Optimizer

from moe_arch.numerics import adam_update, fraction_lost, half_ulp_at, muon_update_rms


class CompensatedUpdates:
    """Kahan-compensated optimizer steps for bf16 weights.

    Use as ``with comp.step_context(): optimizer.step()``: inside, every bf16 parameter is temporarily its fp32
    value (bf16 weight + compensation) with an fp32 gradient, so the optimizers compute and keep their state in
    fp32; on exit the result is rounded back to bf16 and the rounding error is stored for the next step.
    """

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = {n: p for n, p in params.items() if p.dtype == torch.bfloat16}
        self.comp = {n: torch.zeros_like(p, dtype=torch.bfloat16) for n, p in self.params.items()}

    @contextlib.contextmanager
    def fp32_view(self, with_grads: bool = True):
        for n, p in self.params.items():
            p.data = p.data.float() + self.comp[n].float()
            if with_grads and p.grad is not None:
                p.grad = p.grad.float()
        try:
            yield
        finally:
            for n, p in self.params.items():
                full = p.data
                rounded = full.to(torch.bfloat16)
                self.comp[n] = (full - rounded.float()).to(torch.bfloat16)
                p.data = rounded
                if p.grad is not None:
                    p.grad = p.grad.to(torch.bfloat16)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.comp)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n in self.params:
            if n in state:
                self.comp[n] = state[n].to(torch.bfloat16).to(self.params[n].device)


@dataclass
class FrozenTensor:
    name: str
    dtype: str
    optimizer: str
    expected_update: float
    half_ulp: float  # at the tensor's median magnitude
    median_abs: float
    fraction_lost: float


def preflight(model: nn.Module, optimizers: dict[str, Optimizer], threshold: float = 0.5) -> list[FrozenTensor]:
    """Tensors whose expected first update is below half a ULP for more than ``threshold`` of their elements.

    Expected update: AdamW ~ lr (|m_hat / sqrt(v_hat)| = 1 on the first step); Muon ~ adjusted lr / sqrt(max dim).
    Only tensors stored in a low-precision format can be reported (fp32 has 16 more bits of headroom).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for opt_name, opt in optimizers.items():
        for group in opt.param_groups:
            lr = float(group.get("initial_lr", group["lr"]))
            for p in group["params"]:
                if p.dtype not in (torch.bfloat16, torch.float16):
                    continue
                if opt_name in ("muon", "expert_muon"):
                    upd = muon_update_rms(lr, tuple(p.shape), group.get("adjust_lr_fn"))
                else:
                    upd = float(adam_update(lr, None, None, 0, group["betas"], group["eps"]))
                lost = fraction_lost(p.data, upd)
                if lost is not None and lost > threshold:
                    med = float(p.data.detach().abs().float().median())
                    out.append(
                        FrozenTensor(
                            names.get(id(p), "?"),
                            str(p.dtype).replace("torch.", ""),
                            opt_name,
                            upd,
                            half_ulp_at(med, p.dtype),
                            med,
                            lost,
                        )
                    )
    return out
