"""Typed run configuration: model, optimizer, training, data and monitor sections.

Every section is a dataclass validated at construction (like Hugging Face's ``PretrainedConfig``): a bad
value raises :class:`ConfigError` with one line naming the field, the value and what is allowed. Configs
load from YAML (optionally starting from a named preset) and take dotted command-line overrides such as
``--model.d_model 256``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from moe_arch.utils import NumberError, atomic_write_text, parse_number


class ConfigError(ValueError):
    """A configuration value is invalid. The message is one line: source, field, value, what is allowed."""


class DuplicateKeyError(ConfigError):
    """A YAML mapping sets one key twice."""


MAX_VOCAB = 1 << 24
MAX_LAYERS = 4096
MAX_DIM = 1 << 20
MAX_PARAMETERS = 10**13


def _fail(section: str, name: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"{section}.{name}={value!r}: {allowed}")


def _check_finite(section: str, obj) -> None:
    """nan and inf are refused in every float field: no field gives them a meaning, and every comparison with nan
    is False, so a range check such as ``grad_clip < 0`` would let nan through into the run. Integers must fit
    64 bits: torch and numpy take them as int64 and fail deep inside (``Overflow when unpacking long``)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        for x in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(x, float) and not math.isfinite(x):
                _fail(section, f.name, v, "must be a finite number (not nan or inf)")
            if isinstance(x, int) and not isinstance(x, bool) and not -(2**63) <= x < 2**63:
                _fail(section, f.name, v, "must fit in 64 bits (between -2**63 and 2**63 - 1)")


def _check_layers(section: str, name: str, layers: list[int], n_layers: int) -> None:
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_layers:
            _fail(section, name, layers, f"layer index {i!r} out of range; allowed: integers in [0, {n_layers - 1}]")
    if len(set(layers)) != len(layers):
        _fail(section, name, layers, "contains a layer index twice; list each layer once")


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 384  # SwiGLU hidden size of the dense feed-forward layers
    max_seq_len: int = 4096  # longest sequence generation may reach (RoPE is computed on the fly)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Mixture of Experts feed-forward layers
    moe_layers: list[int] = field(default_factory=list)
    n_experts: int = 0
    top_k: int = 2
    d_ff_expert: int = 0
    # Always-on experts added to the routed output (DeepSeekMoE / Qwen2-MoE), each d_ff_expert wide, run as one
    # SwiGLU of n_shared_experts * d_ff_expert; with shared_expert_gate, scaled per token by sigmoid(w . x)
    # as in Qwen2-MoE (DeepSeekMoE: no gate).
    n_shared_experts: int = 0
    shared_expert_gate: bool = True
    router_aux_loss_coef: float = 0.01  # Switch load-balance loss weight
    router_z_loss_coef: float = 0.001  # ST-MoE router z-loss weight
    router_bias_balancing: bool = False  # DeepSeek-V3 auxiliary-loss-free balancing
    router_bias_update_rate: float = 0.001
    # Mamba sequence layers (the others are attention)
    mamba_layers: list[int] = field(default_factory=list)
    mamba_d_state: int = 16
    mamba_expand: int = 2
    mamba_d_conv: int = 4
    mamba_dt_rank: int | None = None  # None: ceil(d_model / 16)
    mamba_chunk_size: int = 0  # scan chunk length; 0 picks ~sqrt(sequence length)
    # auto: the compiled CPU kernel for float32 CPU tensors when it builds (else, with a warning, the chunked
    # PyTorch scan); chunked: always the PyTorch scan. The same function either way (tested).
    mamba_scan: str = "auto"
    # Mixture of Depths token routing
    mod_layers: list[int] = field(default_factory=list)
    mod_capacity: float = 1.0
    mod_aux_loss_coef: float = 0.01
    # Multi-token prediction: number of prediction heads (1 = next token only)
    n_predict: int = 1
    mtp_loss_weight: float = 0.5

    def __post_init__(self) -> None:
        s = "model"
        _check_finite(s, self)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                _fail(s, name, v, "must be a positive integer")
        if self.vocab_size < 2:
            _fail(s, "vocab_size", self.vocab_size, "must be at least 2")
        # Sizes far beyond any trained model are refused here, before anything is allocated or built (a typo
        # like d_model 10000000000 would otherwise overflow or hang in the layer constructors).
        if self.vocab_size > MAX_VOCAB:
            _fail(
                s,
                "vocab_size",
                self.vocab_size,
                f"must be <= {MAX_VOCAB:,} (the largest tokenizers in use have ~256K entries)",
            )
        if self.n_layers > MAX_LAYERS:
            _fail(s, "n_layers", self.n_layers, f"must be <= {MAX_LAYERS:,}")
        for name in ("d_model", "d_ff", "max_seq_len"):
            if getattr(self, name) > MAX_DIM:
                _fail(s, name, getattr(self, name), f"must be <= {MAX_DIM:,}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                divisors = [h for h in range(1, min(self.d_model, 64) + 1) if self.d_model % h == 0]
                _fail(
                    s,
                    "n_heads",
                    self.n_heads,
                    f"must divide model.d_model={self.d_model} (e.g. one of {divisors[-4:]}), or set model.head_dim",
                )
        elif self.head_dim <= 0:
            _fail(s, "head_dim", self.head_dim, "must be a positive integer or null")
        if self.n_heads % self.n_kv_heads:
            _fail(
                s, "n_kv_heads", self.n_kv_heads, f"must divide model.n_heads={self.n_heads} (grouped-query attention)"
            )
        if self.resolved_head_dim % 2:
            _fail(s, "head_dim", self.resolved_head_dim, "must be even (rotary embeddings rotate pairs of dimensions)")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                _fail(s, name, getattr(self, name), "must be > 0")
        for name in (
            "router_aux_loss_coef",
            "router_z_loss_coef",
            "router_bias_update_rate",
            "mod_aux_loss_coef",
            "mtp_loss_weight",
        ):
            if not getattr(self, name) >= 0:
                _fail(s, name, getattr(self, name), "must be >= 0")
        _check_layers(s, "moe_layers", self.moe_layers, self.n_layers)
        _check_layers(s, "mamba_layers", self.mamba_layers, self.n_layers)
        _check_layers(s, "mod_layers", self.mod_layers, self.n_layers)
        for name in ("n_experts", "top_k", "d_ff_expert"):  # unused without moe_layers, but never meaningful
            if getattr(self, name) < 0:
                _fail(s, name, getattr(self, name), "must be >= 0")
        if self.moe_layers:
            if self.n_experts < 1:
                _fail(s, "n_experts", self.n_experts, "must be >= 1 when model.moe_layers is not empty")
            if not 1 <= self.top_k <= self.n_experts:
                _fail(s, "top_k", self.top_k, f"must be in [1, model.n_experts={self.n_experts}]")
            if self.d_ff_expert <= 0:
                _fail(
                    s, "d_ff_expert", self.d_ff_expert, "must be a positive integer when model.moe_layers is not empty"
                )
        if self.n_shared_experts < 0 or (self.n_shared_experts and not self.moe_layers):
            _fail(s, "n_shared_experts", self.n_shared_experts, "must be >= 0, and 0 without model.moe_layers")
        if self.mamba_scan not in ("auto", "chunked"):
            _fail(s, "mamba_scan", self.mamba_scan, "allowed: auto, chunked")
        if self.mamba_layers:
            for name in ("mamba_d_state", "mamba_expand", "mamba_d_conv"):
                if getattr(self, name) < 1:
                    _fail(s, name, getattr(self, name), "must be >= 1")
            if self.mamba_dt_rank is not None and self.mamba_dt_rank < 1:
                _fail(s, "mamba_dt_rank", self.mamba_dt_rank, "must be >= 1 or null")
            if self.mamba_chunk_size < 0:
                _fail(s, "mamba_chunk_size", self.mamba_chunk_size, "must be >= 0 (0 = automatic)")
        if not (isinstance(self.mod_capacity, (int, float)) and 0.0 < self.mod_capacity <= 1.0):
            _fail(s, "mod_capacity", self.mod_capacity, "must be in (0, 1]; 1.0 turns Mixture-of-Depths off")
        if self.n_predict < 1:
            _fail(s, "n_predict", self.n_predict, "must be >= 1 (1 = next-token prediction only)")
        n = self.estimated_parameters()
        if n > MAX_PARAMETERS:
            _fail(
                s,
                "d_model",
                self.d_model,
                f"with these sizes the model would have ~{n:.2e} parameters "
                f"({4 * n / 1e12:,.0f} TB in float32); at most {MAX_PARAMETERS:.0e} are supported",
            )

    def estimated_parameters(self) -> int:
        """Total parameters from the config alone (the model's own count, ``params.count_parameters``, needs the
        model built): embeddings, heads, attention or Mamba mixers, dense or MoE feed-forwards, norms."""
        d, V, hd = self.d_model, self.vocab_size, self.resolved_head_dim
        heads = (1 if self.tie_embeddings else 2) * V * d + (self.n_predict - 1) * (V * d + d * d)
        attn = 2 * d * self.n_heads * hd + 2 * d * self.n_kv_heads * hd
        di, N, r = self.mamba_expand * d, self.mamba_d_state, self.resolved_dt_rank
        mamba = 2 * d * di + di * (r + 2 * N) + r * di + di + di * (N + 1 + self.mamba_d_conv + 1) + di * d
        per_layer = []
        for i in range(self.n_layers):
            seq = mamba if i in self.mamba_layers else attn
            shared = self.n_shared_experts * 3 * d * self.d_ff_expert + (
                d if self.n_shared_experts and self.shared_expert_gate else 0
            )
            ffn = (
                (self.n_experts * 3 * d * self.d_ff_expert + d * self.n_experts + shared)
                if i in self.moe_layers
                else 3 * d * self.d_ff
            )
            per_layer.append(seq + ffn + 2 * d + (d if i in self.mod_layers else 0))
        return heads + sum(per_layer) + d

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_dt_rank(self) -> int:
        return self.mamba_dt_rank if self.mamba_dt_rank is not None else math.ceil(self.d_model / 16)

    @property
    def mod_enabled(self) -> bool:
        return bool(self.mod_layers) and self.mod_capacity < 1.0


PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16-compensated", "bf16-pure")
SCHEDULES = ("cosine", "wsd", "constant")


# What each parameter *is*: the vocabulary ``optim.muon_roles`` routes by. It lives here, below the model, so the
# config can validate the routing on its own; the model's modules register their parameters' roles
# (moe_arch/model/roles.py) from this same table.
ROLES = {
    "embedding": "token embedding table",
    "output_head": "unembedding / prediction head projecting to the vocabulary",
    "norm": "RMSNorm gain",
    "bias": "additive bias",
    "router": "MoE or MoD routing projection",
    "conv": "depthwise causal convolution kernel",
    "ssm": "state-space parameter (A_log, D)",
    "hidden_matrix": "2-D weight of a hidden linear layer",
    "expert_matrix": "stacked expert weights [n_experts, in, out]",
}


@dataclass
class OptimConfig:
    # Muon for hidden 2-D matrices (and stacked expert matrices), AdamW for everything else.
    muon_lr: float = 3e-3
    adamw_lr: float = 3e-3
    weight_decay: float = 0.1
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    # "match_rms_adamw" (Moonlight): Muon's update RMS matches AdamW's, so both can share learning rates.
    muon_adjust_lr: str = "match_rms_adamw"
    # Newton-Schulz precision. torch.optim.Muon runs it in bfloat16, the fast path on GPUs; on a CPU without
    # bf16 matrix units that is ~2x slower than float32 (bench/RESULTS.md). auto: bfloat16 on CUDA, float32 on CPU.
    muon_ns_dtype: str = "auto"
    adamw_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adamw_eps: float = 1e-8
    # Roles optimised by Muon; everything else goes to AdamW (see moe_arch.training.optim).
    muon_roles: list[str] = field(default_factory=lambda: ["hidden_matrix", "expert_matrix"])

    def __post_init__(self) -> None:
        s = "optim"
        _check_finite(s, self)
        for name in ("muon_lr", "adamw_lr", "weight_decay", "adamw_eps"):
            if not getattr(self, name) >= 0:
                _fail(s, name, getattr(self, name), "must be >= 0")
        if not 0 <= self.muon_momentum < 1:
            _fail(s, "muon_momentum", self.muon_momentum, "must be in [0, 1)")
        if self.muon_ns_steps < 1 or self.muon_ns_steps >= 100:
            _fail(s, "muon_ns_steps", self.muon_ns_steps, "must be in [1, 99]")
        if self.muon_ns_dtype not in ("auto", "bfloat16", "float32"):
            _fail(s, "muon_ns_dtype", self.muon_ns_dtype, "allowed: auto, bfloat16, float32")
        if self.muon_adjust_lr not in ("original", "match_rms_adamw"):
            _fail(s, "muon_adjust_lr", self.muon_adjust_lr, "allowed: 'original' or 'match_rms_adamw'")
        if len(self.adamw_betas) != 2 or not all(0 <= b < 1 for b in self.adamw_betas):
            _fail(s, "adamw_betas", self.adamw_betas, "must be two numbers in [0, 1)")
        for r in self.muon_roles:
            if r not in ROLES:
                _fail(s, "muon_roles", self.muon_roles, f"unknown role {r!r}; allowed: {sorted(ROLES)}")


@dataclass
class TrainConfig:
    out_dir: str = "runs"
    run_name: str = "tiny"
    steps: int = 400
    batch_size: int = 16  # sequences per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 128
    warmup_steps: int = 30
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_frac: float = 0.2  # warmup-stable-decay: fraction of steps spent decaying
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "auto"  # auto: fp32 on CPU, bf16-mixed on GPU
    device: str = "auto"
    seed: int = 1234
    log_every: int = 10
    eval_every: int = 200
    eval_max_tokens: int = 65536  # cap on validation tokens per evaluation (0 = whole split)
    ckpt_every: int = 200
    keep_last: int = 2
    save_step0: bool = True
    overwrite: bool = False  # a fresh start may delete the checkpoints another run left in this run folder
    nan_policy: str = "stop"  # stop | skip
    max_nan_skips: int = 3
    compile: bool = False
    # Recompute activations in the backward instead of keeping them: none | full (every block) | selective (every
    # other block) | sequence (every block's attention / Mamba part). torch.utils.checkpoint, non-reentrant;
    # gradients equal the unchecked ones.
    activation_checkpointing: str = "none"
    # CPU runs: keep freed large blocks in the process (glibc mallopt) instead of returning them to the OS
    # and page-faulting them back in on the next step (~20% of a tiny-preset step). See utils.tune_cpu_malloc.
    cpu_malloc_cache: bool = True
    parallel: str = "auto"  # auto | none | ddp | fsdp (multi-process runs under torchrun)
    # Ranks each MoE layer's experts are split across (tokens exchanged with all-to-all); 1: every rank holds all
    # experts. Must divide the world size and model.n_experts; composes with fsdp (docs/distributed.md).
    expert_parallel: int = 1
    peak_flops: float = 0.0  # device peak FLOP/s for MFU; 0 measures the fp32/bf16 matmul peak at start
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "moe-arch"
    sample_prompt: str = "The hacker"
    sample_tokens: int = 48
    progress: str = "auto"  # auto | rich | plain | none

    def __post_init__(self) -> None:
        s = "train"
        _check_finite(s, self)
        for name in ("steps", "batch_size", "grad_accum", "log_every", "keep_last", "expert_parallel"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                _fail(s, name, v, "must be a positive integer")
        if self.seq_len < 2:
            _fail(s, "seq_len", self.seq_len, "must be >= 2")
        for name in ("warmup_steps", "eval_every", "ckpt_every", "eval_max_tokens", "max_nan_skips", "sample_tokens"):
            if getattr(self, name) < 0:
                _fail(s, name, getattr(self, name), "must be >= 0")
        if self.schedule not in SCHEDULES:
            _fail(s, "schedule", self.schedule, f"allowed: {', '.join(SCHEDULES)}")
        if not 0 <= self.min_lr_ratio <= 1:
            _fail(s, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        if not 0 < self.decay_frac <= 1:
            _fail(s, "decay_frac", self.decay_frac, "must be in (0, 1]")
        if self.grad_clip < 0:
            _fail(s, "grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")
        if self.peak_flops < 0:
            _fail(s, "peak_flops", self.peak_flops, "must be >= 0 (0 measures the matmul peak at start)")
        if self.precision not in PRECISIONS:
            _fail(s, "precision", self.precision, f"allowed: {', '.join(PRECISIONS)}")
        if self.nan_policy not in ("stop", "skip"):
            _fail(s, "nan_policy", self.nan_policy, "allowed: stop, skip")
        if self.parallel not in ("auto", "none", "ddp", "fsdp"):
            _fail(s, "parallel", self.parallel, "allowed: auto, none, ddp, fsdp")
        if self.activation_checkpointing not in ("none", "full", "selective", "sequence"):
            _fail(
                s, "activation_checkpointing", self.activation_checkpointing, "allowed: none, full, selective, sequence"
            )
        if self.progress not in ("auto", "rich", "plain", "none"):
            _fail(s, "progress", self.progress, "allowed: auto, rich, plain, none")
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device):
            _fail(s, "device", self.device, "allowed: auto, cpu, cuda, cuda:N")
        if not 0 <= self.seed < 2**32:  # the data order seeds a generator with seed * 1_000_003 + epoch
            _fail(s, "seed", self.seed, "must be in [0, 2**32 - 1]")
        if not self.out_dir.strip():
            _fail(s, "out_dir", self.out_dir, "must name a folder (e.g. runs)")
        # The run folder is out_dir/run_name: a name with a separator or '..' would put it (and the checkpoints a
        # fresh start may delete) somewhere else than under out_dir.
        if not self.run_name.strip() or self.run_name in (".", "..") or re.search(r"[/\\\x00]", self.run_name):
            _fail(
                s,
                "run_name",
                self.run_name,
                "must be a plain folder name (no '/', '\\' or '..'); put the parent folder in train.out_dir",
            )


@dataclass
class DataConfig:
    # "embedded" (the corpus shipped with the package); a file, folder or glob of .txt / .jsonl / .parquet /
    # .arrow / .csv (text, JSONL and CSV also .gz / .zst); a folder saved by datasets' save_to_disk; or
    # "hf:NAME[:SPLIT]" / "hf:NAME:CONFIG:SPLIT" (a hub dataset or a local dataset folder).
    source: str = "embedded"
    text_field: str = "text"
    # Hugging Face sources: the dataset config (e.g. sample-10BT), the split, and whether to stream it.
    hf_config: str = ""
    split: str = ""
    streaming: bool = False
    # Stop after this many documents / tokens (0: all). Documents are kept whole.
    max_documents: int = 0
    max_tokens: int = 0
    # "train-bpe" trains a byte-level BPE of model.vocab_size tokens on the training split (cached); otherwise a
    # tokenizer.json or a Hugging Face tokenizer folder, whose vocabulary the model then follows.
    tokenizer: str = "train-bpe"
    # The end-of-document token; empty: the tokenizer config's eos_token.
    eos_token: str = ""
    val_fraction: float = 0.05
    cache_dir: str = ".cache/moe_arch"
    shard_tokens: int = 1 << 28  # tokens per memory-mapped shard file of the token cache

    def __post_init__(self) -> None:
        s = "data"
        _check_finite(s, self)
        if not 0 < self.val_fraction < 0.5:
            _fail(s, "val_fraction", self.val_fraction, "must be in (0, 0.5)")
        if not self.source:
            _fail(s, "source", self.source, "must name 'embedded', a file, folder or glob, or hf:NAME")
        for name in ("max_documents", "max_tokens"):
            if getattr(self, name) < 0:
                _fail(s, name, getattr(self, name), "must be >= 0 (0: no limit)")
        if self.shard_tokens < 1024:
            _fail(s, "shard_tokens", self.shard_tokens, "must be >= 1024")
        if not self.tokenizer:
            _fail(s, "tokenizer", self.tokenizer, "must be 'train-bpe', a tokenizer.json or a tokenizer folder")
        if (self.hf_config or self.streaming) and not self.source.startswith("hf:"):
            _fail(
                s,
                "hf_config" if self.hf_config else "streaming",
                self.hf_config or self.streaming,
                "applies to hf: sources only; set data.source to hf:NAME",
            )


@dataclass
class MonitorConfig:
    enabled: bool = True
    interval: int = 10  # optimizer steps between checks
    window: int = 20  # steps a tensor must stay unchanged before it is called frozen
    sample_size: int = 4096  # elements fingerprinted per tensor (per expert slice)
    spike_zscore: float = 6.0
    stop_on_critical: bool = False
    # Optimizer steps between cross-rank fingerprints of the replicated parameters (DDP; FSDP2's Replicate
    # dimensions): the first check at which copies differ alerts replicas_diverged. Only acts under torchrun with
    # > 1 rank; 0 turns it off.
    replica_check_every: int = 10

    def __post_init__(self) -> None:
        _check_finite("monitor", self)
        if self.replica_check_every < 0:
            _fail("monitor", "replica_check_every", self.replica_check_every, "must be >= 0 (0: off)")
        if not self.spike_zscore > 0:
            _fail("monitor", "spike_zscore", self.spike_zscore, "must be > 0")
        for name in ("interval", "window", "sample_size"):
            if getattr(self, name) < 1:
                _fail("monitor", name, getattr(self, name), "must be >= 1")
        if self.window < self.interval or self.window % self.interval:
            _fail("monitor", "window", self.window, f"must be a multiple of monitor.interval={self.interval}")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "monitor": MonitorConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    # "section.field" names the user set by hand (their YAML file, command-line overrides), as opposed to a
    # preset's or the class's defaults. Not part of the saved config: load_config fills it.
    explicit: typing.ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        if self.train.seq_len > self.model.max_seq_len:
            _fail("train", "seq_len", self.train.seq_len, f"must be <= model.max_seq_len={self.model.max_seq_len}")
        ep = self.train.expert_parallel
        if ep > 1 and not self.model.moe_layers:
            _fail("train", "expert_parallel", ep, "needs MoE layers (model.moe_layers is empty); use 1")
        if ep > 1 and self.model.n_experts % ep:
            _fail("train", "expert_parallel", ep, f"must divide model.n_experts={self.model.n_experts}")
        if ep > 1 and self.train.parallel not in ("auto", "fsdp"):
            _fail(
                "train",
                "expert_parallel",
                ep,
                f"composes with train.parallel fsdp or auto, not {self.train.parallel!r}",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "Config":
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source}: expected a mapping with sections {sorted(SECTIONS)}, got {type(data).__name__}"
            )
        unknown = set(data) - set(SECTIONS) - {"preset"}
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(
                f"{source}: unknown section {key!r}{_suggest(key, SECTIONS)}; allowed: {sorted(SECTIONS)}"
            )
        try:
            sections = {}
            for name, klass in SECTIONS.items():
                values = data.get(name) or {}
                if not isinstance(values, dict):
                    raise ConfigError(f"{name}: expected a mapping, got {type(values).__name__}")
                sections[name] = _build_section(name, klass, values)
            return cls(**sections)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(str(key), [str(o) for o in options], n=1)  # YAML keys may be numbers
    return f" (did you mean {close[0]!r}?)" if close else ""


def _build_section(name: str, klass: type, values: dict[str, Any]):
    hints = typing.get_type_hints(klass)
    names = {f.name for f in dataclasses.fields(klass)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(
                f"{name}.{key}: unknown field{_suggest(key, names)}; `moe-arch config --help-fields "
                f"{name}` lists the fields"
            )
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return klass(**kwargs)


def describe_fields(section: str | None = None) -> str:
    """Every field of one section (or all), with its type and default: the text of ``config --help-fields``."""
    lines = []
    for name, klass in SECTIONS.items():
        if section is not None and name != section:
            continue
        hints = typing.get_type_hints(klass)
        lines.append(f"{name}:")
        for f in dataclasses.fields(klass):
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else f.default_factory()
                if f.default_factory is not dataclasses.MISSING
                else None
            )
            kind = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
            lines.append(f"  {name}.{f.name:<28} {kind:<16} default {default!r}")
    if not lines:
        raise ConfigError(f"--help-fields {section}: no such section; sections: {', '.join(SECTIONS)}")
    return "\n".join(lines)


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a field's annotation, converting the harmless cases (int -> float)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(path, value, inner[0])
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{path}={value!r}: expected a list, e.g. [1, 2]")
        return [_coerce(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={value!r}: expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}={value!r}: expected an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond any float
                raise ConfigError(f"{path}={value!r}: must be a finite number") from None
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                number = parse_number(value, path)
            except NumberError as e:
                raise ConfigError(f"{path}={value!r}: {e.reason}") from None
        else:
            raise ConfigError(f"{path}={value!r}: expected a number")
        if not math.isfinite(number):
            raise ConfigError(f"{path}={value!r}: must be a finite number (not nan or inf)")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}={value!r}: expected a string")
    return value


# ---------------------------------------------------------------------------------------------------------
# Presets, files and overrides


def preset_names() -> list[str]:
    root = resources.files("moe_arch") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def safe_load_unique(text: str, source: str) -> Any:
    """``yaml.safe_load``, refusing a key given twice in one mapping: PyYAML keeps the last one silently, so
    ``steps: 5`` ... ``steps: 7`` would run 7 steps with no word said."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _refuse_duplicate_keys(node, source)
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None


def _refuse_duplicate_keys(root: yaml.Node, source: str) -> None:
    stack, seen = [(root, ())], set()
    while stack:
        node, where = stack.pop()
        if id(node) in seen:  # an alias refers back to a node already checked (possibly its own ancestor)
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key, value in node.value:
                if key.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges; overriding a merged key is the point
                    stack.append((value, where))
                    continue
                name = key.value if isinstance(key, yaml.ScalarNode) else f"<{key.tag}>"
                if isinstance(key, yaml.ScalarNode):
                    ident = (key.tag, key.value)
                    if ident in first:
                        dotted = ".".join(where + (name,))
                        raise DuplicateKeyError(
                            f"{source}: line {key.start_mark.line + 1}: {dotted!r} is set "
                            f"twice in the same mapping (also on line {first[ident]}); YAML "
                            "would silently keep the last one: remove one of them"
                        )
                    first[ident] = key.start_mark.line + 1
                stack.append((value, where + (str(name),)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, where + (f"[{i}]",)) for i, v in enumerate(node.value))


def _read_yaml(spec: str, relative_to: Path | None = None) -> tuple[Any, str, str, bool]:
    """(data, source, identity, is_file) of a YAML file or a preset name. A relative file named by another file's
    ``preset:`` is looked up next to that file first, then in the working directory."""
    if not spec.strip():  # Path("") is the working directory; an unset shell variable, most likely
        raise ConfigError(f"config {spec!r}: empty name; give a YAML file or one of the presets {preset_names()}")
    path = Path(spec)
    if relative_to is not None and not path.is_absolute() and ((relative_to / path).exists() or not path.exists()):
        path = relative_to / path
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found; give a YAML file or one of the presets {preset_names()}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save the config as UTF-8"
            ) from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
        return safe_load_unique(text, str(path)) or {}, str(path), str(path.resolve()), True
    name = spec
    res = resources.files("moe_arch") / "configs" / f"{name}.yaml"
    if not res.is_file():
        raise ConfigError(
            f"{name!r}: neither a config file nor a preset{_suggest(name, preset_names())}; presets: {preset_names()}"
        )
    return safe_load_unique(res.read_text(), f"preset {name}") or {}, f"preset {name}", f"preset {name}", False


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_raw(path_or_preset: str | None) -> tuple[dict[str, Any], str]:
    """The merged mapping for a file or preset. A file or preset may say ``preset: NAME_OR_FILE`` to start from
    another, which may itself name one: the chain is followed to its root and merged from there (a loop is an
    error naming the chain)."""
    data, source, _ = _load_chain("tiny" if path_or_preset is None else path_or_preset)
    return data, source


def _load_chain(
    spec: str, relative_to: Path | None = None, chain: tuple[tuple[str, str], ...] = ()
) -> tuple[dict[str, Any], str, set[str]]:
    """(merged mapping, source, "section.field" names set in the chain's files: by hand, unlike a preset's)."""
    data, source, ident, is_file = _read_yaml(spec, relative_to)
    if any(ident == i for i, _ in chain):
        loop = " -> ".join([s for _, s in chain] + [source])
        raise ConfigError(
            f"{chain[-1][1]}: preset {spec!r} leads back to itself ({loop}); remove one of these preset: lines"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with sections {sorted(SECTIONS)}")
    own = {k: v for k, v in data.items() if k != "preset"}
    explicit = _keys(own) if is_file else set()
    base = data.get("preset")
    if base is None:
        return own, source, explicit
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{source}: preset={base!r}: must name a preset {preset_names()} or a YAML file")
    merged, _, inherited = _load_chain(base, Path(source).parent if is_file else None, chain + ((ident, source),))
    return _merge(merged, own), source, inherited | explicit


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``['--model.d_model', '256', '--train.steps=10']`` -> nested mapping with YAML-parsed values."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"override {arg!r}: expected --SECTION.FIELD VALUE, e.g. --model.d_model 256")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key}: missing value")
            raw = args[i + 1]
            i += 2
        section, _, name = key.partition(".")
        if section not in SECTIONS:
            raise ConfigError(
                f"override --{key}: unknown section {section!r}{_suggest(section, SECTIONS)}; "
                f"allowed: {sorted(SECTIONS)}"
            )
        quoted = raw.strip().startswith(("'", '"'))
        if typing.get_type_hints(SECTIONS[section]).get(name) is str and not quoted:
            # A text field takes the text as typed: YAML would read `hf:` as a mapping, `123` as a number and
            # `Hello, world` as a list, and the run would then be refused for a value the user never wrote.
            out.setdefault(section, {})[name] = raw
            continue
        try:
            value = safe_load_unique(raw, f"override --{key}")
        except DuplicateKeyError:
            raise
        except ConfigError:  # not YAML: the text itself
            value = raw
        if isinstance(value, str) and "," in value and not quoted:
            # "1,2,3" is a convenient way to write a list on the command line.
            try:
                value = [yaml.safe_load(v) for v in value.split(",") if v.strip()]
            except yaml.YAMLError:
                pass
        out.setdefault(section, {})[name] = value
    return out


def _keys(data: dict) -> set[str]:
    return {f"{sec}.{k}" for sec, vals in data.items() if isinstance(vals, dict) for k in vals}


def load_config(path_or_preset: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    data, source, explicit = _load_chain("tiny" if path_or_preset is None else path_or_preset)
    if overrides:
        ov = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        data = _merge(data, ov)
        explicit |= _keys(ov)
        source = f"{source} (with overrides)"
    cfg = Config.from_dict(data, source)
    cfg.explicit = frozenset(explicit)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
