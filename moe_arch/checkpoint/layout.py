"""A run folder and the checkpoints in it.

Files in ``<run>/checkpoints/``: ``step_0000000[.pt]`` (the true initialisation, kept for the doctor), periodic
``step_NNNNNNN[.pt]`` (the last ``train.keep_last`` kept), ``final[.pt]``, ``checkpoint_interrupted[.pt]`` (after
SIGINT/SIGTERM), and ``latest.txt`` naming the newest one. A checkpoint is a ``.pt`` file (single-file format) or
a folder without suffix (distributed format, recognised by DCP's ``.metadata`` file).

A run folder belongs to one run. Two things protect it. A lock (``<run>/.lock``, held with ``flock`` for the whole
run): a second process that starts in the same folder exits at once naming the holder. The kernel drops an flock
when its process dies, however it dies, so a lock file left by a killed run is never stale: the next run simply
takes it (the file's contents, pid / host / start time, are only there to name the holder). And ownership of the
checkpoints: a fresh start in a folder that already holds checkpoints is refused (resume it, pick another run name,
or ask for the overwrite explicitly), so a new run can never prune, overwrite or mix with another run's files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
import zipfile
from pathlib import Path

from moe_arch.utils import atomic_write_text, clean_stale_temps, os_reason, prove_writable

STEP_RE = re.compile(r"^step_(\d{7})(\.pt)?$")
SINGLE_FILE_SUFFIX = ".pt"
DCP_MARKER = ".metadata"  # torch.distributed.checkpoint writes it last: its presence marks a complete folder


class CheckpointError(RuntimeError):
    pass


class RunFolderError(CheckpointError):
    """A run folder that this run may not use (held by another process, or another run's checkpoints)."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    """A periodic checkpoint's name, without the single-file format's suffix."""
    return f"step_{step:07d}"


def is_distributed(path: str | Path) -> bool:
    """A distributed (DCP) checkpoint folder: the one place that knows what marks one."""
    p = Path(path)
    return p.is_dir() and (p / DCP_MARKER).is_file()


def write_latest(ckpt_dir: Path, name: str) -> None:
    atomic_write_text(ckpt_dir / "latest.txt", name + "\n")


def is_complete(path: Path) -> bool:
    """A checkpoint that can be offered for resuming: a ``.pt`` file whose zip directory (at its end, where a cut
    file loses it) is intact, or a distributed-checkpoint folder with its ``.metadata``. Saves are atomic, so this
    only rejects files damaged afterwards; reading them in full is the loader's job."""
    if path.name.startswith("."):
        return False
    if path.is_dir():
        return is_distributed(path)
    return path.suffix == SINGLE_FILE_SUFFIX and path.is_file() and zipfile.is_zipfile(path)


def existing_checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoints (files and distributed-checkpoint folders) in a run folder, newest step last."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        stem = p.name[:-3] if p.name.endswith(SINGLE_FILE_SUFFIX) else p.name
        if p.name.startswith("."):
            continue
        if STEP_RE.match(p.name) or stem in ("final", "checkpoint_interrupted"):
            if p.suffix == SINGLE_FILE_SUFFIX or is_distributed(p):
                found.append(p)
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


def prune(ckpt_dir: Path, keep_last: int, current_step: int | None = None) -> None:
    """Keep step 0 and the last ``keep_last`` periodic checkpoints (files or distributed-checkpoint folders) up to
    ``current_step``; clean the temporary files and folders of killed saves. Checkpoints past the current step
    (a timeline abandoned by resuming an earlier checkpoint) and the one ``latest.txt`` names are never touched."""
    clean_stale_temps(ckpt_dir)
    for p in ckpt_dir.glob(".*.partial"):
        shutil.rmtree(p, ignore_errors=True)
    steps = sorted((int(m.group(1)), p) for p in ckpt_dir.glob("step_*") if (m := STEP_RE.match(p.name)))
    latest = ckpt_dir / "latest.txt"
    protected = (ckpt_dir / latest.read_text().strip()) if latest.is_file() else None
    periodic = [(s, p) for s, p in steps if s != 0 and (current_step is None or s <= current_step)]
    for _, p in periodic[:-keep_last] if keep_last > 0 else periodic:
        if p == protected:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ the run folder
def writable_dir(path: str | Path, what: str) -> Path:
    """Create ``path`` if needed and prove it takes a file, before any long work writes there."""
    path = Path(path)
    try:
        prove_writable(path)
    except OSError as e:
        raise RunFolderError(f"{path}: cannot write the {what} there ({os_reason(e)}); choose another folder") from None
    return path


class RunLock:
    """An exclusive flock on ``<run_dir>/.lock`` for as long as this object lives (or until ``release``)."""

    def __init__(self, run_dir: str | Path):
        self._f = None
        self.path = writable_dir(run_dir, "run") / ".lock"
        self._f = open(self.path, "a+")
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self._f.close()
            self._f = None
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunFolderError(f"{self.path}: cannot lock the run folder ({e.strerror})") from None
            raise RunFolderError(
                f"{Path(run_dir)} is in use by another run ({self.holder()}); wait for it to "
                "finish, or start this one with another --train.run_name"
            ) from None
        self._f.seek(0)
        self._f.truncate()
        self._f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
        self._f.flush()

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
            return f"pid {info['pid']} on {info['host']}, since {since}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if self._f is not None:
            with contextlib.suppress(OSError):
                self._f.close()  # closing the descriptor drops the flock
            self._f = None

    def __del__(self):
        self.release()


def claim_for_fresh_start(run_dir: str | Path, overwrite: bool) -> None:
    """Refuse a fresh start over another run's checkpoints, or (``overwrite``) remove that run's files first."""
    run_dir = Path(run_dir)
    found = existing_checkpoints(run_dir)
    if not found:
        return
    if not overwrite:
        raise RunFolderError(
            f"{run_dir} already holds another run's checkpoints ({len(found)}, newest "
            f"{found[-1].name}); continue it with --resume latest, start a new run with "
            "--train.run_name NAME, or replace it with --train.overwrite true"
        )
    shutil.rmtree(checkpoint_dir(run_dir))
    for name in ("metrics.jsonl", "alerts.jsonl"):
        (run_dir / name).unlink(missing_ok=True)
    tb = run_dir / "tensorboard"
    if tb.is_dir():
        shutil.rmtree(tb)
