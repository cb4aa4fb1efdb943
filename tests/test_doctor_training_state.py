"""Causes read from the training state beside the weights (doctor/causes/training_state.py), each on files the
stack writes itself, each with a healthy twin that must stay silent, each diagnosed against the run's initial
weights and alone: skipped steps (torch.amp.GradScaler on CPU, fp16 autocast), Adam moments in bf16 (torch AdamW on
bf16 parameters), idle LoRA adapters (peft in Hugging Face's Trainer), and warmups whose steps do nothing (a
LambdaLR counting its warmup in epochs; Hugging Face's get_linear_schedule_with_warmup longer than the run)."""

from __future__ import annotations

import pytest
import torch
from plain_runs import HFTokens, Net, hf_lora_trainer_run, hf_tiny_llama, hf_tiny_lora_llama
from torch import nn

from moe_arch.doctor.pipeline import DiagnoseOptions, diagnose


def _both(ck, init):
    """The diagnosis against the run's initial weights, and alone."""
    return [diagnose(str(ck), DiagnoseOptions(against=str(init), probe=False)), diagnose(str(ck), DiagnoseOptions())]


def _causes(d):
    return [(f.cause, f.severity, f.summary) for f in d.findings]


def _next_token_steps(model, opt, n, sched=None):
    for _ in range(n):
        tok = torch.randint(0, 64, (8, 9))
        logits = model(tok[:, :-1]).float()
        nn.functional.cross_entropy(logits.reshape(-1, 64), tok[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


# ---------------------------------------------------------------------------------------------- GradScaler
class Magnitudes(nn.Module):
    """Features as magnitudes sqrt(h^2 + eps) of a zero-padded projection. With eps = 0 the padded features sit at
    sqrt(0), whose derivative is infinite: every backward yields NaN gradients, whatever the loss scale, while the
    forward and the loss stay finite (the |x| / norm-of-a-zero-vector bug)."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps
        self.embed = nn.Embedding(64, 32)
        self.fc = nn.Linear(32, 32)
        self.gain = nn.Parameter(torch.ones(32))
        self.head = nn.Linear(32, 64, bias=False)
        self.register_buffer("pad", (torch.arange(32) < 24).float(), persistent=False)

    def forward(self, tok):
        h = self.fc(self.embed(tok)) * self.pad
        return self.head(torch.sqrt(h.pow(2) + self.eps) * self.gain)


def _grad_scaler_run(out, eps: float, steps: int = 20):
    torch.manual_seed(0)
    model = Magnitudes(eps)
    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    torch.save({"model": model.state_dict(), "step": 0}, out / "init.pt")
    for _ in range(steps):
        tok = torch.randint(0, 64, (8, 9))
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(tok[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, 64), tok[:, 1:].reshape(-1))
        assert torch.isfinite(loss)  # the loop runs on: nothing in the loss says the steps are skipped
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict()}
    torch.save({**state, "step": steps}, out / "final.pt")
    return model


def test_grad_scaler_skipping_every_step_is_skipped_steps_not_no_gradient(tmp_path):
    model = _grad_scaler_run(tmp_path, eps=0.0)
    names = sorted(n for n, _ in model.named_parameters())
    for d in _both(tmp_path / "final.pt", tmp_path / "init.pt"):
        assert d.status == "critical", _causes(d)
        f = d.findings[0]
        assert f.cause == "skipped_steps" and f.severity == "critical", _causes(d)
        assert sorted(f.tensors) == names  # claimed: no later cause (no_gradient) gets them
        assert not any(g.cause in ("no_gradient", "frozen_unexplained") for g in d.findings), _causes(d)
        ev = f.evidence
        assert ev["trainer_steps"] == 20 and ev["optimizer_steps_applied"] == 0 and ev["skipped_steps"] == 20
        assert ev["fraction_skipped"] == 1.0 and ev["source"] == "GradScaler"
        assert ev["grad_scaler_scale"] == 65536.0 / 2**20 and ev["scale_halvings_from_default_init"] == 20.0
        assert (
            "nan_policy: stop" in f.recommendation and "init_scale" in f.recommendation and "bf16" in f.recommendation
        )
        assert "20 of 20 optimizer steps were skipped" in f.summary and "never moved" in f.summary


def test_grad_scaler_twin_that_steps_is_silent(tmp_path):
    _grad_scaler_run(tmp_path, eps=1e-6)
    assert torch.load(tmp_path / "final.pt")["scaler"]["scale"] == 65536.0  # no overflow: every step applied
    for d in _both(tmp_path / "final.pt", tmp_path / "init.pt"):
        assert d.status == "healthy", (_causes(d), d.inconclusive)


# ---------------------------------------------------------------------------------------------- bf16 moments
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_adam_moments_stored_in_bf16(tmp_path, dtype):
    torch.manual_seed(0)
    model = Net().to(dtype)
    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-3)
    torch.save({"model": model.state_dict(), "step": 0}, tmp_path / "init.pt")
    _next_token_steps(model, opt, 8)
    sd = opt.state_dict()
    torch.save({"model": model.state_dict(), "optimizer": sd, "step": 8}, tmp_path / "final.pt")
    v = [st["exp_avg_sq"] for st in sd["state"].values()]
    for d in _both(tmp_path / "final.pt", tmp_path / "init.pt"):
        found = [f for f in d.findings if f.cause == "low_precision_optimizer_state"]
        if dtype == torch.float32:
            assert d.status == "healthy", (_causes(d), d.inconclusive)
            continue
        # torch's AdamW keeps its moments in the parameters' dtype
        assert len(found) == 1 and found[0].severity == "warning"
        ev = found[0].evidence
        assert sorted(found[0].tensors) == sorted(n for n, _ in model.named_parameters())
        assert ev["moment_dtypes"] == ["bfloat16"] and ev["exp_avg_sq_elements"] == sum(x.numel() for x in v)
        assert ev["fraction_exp_avg_sq_zero"] == round(
            sum(int((x == 0).sum()) for x in v) / sum(x.numel() for x in v), 4
        )
        # beside the weights' own finding (the bf16 norms are precision_underflow), not instead of it
        assert any(f.cause == "precision_underflow" for f in d.findings), _causes(d)


# ---------------------------------------------------------------------------------------------- LoRA adapters
@pytest.mark.parametrize("lr", [0.0, 1e-2])
def test_lora_adapters_that_never_train_are_idle_adapter(tmp_path, lr):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("accelerate")

    hf_lora_trainer_run(tmp_path, lr)  # lr 0: a typo'd or mis-scaled lr for the adapters' only group
    for d in _both(tmp_path / "checkpoint-4", tmp_path / "checkpoint-2"):
        adapters = sorted(e.name for e in d.evidence)
        if lr > 0:
            assert d.status == "healthy", (_causes(d), d.inconclusive)
            continue
        f = d.findings[0]
        assert f.cause == "idle_adapter" and f.severity == "critical", _causes(d)
        assert len(adapters) == 8 and sorted(f.tensors) == adapters  # every lora_A / lora_B pair
        assert f.evidence["n_lora_B"] == 4 and f.evidence["optimizer_steps"] == 4
        assert f.evidence["why"]["learning_rate_0"] >= 4
        assert "target_modules" in f.recommendation
        assert not any(g.cause in ("zero_learning_rate", "frozen_unexplained") for g in d.findings), _causes(d)


@pytest.mark.parametrize("lr", [0.0, 1e-2])
def test_the_live_monitor_names_idle_adapters(lr):
    """The same rule live: a plain loop over a peft model, the monitor at interval 2 / window 4."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")

    from moe_arch.config import MonitorConfig
    from moe_arch.doctor import Monitor

    model = hf_tiny_lora_llama()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    monitor = Monitor(model, opt, MonitorConfig(interval=2, window=4), print_fn=lambda s: None)
    for _ in range(8):
        tok = torch.randint(0, 64, (4, 9))
        model(input_ids=tok, labels=tok).loss.backward()
        opt.step()
        opt.zero_grad()
    adapters = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    if lr > 0:
        assert monitor.alerts == []
        return
    [alert] = monitor.alerts
    assert alert.cause == "idle_adapter" and alert.severity == "critical" and alert.step == 4
    assert sorted(alert.tensors) == adapters and len(adapters) == 8
    assert "did not change in 4 optimizer steps" in alert.message and "target_modules" in alert.message


# ---------------------------------------------------------------------------------------------- warmups
@pytest.mark.parametrize("unit", ["epochs", "steps"])
def test_warmup_that_keeps_the_lr_at_0_for_every_step_taken(tmp_path, unit):
    """A warmup over 5 "epochs" of 100 steps written as a LambdaLR over optimizer steps: lr 0 for the first 100
    steps, so the 20 steps taken did nothing; the twin warms up over 5 steps."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-2)
    ramp = (lambda s: min(1.0, (s // 100) / 5)) if unit == "epochs" else (lambda s: min(1.0, (s + 1) / 5))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ramp)
    torch.save({"model": model.state_dict(), "step": 0}, tmp_path / "init.pt")
    _next_token_steps(model, opt, 20, sched)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()}
    torch.save({**state, "step": 20}, tmp_path / "final.pt")
    for d in _both(tmp_path / "final.pt", tmp_path / "init.pt"):
        if unit == "steps":
            assert d.status == "healthy", (_causes(d), d.inconclusive)
            continue
        f = d.findings[0]
        assert f.cause == "warmup_no_op" and f.severity == "critical", _causes(d)
        assert sorted(f.tensors) == sorted(n for n, _ in model.named_parameters())
        assert f.evidence["saved_lr"] == 0.0 and f.evidence["scheduled_peak_lr"] == 1e-2
        assert f.evidence["optimizer_steps"] == 20
        assert len(d.findings) == 1, _causes(d)


@pytest.mark.parametrize("warmup", [540, 3])
def test_hf_linear_warmup_longer_than_the_run(tmp_path, warmup):
    """Hugging Face's get_linear_schedule_with_warmup (the Trainer's default schedule) with a warmup in the wrong
    unit (540 for a 10-step run): the lr never gets past 2% of its peak. The twin warms up over 3 steps."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    transformers.logging.set_verbosity_error()
    model = hf_tiny_llama()
    model.save_pretrained(tmp_path / "init")
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=10,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        warmup_steps=warmup,
        save_steps=10,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=2,
    )
    Trainer(model=model, args=args, train_dataset=HFTokens()).train()
    for d in _both(tmp_path / "checkpoint-10", tmp_path / "init"):
        found = [f for f in d.findings if f.cause == "warmup_no_op"]
        if warmup == 3:
            assert d.status == "healthy", (_causes(d), d.inconclusive)
            continue
        assert d.status == "warning" and len(found) == 1, _causes(d)
        ev = found[0].evidence
        assert ev["kind"] == "warmup_longer_than_run" and ev["warmup_steps"] == 540 and ev["run_steps"] == 10
        assert ev["scheduled_peak_lr"] == 3e-3 and ev["lr_at_last_step"] == pytest.approx(3e-3 * 10 / 540)
        assert ev["fraction_of_peak_reached"] == round(10 / 540, 3)


# ---------------------------------------------------------------------------------------------- ours: nan_policy skip
def _our_skip_run(small_cfg, bad_every: int | None):
    """Our trainer under ``train.nan_policy: skip``; every batch but each ``bad_every``-th has a NaN loss (None: no
    NaN). Returns (final checkpoint, step-0 checkpoint, batches skipped)."""
    from moe_arch.config import Config
    from moe_arch.training.trainer import Trainer

    d = small_cfg.to_dict()
    d["train"].update(steps=3, nan_policy="skip", max_nan_skips=100)
    t = Trainer(Config.from_dict(d))
    forward, micro_batch, batches = t.model.forward, t._micro_batch, {"n": 0}

    def counted():  # batches, not forwards: the trainer re-runs a bad batch to name the module
        batches["n"] += 1
        return micro_batch()

    def flaky(*a, **k):
        out = forward(*a, **k)
        if bad_every and batches["n"] % bad_every:
            out.loss = out.loss * float("nan")
        return out

    t._micro_batch, t.model.forward = counted, flaky
    r = t.run()
    ck = r.last_checkpoint.parent
    return r.last_checkpoint, ck / "step_0000000.pt", t.nan_skips


def test_our_nan_policy_skip_is_skipped_steps_from_its_checkpoint(small_cfg):
    final, init, skips = _our_skip_run(small_cfg, bad_every=4)
    assert skips == 9 and torch.load(final, weights_only=False)["nan_skips"] == 9  # 3 steps taken, 9 batches dropped
    for d in _both(final, init):
        found = [f for f in d.findings if f.cause == "skipped_steps"]
        assert len(found) == 1, _causes(d)
        ev = found[0].evidence
        assert ev["source"] == "nan_policy: skip" and found[0].severity == "warning"
        assert ev["trainer_steps"] == 12 and ev["skipped_steps"] == 9 and ev["optimizer_steps_applied"] == 3
        assert ev["fraction_skipped"] == 0.75 and "9 of 12 optimizer steps were skipped" in found[0].summary


def test_our_nan_policy_skip_twin_without_nan_has_no_skipped_steps(small_cfg):
    final, init, skips = _our_skip_run(small_cfg, bad_every=None)
    assert skips == 0 and torch.load(final, weights_only=False)["nan_skips"] == 0
    for d in _both(final, init):
        assert not any(f.cause == "skipped_steps" for f in d.findings), _causes(d)


def test_nan_skips_count_is_restored_on_resume(small_cfg):
    from moe_arch.config import Config
    from moe_arch.training.trainer import Trainer

    final, _, skips = _our_skip_run(small_cfg, bad_every=4)
    d = small_cfg.to_dict()
    d["train"].update(steps=4, nan_policy="skip", max_nan_skips=100)
    t = Trainer(Config.from_dict(d), resume=str(final))
    assert t.nan_skips == skips == 9
    r = t.run()
    assert torch.load(r.last_checkpoint, weights_only=False)["nan_skips"] == 9


# ---------------------------------------------------------------------------------------------- live: GradScaler
def _grad_scaler_monitored(eps: float, steps: int = 20):
    from moe_arch.config import MonitorConfig
    from moe_arch.doctor.monitor import Monitor

    torch.manual_seed(0)
    model = Magnitudes(eps)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    mon = Monitor(model, opt, MonitorConfig(interval=5, window=10), print_fn=lambda s: None)
    for i in range(steps):
        tok = torch.randint(0, 64, (8, 9))
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(tok[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, 64), tok[:, 1:].reshape(-1))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        mon.after_step(step=i + 1, loss=loss.item())
    mon.close()
    return model, mon


def test_monitor_alerts_skipped_steps_once_under_a_grad_scaler():
    model, mon = _grad_scaler_monitored(eps=0.0)
    found = [a for a in mon.alerts if a.cause == "skipped_steps"]
    assert len(found) == 1, [(a.cause, a.message) for a in mon.alerts]  # once per run, not every window
    a = found[0]
    assert a.step == 10 and a.severity == "critical" and a is mon.alerts[0]
    assert a.evidence["skipped_steps"] == 10 and a.evidence["optimizer_steps_applied"] == 0
    assert sorted(a.tensors) == sorted(n for n, _ in model.named_parameters())
    assert "10 of 10 optimizer steps were skipped" in a.message and "init_scale" in a.message
    # the frozen weights are explained: no no_gradient alert about them
    assert not any(x.cause in ("no_gradient", "frozen_unexplained") for x in mon.alerts), mon.alerts


def test_monitor_grad_scaler_twin_that_steps_is_silent():
    _, mon = _grad_scaler_monitored(eps=1e-6)
    assert mon.alerts == []
