"""Which checkpoint a path means: a checkpoint itself, or a run folder (or its ``checkpoints/`` folder) -> the one
``latest.txt`` names -> else the newest complete one. ``--resume``, ``eval``/``export`` and the doctor all ask here;
the run's initial (step-0) checkpoint, the doctor's default reference, is found here too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moe_arch.checkpoint.layout import (
    SINGLE_FILE_SUFFIX,
    CheckpointError,
    checkpoint_dir,
    is_complete,
    is_distributed,
    step_name,
)


@dataclass(frozen=True)
class Found:
    path: Path | None  # None: no acceptable checkpoint in ``base``
    base: Path  # the folder searched
    note: str | None = None  # why latest.txt's choice was passed over, if it was


def run_checkpoints(folder: Path) -> Path:
    """Where a run folder keeps its checkpoints: ``folder/checkpoints`` when there is one, else ``folder`` itself."""
    return folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder


def _from_latest(base: Path, accept: Callable[[Path], bool]) -> tuple[Path | None, str | None]:
    """The checkpoint ``base/latest.txt`` names, or (None, why not) when it is unreadable, empty, or names a
    checkpoint that is missing or not acceptable; (None, None) when there is no latest.txt."""
    latest = base / "latest.txt"
    if not latest.exists():
        return None, None
    try:
        name = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{latest} cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})"
    target = base / name
    shown = repr(name[:80] + ("..." if len(name) > 80 else ""))  # one line, whatever the file holds
    try:
        if not name:
            return None, f"{latest} is empty"
        if Path(name).name != name or name in (".", "..") or "\x00" in name or "\n" in name:
            return None, f"{latest} names {shown}, not a checkpoint in {base}"
        if not target.exists():
            return None, f"{latest} names {shown}, which does not exist"
        if not accept(target):
            return None, f"{latest} names {shown}, which is not a complete checkpoint"
        return target, None
    except OSError as e:  # a name too long for the file system, or one it cannot look up
        return None, f"{latest} names {shown}, which cannot be looked up ({e.strerror})"


def newest_in(base: Path, accept: Callable[[Path], bool] = is_complete) -> Found:
    """The checkpoint in the folder ``base`` that ``latest.txt`` names, else the newest that ``accept`` takes
    (by modification time). Listing ``base`` may raise OSError."""
    target, note = _from_latest(base, accept)
    if target is not None:
        return Found(target, base)
    found = [q for q in base.iterdir() if accept(q)]
    newest = max(found, key=lambda q: (q.stat().st_mtime_ns, q.name)) if found else None
    return Found(newest, base, note)


def resolve_resume(spec: str, run_dir: Path, log=None) -> Path:
    """``latest`` (this run's newest checkpoint), a run folder, or a checkpoint. ``latest.txt`` names the newest;
    when it is unreadable, empty, or names a checkpoint that is missing or damaged, the newest complete checkpoint
    is taken instead and ``log`` says why."""
    if spec == "latest":
        base = checkpoint_dir(run_dir)
    else:
        p = Path(spec)
        if p.is_file() or is_distributed(p):
            return p
        if not p.is_dir():
            raise CheckpointError(f"--resume {spec}: no such checkpoint file or run folder")
        base = run_checkpoints(p)
    try:
        found = newest_in(base)
    except OSError as e:
        raise CheckpointError(f"--resume {spec}: cannot list {base} ({e.strerror})") from None
    if found.path is None:
        raise CheckpointError(
            f"--resume {spec}: no complete checkpoint in {base}" + (f" ({found.note})" if found.note else "")
        )
    if found.note and log is not None:
        log(f"{found.note}; resuming the newest complete checkpoint, {found.path.name}")
    return found.path


def initial_checkpoint(path: str | Path) -> Path | None:
    """The run's initial (step-0) checkpoint beside the checkpoint ``path``, in either format; None when there is
    none, or when ``path`` is that checkpoint."""
    path = Path(path)
    for suffix in (SINGLE_FILE_SUFFIX, ""):
        cand = path.parent / (step_name(0) + suffix)
        if cand.exists() and cand.resolve() != path.resolve():
            return cand
    return None
