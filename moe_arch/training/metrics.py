"""Where numbers go: ``metrics.jsonl`` (one JSON object per log step), TensorBoard, and W&B when asked for;
and how the run talks to a person: a rich progress bar on a terminal, plain lines otherwise.

A run's history describes one timeline: when a run (re)starts at step S, the rows a killed or abandoned run
logged after S (they will be logged again) and a last line cut by a crash are removed first, and TensorBoard is
told to purge its events from S + 1 on."""

from __future__ import annotations

import json
import math
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from moe_arch.checkpoint import RunFolderError
from moe_arch.config import ConfigError
from moe_arch.utils import atomic_path

HISTORIES = ("metrics.jsonl", "alerts.jsonl")  # the JSON-lines files of a run folder, one row per step event


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _row(line: bytes) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def _step(row: dict) -> int | None:
    s = row.get("step")
    return s if isinstance(s, int) and not isinstance(s, bool) else None


def check_histories(run_dir: Path) -> None:
    """Refuse, before any long work, a history file the run could not rewind or append to (a folder in its
    place, no permission): otherwise a traceback when training is about to start."""
    for name in HISTORIES:
        p = run_dir / name
        if p.is_dir():
            raise RunFolderError(
                f"{p} is a folder, not a file; move it out of the run folder (the run writes its {name} there)"
            )
        if p.exists() and not os.access(p, os.R_OK | os.W_OK):
            raise RunFolderError(
                f"{p}: cannot read and write it (permission denied); make it writable "
                "(chmod u+rw) or start a new run with --train.run_name NAME"
            )


def rewind_history(path: Path, step: int, redone_evals: bool = False) -> str | None:
    """Cut a JSON-lines history back to ``step``: rows of later steps, unparseable lines and a last line without
    its newline (cut by a crash) are removed, atomically (the file's mode kept, a symbolic link followed). With
    ``redone_evals`` (resuming a run already at its last step, whose final validation runs again), the eval rows
    of ``step`` itself go too. Returns what was removed, or None when nothing was."""
    try:
        path = path.resolve() if path.is_symlink() else path  # rewrite the file it names, not the link
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RunFolderError(f"{path}: cannot be read ({e.strerror}); fix or move it") from None
    if st.st_size == 0:
        return None
    try:
        return _rewind(path, step, redone_evals, st)
    except IsADirectoryError:
        raise RunFolderError(f"{path} is a folder, not a file; move it out of the run folder") from None
    except OSError as e:
        raise RunFolderError(
            f"{path}: cannot cut the history back to step {step} ({e.strerror}); free space or "
            "make the run folder writable"
        ) from None


def _rewind(path: Path, step: int, redone_evals: bool, st: os.stat_result) -> str | None:
    with open(path, "rb") as f:  # the common case, a clean end at or before ``step``, reads only the tail
        f.seek(max(0, st.st_size - (1 << 16)))
        tail = f.read()
    if tail.endswith(b"\n") and not redone_evals:
        last = _row(tail[:-1].rsplit(b"\n", 1)[-1])
        if last is not None and (_step(last) is None or _step(last) <= step):
            return None
    later, bad, torn, evals = [], 0, False, 0
    with atomic_path(path) as tmp, open(path, "rb") as src, open(tmp, "wb") as dst:
        os.chmod(tmp, stat.S_IMODE(st.st_mode))  # not the temporary file's 0600: others may read the history
        for line in src:
            complete = line.endswith(b"\n")
            row = _row(line)
            if row is None:
                if complete:
                    bad += 1
                else:
                    torn = True
                continue
            s = _step(row)
            if s is not None and s > step:
                later.append(s)
                continue
            if redone_evals and s == step and row.get("kind") == "eval":
                evals += 1
                continue
            dst.write(line if complete else line + b"\n")
    parts = []
    if later:
        parts.append(f"{len(later)} rows of steps {min(later)}-{max(later)} (after step {step}, where this run starts)")
    if evals:
        parts.append(f"{evals} validation rows of step {step} (its final validation runs again)")
    if torn:
        parts.append("a last line cut mid-row")
    if bad:
        parts.append(f"{bad} unreadable lines")
    return f"{path}: removed " + " and ".join(parts) if parts else None


class MetricsLogger:
    """``start_step``: the step the run starts from (0, or the resumed checkpoint's); the history past it is
    removed first (``rewind_history``), and ``log`` says what was removed."""

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "moe-arch",
        config: dict | None = None,
        enabled: bool = True,
        start_step: int = 0,
        log=None,
        redone_evals: bool = False,
    ):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in HISTORIES:
            said = rewind_history(run_dir / name, start_step, redone_evals and name == "metrics.jsonl")
            if said and log is not None:
                log(said)
        self._f = open(self.path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # lazy: imports tensorboard (slow); only when on

            tb_dir = run_dir / "tensorboard"
            # Events of the steps about to be logged again are hidden from TensorBoard (its own resume rule).
            purge = start_step + 1 if tb_dir.is_dir() and any(tb_dir.iterdir()) else None
            self._tb = SummaryWriter(log_dir=str(tb_dir), purge_step=purge)
        if wandb:
            try:
                import wandb as wb  # lazy: an optional extra (moe-arch[wandb])
            except ImportError:
                raise ConfigError(
                    "train.wandb=true: the wandb package is not installed; pip install 'moe-arch[wandb]' "
                    "or pass --train.wandb false"
                ) from None
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
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
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
