"""Grouped-query causal self-attention with RoPE and a KV cache for generation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_arch.config import ModelConfig
from moe_arch.model.layers import Rotary


class KVCache:
    """Keys/values of one attention layer, indexed by *original* token position.

    ``valid[b, s]`` says whether position ``s`` of sequence ``b`` holds a key: with Mixture-of-Depths only
    the tokens a block selected have one. Slot ``max_len`` is a scratch slot where padded (unused) entries
    of a gathered batch are written; it is never valid.
    """

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, max_len: int, device, dtype):
        self.max_len = max_len
        self.k = torch.zeros(batch, n_kv_heads, max_len + 1, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.zeros(batch, max_len + 1, dtype=torch.bool, device=device)

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None) -> int:
        """k, v [B, Hkv, T, D]; positions [B, T]; valid [B, T] or None (all valid). Returns one past the largest
        position: no query of this call sees a key beyond it."""
        last = int(positions.max())
        if last >= self.max_len:
            raise ValueError(
                f"generation reached position {last}, beyond the cache's max_len "
                f"{self.max_len}; raise model.max_seq_len or generate fewer tokens"
            )
        slots = positions if valid is None else torch.where(valid, positions, torch.full_like(positions, self.max_len))
        idx = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k.scatter_(2, idx, k.to(self.k.dtype))
        self.v.scatter_(2, idx, v.to(self.v.dtype))
        self.valid.scatter_(1, slots, torch.ones_like(slots, dtype=torch.bool) if valid is None else valid)
        self.valid[:, self.max_len] = False
        return last + 1

    def row(self, b: int) -> "KVCache":
        """A cache of batch 1 that reads and writes row ``b`` of this one (for one prompt's prefill)."""
        view = KVCache.__new__(KVCache)
        view.max_len = self.max_len
        view.k, view.v, view.valid = self.k[b : b + 1], self.v[b : b + 1], self.valid[b : b + 1]
        return view

    def rollback(self, end: torch.Tensor) -> None:
        """Forget the keys at positions >= end[b] of each sequence (speculative tokens that were not accepted)."""
        slots = torch.arange(self.valid.shape[1], device=self.valid.device)
        self.valid &= slots[None, :] < end[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.resolved_head_dim
        d = cfg.d_model
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def init_weights(self, std: float, out_std: float, gen: torch.Generator) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(lin.weight, 0.0, std, generator=gen)
        nn.init.normal_(self.o_proj.weight, 0.0, out_std, generator=gen)

    def new_cache(self, batch: int, max_len: int, device, dtype) -> KVCache:
        return KVCache(batch, self.n_kv_heads, self.head_dim, max_len, device, dtype)

    def forward(self, x: torch.Tensor, ctx: "SeqContext") -> torch.Tensor:
        B, T, _ = x.shape
        # One GEMM for q, k and v (~20% faster than three on the CPU); the weights stay separate parameters, so
        # Muon still orthogonalises each projection on its own.
        qkv = F.linear(x, torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
        q, k, v = qkv.split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = ctx.cos_sin(q.dtype)
        q, k = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        cache: KVCache | None = ctx.cache
        if cache is None:
            # Training / plain forward: tokens are in causal order (also after MoD's order-keeping gather),
            # and right-padding from MoD sits after every real token, so the causal mask alone is exact.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            n = cache.write(k, v, ctx.positions, ctx.valid)
            keys_pos = torch.arange(n, device=x.device)
            # A query at position p sees the cached keys at positions <= p that are valid.
            mask = cache.valid[:, None, None, :n] & (keys_pos[None, None, None, :] <= ctx.positions[:, None, :, None])
            out = F.scaled_dot_product_attention(
                q, cache.k[:, :, :n].to(q.dtype), cache.v[:, :, :n].to(q.dtype), attn_mask=mask, enable_gqa=gqa
            )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class SeqContext:
    """Per-call information a sequence layer needs besides its input: positions, padding, cache."""

    def __init__(
        self,
        positions: torch.Tensor,
        rotary: Rotary,
        valid: torch.Tensor | None = None,
        cache=None,
        cos_sin_table: tuple[torch.Tensor, torch.Tensor] | None = None,
        contiguous: bool = False,
    ):
        self.positions = positions  # [B, T] original positions
        self.valid = valid  # [B, T] bool, False for padding (MoD), None when all valid
        self.cache = cache
        self._rotary = rotary
        self._table = cos_sin_table  # cos/sin for positions 0..N-1, shared by the layers of one forward
        self._contiguous = contiguous  # positions are 0..T-1 in every row

    def cos_sin(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._table is not None:
            cos, sin = self._table
            if self._contiguous:
                T = self.positions.shape[1]
                return cos[:T].to(dtype), sin[:T].to(dtype)
            return cos[self.positions].to(dtype), sin[self.positions].to(dtype)
        return self._rotary.cos_sin(self.positions, dtype)
