"""Tiny Hugging Face models of the architectures people train, run in transformers' own ``Trainer`` with the live
monitor attached: the false-alarm suite (tests/test_false_alarms.py) and its table (bench/bench_false_alarms.py).

Each run saves the initial weights with ``save_pretrained`` (the reference for ``diagnose --against``), trains on a
learnable synthetic task so that gradients are consistent (random tokens would give noise-only updates, which is
not how a real run moves its biases and norms), snapshots every parameter at each monitor check, and keeps the
Trainer's final checkpoint folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

VOCAB = 64
SEED_LR = 3e-4  # the seed run's AdamW learning rate: below half a bf16 ULP at 1.0


def _common() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def _build(arch: str):
    import transformers as T

    c = _common()
    if arch == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(intermediate_size=64, **c))
    if arch == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(intermediate_size=64, **c))
    if arch == "qwen2_moe":
        return T.Qwen2MoeForCausalLM(
            T.Qwen2MoeConfig(
                intermediate_size=64,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=64,
                num_experts=4,
                num_experts_per_tok=2,
                **c,
            )
        )
    if arch == "mixtral":
        return T.MixtralForCausalLM(
            T.MixtralConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **c)
        )
    if arch == "olmoe":
        return T.OlmoeForCausalLM(T.OlmoeConfig(intermediate_size=64, num_experts=4, num_experts_per_tok=2, **c))
    if arch == "gemma":
        return T.GemmaForCausalLM(T.GemmaConfig(intermediate_size=64, head_dim=16, **c))
    if arch == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    if arch == "mamba":
        return T.MambaForCausalLM(
            T.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2)
        )
    raise ValueError(f"unknown architecture {arch!r}")


# What each one brings that the others do not (README table).
ARCHS = {
    "llama": "RMSNorm, GQA, SwiGLU",
    "qwen2": "Llama + zero-initialised q/k/v biases",
    "qwen2_moe": "top-k experts stacked in memory, saved per expert; shared expert with a sigmoid gate; q/k/v biases",
    "mixtral": "top-k experts stacked in memory, saved per expert (block_sparse_moe.experts.N.w1)",
    "olmoe": "experts + q/k RMSNorm",
    "gemma": "norms stored as w with scale 1 + w (zero-initialised), tied embeddings",
    "gpt2": "LayerNorm with biases, tied embeddings, Conv1D layout",
    "mamba": "selective-scan SSM: A_log, D, dt_proj, conv1d",
}


class Pattern(torch.utils.data.Dataset):
    """Arithmetic sequences modulo the vocabulary, each with its own start and stride: learnable, deterministic."""

    def __init__(self, n: int, length: int = 16):
        self.n, self.length = n, length

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        a = int(torch.randint(1, 5, (1,), generator=g))
        b = int(torch.randint(0, VOCAB, (1,), generator=g))
        t = (b + a * torch.arange(self.length)) % VOCAB
        return {"input_ids": t, "labels": t}


@dataclass
class ArchRun:
    arch: str
    mode: str  # fp32 | autocast (bf16 autocast, fp32 weights) | bf16 (weights stored in bf16: the seed's bug)
    out: Path
    steps: int
    alerts: list = field(default_factory=list)
    snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # step -> {name: weights}
    seconds: float = 0.0

    @property
    def init(self) -> Path:
        return self.out / "init"

    @property
    def checkpoint(self) -> Path:
        return self.out / f"checkpoint-{self.steps}"

    def unchanged(self, since: int, until: int) -> set[str]:
        """Tensors bitwise equal at ``since`` and ``until`` (measured on every element)."""
        a, b = self.snapshots[since], self.snapshots[until]
        return {n for n in a if torch.equal(a[n], b[n])}

    def fraction_unchanged(self, name: str, since: int, until: int) -> float:
        return float((self.snapshots[since][name] == self.snapshots[until][name]).float().mean())


def run(
    arch: str, mode: str, out: Path, steps: int = 60, lr: float | None = None, warmup: int = 0, monitor_config=None
) -> ArchRun:
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from moe_arch.config import MonitorConfig
    from moe_arch.doctor.integrations import HFMonitorCallback

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = _build(arch)
    if mode == "bf16":
        model = model.to(torch.bfloat16)
    lr = lr if lr is not None else SEED_LR
    model.save_pretrained(out / "init")
    cfg = monitor_config or MonitorConfig()
    result = ArchRun(arch, mode, out, steps)
    result.snapshots[0] = {n: p.detach().clone() for n, p in model.named_parameters()}

    class Snapshots(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % cfg.interval == 0:
                result.snapshots[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}

    monitor = HFMonitorCallback(cfg)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=lr,
        warmup_steps=warmup,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=steps,
        save_steps=steps,
        bf16=(mode == "autocast"),
        seed=0,
    )
    t = time.perf_counter()
    # Snapshots first: the monitor's check at step s compares against the snapshot the callback took at s - window.
    Trainer(model=model, args=args, train_dataset=Pattern(steps * 8), callbacks=[Snapshots(), monitor]).train()
    result.seconds = time.perf_counter() - t
    result.alerts = list(monitor.monitor.alerts)
    return result
