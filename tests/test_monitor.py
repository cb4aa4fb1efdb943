import json

import pytest
import torch
from plain_runs import train

from moe_arch.config import MonitorConfig
from moe_arch.doctor.monitor import CriticalAlert, Monitor

CFG = MonitorConfig(interval=5, window=10)


def test_healthy_plain_loop_raises_no_alert(tmp_path):
    planted = train(tmp_path, steps=30, monitor_config=CFG)
    assert planted["monitor"].alerts == []
    assert not (tmp_path / "alerts.jsonl").exists()


@pytest.mark.parametrize(
    "bug, severity",
    [
        ("bf16", "critical"),
        ("not_in_optimizer", "critical"),
        ("unused", "critical"),
        ("zero_lr", "critical"),
        ("zero_grad_order", "critical"),
        ("dead_experts", "warning"),
        ("excessive", "warning"),
    ],
)
def test_each_cause_is_caught_in_the_first_window(tmp_path, bug, severity):
    planted = train(tmp_path, bug, steps=20, monitor_config=CFG)
    alerts = planted["monitor"].alerts
    assert alerts, "no alert"
    first = alerts[0]
    assert first.step == CFG.window  # certain after one full window of optimizer steps
    assert (first.cause, first.severity) == (planted["cause"], severity), first.message
    assert sorted(first.tensors) == sorted(planted["tensors"])
    if bug == "dead_experts":
        assert first.experts == planted["experts"]
    # Said once: no second alert about the same tensors.
    assert all(a.cause != first.cause or not set(a.tensors) & set(first.tensors) for a in alerts[1:])
    lines = [json.loads(l) for l in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert lines[0]["cause"] == planted["cause"] and lines[0]["step"] == CFG.window


def test_bf16_alert_message_has_the_numbers(tmp_path):
    msg = train(tmp_path, "bf16", steps=10, monitor_config=CFG)["monitor"].alerts[0].message
    assert msg.startswith(
        "step 10: 3 tensors (blocks.*.norm.weight \u00d72, final_norm.weight) have not changed in "
        "10 optimizer steps: bfloat16 stores them"
    )
    assert "below half a ULP (3.9e-03)" in msg and "cause precision_underflow" in msg


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _loop(model, opt, mon, steps, loss_at=lambda i, l: l, before=lambda i: None):
    g = torch.Generator().manual_seed(0)
    for i in range(steps):
        before(i)
        x = torch.randn(8, 4, generator=g)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.after_step(loss=loss_at(i, loss.item()))


def test_loss_spike_and_first_nonfinite_module():
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.b.parameters(), lr=1e-3)  # `a` is frozen, so the NaN stays in `b`
    mon = Monitor(model, opt, MonitorConfig(interval=5, window=10), print_fn=lambda s: None)
    _loop(model, opt, mon, 30, loss_at=lambda i, l: l * 50 if i == 25 else l)
    spikes = [a for a in mon.alerts if a.cause == "loss_spike"]
    assert [a.step for a in spikes] == [26]

    def poison(i):
        if i == 3:  # the 34th step overall
            with torch.no_grad():
                model.b.weight.fill_(float("nan"))

    _loop(model, opt, mon, 6, before=poison)
    nonfinite = [a for a in mon.alerts if a.cause == "non_finite"]
    assert nonfinite[0].step == 34 and "nan" in nonfinite[0].message
    assert nonfinite[1].tensors == ["b"] and "module 'b'" in nonfinite[1].message


def test_stop_on_critical_raises_in_a_plain_loop(tmp_path):
    cfg = MonitorConfig(interval=5, window=10, stop_on_critical=True)
    with pytest.raises(CriticalAlert, match="precision_underflow"):
        train(tmp_path, "bf16", steps=20, monitor_config=cfg)


def test_our_trainer_alerts_and_can_stop(small_cfg):
    from moe_arch.config import Config
    from moe_arch.training.trainer import Trainer

    d = small_cfg.to_dict()
    d["train"].update(steps=40, precision="bf16-pure", warmup_steps=0, log_every=5)
    d["optim"].update(muon_lr=1e-3, adamw_lr=3e-4)
    d["monitor"] = {"enabled": True, "interval": 5, "window": 10, "stop_on_critical": True}
    t = Trainer(Config.from_dict(d))
    r = t.run()
    assert r.steps == 10 and r.last_checkpoint.name == "checkpoint_interrupted.pt"
    assert "monitor: critical alert at step 10" in t.stop_reason
    rows = [json.loads(l) for l in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
    alert_rows = [r for r in rows if r["kind"] == "alert"]
    assert alert_rows[0]["alert_cause"] == "precision_underflow" and alert_rows[0]["step"] == 10
    assert any(r["kind"] == "monitor" and "update_ratio_norms" in r for r in rows)


@pytest.mark.parametrize("lr", [1e8, 3e-4])
def test_weights_gone_nan_are_named_when_no_loss_reaches_the_monitor(tmp_path, lr):
    """Hugging Face's Trainer logs a NaN/inf loss as 0 (logging_nan_inf_filter) and keeps stepping: at lr 1e8 the
    weights are NaN after 2 steps while the logged loss looks fine. The monitor reads the weights themselves: a
    critical non_finite alert at its first full window naming every NaN tensor; the healthy twin stays silent."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from plain_runs import HFTokens, hf_args, hf_tiny_llama
    from transformers import Trainer

    from moe_arch.doctor.integrations import HFMonitorCallback

    transformers.logging.set_verbosity_error()
    model = hf_tiny_llama()
    cb = HFMonitorCallback(MonitorConfig(interval=2, window=4))
    args = hf_args(tmp_path, max_steps=8, learning_rate=lr)
    Trainer(model=model, args=args, train_dataset=HFTokens(256), callbacks=[cb]).train()
    nan = sorted(n for n, p in model.named_parameters() if not torch.isfinite(p).all())
    if lr < 1:
        assert nan == [] and cb.monitor.alerts == []
        return
    alert = cb.monitor.alerts[0]
    assert nan and alert.cause == "non_finite" and alert.severity == "critical" and alert.step == 4
    assert sorted(alert.tensors) == nan


def test_a_hooks_only_loop_whose_weights_go_nan():
    """A plain loop that never hands the monitor its loss (optimizer hooks only): the NaN weights are named."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = Monitor(model, opt, MonitorConfig(interval=2, window=4), print_fn=lambda s: None)
    for step in range(8):
        loss = model(torch.randn(4, 8)).pow(2).mean() * (float("inf") if step >= 2 else 1.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
    [alert] = monitor.alerts
    assert alert.cause == "non_finite" and alert.step == 4
    assert sorted(alert.tensors) == ["0.bias", "0.weight", "2.bias", "2.weight"]
