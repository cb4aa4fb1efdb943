"""Parameter accounting: total, active per token, per-kind breakdown, model FLOPs per token.

*Active* parameters are those one token's forward pass multiplies by: everything except the experts it
was not routed to, i.e. expert tensors count ``top_k / n_experts`` of their size. Mixture-of-Depths does
not change the active count: a token may be selected by any MoD block, so every block's parameters are
reachable by every token. What MoD changes is the expected *compute* per token, which
``flops_per_token`` reports separately (a block's FLOPs scaled by its expected selected fraction).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from moe_arch.config import ModelConfig
from moe_arch.model.mod import capacity_tokens
from moe_arch.model.roles import named_parameter_roles
from moe_arch.model.transformer import HybridLM, layer_kinds


def _kind(name: str, role: str, model: HybridLM) -> str:
    """A human grouping for the breakdown table."""
    if role in ("embedding",):
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if name.startswith("mtp_heads"):
        return "mtp_heads"
    if role == "norm":
        return "norms"
    if ".mod_router" in name:
        return "mod_routers"
    if name.startswith("layers."):
        i = int(name.split(".")[1])
        seq_kind, ffn_kind = layer_kinds(model.cfg, i)
        if ".seq_layer." in name:
            return seq_kind
        if ".ffn." in name:
            if ffn_kind == "moe":
                return "moe_router" if ".router." in name else "moe_experts"
            return "dense_ffn"
    return "other"


def count_parameters(model: HybridLM) -> dict:
    cfg = model.cfg
    by_kind: Counter = Counter()
    by_role: Counter = Counter()
    n_tensors = 0
    n_norms = 0
    total = 0
    inactive = 0.0
    for name, p, role in named_parameter_roles(model):
        n = p.numel()
        total += n
        n_tensors += 1
        by_kind[_kind(name, role, model)] += n
        by_role[role] += n
        if role == "norm":
            n_norms += 1
        if role == "expert_matrix":
            inactive += n * (1.0 - cfg.top_k / cfg.n_experts)
    active = int(round(total - inactive))
    return {
        "total": total,
        "active": active,
        "sparsity": 1.0 - active / total if total else 0.0,
        "n_tensors": n_tensors,
        "n_norms": n_norms,
        "by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "by_role": dict(sorted(by_role.items(), key=lambda kv: -kv[1])),
    }


def flops_per_token(cfg: ModelConfig, seq_len: int, model: nn.Module | None = None) -> dict:
    """Training FLOPs per token (forward + backward = 3x forward), counting matmuls only.

    Matmul weights count 6 FLOPs per parameter per token (2 forward, 4 backward); attention scores and values
    add 6 * 2 * n_heads * head_dim * (seq_len / 2) per attention layer (causal average context), and the
    Mamba scan ~ 6 * 3 * d_inner * d_state per layer. MoD blocks count their expected selected fraction.
    """
    if model is None:
        with torch.device("meta"):
            model = HybridLM(cfg)
    frac = capacity_tokens(cfg.mod_capacity, seq_len) / seq_len if cfg.mod_enabled else 1.0
    per_layer = Counter()
    other = 0.0
    for name, p, role in named_parameter_roles(model):
        if role not in ("hidden_matrix", "expert_matrix", "output_head", "router"):
            continue  # embeddings are lookups; norms, biases, convs are negligible
        n = p.numel() * (cfg.top_k / cfg.n_experts if role == "expert_matrix" else 1.0)
        if name.startswith("layers."):
            per_layer[int(name.split(".")[1])] += 6 * n
        else:
            other += 6 * n
    hd = cfg.resolved_head_dim
    for i in range(cfg.n_layers):
        seq_kind, _ = layer_kinds(cfg, i)
        if seq_kind == "attention":
            ctx = seq_len / 2 * (frac if (cfg.mod_enabled and i in cfg.mod_layers) else 1.0)
            per_layer[i] += 6 * 2 * cfg.n_heads * hd * ctx
        else:
            per_layer[i] += 6 * 3 * cfg.mamba_expand * cfg.d_model * cfg.mamba_d_state
    total = other
    for i, f in per_layer.items():
        total += f * (frac if (cfg.mod_enabled and i in cfg.mod_layers) else 1.0)
    dense_equiv = other + sum(per_layer.values())
    return {"train_flops_per_token": total, "train_flops_per_token_no_mod": dense_equiv, "mod_selected_fraction": frac}
