"""Where numbers go: ``metrics.jsonl`` (one JSON object per log step), TensorBoard, and W&B when asked for;
and how the run talks to a person: a rich progress bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = True, wandb: bool = False, wandb_project: str = "moe-arch",
                 config: dict | None = None, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                from moe_arch.config import ConfigError

                raise ConfigError("train.wandb=true: the wandb package is not installed; pip install 'moe-arch[wandb]' "
                                  "or pass --train.wandb false") from None
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self._wandb = wb.init(project=wandb_project, dir=str(run_dir), config=config, mode=mode)

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, "time": time.time(), **{k: _clean(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k in ("kind", "step", "time") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if self._tb is not None:
                self._tb.add_scalar(f"{kind}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in row.items() if isinstance(v, (int, float))}, step=step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class ConsoleUI:
    """Progress bar (rich, on a terminal) or plain lines; messages print above the bar."""

    def __init__(self, mode: str, total: int, start: int = 0, enabled: bool = True):
        self.enabled = enabled
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode = mode if enabled else "none"
        self.console = Console(highlight=False, soft_wrap=True)
        self._progress = None
        if self.mode == "rich":
            self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                      console=self.console, transient=False)
            self._task = self._progress.add_task("train", total=total, completed=start, status="")
            self._progress.start()

    def print(self, msg: str) -> None:
        if self.mode == "none":
            return
        self.console.print(msg)  # rich renders markup, or strips it when stdout is not a terminal

    def update(self, step: int, status: str, line: str | None = None) -> None:
        if self.mode == "rich":
            self._progress.update(self._task, completed=step, status=status)
        elif self.mode == "plain" and line:
            print(line, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
