"""Memory planner: what one training step holds per device, from the config alone (model built on the meta device).

Why by hand: PyTorch's memory tools (``torch.cuda.memory``, the memory snapshot, ``FakeTensorMode``) measure a step
that runs; a planner must answer before there is a device that fits, and our forward has data-dependent shapes (MoE
loads, MoD selection) that a fake or meta run cannot trace. So each term below is the list of tensors the code keeps,
written next to the code that keeps it (``tests/test_memory.py`` compares each block's activation term with the
bytes autograd really saves, counted with ``saved_tensors_hooks``; ``bench/bench_memory.py`` compares the whole
plan with a measured peak).

The step, in the order it allocates:

    static      parameters + optimizer states (+ bf16-compensated's buffers; FSDP: this rank's shards)
    forward     + activations saved for the backward, block by block (+ autocast's bf16 weight copies)
    backward    heads first, then blocks last to first: each block's activations are freed as its gradients appear
    step        + all gradients + the optimizers' temporaries (Muon's Newton-Schulz batches, compensated fp32 views)

peak = static + the largest of those phases. Activation formulas count bytes per token of each tensor a layer saves;
``compute`` is the matmul output dtype (2 under bf16 autocast or bf16 weights), ``resid`` the residual stream's.
The CPU float32 path runs the fused C kernels (``model/fused.py``), which save less than the PyTorch reference path
that GPUs and other dtypes take; both are modelled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from moe_arch.config import Config
from moe_arch.model import cpu_kernels
from moe_arch.model.mod import capacity_tokens
from moe_arch.model.moe import Experts
from moe_arch.model.transformer import HybridLM, build_model, layer_kinds
from moe_arch.parallel.parallelize import clip_grads_, parallelize
from moe_arch.precision import resolve_policy
from moe_arch.training.optim import build_optimizers, newton_schulz_batches, plan_parameters
from moe_arch.training.precision import CompensatedUpdates

GiB = 1024**3


class PlanError(ValueError):
    """An input the planner cannot plan, in the planner's own words: ``template`` names the inputs as ``{gpus}``,
    ``{seq_len}``, ``{max_seq_len}``... and the refused value as ``{value}``; ``str()`` says the names as
    plan_memory's arguments (and config fields), :meth:`worded` in another vocabulary (``moe-arch info --memory``
    says its flags)."""

    NAMES = {
        "gpus": "gpus",
        "batch_size": "batch_size",
        "seq_len": "seq_len",
        "gpu_memory_gb": "gpu_memory_gb",
        "parallel": "parallel",
        "checkpointing": "checkpointing",
        "max_seq_len": "model.max_seq_len",
        "expert_parallel": "expert_parallel",
        "n_experts": "model.n_experts",
    }

    def __init__(self, template: str, value: object = None):
        self.template, self.value = template, value
        super().__init__(self.worded({}))

    def worded(self, names: dict[str, str]) -> str:
        return self.template.format(**(self.NAMES | names), value=self.value)


@dataclass(frozen=True)
class Numerics:
    """How one step computes: which dtypes and which code path (see ``moe_arch/precision.py``)."""

    precision: str  # fp32 | bf16-mixed | bf16-pure | bf16-compensated
    device: str  # cuda | cpu
    kernels: bool  # the CPU C kernels are built (float32 CPU tensors take them)
    fsdp_mixed: bool = False  # FSDP2 gathers parameters in bf16 (no autocast weight copies)

    @property
    def autocast(self) -> bool:
        return self.precision == "bf16-mixed"

    @property
    def param(self) -> int:  # bytes per stored parameter (and gradient)
        return 2 if self.precision in ("bf16-pure", "bf16-compensated") else 4

    @property
    def resid(self) -> int:  # residual stream
        return self.param

    @property
    def compute(self) -> int:  # matmul outputs
        return 4 if self.precision == "fp32" else 2

    @property
    def expert(self) -> int:
        """Grouped GEMM outputs. CPU autocast leaves grouped_mm in float32 (measured); on CUDA, grouped_mm runs in
        bf16 under autocast (its kernels are bf16) - assumed, not measured here (no GPU was available)."""
        return 4 if self.precision == "fp32" or (self.autocast and self.device == "cpu") else 2

    def kernel(self, nbytes: int) -> bool:
        """Whether an element-wise chain on tensors of this width runs the CPU kernel (float32 CPU only)."""
        return self.device == "cpu" and self.kernels and nbytes == 4


# ------------------------------------------------------------------------------------------------- activations
def _norm_and_consumer(num: Numerics, d: int, consumer_casts: bool = True) -> float:
    """RMSNorm (fused.rms_norm) plus the saved input of the linear that reads its output, bytes per token.

    kernel: x, rstd; the output y (fp32) is what the linear saves. reference: x.float(), rstd, the normalised
    x (saved by the multiply with the weight), then the linear's input (y, or its bf16 copy)."""
    b = 4 * d + 4  # x (or its float32 copy) and rstd
    if num.kernel(num.resid):
        return b + (2 * d if num.autocast and consumer_casts else 4 * d)
    b += 4 * d
    return b + (2 * d if num.autocast and consumer_casts else num.resid * d if num.resid == 2 else 4 * d)


def _swiglu(num: Numerics, n_rows: float, f: int, nbytes: int) -> float:
    """silu(a) * b feeding a down projection: kernel saves a, b, out; reference also silu(a)."""
    return n_rows * f * nbytes * (3 if num.kernel(nbytes) else 4)


def attention_bytes(cfg, num: Numerics, n: float) -> float:
    """Attention on n tokens: qkv (v is a view of it and SDPA keeps it), roped q and k, SDPA's output and
    logsumexp (flash / efficient / CPU flash all keep these; the o_proj input is a view of the output)."""
    q = cfg.n_heads * cfg.resolved_head_dim
    kv = cfg.n_kv_heads * cfg.resolved_head_dim
    c = num.compute
    return n * (c * (q + 2 * kv) + c * q + c * kv + c * q + 4 * cfg.n_heads)


def attention_constant(cfg, num: Numerics) -> float:
    """The concatenated q/k/v weight of the fused projection (one copy per forward; under autocast its bf16
    cast is counted with the other autocast weight copies)."""
    if num.autocast:
        return 0.0
    q = cfg.n_heads * cfg.resolved_head_dim
    kv = cfg.n_kv_heads * cfg.resolved_head_dim
    return num.compute * (q + 2 * kv) * cfg.d_model


def mamba_bytes(cfg, num: Numerics, n: float) -> float:
    """Mamba on n tokens. The causal conv runs the CPU kernel for float32 inputs; the selective scan's inputs are
    cast to float32, so on a CPU with kernels it always runs the kernel (bf16 models too), else the chunked scan."""
    di, R, S = cfg.mamba_expand * cfg.d_model, cfg.resolved_dt_rank, cfg.mamba_d_state
    c = num.compute
    conv_kernel, scan_kernel = num.kernel(c), num.kernel(4)
    per = 0.0
    # in_proj's output [2 di]: kept when the conv kernel saves xi (a view of it) or when silu saves z (a view)
    if conv_kernel or (not scan_kernel and c == 4):
        per += 2 * di * c
    per += di * 4 if conv_kernel else 3 * di * c  # conv output | zero-padded xi, conv before silu, conv output
    per += (R + 2 * S) * c + 4 * di  # x_proj output (dt, B, C are views); dt_proj output in float32 (softplus)
    if c == 2:
        per += 4 * di  # float32 copy of the conv output: the scan's u
    if scan_kernel:
        per += 4 * di + 8 * S + 4 * di  # softplus(dt), float32 contiguous B and C, z
    else:
        per += 4 * di + 4 * di + 8 * S  # the chunked scan's time-major copies of u, dt, B, C
        per += 4 * di + 4 * di  # y + u*D and silu(z)
        if c == 2:
            per += 4 * di  # z in float32 (silu's input)
    per += di * c  # out_proj's input (scan output cast back)
    return n * per


def moe_bytes(cfg, num: Numerics, n: float, padded: bool, ep: int = 1) -> float:
    """Dropless MoE on n routed tokens (n * top_k assignments). padded: MoD's padding rows are removed first.
    ep: expert-parallel ranks the experts are split over (the rows travel to their experts' ranks and back)."""
    d, E, k, f = cfg.d_model, cfg.n_experts, cfg.top_k, cfg.d_ff_expert
    x = num.resid if not num.autocast else 4  # the norm's output (float32 under autocast)
    e = num.expert
    per_token = 8 * E + 12 * k + 16  # router logits and probs (fp32), top-k indices and weights, normaliser, lse
    if num.autocast:
        per_token += 2 * d  # the router's bf16 copy of its input
    if padded:
        per_token += 8 + x * d + x * d  # kept-row index, the kept rows, and the output rows index_copy'd back
    a = n * k
    per_assign = 8 + 8 + 4 + x * d + 2 * e * d  # order, token_of, weight; gathered rows; expert output, scaled
    if ep > 1:
        # parallel/expert_parallel.py: the gathered rows are sent (the all-to-all saves no tensor: its backward is
        # the reverse exchange), the received rows sorted by local expert are what the grouped GEMM keeps in their
        # place, and the returned outputs are the expert output above. Kept in addition: the two row permutations
        # (index_select saves its index): by local expert, and back to arrival order. Balanced routing: a rank
        # receives as many rows as it sends, so the SwiGLU below runs on as many rows as without expert parallelism
        # (a skewed router can send a rank up to ep x as many). The buffers in flight: exchange_bytes.
        per_assign += 8 + 8
    out = n * per_token + a * per_assign + _swiglu(num, a, f, e)
    if cfg.n_shared_experts:
        out += _swiglu(num, n, cfg.n_shared_experts * f, num.compute)
        if cfg.shared_expert_gate:
            out += n * (num.compute * d + 8)
    return out


def exchange_bytes(cfg, num: Numerics, n: float, ep: int) -> float:
    """The all-to-all buffers of one MoE layer under expert parallelism, alive while it runs (not kept): going out,
    the rows sent and received before their sorted copy (the norm output's dtype); coming back, the outputs in
    local-expert and arrival order before the received copy. The backward's reverse exchanges hold the gradients
    of the same tensors. Balanced routing: n * top_k rows each way (up to ep x as many received under skew)."""
    if ep == 1:
        return 0.0
    x = num.resid if not num.autocast else 4
    return n * cfg.top_k * 2 * cfg.d_model * max(x, num.expert)


def mod_bytes(cfg, num: Numerics, n_full: float, n_sel: float) -> float:
    """Mixture-of-Depths around a block: the residual input (router and gather keep it; autocast also a bf16
    copy), router logits, BCE inputs; per selected row the gather index, sigmoid weight, valid mask and the
    block's update before scaling."""
    d = cfg.d_model
    return n_full * (12 + num.resid * d + (2 * d if num.autocast else 0)) + n_sel * (8 + 4 + 1 + num.resid * d + 4)


def mod_rows(cfg, batch: int, seq: int) -> tuple[float, float]:
    """(padded rows, real selected tokens) of a MoD block. A sequence selects capacity_tokens(T) tokens on average
    (causal ranking: token t is kept with probability ceil(c (t+1)) / (t+1)); the batch is padded to its longest
    selection, about sqrt(2 ln B) standard deviations above the mean for B roughly independent sequences."""
    mean = capacity_tokens(cfg.mod_capacity, seq)
    sd = math.sqrt(seq * cfg.mod_capacity * (1 - cfg.mod_capacity))
    longest = min(seq, mean + math.sqrt(2 * math.log(max(batch, 2))) * sd)
    return batch * longest, batch * mean


def _matmul_params(module: torch.nn.Module, num: Numerics) -> int:
    """Parameters autocast copies to bf16 in a forward (weights of matmuls; CPU autocast leaves grouped_mm, hence
    the experts, in float32). The copies live until the backward has used them."""
    skip = {id(p) for m in module.modules() if isinstance(m, Experts) and num.device == "cpu" for p in m.parameters()}
    n = 0
    for name, p in module.named_parameters():
        if p.ndim >= 2 and id(p) not in skip and "conv1d" not in name and not name.endswith("embed.weight"):
            n += p.numel()
    return n


@dataclass
class BlockActivations:
    index: int
    kind: str
    tokens: float  # rows the block's layers see (MoD: the selected ones)
    saved: float  # bytes kept for the backward (autocast's weight copies included)
    transient: float  # largest extra while its backward runs
    copies: float = 0.0  # of which autocast's bf16 weight copies
    seq_saved: float = 0.0  # of which the sequence part (seq_norm + attention / Mamba, without weight copies)
    exchange: float = 0.0  # expert parallelism's all-to-all buffers while its MoE layer runs (forward or backward)


def block_activations(cfg, num: Numerics, batch: int, seq: int, model=None, ep: int = 1) -> list[BlockActivations]:
    """Per block: bytes kept for the backward (with autocast's weight copies when ``model``, a meta-device
    HybridLM of ``cfg``, is given) and its backward's temporaries; ``ep``: expert-parallel ranks."""
    out = []
    N = batch * seq
    d = cfg.d_model
    for i in range(cfg.n_layers):
        seq_kind, ffn_kind = layer_kinds(cfg, i)
        mod = cfg.mod_enabled and i in cfg.mod_layers
        rows, real = mod_rows(cfg, batch, seq) if mod else (N, N)
        seq_part = rows * _norm_and_consumer(num, d)  # seq_norm with its consumer's input
        if seq_kind == "attention":
            seq_part += attention_bytes(cfg, num, rows) + attention_constant(cfg, num)
            width = max(3 * cfg.n_heads * cfg.resolved_head_dim, d)
        else:
            seq_part += mamba_bytes(cfg, num, rows)
            width = 2 * cfg.mamba_expand * d
        b = seq_part + rows * _norm_and_consumer(num, d)  # and ffn_norm
        exchange = 0.0
        if ffn_kind == "moe":
            b += moe_bytes(cfg, num, real, padded=mod, ep=ep)
            exchange = exchange_bytes(cfg, num, real, ep)
            width = max(width, cfg.top_k * cfg.d_ff_expert)
        else:
            b += _swiglu(num, rows, cfg.d_ff, num.compute)
            width = max(width, cfg.d_ff)
        if mod:
            b += mod_bytes(cfg, num, N, rows)
        copies = 2 * _matmul_params(model.layers[i], num) if num.autocast and not num.fsdp_mixed and model else 0
        # backward temporaries: the gradient of the block's widest intermediate and of the residual stream
        out.append(
            BlockActivations(
                i,
                f"{seq_kind}/{ffn_kind}{'/mod' if mod else ''}",
                rows,
                b + copies,
                rows * 4 * (width + 2 * d) + exchange,
                copies,
                seq_part,
                exchange,
            )
        )
    return out


def head_activations(cfg, num: Numerics, batch: int, seq: int) -> tuple[float, float]:
    """(saved, transient) of the final norm, the LM head and the MTP heads in a training forward.

    CPU float32 kernel path: the loss and both gradients are formed in the forward (dh [N, d] and dW^T [d, V]
    kept per head; the logits exist one 16 MB block at a time). Otherwise each head keeps its [N, V] logit
    gradient (fp32 fused path) or fp32 log-softmax (unfused path under bf16), and while one head runs it
    briefly holds the logits in two dtypes besides."""
    N = batch * seq
    d, V, heads = cfg.d_model, cfg.vocab_size, cfg.n_predict
    saved = N * 8  # token ids (embedding backward)
    fused = num.kernel(4) and num.precision == "fp32"
    saved += N * _norm_and_consumer(num, d, consumer_casts=False) if not fused else N * (8 * d + 4)
    per_head_in = num.compute * d if num.autocast else num.resid * d  # the head's (cast) input
    if fused:
        saved += heads * (N * 4 * d + 4 * d * V)  # dh and dW^T per head
        saved += (heads - 1) * N * 4 * d  # MTP: the projection's output (silu input)
        transient = 4 * min(N, max(1, 1024 * 4096 // V)) * V
    else:
        saved += heads * N * (4 * V + 8) + (heads - 1) * N * per_head_in  # logit grad / log-softmax; MTP hidden
        saved += (heads - 1) * N * num.compute * d  # MTP projection output
        if num.autocast:
            saved += heads * N * 2 * d  # bf16 copies of each head's input
        transient = N * V * (num.compute + 4) if num.precision != "fp32" else 0.0
    return saved + head_copies(cfg, num), transient


def head_copies(cfg, num: Numerics) -> float:
    """Autocast's bf16 copies of the unembeddings and MTP projections (kept until the backward)."""
    if not num.autocast or num.fsdp_mixed:
        return 0.0
    d, V, heads = cfg.d_model, cfg.vocab_size, cfg.n_predict
    return 2 * (heads * V * d + (heads - 1) * d * d)


# ----------------------------------------------------------------------------------------------- state and plan
@dataclass
class MemoryPlan:
    config: str
    precision: str
    device: str
    parallel: str
    gpus: int
    batch_size: int
    seq_len: int
    activation_checkpointing: str
    parameters: int
    expert_parallel: int = 1
    gb: dict = field(default_factory=dict)  # component -> GiB per device
    peak_gb: float = 0.0
    phase: str = ""  # which phase sets the peak
    gpu_memory_gb: float | None = None
    fits: bool | None = None
    max_batch_size: int | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def muon_groups(
    plans, n_experts: int, gpus: int, ep: int, sharded: bool
) -> tuple[list[list[tuple]], list[list[tuple]]]:
    """(global shapes, shapes one rank orthogonalises) of Muon's [2-D matrices, stacked experts]. BatchedMuon cuts
    its batches by the global shapes (a DTensor's .shape) and gathers an FSDP-sharded 2-D update whole; a stacked
    expert tensor sharded on dim 0 (FSDP2, with or without expert parallelism) is orthogonalised as the whole
    experts of the rank's own shard (FSDP2's largest dim-0 chunk of its ep group's n_experts/ep experts), with no
    gather (optim.holds_whole_experts)."""
    groups = [[pl.shape for pl in plans if pl.optimizer == o] for o in ("muon", "expert_muon")]
    held = [list(g) for g in groups]
    if sharded and gpus > 1:
        local = -(-(n_experts // ep) // (gpus // ep))
        held[1] = [(local, *s[1:]) for s in groups[1]]
    return groups, held


def _muon_step_transient(
    groups: list[list[tuple[int, ...]]], ns_bytes: int, batched: list[bool], held: list[list[tuple]] | None = None
) -> float:
    """Muon's temporaries in bytes (``training/optim.py``). BatchedMuon handles its matrices in the batches of
    ``newton_schulz_batches``: the Nesterov updates (fp32) while they are concatenated, then the batch, and in
    each Newton-Schulz iteration X, the next X (ns dtype) and A, B [b, m, m]. torch.optim.Muon does one matrix at
    a time: the same terms for one matrix. ``held``: the shapes a rank orthogonalises when they are not the global
    ones (expert parallelism's local experts), batched as the global ones."""

    def batch(shapes: list[tuple[int, ...]]) -> float:
        m, n = sorted(shapes[0][-2:])
        b = sum(s[0] if len(s) == 3 else 1 for s in shapes)
        x = b * m * n
        return max(8 * x if len(shapes) > 1 else 0, x * (4 + 2 * ns_bytes) + 2 * b * m * m * ns_bytes)

    peak = 0.0
    for shapes, own, is_batched in zip(groups, held or groups, batched):
        batches = newton_schulz_batches(shapes) if is_batched else [[i] for i in range(len(shapes))]
        peak = max([peak] + [batch([own[i] for i in idx]) for idx in batches])
    return peak


def expert_block_params(model: HybridLM) -> list[int]:
    """Per block: the parameters of its stacked experts (what expert parallelism splits; 0 for a dense block)."""
    return [
        sum(p.numel() for e in blk.modules() if isinstance(e, Experts) for p in e.parameters()) for blk in model.layers
    ]


def _check_expert_parallel(cfg: Config, ep: int, gpus: int, parallel: str) -> None:
    """The runtime's constraints on expert parallelism (``train.expert_parallel``), in the planner's words."""
    if ep == 1:
        return
    m = cfg.model
    if not m.moe_layers:
        raise PlanError("{expert_parallel} {value}: needs MoE layers (model.moe_layers is empty); use 1", ep)
    if parallel != "fsdp":
        raise PlanError(f"{{expert_parallel}} {{value}}: composes with {{parallel}} fsdp only, not {parallel!r}", ep)
    if gpus % ep:
        raise PlanError(f"{{expert_parallel}} {{value}}: must divide {{gpus}} {gpus}", ep)
    if m.n_experts % ep:
        raise PlanError(f"{{expert_parallel}} {{value}}: must divide {{n_experts}}={m.n_experts}", ep)


def plan_memory(
    cfg: Config,
    *,
    name: str = "",
    gpus: int = 1,
    gpu_memory_gb: float | None = None,
    parallel: str = "fsdp",
    batch_size: int | None = None,
    seq_len: int | None = None,
    checkpointing: str | None = None,
    precision: str | None = None,
    device: str = "cuda",
    kernels: bool | None = None,
    grad_accum: int | None = None,
    expert_parallel: int | None = None,
) -> MemoryPlan:
    """Per-device memory of one training step. ``expert_parallel`` (default ``train.expert_parallel``): the ranks
    each MoE layer's experts are split over, as the runtime does it: a (gpus/ep "dp_mod_ep", ep "ep") mesh, each
    rank of an ep group owning n_experts/ep whole experts, FSDP2-sharded over dp_mod_ep. Persistent expert state per
    device stays 1/gpus of the total; what shrinks is what FSDP gathers of a block's experts (1/ep) and Muon's
    expert temporaries (local whole experts, no gather); the token all-to-all adds two row permutations per
    assignment (kept for the backward) and its buffers while a MoE layer runs."""
    ep = cfg.train.expert_parallel if expert_parallel is None else expert_parallel
    for arg, v in (("gpus", gpus), ("batch_size", batch_size), ("seq_len", seq_len), ("expert_parallel", ep)):
        if v is not None and v < 1:
            raise PlanError(f"{{{arg}}} {{value}}: must be >= 1", v)
    if seq_len is not None and seq_len > cfg.model.max_seq_len:  # as train.seq_len is (and bounds the work)
        raise PlanError(
            f"{{seq_len}} {{value}}: must be <= model.max_seq_len={cfg.model.max_seq_len} (raise it "
            "with {max_seq_len})",
            seq_len,
        )
    if gpu_memory_gb is not None and not (math.isfinite(gpu_memory_gb) and gpu_memory_gb > 0):
        raise PlanError("{gpu_memory_gb} {value}: must be a finite number > 0 (GiB per device)", gpu_memory_gb)
    m = cfg.model
    B = batch_size or cfg.train.batch_size
    T = seq_len or cfg.train.seq_len
    ckpt = checkpointing or cfg.train.activation_checkpointing
    prec = precision or cfg.train.precision
    if prec == "auto":
        prec = "bf16-mixed" if device == "cuda" else "fp32"
    accum = grad_accum or cfg.train.grad_accum
    if parallel not in ("fsdp", "ddp"):
        raise PlanError("{parallel} {value!r}: allowed fsdp, ddp", parallel)
    if ckpt not in ("none", "full", "selective", "sequence"):
        raise PlanError("{checkpointing} {value!r}: allowed none, full, selective, sequence", ckpt)
    if prec == "bf16-compensated" and parallel == "fsdp" and gpus > 1:
        raise PlanError(
            "bf16-compensated is not supported with FSDP (train.parallel=fsdp); use bf16-mixed or {parallel} ddp"
        )
    _check_expert_parallel(cfg, ep, gpus, parallel)
    if kernels is None:
        kernels = device == "cpu" and cpu_kernels.available()
    sharded = parallel == "fsdp" and gpus > 1
    num = Numerics(prec, device, kernels, fsdp_mixed=sharded and prec == "bf16-mixed")
    with torch.device("meta"):
        model = HybridLM(m)
    plans = plan_parameters(model, cfg.optim)
    n_params = sum(p.numel() for p in model.parameters())
    shard = gpus if sharded else 1

    # ---- static: parameters, optimizer states, compensation buffers
    state_bytes = 4 if prec in ("fp32", "bf16-mixed", "bf16-compensated") else 2  # optimizer states' dtype
    params = n_params * num.param / shard
    opt = sum(pl.param.numel() * (2 if pl.optimizer == "adamw" else 1) for pl in plans) * state_bytes / shard
    comp = n_params * 2 if prec == "bf16-compensated" else 0.0
    grads = n_params * num.param / shard

    # ---- activations of one micro-batch
    blocks = block_activations(m, num, B, T, model, ep)
    head_saved, head_transient = head_activations(m, num, B, T)
    checkpointed = [ckpt == "full" or (ckpt == "selective" and i % 2 == 1) for i in range(m.n_layers)]
    N = B * T
    kept = [N * num.resid * m.d_model if c else b.saved for b, c in zip(blocks, checkpointed)]
    if ckpt == "sequence":  # each block keeps its input in place of the sequence part's activations
        kept = [b.saved - b.seq_saved + b.tokens * num.resid * m.d_model for b in blocks]
    per_block_params = [sum(p.numel() for p in blk.parameters()) for blk in model.layers]
    # the one block being recomputed holds its full activations again during its backward
    recompute = max((b.saved for b, c in zip(blocks, checkpointed) if c), default=0.0)
    if ckpt == "sequence":
        recompute = max(b.seq_saved for b in blocks)
    activations = sum(kept) + head_saved
    autocast_copies = head_copies(m, num) + sum(b.copies for b, c in zip(blocks, checkpointed) if not c)

    # ---- FSDP: a block's parameters gathered whole (and the next one prefetched); its gradients reduce-scattered.
    # Expert parallelism: the experts' all-gather runs over dp_mod_ep and brings back this rank's n_experts/ep only.
    gathered = 0.0
    if sharded:
        gbytes = 2 if num.fsdp_mixed else num.param
        unsharded = max(p - e + e // ep for p, e in zip(per_block_params, expert_block_params(model)))
        gathered = 2 * unsharded * gbytes + unsharded * 4  # two blocks + one unsharded grad
        root = n_params - sum(per_block_params)  # embedding and heads: the root unit, gathered for fwd and bwd
        gathered += root * gbytes
    ddp_buckets = n_params * num.param if parallel == "ddp" and gpus > 1 else 0.0  # DDP's gradient buckets

    # ---- phases
    static = params + opt + comp + ddp_buckets
    acc_grads = grads if accum > 1 else 0.0  # later micro-batches run with the earlier ones' gradients held
    # autocast caches its weight casts until the forward's autocast region ends: checkpointed blocks' copies too
    # expert parallelism's exchange buffers of one MoE layer exist while it runs, before the heads' temporaries do
    exchange = max(b.exchange for b in blocks)
    forward = (
        acc_grads
        + activations
        + max(head_transient, exchange)
        + gathered
        + sum(b.copies for b, c in zip(blocks, checkpointed) if c)
    )
    # backward: heads first (their gradients appear, their activations go), then blocks last to first
    head_params = n_params - sum(per_block_params)
    live = acc_grads + activations - head_saved + head_params * num.param / shard + head_transient
    backward = live
    for i in reversed(range(m.n_layers)):
        extra = blocks[i].transient + (recompute if checkpointed[i] or ckpt == "sequence" else 0.0)
        backward = max(backward, live + extra + gathered)
        live += per_block_params[i] * num.param / shard - kept[i]
    groups, held = muon_groups(plans, m.n_experts, gpus, ep, sharded)
    ns_bytes = 2 if device == "cuda" and cfg.optim.muon_ns_dtype in ("auto", "bfloat16") else 4
    if device == "cpu" and cfg.optim.muon_ns_dtype == "bfloat16":
        ns_bytes = 2
    batched = [ns_bytes != 2 or sharded, True]
    # Under FSDP, BatchedMuon gathers each 2-D update whole (the same temporaries on every rank); stacked experts
    # are orthogonalised as this rank's own shard of whole experts.
    step_tmp = _muon_step_transient(groups, ns_bytes, batched, held)
    if prec == "bf16-compensated":
        step_tmp += n_params * (2 + 2)  # weights and gradients viewed in float32 during the step
    step = grads + step_tmp
    phases = {"forward": forward, "backward": backward, "optimizer step": step}
    phase = max(phases, key=phases.get)
    peak = static + phases[phase]

    plan = MemoryPlan(
        name,
        prec,
        device,
        parallel if gpus > 1 else "none",
        gpus,
        B,
        T,
        ckpt,
        n_params,
        expert_parallel=ep,
        gpu_memory_gb=gpu_memory_gb,
    )
    plan.gb = {
        k: v / GiB
        for k, v in {
            "parameters": params,
            "gradients": grads,
            "optimizer states": opt,
            "compensation buffers": comp,
            "activations (kept)": activations - autocast_copies,
            "autocast bf16 weight copies": autocast_copies,
            "fsdp gathered": gathered,
            "ddp buckets": ddp_buckets,
            "optimizer-step temporaries": step_tmp,
            "head temporaries": head_transient,
            "all-to-all buffers (one layer)": exchange,
        }.items()
        if v
    }
    plan.peak_gb = peak / GiB
    plan.phase = phase
    if gpu_memory_gb:
        plan.fits = plan.peak_gb <= gpu_memory_gb * USABLE
        plan.max_batch_size = (
            _largest_batch(cfg, name, gpus, gpu_memory_gb, parallel, T, ckpt, prec, device, kernels, accum, ep)
            if plan.fits or B > 1
            else 0
        )
    if sharded:
        plan.notes.append(
            f"FSDP over {gpus} devices: parameters, gradients and optimizer states sharded; activations are per device"
        )
    if ep > 1:
        plan.notes.append(
            f"expert parallel {ep}: each rank runs {m.n_experts // ep} of {m.n_experts} experts (FSDP-sharded over "
            f"{gpus // ep}); token exchange planned for balanced routing, a skewed router can send a rank up to "
            f"{ep}x the rows"
        )
    return plan


# Leave room for the CUDA context, allocator fragmentation and NCCL buffers (PyTorch reserves in blocks).
USABLE = 0.9


def measure_step_peak(
    cfg: Config,
    precision: str,
    checkpointing: str,
    batch: int,
    seq: int,
    steps: int = 3,
    expert_parallel: int | None = None,
) -> int:
    """What ``plan_memory(..., device="cpu")`` predicts, measured: the peak of live tensor bytes over building the
    model and ``steps`` training steps composed as the trainer does (precision policy, checkpointing, Muon + AdamW,
    compensated updates, clipping, zero_grad(set_to_none)), from the profiler's allocation events (+bytes / -bytes
    in time order; the CPU analogue of torch.cuda.max_memory_allocated). Used by bench_memory.py and the tests.

    ``expert_parallel`` (inside a running process group: torchrun, gloo): this rank's peak with the model
    FSDP2-sharded as the trainer shards it (``parallelize(..., "fsdp", expert_parallel)``), each rank on its own
    tokens: what ``plan_memory(cfg, gpus=world, expert_parallel=...)`` predicts per device. The process group's own
    buffers are not tensors and are not counted."""
    cpu = torch.device("cpu")
    policy = resolve_policy(precision, cpu)
    sharded = expert_parallel is not None
    g = torch.Generator().manual_seed(dist.get_rank() if sharded else 0)  # ranks route different tokens
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq), generator=g)
    targets = torch.randint(0, cfg.model.vocab_size, (batch, seq + cfg.model.n_predict - 1), generator=g)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = (
            build_model(cfg.model, seed=0).to(policy.param_dtype).train().set_activation_checkpointing(checkpointing)
        )
        if sharded:
            model = parallelize(model, "fsdp", policy, cpu, expert_parallel)
        opts = build_optimizers(model, cfg.optim)
        comp = CompensatedUpdates(dict(model.named_parameters())) if policy.compensated else None
        for _ in range(steps):
            with policy.autocast(cpu):
                out = model(tokens, targets)
            out.loss.backward()
            del out
            clip_grads_([p for p in model.parameters() if p.grad is not None], cfg.train.grad_clip)
            with comp.fp32_view() if comp else torch.no_grad():
                for o in opts.values():
                    o.step()
            for o in opts.values():
                o.zero_grad(set_to_none=True)
    live = peak = 0
    for _, n in sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    ):
        live += n
        peak = max(peak, live)
    return peak


def _largest_batch(cfg, name, gpus, gpu_memory_gb, parallel, T, ckpt, prec, device, kernels, accum, ep) -> int:
    def fits(b: int) -> bool:
        p = plan_memory(
            cfg,
            name=name,
            gpus=gpus,
            gpu_memory_gb=None,
            parallel=parallel,
            batch_size=b,
            seq_len=T,
            checkpointing=ckpt,
            precision=prec,
            device=device,
            kernels=kernels,
            grad_accum=accum,
            expert_parallel=ep,
        )
        return p.peak_gb <= gpu_memory_gb * USABLE

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi) and hi < 1 << 16:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
