"""The live twins of two checkpoint causes, each with a healthy twin that stays silent:

- ``warmup_no_op``: optimizer steps taken with lr 0 in every param group below the schedule's peak. The broken
  schedules are the classic integer-division warmup (``min(1, step // warmup)``: lr 0 for the whole warmup); the
  healthy ones warm up from ``(step + 1) / warmup`` and, like the Hugging Face default, from ``step / warmup`` (one
  step at lr 0, which is not reported).
- ``low_precision_optimizer_state``: Adam moments stored in bf16 (torch's AdamW keeps them in the parameters'
  dtype), named at the first full window beside the weights' own findings; fp32 weights (also under autocast) keep
  fp32 moments.

On a plain PyTorch loop, on our trainer and on the Hugging Face Trainer with the monitor's callback.

And ``skipped_steps`` with several optimizers: a Lightning module with two optimizers under manual optimization,
whose ``global_step`` counts each optimizer's step (two per batch). The healthy twin (every step applied) stays
silent (counting one optimizer's steps against it read as 50% skipped), and so does a GAN-style module that steps
one optimizer per batch, in turn; under a GradScaler whose every step overflows, both optimizers' skips are named.

And the GradScaler's two paths on a plain loop: a fused AdamW (the Hugging Face default) is stepped on every step
and skips inside its kernel, so its step hooks fire on skipped steps too; the monitor reads ``found_inf``. Steps
at lr 0 that the GradScaler skipped are not warmup_no_op's; bf16 moments are read once some state exists; and a
warning-level warmup_no_op does not hide the tensors' own findings.
"""

from __future__ import annotations

import pytest
import torch
from plain_runs import HFTokens, Net, hf_tiny_llama_bf16, lightning_trainer

from moe_arch.config import MonitorConfig
from moe_arch.doctor.monitor import Monitor

CFG = MonitorConfig(interval=5, window=10)


def _plain(schedule, dtype=torch.float32, steps: int = 20):
    torch.manual_seed(0)
    return _plain_model(Net().to(dtype), schedule, steps)


def _plain_model(model, schedule, steps: int = 20):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    mon = Monitor(model, opt, CFG, enabled_output=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tok = torch.randint(0, 64, (8, 16), generator=g)
        loss = torch.nn.functional.cross_entropy(model(tok[:, :-1]).float().reshape(-1, 64), tok[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        mon.after_step(loss=loss.item())
    return mon, model


def _of(mon, cause):
    return [a for a in mon.alerts if a.cause == cause]


def test_a_warmup_at_lr_0_for_the_whole_window_is_critical_and_explains_the_frozen_weights():
    mon, model = _plain(lambda s: min(1.0, s // 10))  # integer division: lr 0 for the first 10 steps
    (alert,) = _of(mon, "warmup_no_op")
    assert alert.step == CFG.window and alert.severity == "critical"
    assert sorted(alert.tensors) == sorted(n for n, _ in model.named_parameters())
    ev = alert.evidence
    assert ev["optimizer_steps_at_lr_0"] == 10 and ev["window_steps"] == 10 and ev["scheduled_peak_lr"] == 1e-2
    assert "10 of the last 10 optimizer steps ran with lr 0" in alert.message
    # It explains the unchanged tensors: no other cause is alerted about them at that check.
    assert [a.cause for a in mon.alerts if a.step == CFG.window] == ["warmup_no_op"]


def test_some_steps_at_lr_0_are_a_warning():
    mon, _ = _plain(lambda s: min(1.0, s // 3))  # lr 0 for 3 steps, then the peak: the weights move
    (alert,) = _of(mon, "warmup_no_op")
    assert alert.step == CFG.window and alert.severity == "warning"
    assert alert.evidence["optimizer_steps_at_lr_0"] == 3 and alert.evidence["unchanged_over_window"] is False


@pytest.mark.parametrize(
    "schedule", [lambda s: min(1.0, (s + 1) / 10), lambda s: min(1.0, s / 10)], ids=["from_step_1", "from_0"]
)
def test_warmups_that_do_not_stall_stay_silent(schedule):
    mon, _ = _plain(schedule)
    assert mon.alerts == [], [a.message for a in mon.alerts]


def test_bf16_moments_are_named_live_and_fp32_moments_are_not():
    mon, model = _plain(lambda s: 1.0, dtype=torch.bfloat16)
    (alert,) = _of(mon, "low_precision_optimizer_state")
    assert alert.step == CFG.window and alert.severity == "warning"
    assert sorted(alert.tensors) == sorted(n for n, _ in model.named_parameters())
    assert alert.evidence["moment_dtypes"] == ["bfloat16"] and alert.evidence["exp_avg_sq_elements"] > 0
    assert "cause low_precision_optimizer_state" in alert.message
    fp32, _ = _plain(lambda s: 1.0)
    assert _of(fp32, "low_precision_optimizer_state") == [] and fp32.alerts == []


@pytest.mark.parametrize("precision", ["bf16-pure", "fp32"])
def test_our_trainer_names_bf16_moments_and_not_fp32_ones(small_cfg, precision):
    from moe_arch.config import Config
    from moe_arch.training.trainer import Trainer

    d = small_cfg.to_dict()
    d["train"].update(steps=10, precision=precision, warmup_steps=3)
    d["monitor"] = {"enabled": True, "interval": 5, "window": 10}
    t = Trainer(Config.from_dict(d))
    t.run()
    found = _of(t.monitor, "low_precision_optimizer_state")
    assert _of(t.monitor, "warmup_no_op") == []  # ours warms up from (step + 1) / warmup_steps
    if precision == "fp32":
        assert found == []
        return
    (alert,) = found
    assert alert.step == 10 and alert.evidence["moment_dtypes"] == ["bfloat16"]
    adam = {t.name for t in t.monitor.tracked if t.optimizer == "adamw"}
    assert set(alert.tensors) <= adam and alert.tensors


def _hf(tmp_path, model, steps=4, **kw):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from moe_arch.doctor.integrations import HFMonitorCallback

    transformers.logging.set_verbosity_error()
    cb = HFMonitorCallback(MonitorConfig(interval=2, window=4))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=3e-4,
        warmup_steps=kw.pop("warmup_steps", 0),
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=steps,
        save_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=HFTokens(64), callbacks=[cb], **kw).train()
    return cb.monitor


def test_hf_callback_names_bf16_moments(tmp_path):
    mon = _hf(tmp_path, hf_tiny_llama_bf16())
    (alert,) = _of(mon, "low_precision_optimizer_state")
    assert alert.step == 4 and alert.evidence["moment_dtypes"] == ["bfloat16"]


def test_hf_callback_names_steps_at_lr_0_and_its_default_warmup_stays_silent(tmp_path):
    model = hf_tiny_llama_bf16().float()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s // 4))
    mon = _hf(tmp_path / "broken", model, optimizers=(opt, sched))
    (alert,) = _of(mon, "warmup_no_op")
    assert alert.step == 4 and alert.severity == "critical" and alert.evidence["optimizer_steps_at_lr_0"] == 4
    # HF's linear warmup starts at lr 0 (one step that does nothing): not reported; fp32 moments: silent too
    healthy = _hf(tmp_path / "healthy", hf_tiny_llama_bf16().float(), warmup_steps=2)
    assert healthy.alerts == [], [a.message for a in healthy.alerts]


def _lightning_two_optimizers(tmp_path, overflow: bool, alternate: bool = False):
    L = pytest.importorskip("lightning")
    from lightning.pytorch.plugins.precision import MixedPrecision

    from moe_arch.doctor.integrations import LightningMonitorCallback

    class TwoOptimizers(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = Net()
            self.automatic_optimization = False

        def training_step(self, batch, i):
            blocks, rest = self.optimizers()
            tok = batch[0]
            logits = self.net(tok[:, :-1]).float().reshape(-1, 64)
            loss = torch.nn.functional.cross_entropy(logits, tok[:, 1:].reshape(-1))
            if overflow:  # every step's fp16 gradients overflow: the GradScaler skips both optimizers
                loss = loss * 1e30
            blocks.zero_grad()
            rest.zero_grad()
            self.manual_backward(loss)
            if not alternate:
                blocks.step()
                rest.step()
            elif i % 2:  # a GAN's generator and discriminator: one optimizer per batch, in turn
                blocks.step()
            else:
                rest.step()

        def configure_optimizers(self):
            ids = {id(p) for p in self.net.blocks.parameters()}
            return [
                torch.optim.AdamW(self.net.blocks.parameters(), lr=1e-3),
                torch.optim.AdamW([p for p in self.parameters() if id(p) not in ids], lr=1e-3),
            ]

    cb = LightningMonitorCallback(MonitorConfig(interval=2, window=4))
    module = TwoOptimizers()
    scaler = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))] if overflow else None
    trainer = lightning_trainer(tmp_path, 16, [cb], plugins=scaler)
    trainer.fit(
        module,
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randint(0, 64, (64, 8))), batch_size=8),
    )
    # Lightning counts every optimizer step (two per batch, or one when they alternate), skipped or not
    assert trainer.global_step == 16
    return cb.monitor, module


@pytest.mark.parametrize("alternate", [False, True], ids=["both_step", "alternating"])
def test_two_optimizers_that_step_are_not_counted_as_skips(tmp_path, alternate):
    mon, _ = _lightning_two_optimizers(tmp_path, overflow=False, alternate=alternate)
    assert mon.loop_counts_each_optimizer_step  # the callback saw manual optimization
    assert mon.alerts == [], [a.message for a in mon.alerts]


@pytest.mark.parametrize("alternate", [False, True], ids=["both_step", "alternating"])
def test_two_optimizers_skipped_by_a_grad_scaler_are_named(tmp_path, alternate):
    mon, module = _lightning_two_optimizers(tmp_path, overflow=True, alternate=alternate)
    (alert,) = _of(mon, "skipped_steps")
    assert alert.step == 4 and alert.severity == "critical"
    assert alert.evidence["optimizer_steps_applied"] == 0 and alert.evidence["trainer_steps"] == 4
    assert alert.evidence["applied_by_optimizer"] == {"optimizer0": 0, "optimizer1": 0}
    assert sorted(alert.tensors) == sorted(n for n, _ in module.named_parameters())


def _scaled(fused: bool, overflow_steps: int, dtype=torch.float32, steps: int = 20, schedule=lambda s: 1.0):
    """A plain loop under torch.amp's GradScaler("cpu"), whose first ``overflow_steps`` losses are infinite (every
    gradient overflows, so the scaler skips the step). A fused AdamW takes the GradScaler's other path: its step
    runs on every step (both step hooks fire) and skips inside the kernel on ``found_inf``. The scheduler steps only
    when the scale did not drop, as the Hugging Face / Accelerate loops do."""
    torch.manual_seed(0)
    model = Net().to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    scaler = torch.amp.GradScaler("cpu")
    mon = Monitor(model, opt, CFG, enabled_output=False)
    g = torch.Generator().manual_seed(0)
    for i in range(steps):
        tok = torch.randint(0, 64, (8, 16), generator=g)
        loss = torch.nn.functional.cross_entropy(model(tok[:, :-1]).float().reshape(-1, 64), tok[:, 1:].reshape(-1))
        if i < overflow_steps:
            loss = loss * float("inf")
        opt.zero_grad()
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if scaler.get_scale() >= scale:
            sched.step()
        mon.after_step(step=i + 1)
    return mon, model


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_every_step_skipped_by_a_grad_scaler_is_critical_also_under_a_fused_optimizer(fused):
    assert torch.optim.AdamW([torch.zeros(1)], fused=True)._step_supports_amp_scaling  # the path under test
    # a warmup from lr 0 whose scheduler never steps (every step's scale drops): the lr-0 steps were skipped, not
    # taken, so warmup_no_op stays silent and skipped_steps explains the unmoved weights
    mon, model = _scaled(fused, overflow_steps=20, schedule=lambda s: min(1.0, s / 10))
    (alert,) = mon.alerts
    assert alert.cause == "skipped_steps" and alert.step == CFG.window and alert.severity == "critical"
    assert alert.evidence["optimizer_steps_applied"] == 0 and alert.evidence["trainer_steps"] == CFG.window
    assert sorted(alert.tensors) == sorted(n for n, _ in model.named_parameters())


def test_a_fused_optimizer_under_a_grad_scaler_that_applies_its_steps_stays_silent():
    mon, _ = _scaled(True, overflow_steps=0, schedule=lambda s: min(1.0, (s + 1) / 10))
    assert mon.alerts == [], [a.message for a in mon.alerts]


def test_bf16_moments_are_named_once_the_state_exists_after_skipped_steps():
    # the first window's steps are all skipped (no optimizer state yet): the moments are read at a later window
    mon, model = _scaled(False, overflow_steps=CFG.window, dtype=torch.bfloat16)
    assert [a.cause for a in mon.alerts if a.step == CFG.window] == ["skipped_steps"]
    (alert,) = _of(mon, "low_precision_optimizer_state")
    assert alert.step == CFG.window + CFG.interval and alert.evidence["moment_dtypes"] == ["bfloat16"]


def test_some_steps_at_lr_0_do_not_hide_the_other_findings():
    # a warning (3 steps at lr 0, the weights moved) explains nothing: a parameter that never gets a gradient is
    # still named beside it
    torch.manual_seed(0)
    model = Net()
    model.unused = torch.nn.Parameter(torch.randn(4, 4))
    mon, _ = _plain_model(model, lambda s: min(1.0, s // 3))
    (warning,) = _of(mon, "warmup_no_op")
    assert warning.severity == "warning" and "did not move the weights" in warning.message
    (alert,) = _of(mon, "no_gradient")
    assert alert.severity == "critical" and alert.tensors == ["unused"]
    torch.manual_seed(0)
    healthy, _ = _plain_model(Net(), lambda s: min(1.0, s // 3))
    assert [a.cause for a in healthy.alerts] == ["warmup_no_op"], [a.message for a in healthy.alerts]
