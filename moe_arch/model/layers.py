"""Building blocks shared by the sequence and feed-forward layers: RMSNorm, SwiGLU, rotary embeddings."""

from __future__ import annotations

import torch
from torch import nn

from moe_arch.model import fused
from moe_arch.model.roles import register_roles


@register_roles({"weight": "norm"})
class RMSNorm(nn.Module):
    """y = x / rms(x) * g, computed in float32 whatever the input dtype (as Llama/Mixtral do)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.rms_norm(x, self.weight, self.eps).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class SwiGLU(nn.Module):
    """Dense feed-forward layer: w2(silu(w1 x) * w3 x)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)  # gate
        self.w3 = nn.Linear(d_model, d_ff, bias=False)  # up
        self.w2 = nn.Linear(d_ff, d_model, bias=False)  # down

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.w2(fused.swiglu(self.w1(x), self.w3(x)))

    def init_weights(self, std: float, out_std: float, gen: torch.Generator) -> None:
        for lin, s in ((self.w1, std), (self.w3, std), (self.w2, out_std)):
            nn.init.normal_(lin.weight, 0.0, s, generator=gen)


class Rotary:
    """Rotary position embedding (RoPE), "rotate half" convention as in Llama.

    Cos/sin are computed from explicit positions, so tokens that Mixture-of-Depths gathered out of order
    of their neighbours keep their original positions.
    """

    def __init__(self, head_dim: int, theta: float):
        self.head_dim = head_dim
        # Built on the CPU explicitly: the model may be constructed under a meta-device context.
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [..., T] -> cos, sin [..., T, head_dim]."""
        inv = self.inv_freq.to(positions.device, torch.float32)
        freqs = positions.to(torch.float32).unsqueeze(-1) * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, D]; cos/sin [B, T, D] or [T, D]."""
        return fused.rope(x, cos, sin)
