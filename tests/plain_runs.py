"""Small training runs written in plain PyTorch (not moe_arch's trainer), each with one planted bug."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class Norm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) * self.weight


class Block(nn.Module):
    def __init__(self, d, n_experts=4):
        super().__init__()
        self.norm = Norm(d)
        self.fc = nn.Linear(d, d)
        self.router = nn.Linear(d, n_experts, bias=False)
        self.experts = nn.Parameter(torch.randn(n_experts, d, d) * 0.02)
        self.allowed = None  # restrict routing to these experts (to plant dead experts)

    def forward(self, x):
        h = self.norm(x)
        logits = self.router(h)
        if self.allowed is not None:
            mask = torch.full_like(logits, float("-inf"))
            mask[..., self.allowed] = 0
            logits = logits + mask
        top = logits.argmax(-1)  # top-1 routing
        gate = torch.softmax(logits, -1).gather(-1, top[..., None])
        out = torch.einsum("...d,...de->...e", h, self.experts[top]) * gate
        return x + torch.relu(self.fc(h)) + out


class Net(nn.Module):
    def __init__(self, d=32, n_layers=2, vocab=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_layers))
        self.final_norm = Norm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0, 0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, tok):
        x = self.embed(tok)
        for b in self.blocks:
            x = b(x)
        return self.head(self.final_norm(x))


def norm_names(model):
    return [n for n, _ in model.named_parameters() if n.endswith("norm.weight")]


def train(out: Path, bug: str = "none", steps: int = 30, seed: int = 0, save_kwargs=None, monitor_config=None) -> dict:
    """Train, saving the step-0 state as ``init.pt`` and the final as ``final.pt``; return what was planted."""
    torch.manual_seed(seed)
    model = Net()
    planted: dict = {"cause": None, "tensors": []}
    named = list(model.named_parameters())
    if bug == "bf16":
        model = model.to(torch.bfloat16)
        named = list(model.named_parameters())
        planted = {"cause": "precision_underflow", "tensors": norm_names(model)}
    lr = 3e-4 if bug == "bf16" else 1e-2
    if bug == "not_in_optimizer":
        groups = [{"params": [p for n, p in named if not n.endswith(".bias")]}]
        planted = {"cause": "not_in_optimizer", "tensors": [n for n, _ in named if n.endswith(".bias")]}
    elif bug == "zero_lr":
        norms = set(norm_names(model))
        groups = [
            {"params": [p for n, p in named if n not in norms]},
            {"params": [p for n, p in named if n in norms], "lr": 0.0},
        ]
        planted = {"cause": "zero_learning_rate", "tensors": sorted(norms)}
    elif bug == "excessive":
        groups = [
            {"params": [p for n, p in named if n != "blocks.1.fc.weight"]},
            {"params": [dict(named)["blocks.1.fc.weight"]], "lr": lr * 300},
        ]
        planted = {"cause": "excessive_update", "tensors": ["blocks.1.fc.weight"]}
    else:
        groups = [{"params": [p for _, p in named]}]
    if bug == "unused":
        model.extra = nn.Linear(32, 32)  # registered, optimised, never used in forward
        groups[0]["params"].append(model.extra.weight)
        groups[0]["params"].append(model.extra.bias)
        planted = {"cause": "no_gradient", "tensors": ["extra.weight", "extra.bias"]}
    if bug == "dead_experts":
        for b in model.blocks:
            b.allowed = [0, 1]
        planted = {
            "cause": "dead_experts",
            "tensors": ["blocks.0.experts", "blocks.1.experts"],
            "experts": {"blocks.0": [2, 3], "blocks.1": [2, 3]},
        }
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    if bug == "zero_grad_order":
        planted = {"cause": "no_gradient", "tensors": [n for n, _ in model.named_parameters()], "all": True}
    out.mkdir(parents=True, exist_ok=True)
    save = save_kwargs or {}
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 0}, out / "init.pt")
    monitor = None
    if monitor_config is not None:
        from moe_arch.doctor.monitor import Monitor

        monitor = Monitor(model, opt, monitor_config, run_dir=out, print_fn=lambda s: None)  # <- line 1 of 2
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        tok = torch.randint(0, 64, (16, 8), generator=g)
        logits = model(tok[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, 64), tok[:, 1:].reshape(-1))
        loss.backward()
        if bug == "zero_grad_order":
            opt.zero_grad()  # the classic mistake: gradients cleared before the step
        opt.step()
        opt.zero_grad()
        if monitor is not None:
            monitor.after_step(loss=loss.item())  # <- line 2 of 2 (optional: the hooks already run the checks)
    planted["monitor"] = monitor
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": steps, **save}
    torch.save(state, out / "final.pt")
    planted["model"] = model
    planted["optimizer"] = opt
    return planted


class HFTokens(torch.utils.data.Dataset):
    """Random token sequences in the shape Hugging Face's Trainer expects (input_ids = labels)."""

    def __init__(self, n: int = 64, length: int = 16, vocab: int = 64):
        self.n, self.length, self.vocab = n, length, vocab

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        t = torch.randint(0, self.vocab, (self.length,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": t, "labels": t}


def hf_tiny_llama():
    """A two-layer Llama (transformers), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def hf_tiny_llama_bf16():
    """A two-layer Llama stored in bf16: the seed bug in someone else's model."""
    return hf_tiny_llama().to(torch.bfloat16)


def hf_tiny_lora_llama():
    """The two-layer Llama with peft LoRA adapters on q_proj / v_proj (the base frozen by peft)."""
    import peft

    return peft.get_peft_model(
        hf_tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )


def hf_args(out: Path, **overrides):
    """TrainingArguments for a quiet CPU run of Hugging Face's Trainer in ``out`` (constant lr, no reporting, no
    saves unless asked); ``overrides`` set the rest (max_steps, learning_rate, ...)."""
    from transformers import TrainingArguments

    kw = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        save_strategy="no",
    )
    return TrainingArguments(**{**kw, **overrides})


def lightning_trainer(root: Path, max_steps: int, callbacks: list, **overrides):
    """A quiet CPU ``lightning.Trainer`` (no logger, checkpoints, progress bar or summary) in ``root``."""
    import lightning as L

    kw = dict(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=str(root),
    )
    return L.Trainer(**{**kw, **overrides})


def hf_lora_trainer_run(out: Path, lr: float) -> None:
    """Hugging Face's Trainer on :func:`hf_tiny_lora_llama`: 4 steps at a constant ``lr``, adapter checkpoints
    ``checkpoint-2`` and ``checkpoint-4`` in ``out``."""
    import transformers
    from transformers import Trainer

    transformers.logging.set_verbosity_error()
    model = hf_tiny_lora_llama()
    args = hf_args(
        out, max_steps=4, per_device_train_batch_size=8, learning_rate=lr, save_strategy="steps", save_steps=2
    )
    Trainer(model=model, args=args, train_dataset=HFTokens()).train()


def lightning_module(configure_optimizers, log_name: str | None = None):
    """A LightningModule training :class:`Net` on next-token prediction. Batches: a TensorDataset tuple of token
    tensors or a dict with ``input_ids``; ``configure_optimizers(module)`` returns the optimizer; ``log_name`` logs
    the loss under that name (for Lightning's loggers)."""
    import lightning.pytorch as L

    class NetModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = Net()

        def training_step(self, batch, _):
            tok = batch["input_ids"] if isinstance(batch, dict) else batch[0]
            loss = nn.functional.cross_entropy(self.net(tok[:, :-1]).reshape(-1, 64), tok[:, 1:].reshape(-1))
            if log_name:
                self.log(log_name, loss)
            return loss

        def configure_optimizers(self):
            return configure_optimizers(self)

    return NetModule()
