"""The monitor inside Hugging Face's Trainer and Lightning's Trainer (each skipped when its library is absent)."""

import json

import pytest
import torch
from plain_runs import Net, lightning_trainer, norm_names

from moe_arch.config import MonitorConfig


def test_hugging_face_trainer_callback(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("accelerate", reason="accelerate (needed by transformers.Trainer) is not installed")
    from plain_runs import HFTokens, hf_args, hf_tiny_llama_bf16
    from transformers import Trainer

    from moe_arch.doctor.integrations import HFMonitorCallback

    transformers.logging.set_verbosity_error()
    model = hf_tiny_llama_bf16()

    cb = HFMonitorCallback(MonitorConfig(interval=2, window=4, stop_on_critical=True))
    args = hf_args(tmp_path, max_steps=20, learning_rate=3e-4)
    trainer = Trainer(model=model, args=args, train_dataset=HFTokens(256), callbacks=[cb])
    trainer.train()
    alert = cb.monitor.alerts[0]
    assert alert.cause == "precision_underflow" and alert.step == 4
    assert sorted(alert.tensors) == sorted(n for n, _ in model.named_parameters() if n.endswith("norm.weight"))
    assert trainer.state.global_step == 4  # stop_on_critical ended the run at the alert
    assert json.loads((tmp_path / "alerts.jsonl").read_text().splitlines()[0])["cause"] == "precision_underflow"


def test_lightning_callback(tmp_path):
    L = pytest.importorskip("lightning", reason="lightning is not installed")

    from moe_arch.doctor.integrations import LightningMonitorCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = Net().to(torch.bfloat16)

        def training_step(self, batch, i):
            tok = batch[0]
            logits = self.net(tok[:, :-1])
            return torch.nn.functional.cross_entropy(logits.float().reshape(-1, 64), tok[:, 1:].reshape(-1))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-4)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randint(0, 64, (256, 8))), batch_size=8)
    cb = LightningMonitorCallback(MonitorConfig(interval=2, window=4))
    trainer = lightning_trainer(tmp_path, 8, [cb])
    module = Module()
    trainer.fit(module, data)
    alert = cb.monitor.alerts[0]
    assert alert.cause == "precision_underflow" and alert.step == 4
    assert sorted(alert.tensors) == sorted(f"net.{n}" for n in norm_names(module.net))
