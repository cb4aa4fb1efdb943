"""Optimizers and learning-rate schedule.

Routing rule (explicit, printed by ``moe-arch info --optimizer``): every parameter's *role* is declared by the
module that owns it (``moe_arch.model.roles``). Roles in ``optim.muon_roles`` (default: hidden 2-D matrices and
stacked expert matrices) go to Muon; everything else (embeddings, output heads, norms, biases, routers, conv
kernels, A_log, D) goes to AdamW. Routers stay on AdamW on purpose: orthogonalising a 14 x 1792 router gradient
would force all its singular values to ~1 and fight the softmax's temperature.

- 2-D matrices: ``torch.optim.Muon``.
- Stacked expert weights [E, in, out]: :class:`BatchedMuon`, the same algorithm applied to each expert's
  matrix, batched (one ``baddbmm`` per Newton-Schulz step for all experts); parity with torch's Muon per slice
  is tested.
- Under FSDP2 the matrices are sharded DTensors, and orthogonalisation needs the whole matrix: there every Muon
  tensor goes to :class:`BatchedMuon`. A 2-D matrix's momentum-combined update is all-gathered, orthogonalised
  (every rank, on the same full matrix) and each rank keeps its own slice; a stacked expert tensor is sharded on
  the expert dim (FSDP2's dim-0 shards, expert parallelism), so a rank's slice is whole expert matrices, which it
  orthogonalises alone with no gather (:func:`holds_whole_experts`). Same arithmetic per matrix as the
  single-process run; the optimizer state stays sharded. (For 2-D matrices the cheaper pattern, each rank
  orthogonalising a subset of matrices and scattering the results, is not implemented.)
- Newton-Schulz precision (``optim.muon_ns_dtype``): torch's Muon runs it in bfloat16, which is what a GPU's
  tensor cores want; a CPU without bf16 matrix units runs it ~2x faster in float32 (and float32 is the more exact
  of the two). With ``auto`` a CPU run therefore sends its 2-D matrices to :class:`BatchedMuon` in float32;
  BatchedMuon also batches the Newton-Schulz of same-shape matrices into one ``baddbmm`` chain (batches of at
  most ``MAX_BATCH_ELEMENTS``), which on small models removes most of the per-matrix call overhead. bfloat16
  without FSDP keeps torch.optim.Muon.
- Muon's lr is scaled by shape with the Moonlight rule (``adjust_lr_fn="match_rms_adamw"``): update RMS
  ~= 0.2 * lr, comparable to AdamW's, so the two base learning rates are on one scale.
- No weight decay on norms, biases, routers and state-space parameters (A_log, D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import AdamW, Muon, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from moe_arch.config import OptimConfig, TrainConfig
from moe_arch.model.roles import named_parameter_roles
from moe_arch.numerics import muon_adjusted_lr
from moe_arch.parallel.parallelize import full, shard_like

NO_DECAY_ROLES = {"norm", "bias", "router", "ssm"}
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def zeropower_batched(
    G: torch.Tensor,
    coefficients=NS_COEFFICIENTS,
    steps: int = 5,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Newton-Schulz orthogonalisation of each matrix of G [E, m, n], exactly as torch.optim.Muon does for one."""
    a, b, c = coefficients
    X = G.to(dtype)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.transpose(-2, -1)
    X = X / X.flatten(1).norm(dim=1).clamp(min=eps)[:, None, None]
    for _ in range(steps):
        A = X @ X.transpose(-2, -1)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    if transposed:
        X = X.transpose(-2, -1)
    return X


class BatchedMuon(Optimizer):
    """Muon for 2-D matrices and stacked expert matrices [E, in, out] (each expert's matrix orthogonalised on its
    own), also when they are FSDP2 / expert-parallel DTensor shards. State and hyper-parameters are those of
    torch.optim.Muon, so checkpoints move between the two.

    Matrices of one group with the same shape (and the experts of same-shaped stacks) are orthogonalised together:
    one batched Newton-Schulz per shape instead of one per matrix. ``ns_dtype`` is the Newton-Schulz precision
    (bfloat16 as in torch.optim.Muon; float32 on CPUs, see the module docstring)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients=NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        ns_dtype: torch.dtype = torch.bfloat16,
    ):
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=tuple(ns_coefficients),
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype  # not a group hyper-parameter: state dicts stay those of torch.optim.Muon
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(
                        f"BatchedMuon takes matrices or stacked [n_experts, in, out] tensors, got shape "
                        f"{tuple(p.shape)}"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for batch in newton_schulz_batches([tuple(p.shape) for p in params]):
                self._update(group, [params[i] for i in batch])
        return loss

    def _update(self, group: dict, params: list[torch.Tensor]) -> None:
        """Momentum, one batched Newton-Schulz and the weight update for same-shape parameters. Batches are cut at
        MAX_BATCH_ELEMENTS, so the step's temporaries (updates, their concatenation, X and A, B) stay bounded
        instead of growing with the model (seed-3b's expert matrices: ~17 GB in one batch, see the planner)."""
        lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
        wholes, owned = [], []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mom)
            update = p.grad.lerp(buf, mom) if group["nesterov"] else buf
            owned.append(holds_whole_experts(p))
            # Orthogonalisation needs whole matrices: a shard of whole experts has them, anything else is gathered.
            whole = update.to_local() if owned[-1] else full(update)
            whole = whole if whole.ndim == 3 else whole.unsqueeze(0)
            wholes.append(whole if whole.shape[1] <= whole.shape[2] else whole.transpose(1, 2))
        sizes = [w.shape[0] for w in wholes]
        batch = wholes[0] if len(wholes) == 1 else torch.cat(wholes)
        del wholes
        ortho = zeropower_batched(batch, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype=self.ns_dtype)
        del batch
        for p, o, own in zip(params, ortho.split(sizes), owned):
            if p.shape[-2] > p.shape[-1]:
                o = o.transpose(1, 2)
            if own:
                o = type(p).from_local(o.to(p.dtype), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            else:
                o = shard_like(o.reshape(p.shape).to(p.dtype), p)  # DTensor .shape is the global shape
            p.mul_(1 - lr * wd)
            p.add_(o, alpha=-muon_adjusted_lr(lr, tuple(p.shape), group["adjust_lr_fn"]))


def holds_whole_experts(p: torch.Tensor) -> bool:
    """A stacked expert tensor [E, in, out] sharded only over experts (FSDP2's dim-0 shards, expert parallelism):
    each rank's local slice is whole expert matrices, which it orthogonalises alone (no all-gather)."""
    placements = getattr(p, "placements", None)
    return (
        p.ndim == 3
        and placements is not None
        and all(pl.is_replicate() or getattr(pl, "dim", None) == 0 for pl in placements)  # Shard, _StridedShard
    )


# Largest Newton-Schulz batch of BatchedMuon, in matrix elements (2^27: 512 MB of float32 updates): large enough
# that small models run one batch per shape, small enough that a 3B model's step does not hold every expert's
# update and orthogonalisation at once.
MAX_BATCH_ELEMENTS = 1 << 27


def newton_schulz_batches(shapes: list[tuple[int, ...]]) -> list[list[int]]:
    """How BatchedMuon groups its matrices (indices into ``shapes``; 2-D or stacked [E, m, n]): same shape up to
    transposition (Newton-Schulz works on the wide orientation, so [m, n] and [n, m] share a batch), in order, cut
    before a batch would exceed MAX_BATCH_ELEMENTS. The memory planner counts the same batches."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(shapes):
        by_shape.setdefault(tuple(sorted(s[-2:])), []).append(i)
    batches = []
    for idx in by_shape.values():
        batch, size = [], 0
        for i in idx:
            n = math.prod(shapes[i])
            if batch and size + n > MAX_BATCH_ELEMENTS:
                batches.append(batch)
                batch, size = [], 0
            batch.append(i)
            size += n
        batches.append(batch)
    return batches


def resolve_ns_dtype(cfg: OptimConfig, device: torch.device) -> torch.dtype:
    if cfg.muon_ns_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.muon_ns_dtype)


@dataclass
class ParamPlan:
    name: str
    shape: tuple[int, ...]
    role: str
    optimizer: str  # muon | expert_muon | adamw
    lr: float  # base learning rate of its group
    effective_lr: float  # what one step applies (Muon: shape-adjusted)
    weight_decay: float
    param: nn.Parameter


def plan_parameters(model: nn.Module, cfg: OptimConfig) -> list[ParamPlan]:
    plans = []
    for name, p, role in named_parameter_roles(model):
        if not p.requires_grad:
            continue
        if role in cfg.muon_roles:
            if p.ndim not in (2, 3):
                raise ValueError(
                    f"optim.muon_roles includes {role!r}, but {name} has shape {tuple(p.shape)}; Muon "
                    "needs 2-D matrices or stacked [E, in, out] expert matrices"
                )
            opt = "muon" if p.ndim == 2 else "expert_muon"
            eff = muon_adjusted_lr(cfg.muon_lr, tuple(p.shape), cfg.muon_adjust_lr)
            plans.append(ParamPlan(name, tuple(p.shape), role, opt, cfg.muon_lr, eff, cfg.weight_decay, p))
        else:
            wd = 0.0 if role in NO_DECAY_ROLES or p.ndim < 2 else cfg.weight_decay
            plans.append(ParamPlan(name, tuple(p.shape), role, "adamw", cfg.adamw_lr, cfg.adamw_lr, wd, p))
    return plans


def build_optimizers(model: nn.Module, cfg: OptimConfig, plans: list[ParamPlan] | None = None) -> dict[str, Optimizer]:
    """Named optimizers, each built from named parameters (so their state dicts carry ``param_names``).

    Under FSDP2 (DTensor parameters) the 2-D matrices also go to :class:`BatchedMuon`, which gathers them whole."""
    plans = plans if plans is not None else plan_parameters(model, cfg)
    by_opt: dict[str, list[ParamPlan]] = {}
    for pl in plans:
        by_opt.setdefault(pl.optimizer, []).append(pl)
    muon_kw = dict(
        lr=cfg.muon_lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.muon_momentum,
        nesterov=cfg.muon_nesterov,
        ns_steps=cfg.muon_ns_steps,
        adjust_lr_fn=cfg.muon_adjust_lr,
    )
    opts: dict[str, Optimizer] = {}
    device = next((pl.param.device for pl in plans), torch.device("cpu"))
    ns_dtype = resolve_ns_dtype(cfg, device)
    if "muon" in by_opt:
        sharded = any(hasattr(pl.param, "device_mesh") for pl in by_opt["muon"])
        named = [(pl.name, pl.param) for pl in by_opt["muon"]]
        if sharded or ns_dtype != torch.bfloat16:
            opts["muon"] = BatchedMuon(named, ns_dtype=ns_dtype, **muon_kw)
        else:
            opts["muon"] = Muon(named, **muon_kw)
    if "expert_muon" in by_opt:
        opts["expert_muon"] = BatchedMuon(
            [(pl.name, pl.param) for pl in by_opt["expert_muon"]], ns_dtype=ns_dtype, **muon_kw
        )
    if "adamw" in by_opt:
        decay = [(pl.name, pl.param) for pl in by_opt["adamw"] if pl.weight_decay > 0]
        no_decay = [(pl.name, pl.param) for pl in by_opt["adamw"] if pl.weight_decay == 0]
        groups = [
            g
            for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]
        ]
        # PyTorch's fused kernel: one pass per tensor instead of ~10 ops (10 -> 0.9 ms for the tiny preset's AdamW
        # tensors on 2 CPU cores). Same update rule; DTensor (FSDP2) parameters keep the default implementation.
        plain = all(
            type(pl.param) in (torch.Tensor, nn.Parameter) and pl.param.device.type in ("cpu", "cuda")
            for pl in by_opt["adamw"]
        )
        opts["adamw"] = AdamW(
            groups, lr=cfg.adamw_lr, betas=tuple(cfg.adamw_betas), eps=cfg.adamw_eps, fused=True if plain else None
        )
    return opts


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier on every group's base lr after ``step`` optimizer steps: linear warmup, then the schedule."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    total = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / total)
    lo = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
    # warmup-stable-decay: flat, then linear decay over the last decay_frac of the steps
    decay_start = 1.0 - cfg.decay_frac
    if progress <= decay_start:
        return 1.0
    return 1.0 - (1 - lo) * (progress - decay_start) / cfg.decay_frac


def build_schedulers(opts: dict[str, Optimizer], cfg: TrainConfig) -> dict[str, LambdaLR]:
    """One LambdaLR per optimizer: lr = base_lr(group) * factor(step), so each group keeps its own base lr."""

    # A plain function (not a callable object) so LambdaLR leaves it out of its state dict: the schedule is
    # rebuilt from the config, and the state dict stays loadable with weights_only=True.
    def factor(step: int) -> float:
        return lr_factor(step, cfg)

    return {name: LambdaLR(opt, factor) for name, opt in opts.items()}


def format_plan(plans: list[ParamPlan]) -> list[dict]:
    return [
        {
            "name": p.name,
            "shape": list(p.shape),
            "role": p.role,
            "optimizer": p.optimizer,
            "lr": p.lr,
            "effective_lr": p.effective_lr,
            "weight_decay": p.weight_decay,
        }
        for p in plans
    ]
