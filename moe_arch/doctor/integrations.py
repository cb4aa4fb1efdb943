"""The live monitor inside other people's training loops: a Hugging Face ``TrainerCallback`` and a Lightning
``Callback``. Both need their library (``pip install 'moe-arch[hf]'`` / ``'moe-arch[lightning]'``); importing
this module without them is fine, instantiating a callback is not.

    trainer = transformers.Trainer(..., callbacks=[HFMonitorCallback()])
    trainer = lightning.Trainer(..., callbacks=[LightningMonitorCallback()])

At train start, before the first optimizer step, both run the monitor's preflight: tensors stored in bf16/fp16
whose first update at their group's lr is below half a ULP are named in one warning at step 0
(``callback.monitor.preflight_alerts``). Alerts print to the console and go to ``alerts.jsonl`` in the output
folder; with ``stop_on_critical`` the callback asks the trainer to stop at the next step boundary.
"""

from __future__ import annotations

from pathlib import Path

from moe_arch.config import MonitorConfig
from moe_arch.doctor.monitor import Alert, Monitor

try:
    from transformers import TrainerCallback as _HFBase
except ImportError:  # pragma: no cover - exercised when transformers is absent
    _HFBase = object

try:
    from lightning.pytorch.callbacks import Callback as _LBase
except ImportError:  # pragma: no cover
    try:
        from pytorch_lightning.callbacks import Callback as _LBase
    except ImportError:
        _LBase = object


class HFMonitorCallback(_HFBase):
    """Hugging Face ``Trainer`` callback running the moe_arch monitor."""

    def __init__(self, config: MonitorConfig | None = None, run_dir: str | Path | None = None):
        if _HFBase is object:
            raise ImportError("HFMonitorCallback needs transformers: pip install 'moe-arch[hf]'")
        self.config = config or MonitorConfig()
        self.run_dir = run_dir
        self.monitor: Monitor | None = None
        self._stop = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        def stop(alert: Alert):
            self._stop = True

        self.monitor = Monitor(
            model,
            optimizer,
            self.config,
            run_dir=self.run_dir or args.output_dir,
            enabled_output=state.is_world_process_zero,
            auto_check=False,
            on_critical=stop,
        )
        # Before step 1: the optimizer and its scheduler exist, so each tensor's storage dtype meets its group's lr.
        self.monitor.preflight()

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.after_step(step=state.global_step)
            if self._stop:
                control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.monitor is not None and logs and "loss" in logs:
            self.monitor.after_step(loss=float(logs["loss"]))

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()


class LightningMonitorCallback(_LBase):
    """Lightning callback running the moe_arch monitor on the module and the trainer's optimizers."""

    def __init__(self, config: MonitorConfig | None = None, run_dir: str | Path | None = None):
        if _LBase is object:
            raise ImportError("LightningMonitorCallback needs lightning: pip install 'moe-arch[lightning]'")
        super().__init__()
        self.config = config or MonitorConfig()
        self.run_dir = run_dir
        self.monitor: Monitor | None = None

    def on_train_start(self, trainer, pl_module):
        def stop(alert: Alert):
            trainer.should_stop = True

        self.monitor = Monitor(
            pl_module,
            list(trainer.optimizers),
            self.config,
            run_dir=self.run_dir or trainer.default_root_dir,
            enabled_output=trainer.is_global_zero,
            auto_check=False,
            on_critical=stop,
        )
        # Under manual optimization Lightning's global_step counts every optimizer.step call (skipped by a
        # GradScaler or not), not batches: the monitor compares it with the sum of the optimizers' applied steps.
        self.monitor.loop_counts_each_optimizer_step = not pl_module.automatic_optimization
        self.monitor.preflight()  # before step 1, as the Hugging Face callback

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.monitor is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.monitor.after_step(step=trainer.global_step, loss=float(loss) if loss is not None else None)

    def on_train_end(self, trainer, pl_module):
        if self.monitor is not None:
            self.monitor.close()
