"""Facts before causes: the doctor never calls a run healthy when a tensor did not train, says "inconclusive"
when the evidence cannot support a verdict, and "untrained" before the first step. Runs are plain PyTorch loops
(tests/plain_runs.py), not this project's trainer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plain_runs import Net, lightning_module, norm_names, train
from torch import nn

from moe_arch.cli import main
from moe_arch.doctor.pipeline import DiagnoseOptions, diagnose


def _steps(model, opt, n: int, vocab: int, sched=None, logits=None, dtype=torch.float32) -> None:
    """n next-token steps on random tokens (``logits`` maps tokens to logits; default: the model itself)."""
    forward = logits or model
    for _ in range(n):
        tok = torch.randint(0, vocab, (8, 8))
        out = forward(tok[:, :-1]).to(dtype)
        nn.functional.cross_entropy(out.reshape(-1, vocab), tok[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


def test_nan_weights_are_non_finite_and_critical(tmp_path):
    train(tmp_path)
    ck = torch.load(tmp_path / "final.pt")
    ck["model"]["blocks.1.fc.weight"].fill_(float("nan"))
    torch.save(ck, tmp_path / "nan.pt")
    for against in (None, str(tmp_path / "init.pt")):
        d = diagnose(str(tmp_path / "nan.pt"), DiagnoseOptions(against=against))
        assert d.status == "critical"
        f = d.findings[0]
        assert f.cause == "non_finite" and f.tensors == ["blocks.1.fc.weight"]
        assert f.evidence["nonfinite_elements"]["blocks.1.fc.weight"] == 32 * 32


def test_against_the_same_file_is_inconclusive(tmp_path, capsys):
    train(tmp_path)
    final = str(tmp_path / "final.pt")
    d = diagnose(final, DiagnoseOptions(against=final))
    assert d.status == "inconclusive" and d.findings == []
    assert "identical to the checkpoint" in d.inconclusive[0] and "--against" in d.inconclusive[0]
    assert main(["diagnose", final, "--against", final, "--fail-on", "critical", "--quiet"]) == 3
    assert main(["diagnose", final, "--against", final, "--quiet"]) == 0


def test_a_runs_step_zero_checkpoint_is_untrained(tmp_path):
    train(tmp_path)
    d = diagnose(str(tmp_path / "init.pt"))
    assert d.status == "untrained" and d.findings == [] and "nothing trained yet" in d.notes[0]
    assert main(["diagnose", str(tmp_path / "init.pt"), "--fail-on", "warning", "--quiet"]) == 0


def test_our_trainers_step_zero_checkpoint_is_untrained(small_cfg):
    from pathlib import Path

    from moe_arch.training.trainer import Trainer

    Trainer(small_cfg).run()
    step0 = Path(small_cfg.train.out_dir) / "t" / "checkpoints" / "step_0000000.pt"
    d = diagnose(str(step0), DiagnoseOptions(probe=False))
    assert d.status == "untrained" and d.findings == []


def test_weights_only_without_a_reference_is_inconclusive(tmp_path):
    from safetensors.torch import save_file

    planted = train(tmp_path)
    save_file({k: v.contiguous() for k, v in planted["model"].state_dict().items()}, tmp_path / "m.safetensors")
    d = diagnose(str(tmp_path / "m.safetensors"))
    assert d.status == "inconclusive" and "neither optimizer state nor a reference" in d.inconclusive[0]


def test_lambda_lr_zero_for_one_group_is_a_zero_learning_rate(tmp_path):
    """LambdaLR whose lambda returns 0 for the norms' group: the saved lr is 0, initial_lr is not, the moments are
    non-zero, the weights never moved."""
    torch.manual_seed(0)
    model = Net()
    norms = [n for n, _ in model.named_parameters() if n.endswith("norm.weight")]
    named = dict(model.named_parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in named.items() if n not in norms]}, {"params": [named[n] for n in norms]}],
        lr=3e-3,
        weight_decay=0.0,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 1.0, lambda s: 0.0])
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 0}, tmp_path / "init.pt")
    _steps(model, opt, 5, 64, sched)
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": 5},
        tmp_path / "final.pt",
    )
    d = diagnose(str(tmp_path / "final.pt"), DiagnoseOptions(against=str(tmp_path / "init.pt")))
    assert d.status == "critical"
    f = d.findings[0]
    assert f.cause == "zero_learning_rate" and sorted(f.tensors) == sorted(norms)
    assert f.evidence["saved_lr"] == 0.0 and f.evidence["scheduled_peak_lr"] == [3e-3]
    assert len(d.findings) == 1


class StackedMoE(nn.Module):
    """Experts stacked as ``mlp.w_in`` [E, d, h] beside ``mlp.router`` (no "expert" in any name)."""

    def __init__(self, d=16, h=24, n=4, allowed=(0, 1)):
        super().__init__()
        self.embed = nn.Embedding(32, d)
        self.mlp = nn.Module()
        self.mlp.router = nn.Linear(d, n, bias=False)
        self.mlp.w_in = nn.Parameter(torch.randn(n, d, h) * 0.1)
        self.mlp.w_out = nn.Parameter(torch.randn(n, h, d) * 0.1)
        self.head = nn.Linear(d, 32, bias=False)
        self.allowed = list(allowed)

    def forward(self, tok):
        x = self.embed(tok)
        logits = self.mlp.router(x)
        mask = torch.full_like(logits, float("-inf"))
        mask[..., self.allowed] = 0
        top = (logits + mask).argmax(-1)
        y = torch.einsum("btd,btdh->bth", x, self.mlp.w_in[top]).relu()
        return self.head(x + torch.einsum("bth,bthd->btd", y, self.mlp.w_out[top]))


def test_stacked_experts_are_found_by_structure_not_by_name(tmp_path):
    torch.manual_seed(0)
    model = StackedMoE()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 0}, tmp_path / "init.pt")
    _steps(model, opt, 5, 32)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 5}, tmp_path / "final.pt")
    for against in (str(tmp_path / "init.pt"), None):
        d = diagnose(str(tmp_path / "final.pt"), DiagnoseOptions(against=against))
        f = next(f for f in d.findings if f.cause == "dead_experts")
        assert sorted(f.tensors) == ["mlp.w_in", "mlp.w_out"] and f.experts == {"mlp": [2, 3]}
        assert d.status != "healthy"


def test_tied_weights_are_not_reported_outside_the_optimizer(tmp_path):
    """nanoGPT ties lm_head.weight to transformer.wte.weight: one parameter, two names in the state dict."""
    torch.manual_seed(0)
    model = nn.Module()
    model.transformer = nn.Module()
    model.transformer.wte = nn.Embedding(64, 16)
    model.transformer.ln_f = nn.LayerNorm(16)
    model.lm_head = nn.Linear(16, 64, bias=False)
    model.lm_head.weight = model.transformer.wte.weight
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # parameters() yields the tied weight once
    assert len(opt.param_groups[0]["params"]) == 3
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iter_num": 0}, tmp_path / "init.pt")
    _steps(model, opt, 3, 64, logits=lambda tok: model.lm_head(model.transformer.ln_f(model.transformer.wte(tok))))
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iter_num": 3}, tmp_path / "ckpt.pt")
    for against in (None, str(tmp_path / "init.pt")):
        d = diagnose(str(tmp_path / "ckpt.pt"), DiagnoseOptions(against=against))
        assert not any(f.cause == "not_in_optimizer" for f in d.findings), [(f.cause, f.tensors) for f in d.findings]
        ev = {e.name: e for e in d.evidence}
        assert ev["lm_head.weight"].alias_of == "transformer.wte.weight"


def test_healthy_bf16_run_without_a_reference_is_not_critical(tmp_path):
    """bf16 weights, AdamW 1e-2 with a decaying schedule: every tensor moves. Without a reference, the rounding
    rule on the final (decayed) moments is a hypothesis, never a critical finding."""
    torch.manual_seed(0)
    model = Net().to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 40, eta_min=1e-5)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    _steps(model, opt, 40, 64, sched)
    assert all(not torch.equal(v, init[k]) for k, v in model.state_dict().items())
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 40}, tmp_path / "final.pt")
    d = diagnose(str(tmp_path / "final.pt"))
    assert d.status != "critical", [(f.cause, f.severity, f.tensors) for f in d.findings]
    for f in d.findings:  # besides the bf16 Adam moments (torch's AdamW keeps them in the parameters' dtype)
        if f.cause != "low_precision_optimizer_state":
            assert f.cause == "precision_underflow" and "hypothesis" in f.evidence


def test_unmapped_optimizer_is_inconclusive_alone_and_frozen_tensors_still_critical(tmp_path):
    train(tmp_path)
    init, final = torch.load(tmp_path / "init.pt"), torch.load(tmp_path / "final.pt")
    other = torch.optim.AdamW([nn.Parameter(torch.randn(7, 3))], lr=1e-3)  # state for tensors this model lacks
    nn.Parameter(torch.randn(7, 3)).sum().backward()
    frozen = ["blocks.0.fc.weight", "final_norm.weight"]
    for n in frozen:
        final["model"][n] = init["model"][n].clone()
    torch.save({"model": final["model"], "optimizer": other.state_dict(), "step": 30}, tmp_path / "foreign.pt")
    d = diagnose(str(tmp_path / "foreign.pt"))
    assert d.status == "inconclusive" and "could not be mapped" in d.inconclusive[0]
    d = diagnose(str(tmp_path / "foreign.pt"), DiagnoseOptions(against=str(tmp_path / "init.pt")))
    assert d.status == "critical"
    f = next(f for f in d.findings if f.cause == "frozen_unexplained")
    assert sorted(f.tensors) == sorted(frozen)
    assert "a mapping of the optimizer state to names" in f.evidence["evidence_missing"]


def test_the_summary_names_every_root_cause(tmp_path):
    from moe_arch.doctor.report import build_blocks

    train(tmp_path, "zero_lr")
    ck = torch.load(tmp_path / "final.pt")
    ck["model"]["blocks.1.fc.weight"].fill_(float("inf"))
    torch.save(ck, tmp_path / "two.pt")
    d = diagnose(str(tmp_path / "two.pt"), DiagnoseOptions(against=str(tmp_path / "init.pt")))
    assert {f.cause for f in d.findings} == {"zero_learning_rate", "non_finite"}
    text = repr(build_blocks(d, plots=False)[:6])
    assert "zero_learning_rate" in text and "non_finite" in text


# ------------------------------------------------------------------------------------------ property
_NAMES = [n for n, _ in Net().named_parameters()]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frozen=st.sets(st.sampled_from(_NAMES), min_size=1, max_size=5), nan=st.booleans())
def test_planted_frozen_or_nan_tensors_never_read_healthy(tmp_path_factory, frozen, nan):
    """Plant a random set of frozen tensors (restored to their initial values) or NaN tensors into a healthy run:
    never healthy, and the finding names exactly the planted set."""
    root = tmp_path_factory.mktemp("plant")
    if not (root / "final.pt").exists():
        train(root)
    init, final = torch.load(root / "init.pt"), torch.load(root / "final.pt")
    for n in frozen:
        final["model"][n] = torch.full_like(final["model"][n], float("nan")) if nan else init["model"][n].clone()
    torch.save(final, root / "planted.pt")
    d = diagnose(str(root / "planted.pt"), DiagnoseOptions(against=str(root / "init.pt")))
    assert d.status == "critical"
    cause = "non_finite" if nan else "frozen_unexplained"
    f = next(f for f in d.findings if f.cause == cause)
    assert sorted(f.tensors) == sorted(frozen)


def test_accelerate_save_state_folders_with_frozen_tensors_are_never_healthy(tmp_path):
    """accelerate's save_state (model.safetensors with sorted names, optimizer.bin, scheduler.bin): a group with lr
    0 for the norms; against the step-0 folder the norms are named, alone the run is not called healthy."""
    accelerate = pytest.importorskip("accelerate")

    torch.manual_seed(0)
    acc = accelerate.Accelerator(cpu=True)
    model = Net()
    norms = sorted(n for n, _ in model.named_parameters() if n.endswith("norm.weight"))
    named = dict(model.named_parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in named.items() if n not in norms]}, {"params": [named[n] for n in norms], "lr": 0.0}],
        lr=1e-2,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model, opt, sched = acc.prepare(model, opt, sched)
    acc.save_state(str(tmp_path / "step0"))
    for _ in range(4):
        tok = torch.randint(0, 64, (8, 8))
        acc.backward(nn.functional.cross_entropy(model(tok[:, :-1]).reshape(-1, 64), tok[:, 1:].reshape(-1)))
        opt.step()
        sched.step()
        opt.zero_grad()
    acc.save_state(str(tmp_path / "step4"))
    assert (tmp_path / "step4" / "optimizer.bin").is_file()
    d = diagnose(str(tmp_path / "step4"), DiagnoseOptions(against=str(tmp_path / "step0")))
    assert d.checkpoint["format"] == "accelerate" and d.status == "critical"
    frozen = {t for f in d.findings if f.cause in ("zero_learning_rate", "frozen_unexplained") for t in f.tensors}
    assert sorted(frozen) == norms, [(f.cause, f.tensors) for f in d.findings]
    assert diagnose(str(tmp_path / "step4")).status != "healthy"


def test_peft_lora_trainer_folders_diagnose_the_adapters(tmp_path):
    """A LoRA run in Hugging Face's Trainer saves adapter_model.safetensors (the base is frozen on purpose)."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("accelerate")
    from plain_runs import hf_lora_trainer_run

    hf_lora_trainer_run(tmp_path, 1e-2)
    ck = tmp_path / "checkpoint-4"
    assert (ck / "adapter_model.safetensors").is_file() and not (ck / "model.safetensors").exists()
    d = diagnose(str(ck), DiagnoseOptions(against=str(tmp_path / "checkpoint-2")))
    assert d.checkpoint["format"] == "peft" and d.checkpoint["step"] == 4
    names = {e.name for e in d.evidence}
    assert names and all("lora_" in n for n in names)
    assert any("frozen on purpose" in n for n in d.notes)
    assert d.status in ("healthy", "warning"), [(f.cause, f.tensors) for f in d.findings]
    assert not any(f.cause in ("not_in_optimizer", "frozen_unexplained") for f in d.findings)


def test_lightning_ckpt_files_with_a_frozen_group(tmp_path):
    """Lightning's .ckpt (state_dict with the module's attribute prefix, optimizer_states, global_step), written by
    Lightning's own ModelCheckpoint; the norms' param group has lr 0."""
    L = pytest.importorskip("lightning.pytorch")

    def norms_frozen(module):
        named = dict(module.net.named_parameters())
        norms = [n for n in named if n.endswith("norm.weight")]
        return torch.optim.AdamW(
            [
                {"params": [p for n, p in named.items() if n not in norms]},
                {"params": [named[n] for n in norms], "lr": 0.0},
            ],
            lr=1e-2,
        )

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randint(0, 64, (64, 8))), batch_size=8)
    ckpt_cb = L.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ckpt_cb],
    )
    trainer.fit(lightning_module(norms_frozen), data)
    d = diagnose(str(tmp_path / "step=4.ckpt"), DiagnoseOptions(against=str(tmp_path / "step=2.ckpt")))
    norms = sorted(e.name for e in d.evidence if e.name.endswith("norm.weight"))
    assert len(norms) == 3 and d.status == "critical" and d.checkpoint["step"] == 4
    frozen = {t for f in d.findings if f.cause in ("zero_learning_rate", "frozen_unexplained") for t in f.tensors}
    assert sorted(frozen) == norms, [(f.cause, f.tensors) for f in d.findings]


def test_torchtitan_style_dcp_step_folders(tmp_path):
    """torchtitan saves step-N/ folders with torch.distributed.checkpoint: the model's state dict flattened into the
    top level (get_model_state_dict), the optimizer under "optimizer" flattened per parameter
    (get_optimizer_state_dict(flatten_optimizer_state_dict=True): state tensors and pickled hyper-parameters), and
    TrainState's step as a tensor. torchtitan is not installable here, so the folders are written with the same
    torch.distributed.checkpoint calls its ModelWrapper / OptimizersContainer / TrainState make. The norms' group has
    lr 0: named exactly, against step-0 and alone (the hyper-parameters are read with weights_only=True)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    torch.manual_seed(0)
    model = Net()
    norms = sorted(norm_names(model))
    named = dict(model.named_parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in named.items() if n not in norms]}, {"params": [named[n] for n in norms], "lr": 0.0}],
        lr=1e-2,
    )

    def save(step: int):
        states = {
            **get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(
                model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True)
            ),
            "train_state": {"step": torch.tensor(step, dtype=torch.int32)},
        }
        dcp.save(states, checkpoint_id=str(tmp_path / f"step-{step}"), no_dist=True)

    save(0)
    _steps(model, opt, 4, 64)
    save(4)
    d = diagnose(str(tmp_path / "step-4"), DiagnoseOptions(against=str(tmp_path / "step-0"), probe=False))
    assert d.checkpoint["format"] == "torchtitan-dcp" and d.checkpoint["step"] == 4
    assert all(s["n_mapped"] == s["n_params"] == len(named) for s in d.optimizers)
    assert [(f.cause, sorted(f.tensors)) for f in d.findings] == [("zero_learning_rate", norms)]
    alone = diagnose(str(tmp_path / "step-4"), DiagnoseOptions(probe=False))
    assert [(f.cause, sorted(f.tensors)) for f in alone.findings] == [("zero_learning_rate", norms)]


def test_transformers5_moe_trained_stacked_saved_per_expert(tmp_path):
    """transformers 5 trains Mixtral's experts stacked (mlp.experts.gate_up_proj [E, 2F, d]) and saves them per
    expert (block_sparse_moe.experts.N.w1 / w3). The HF Trainer's optimizer.pt lists the stacked parameters; the
    doctor maps them with transformers' own save-time conversion. Layer 0's gate_up_proj gets lr 0: the finding
    names exactly the saved tensors that stayed unchanged (measured on the files), against the initial weights
    and alone."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from arch_runs import Pattern, _build
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = _build("mixtral")
    model.save_pretrained(tmp_path / "init")
    named = dict(model.named_parameters())
    frozen_param = "model.layers.0.mlp.experts.gate_up_proj"
    assert frozen_param in named  # the in-memory (stacked) layout
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in named.items() if n != frozen_param]}, {"params": [named[frozen_param]], "lr": 0.0}],
        lr=1e-3,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=8,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=100,
        save_steps=6,
    )
    Trainer(model=model, args=args, train_dataset=Pattern(48), optimizers=(opt, sched)).train()
    ck = tmp_path / "checkpoint-6"
    before, after = load_file(tmp_path / "init" / "model.safetensors"), load_file(ck / "model.safetensors")
    unchanged = sorted(n for n in after if torch.equal(before[n], after[n]))
    assert unchanged and all(".layers.0.block_sparse_moe.experts." in n for n in unchanged), unchanged
    for d in (
        diagnose(str(ck), DiagnoseOptions(against=str(tmp_path / "init"), probe=False)),
        diagnose(str(ck), DiagnoseOptions(probe=False)),
    ):
        assert all(s["n_mapped"] == s["n_params"] for s in d.optimizers), d.optimizers
        assert [(f.cause, sorted(f.tensors)) for f in d.findings] == [("zero_learning_rate", unchanged)]


def _accumulated_run(tmp_path, accum: int, optimizer_steps: int):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    micro = 0
    for _ in range(optimizer_steps):
        for _ in range(accum):
            tok = torch.randint(0, 64, (8, 8))
            loss = nn.functional.cross_entropy(model(tok[:, :-1]).reshape(-1, 64), tok[:, 1:].reshape(-1)) / accum
            loss.backward()
            micro += 1
        opt.step()
        opt.zero_grad()
    return model, opt, micro


def test_steps_are_optimizer_steps_when_a_trainer_counts_micro_steps(tmp_path):
    """A loop that saves its micro-step counter as ``step`` with gradient accumulation 4 in its config: the report
    says 5 optimizer steps (the Adam state's own count agrees with 20 / 4) and names the counter."""
    model, opt, micro = _accumulated_run(tmp_path, 4, 5)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": micro,
            "config": {"train": {"grad_accum": 4}},
        },
        tmp_path / "micro.pt",
    )
    d = diagnose(str(tmp_path / "micro.pt"), DiagnoseOptions(probe=False))
    assert micro == 20 and d.checkpoint["step"] == 20 and d.checkpoint["optimizer_steps"] == 5
    assert any("counts micro-steps" in n and "5 optimizer steps" in n for n in d.notes), d.notes


def test_nanogpt_iter_num_is_read_as_optimizer_steps(tmp_path):
    """nanoGPT's ckpt.pt: ``iter_num`` counts optimizer steps (each of gradient_accumulation_steps micro-batches)."""
    model, opt, micro = _accumulated_run(tmp_path, 4, 5)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "model_args": {"n_layer": 2},
            "iter_num": 5,
            "best_val_loss": 1e9,
            "config": {"gradient_accumulation_steps": 4},
        },
        tmp_path / "ckpt.pt",
    )
    d = diagnose(str(tmp_path / "ckpt.pt"), DiagnoseOptions(probe=False))
    assert d.checkpoint["step"] == 5 and d.checkpoint["optimizer_steps"] == 5
    assert not any("micro-steps" in n for n in d.notes)


@pytest.mark.parametrize(
    "stage,ranks",
    [
        (2, 1),
        pytest.param(0, 1, marks=pytest.mark.slow),
        pytest.param(1, 1, marks=pytest.mark.slow),
        pytest.param(2, 2, marks=pytest.mark.slow),
    ],
)
def test_deepspeed_checkpoints_map_zero_partitions_by_name(tmp_path, stage, ranks):
    """DeepSpeed's own engine and save_checkpoint (ZeRO 0, 1, 2; CPU, gloo; with 2 ranks a parameter's state is
    split across both ranks' files): the norms' group has lr 0. Against global_step0 and alone, the finding names
    exactly the norms; every parameter's optimizer state is mapped by name."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(__file__).with_name("deepspeed_run.py"))
    launch = (
        [sys.executable, script]
        if ranks == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(ranks),
            "--master_port",
            str(29400 + os.getpid() % 500),
            script,
        ]
    )
    out = subprocess.run(
        launch + [str(tmp_path), str(stage)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "latest").read_text().strip() == "global_step4"
    assert len(list((tmp_path / "global_step4").glob("*optim_states.pt"))) == (ranks if stage else 0)
    norms = sorted(norm_names(Net()))
    n_params = len(list(Net().parameters()))
    for d in (
        diagnose(str(tmp_path), DiagnoseOptions(against=str(tmp_path / "global_step0"), probe=False)),
        diagnose(str(tmp_path), DiagnoseOptions(probe=False)),
    ):
        assert d.checkpoint["format"] == "deepspeed" and d.checkpoint["optimizer_steps"] == 4
        assert [(s["n_mapped"], s["n_params"]) for s in d.optimizers] == [(n_params, n_params)], d.notes
        assert [(f.cause, sorted(f.tensors)) for f in d.findings] == [("zero_learning_rate", norms)], d.notes


# ------------------------------------------------------------------- planted faults on several stacks
@pytest.fixture(scope="module")
def healthy_runs(tmp_path_factory) -> dict:
    """Healthy runs written by three stacks: (reference, checkpoint, read, write) per stack, where read/write get and
    put the checkpoint's model tensors by the names the doctor reports."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    L = pytest.importorskip("lightning.pytorch")
    from arch_runs import run
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("healthy_runs")
    out = {}
    train(root / "plain")
    out["plain"] = (
        root / "plain" / "init.pt",
        root / "plain" / "final.pt",
        lambda p: torch.load(p)["model"],
        lambda p, sd: torch.save({**torch.load(p), "model": sd}, p),
    )
    hf = run("mixtral", "fp32", root / "hf", steps=10)  # experts saved per expert, trained stacked
    out["hf_mixtral"] = (
        hf.init,
        hf.checkpoint,
        lambda p: load_file(p / "model.safetensors"),
        lambda p, sd: save_file(sd, p / "model.safetensors", metadata={"format": "pt"}),
    )

    class SaveInitial(L.Callback):
        def on_train_start(self, trainer, module):
            trainer.save_checkpoint(root / "lightning" / "init.ckpt")

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randint(0, 64, (64, 8))), batch_size=8)
    trainer = L.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[SaveInitial()],
    )
    trainer.fit(lightning_module(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2)), data)
    trainer.save_checkpoint(root / "lightning" / "final.ckpt")
    out["lightning"] = (
        root / "lightning" / "init.ckpt",
        root / "lightning" / "final.ckpt",
        lambda p: torch.load(p)["state_dict"],  # names as Lightning saves them: net.<name>
        lambda p, sd: torch.save({**torch.load(p), "state_dict": sd}, p),
    )
    for stack, (ref, ck, *_) in out.items():
        d = diagnose(str(ck), DiagnoseOptions(against=str(ref), probe=False))
        assert d.status == "healthy", (stack, [(f.cause, f.tensors) for f in d.findings])
    return out


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), stack=st.sampled_from(["plain", "hf_mixtral", "lightning"]), nan=st.booleans())
def test_planted_faults_on_several_stacks_never_read_healthy(healthy_runs, tmp_path_factory, data, stack, nan):
    """Restore a random set of tensors of a healthy run to their initial values (or fill them with NaN), in the
    files each stack wrote: never healthy, and the findings name exactly the planted tensors."""
    import shutil

    ref, ck, read, write = healthy_runs[stack]
    work = tmp_path_factory.mktemp("planted")
    dst = work / ck.name
    shutil.copytree(ck, dst) if ck.is_dir() else shutil.copy(ck, dst)
    init, final = read(ref), read(dst)
    names = sorted(n for n, t in final.items() if t.is_floating_point() and not torch.equal(t, init[n]))
    planted = data.draw(st.sets(st.sampled_from(names), min_size=1, max_size=4))
    for n in planted:
        final[n] = torch.full_like(final[n], float("nan")) if nan else init[n].clone()
    write(dst, final)
    d = diagnose(str(dst), DiagnoseOptions(against=str(ref), probe=False))
    assert d.status == "critical", (stack, planted, [(f.cause, f.tensors) for f in d.findings])
    named = {t for f in d.findings for t in f.tensors}
    assert named == planted, (stack, [(f.cause, f.tensors) for f in d.findings])
