"""The hybrid language model: pre-norm blocks whose sequence layer is attention or Mamba and whose
feed-forward layer is dense SwiGLU or MoE, optional Mixture-of-Depths routing per block, and
multi-token prediction heads.

    x = x + seq_layer(seq_norm(x));  x = x + ffn(ffn_norm(x))          (per block, on the tokens MoD selected)
    logits_i = head_i(final_norm(x))  predicts token t + i + 1          (i = 0 is the ordinary LM head)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from moe_arch.config import ModelConfig
from moe_arch.model import generation
from moe_arch.model.attention import Attention, SeqContext
from moe_arch.model.layers import RMSNorm, Rotary, SwiGLU
from moe_arch.model.losses import linear_cross_entropy
from moe_arch.model.mamba import Mamba, use_compiled_scan
from moe_arch.model.mod import ModScores, causal_capacity_select, gather_selected
from moe_arch.model.moe import MoE
from moe_arch.model.roles import OutputHead, RouterLinear

# Components are registered by kind; a block looks its layers up here instead of branching on config flags.
SEQUENCE_LAYERS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {"attention": Attention, "mamba": Mamba}
FFN_LAYERS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "dense": lambda cfg, i: SwiGLU(cfg.d_model, cfg.d_ff),
    "moe": MoE,
}


CHECKPOINTING = ("none", "full", "selective", "sequence")


def layer_kinds(cfg: ModelConfig, i: int) -> tuple[str, str]:
    return ("mamba" if i in cfg.mamba_layers else "attention", "moe" if i in cfg.moe_layers else "dense")


class Aux:
    """Auxiliary losses and routing statistics collected during one forward."""

    def __init__(self) -> None:
        self.moe_lb: list[torch.Tensor] = []
        self.moe_z: list[torch.Tensor] = []
        self.mod_bce: list[torch.Tensor] = []
        self.moe_load: dict[int, torch.Tensor] = {}
        self.mod_frac: dict[int, torch.Tensor] = {}
        self.mod_weight: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def add_moe(self, layer: int, lb: torch.Tensor, z: torch.Tensor, load: torch.Tensor) -> None:
        self.moe_lb.append(lb)
        self.moe_z.append(z)
        self.moe_load[layer] = load

    def add_mod(self, layer: int, bce: torch.Tensor, frac: torch.Tensor, w_mean: torch.Tensor, w_std: torch.Tensor):
        self.mod_bce.append(bce)
        self.mod_frac[layer] = frac
        self.mod_weight[layer] = (w_mean, w_std)

    @staticmethod
    def _mean(xs: list[torch.Tensor]) -> torch.Tensor | None:
        return torch.stack(xs).mean() if xs else None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        seq_kind, ffn_kind = layer_kinds(cfg, layer_idx)
        self.seq_kind, self.ffn_kind = seq_kind, ffn_kind
        self.seq_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.seq_layer = SEQUENCE_LAYERS[seq_kind](cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FFN_LAYERS[ffn_kind](cfg, layer_idx)
        self.mod_capacity = cfg.mod_capacity
        self.mod_router = (
            RouterLinear(cfg.d_model, 1, bias=False) if cfg.mod_enabled and layer_idx in cfg.mod_layers else None
        )
        self.checkpoint_seq = False  # set by HybridLM.set_activation_checkpointing("sequence")

    def init_weights(self, std: float, out_std: float, gen: torch.Generator) -> None:
        self.seq_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.seq_layer.init_weights(std, out_std, gen)
        self.ffn.init_weights(std, out_std, gen)
        if self.mod_router is not None:
            nn.init.normal_(self.mod_router.weight, 0.0, std, generator=gen)

    def _residual(self, x: torch.Tensor, ctx: SeqContext, aux: Aux | None) -> torch.Tensor:
        """What the block adds to the residual stream: seq_layer(...) + ffn(...)."""
        if self.checkpoint_seq and ctx.cache is None and self.training and torch.is_grad_enabled():
            # activation_checkpointing=sequence: keep x, recompute the norm and attention / Mamba in the backward
            a = torch.utils.checkpoint.checkpoint(
                lambda inp: self.seq_layer(self.seq_norm(inp), ctx), x, use_reentrant=False, preserve_rng_state=True
            )
        else:
            a = self.seq_layer(self.seq_norm(x), ctx)
        h = x + a
        if self.ffn_kind == "moe":
            f = self.ffn(self.ffn_norm(h), ctx.valid, aux)
        else:
            f = self.ffn(self.ffn_norm(h))
        return a + f

    def forward(self, x: torch.Tensor, ctx: SeqContext, aux: Aux | None = None, cache: dict | None = None):
        if self.mod_router is None:
            return x + self._residual(x, ctx, aux)
        logits = self.mod_router(x).squeeze(-1).float()  # [B, T]
        if cache is not None:  # generation: ranked against the cached scores of the earlier positions
            selected = cache["mod"].select(logits.detach(), ctx.positions, self.mod_capacity)
            cache["selected"] = selected  # what a speculative rollback needs to know
        else:
            selected = causal_capacity_select(logits.detach(), self.mod_capacity)
        order, valid = gather_selected(selected)
        if order.shape[1] == 0:  # decoding a token no sequence in the batch selected: nothing to compute
            return x
        d = x.shape[-1]
        idx = order.unsqueeze(-1).expand(-1, -1, d)
        sub = SeqContext(
            ctx.positions.gather(1, order), ctx._rotary, valid=valid, cache=ctx.cache, cos_sin_table=ctx._table
        )
        delta = self._residual(x.gather(1, idx), sub, aux)
        weight = torch.sigmoid(logits).gather(1, order)  # the router learns through this scale
        update = delta * weight.unsqueeze(-1).to(delta.dtype)
        if valid is not None:
            update = torch.where(valid.unsqueeze(-1), update, torch.zeros_like(update))
        if aux is not None:
            w_sel = weight if valid is None else weight[valid]
            aux.add_mod(
                self.layer_idx,
                F.binary_cross_entropy_with_logits(logits, selected.float()),
                selected.float().mean().detach(),
                w_sel.mean().detach(),
                w_sel.std().detach() if w_sel.numel() > 1 else torch.zeros((), device=x.device),
            )
        # Under autocast a block whose layers are all matmuls returns bf16 while the residual stream stays float32.
        return x.scatter_add(1, idx, update.to(x.dtype))


class MTPHead(nn.Module):
    """Extra prediction head i >= 1 (Medusa-style): a residual SiLU projection and its own unembedding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.out = OutputHead(cfg.d_model, cfg.vocab_size, bias=False)

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        return h + F.silu(self.proj(h))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(h))


@dataclass
class LMOutput:
    loss: torch.Tensor | None = None  # what the optimizer minimises: lm + weighted MTP + weighted aux terms
    lm_loss: torch.Tensor | None = None  # next-token cross-entropy alone (honest perplexity)
    mtp_losses: list[torch.Tensor] = field(default_factory=list)  # head i (i >= 1) cross-entropy
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted: moe_load_balance, ...
    logits: torch.Tensor | None = None  # next-token logits, when asked for
    aux: Aux | None = None


def _checkpoint_block(block: Block, x: torch.Tensor, ctx: SeqContext, aux: Aux | None) -> torch.Tensor:
    """``block(x)`` under non-reentrant ``torch.utils.checkpoint``. The recomputation in the backward runs the
    same operations (so the same tensors are saved: auxiliary-loss graphs included) but records its routing
    statistics into a throw-away ``Aux``: the step's statistics are counted once. RNG state is restored for the
    recomputation (``preserve_rng_state``), so any dropout would reproduce."""
    calls = 0

    def run(inp: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return block(inp, ctx, aux if calls == 1 or aux is None else Aux(), None)

    return torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False, preserve_rng_state=True)


class HybridLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = OutputHead(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.mtp_heads = nn.ModuleList(MTPHead(cfg) for _ in range(cfg.n_predict - 1))
        self.rotary = Rotary(cfg.resolved_head_dim, cfg.rope_theta)
        self.checkpointing = "none"

    def set_activation_checkpointing(self, mode: str) -> "HybridLM":
        """none | full (every block) | selective (every other block, the odd ones) | sequence (every block's norm +
        attention / Mamba only): in training forwards, a checkpointed part keeps only its input and recomputes the
        rest in the backward."""
        if mode not in CHECKPOINTING:
            raise ValueError(f"activation checkpointing {mode!r}: allowed {', '.join(CHECKPOINTING)}")
        self.checkpointing = mode
        for blk in self.layers:
            blk.checkpoint_seq = mode == "sequence"
        return self

    def _checkpointed(self, i: int) -> bool:
        return self.checkpointing == "full" or (self.checkpointing == "selective" and i % 2 == 1)

    # ---------------------------------------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self, seed: int) -> "HybridLM":
        """Deterministic initialisation from ``seed`` alone (independent of the global RNG).

        Output projections of each residual branch (o_proj, w2, expert w_down, Mamba out_proj, MTP proj)
        use std / sqrt(2 * n_layers) so the residual stream's variance does not grow with depth (GPT-2).
        """
        dev = self.embed.weight.device
        gen = torch.Generator(device=dev).manual_seed(seed)
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.embed.weight, 0.0, std, generator=gen)
        for block in self.layers:
            block.init_weights(std, out_std, gen)
        self.final_norm.reset_parameters()
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, std, generator=gen)
        for head in self.mtp_heads:
            nn.init.normal_(head.proj.weight, 0.0, out_std, generator=gen)
            nn.init.normal_(head.out.weight, 0.0, std, generator=gen)
        return self

    # ------------------------------------------------------------------------------------------- forward
    def _context(
        self,
        B: int,
        T: int,
        device,
        start: int | torch.Tensor = 0,
        cache=None,
        table: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SeqContext:
        if isinstance(start, torch.Tensor):  # one start per sequence (batched generation of different lengths)
            positions = start[:, None] + torch.arange(T, device=device)[None, :]
            contiguous = False
        else:
            positions = torch.arange(start, start + T, device=device).unsqueeze(0).expand(B, -1)
            contiguous = start == 0 and cache is None
        if table is None:
            n = int(positions.max()) + 1 if isinstance(start, torch.Tensor) else start + T
            table = self.rotary.cos_sin(torch.arange(n, device=device), torch.float32)
        return SeqContext(positions, self.rotary, cos_sin_table=table, contiguous=contiguous)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        aux: Aux | None = None,
        caches: list | None = None,
        start: int | torch.Tensor = 0,
        table: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states. With ``caches`` (generation), ``start`` is the position of the first token
        (an int, or one per sequence) and ``table`` a precomputed rotary table covering every position."""
        B, T = tokens.shape
        x = self.embed(tokens)
        base = self._context(B, T, tokens.device, start, caches, table)
        for i, block in enumerate(self.layers):
            cache = caches[i] if caches is not None else None
            ctx = SeqContext(
                base.positions,
                self.rotary,
                cache=cache["seq"] if cache else None,
                cos_sin_table=base._table,
                contiguous=base._contiguous,
            )
            if cache is None and self._checkpointed(i) and self.training and torch.is_grad_enabled():
                x = _checkpoint_block(block, x, ctx, aux)
            else:
                x = block(x, ctx, aux, cache)
        return self.final_norm(x)

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = False, mtp: bool = True
    ) -> LMOutput:
        """tokens [B, T]; targets [B, T + n_predict - 1] with targets[:, t] = token t + 1 (so head i's labels
        are targets[:, i : i + T]). With fewer target columns, only the heads that have labels are scored."""
        aux = Aux()
        h = self.hidden_states(tokens, aux)
        want_logits = return_logits or targets is None
        out = LMOutput(aux=aux, logits=self.lm_head(h) if want_logits else None)
        if targets is None:
            return out
        T = tokens.shape[1]
        V = self.cfg.vocab_size
        if want_logits:
            lm_loss = F.cross_entropy(out.logits.float().reshape(-1, V), targets[:, :T].reshape(-1))
        else:  # fused projection + cross-entropy: the [B*T, V] logits are never materialised twice
            lm_loss = linear_cross_entropy(h, self.lm_head.weight, targets[:, :T])
        total = lm_loss
        if mtp:
            for i, head in enumerate(self.mtp_heads, start=1):
                if targets.shape[1] < i + T:
                    break
                out.mtp_losses.append(linear_cross_entropy(head.hidden(h), head.out.weight, targets[:, i : i + T]))
            if out.mtp_losses:
                total = total + self.cfg.mtp_loss_weight * torch.stack(out.mtp_losses).mean()
        for name, values, coef in (
            ("moe_load_balance", aux.moe_lb, self.cfg.router_aux_loss_coef),
            ("moe_z_loss", aux.moe_z, self.cfg.router_z_loss_coef),
            ("mod_router", aux.mod_bce, self.cfg.mod_aux_loss_coef),
        ):
            v = Aux._mean(values)
            if v is not None:
                out.aux_losses[name] = v
                if coef > 0:
                    total = total + coef * v
        out.loss, out.lm_loss = total, lm_loss
        return out

    def compile_blocks(self) -> "HybridLM":
        """``train.compile``: torch.compile the parts with static shapes (norms, attention, dense feed-forward, the
        Mamba scan's block kernels); MoE dispatch and MoD routing have data-dependent shapes and stay eager."""
        for block in self.layers:
            block.seq_norm.compile()
            block.ffn_norm.compile()
            if block.seq_kind == "attention":
                block.seq_layer.compile()
            if block.ffn_kind == "dense":
                block.ffn.compile()
        self.final_norm.compile()
        if self.cfg.mamba_layers:
            use_compiled_scan(True)
        return self

    @torch.no_grad()
    def update_router_biases(self, loads: dict[int, torch.Tensor]) -> None:
        for i, load in loads.items():
            ffn = self.layers[i].ffn
            if isinstance(ffn, MoE):
                ffn.update_bias(load)

    # ---------------------------------------------------------------------------------------- generation
    def new_caches(self, batch: int, max_len: int) -> list[dict]:
        """Per block: its sequence layer's cache (KV or Mamba state) and, with MoD, the router scores by position;
        all allocated once for ``max_len`` positions."""
        p = self.embed.weight
        return [
            {
                "seq": blk.seq_layer.new_cache(batch, max_len, p.device, p.dtype),
                "mod": ModScores(batch, max_len, p.device) if blk.mod_router is not None else None,
                "selected": None,
            }
            for blk in self.layers
        ]

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        speculative: bool = False,
    ) -> torch.Tensor:
        """``prompt`` [B, T] followed by ``max_new_tokens`` sampled tokens (greedy at temperature 0), with the KV /
        SSM caches; ``speculative``: the MTP heads draft tokens that one forward verifies (same tokens when
        greedy, same distribution when sampling). See ``model/generation.py``."""
        drafts = len(self.mtp_heads) if speculative else 0
        out = generation.generate(
            self,
            prompt,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_id=eos_id,
            generator=generator,
            draft_tokens=drafts,
        )
        return torch.cat([prompt, out.tokens], 1)


def materialize(cfg: ModelConfig, state_dict: dict, device: str | torch.device = "cpu", strict: bool = True):
    """A model holding ``state_dict``'s weights, built without a throw-away random initialisation.

    Returns (model, missing keys, unexpected keys)."""
    with torch.device("meta"):
        model = HybridLM(cfg)
    model.to_empty(device=device)
    for module in model.modules():  # buffers not saved in state dicts (e.g. an unused expert_bias) start at zero
        for name, buf in module.named_buffers(recurse=False):
            if name in module._non_persistent_buffers_set:
                buf.zero_()
    dtypes = {v.dtype for v in state_dict.values() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    if len(dtypes) == 1:
        model.to(next(iter(dtypes)))
    missing, unexpected = model.load_state_dict(state_dict, strict=strict)
    return model, missing, unexpected


def build_model(cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu") -> HybridLM:
    with torch.device(device):
        model = HybridLM(cfg)
    if torch.device(device).type != "meta":
        model.init_weights(seed)
    return model
