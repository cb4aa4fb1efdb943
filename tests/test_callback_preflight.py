"""The callbacks' preflight: at train start, before the first optimizer step, the Hugging Face and Lightning callbacks
check each parameter's storage dtype against its optimizer group's (peak) lr with the half-ULP rule and name the
tensors that cannot move. The seed's bug (bf16 weights, AdamW 3e-4, RMSNorm gains at 1.0) is named at step 0, on
exactly the tensors the run then leaves bitwise unchanged; the fp32 and bf16-autocast twins stay silent."""

from __future__ import annotations

import json

import pytest
import torch
from plain_runs import HFTokens, Net, hf_tiny_llama_bf16, lightning_trainer, norm_names

from moe_arch.config import MonitorConfig


def _hf_run(tmp_path, mode: str, steps: int = 4):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from moe_arch.doctor.integrations import HFMonitorCallback

    transformers.logging.set_verbosity_error()
    model = hf_tiny_llama_bf16()
    if mode != "bf16":
        model = model.float()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = HFMonitorCallback(MonitorConfig(interval=2, window=4))
    seen_before_step_1: list = []

    class FirstStep(TrainerCallback):  # runs after the monitor's on_train_begin, before the first optimizer step
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 0:
                seen_before_step_1.extend(cb.monitor.preflight_alerts)

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=3e-4,
        warmup_steps=2,  # the peak lr (initial_lr) is what the tensors must survive, not the warmup's first lr
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=steps,
        save_strategy="no",
        bf16=mode == "autocast",
    )
    Trainer(model=model, args=args, train_dataset=HFTokens(64), callbacks=[cb, FirstStep()]).train()
    frozen = {n for n, p in model.named_parameters() if torch.equal(p.detach(), w0[n])}
    return cb, seen_before_step_1, frozen, model


def test_hf_callback_names_the_seed_bug_before_step_1(tmp_path):
    cb, before, frozen, model = _hf_run(tmp_path, "bf16")
    norms = {n for n, _ in model.named_parameters() if n.endswith("norm.weight")}
    assert len(before) == 1, before
    alert = before[0]
    assert alert.step == 0 and alert.cause == "precision_underflow" and alert.evidence["preflight"]
    assert set(alert.tensors) == norms == frozen  # the prediction is what the run then did, measured bitwise
    assert all(u == pytest.approx(3e-4) for u in alert.evidence["expected_update"].values())
    assert all(h == 2**-8 for h in alert.evidence["half_ulp"].values())  # bf16 at 1.0
    assert "preflight" in alert.message and "model.norm.weight" in alert.message
    first = json.loads((tmp_path / "alerts.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["cause"] == "precision_underflow"
    # The window's check confirms the prediction at step 4 (the preflight does not silence it), on the same tensors.
    confirmed = cb.monitor.alerts[0]
    assert confirmed.step == 4 and confirmed.severity == "critical" and set(confirmed.tensors) == frozen


@pytest.mark.parametrize("mode", ["fp32", "autocast"])
def test_hf_callback_preflight_is_silent_on_the_healthy_twins(tmp_path, mode):
    cb, before, frozen, _ = _hf_run(tmp_path, mode)
    assert before == [] and cb.monitor.preflight_alerts == [] and frozen == set()
    assert not (tmp_path / "alerts.jsonl").exists()


def _lightning_run(tmp_path, bf16_weights: bool, precision: str = "32-true"):
    L = pytest.importorskip("lightning")

    from moe_arch.doctor.integrations import LightningMonitorCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = Net().to(torch.bfloat16) if bf16_weights else Net()

        def training_step(self, batch, i):
            tok = batch[0]
            logits = self.net(tok[:, :-1])
            return torch.nn.functional.cross_entropy(logits.float().reshape(-1, 64), tok[:, 1:].reshape(-1))

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=3e-4)
            return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))]

    seen: list = []

    class FirstStep(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, i):
            if trainer.global_step == 0:
                seen.extend(cb.monitor.preflight_alerts)

    cb = LightningMonitorCallback(MonitorConfig(interval=2, window=4))
    module = Module()
    w0 = {n: p.detach().clone() for n, p in module.named_parameters()}
    lightning_trainer(tmp_path, 4, [cb, FirstStep()], precision=precision).fit(
        module,
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randint(0, 64, (64, 8))), batch_size=8),
    )
    frozen = {n for n, p in module.named_parameters() if torch.equal(p.detach(), w0[n])}
    return cb, seen, frozen, module


def test_lightning_callback_names_the_seed_bug_before_step_1(tmp_path):
    cb, before, frozen, module = _lightning_run(tmp_path, bf16_weights=True)
    assert len(before) == 1 and before[0].step == 0 and before[0].cause == "precision_underflow"
    assert set(before[0].tensors) == {f"net.{n}" for n in norm_names(module.net)} == frozen


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_callback_preflight_is_silent_on_the_healthy_twins(tmp_path, precision):
    cb, before, frozen, _ = _lightning_run(tmp_path, bf16_weights=False, precision=precision)
    assert before == [] and cb.monitor.preflight_alerts == [] and frozen == set()
