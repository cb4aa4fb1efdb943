"""Checkpoints: one ``torch.save`` file per checkpoint, readable with plain PyTorch.

Everything in a checkpoint is a tensor or a plain Python value, so ``torch.load(path, weights_only=True)``
reads it without unpickling code, and ``torch.load(..., mmap=True)`` reads it lazily. Layout::

    format, version, step, epoch, tokens_seen, data_state, rng, config (dict), precision,
    model (state dict), optimizers {name: state dict}, schedulers {name: state dict},
    precision_state (compensation buffers), param_roles {name: role}, buffers [names], kind, saved_at

Files in ``<run>/checkpoints/``: ``step_0000000.pt`` (the true initialisation, kept for the doctor), periodic
``step_NNNNNNN.pt`` (the last ``train.keep_last`` kept), ``final.pt``, ``checkpoint_interrupted.pt`` (after
SIGINT/SIGTERM), and ``latest.txt`` naming the newest one. Every write goes to a temporary file that is
fsynced and renamed, so a crash during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Any

import torch

from moe_arch import __version__
from moe_arch.utils import atomic_path, atomic_write_text, clean_stale_temps

FORMAT = "moe_arch.checkpoint/1"
STEP_RE = re.compile(r"^step_(\d{7})(\.pt)?$")

# Fields that must match to resume: they fix the model's shapes, the precision of its weights, the optimizer
# layout and the data stream. Anything else (steps, logging, eval cadence, ...) may change on resume.
RESUME_KEYS = {
    "model": None,  # every field
    "optim": ["muon_roles"],
    "train": ["seq_len", "grad_accum", "seed", "precision"],  # batch size: checked as the global batch
    "data": ["source", "tokenizer", "val_fraction", "text_field"],
}


class CheckpointError(RuntimeError):
    pass


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    payload = {"format": FORMAT, "version": __version__, "saved_at": time.time(), **payload}
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        msg = (e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] if str(e) else "")
        raise CheckpointError(f"{path}: the checkpoint could not be written ({type(e).__name__}: {msg}); the "
                              "previous checkpoint is kept. Free space or choose another --train.out_dir") from None
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    path = Path(path)
    if path.is_dir() and (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: a distributed (sharded) checkpoint folder; convert it with "
                              f"`moe-arch export {path} out.pt`, or resume it with --resume")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'truncated or corrupt'})") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a moe_arch checkpoint (no format {FORMAT!r}); `moe-arch diagnose` reads "
                              "other checkpoints")
    return ck


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def write_latest(ckpt_dir: Path, name: str) -> None:
    atomic_write_text(ckpt_dir / "latest.txt", name + "\n")


def is_complete(path: Path) -> bool:
    """A checkpoint that can be offered for resuming: a ``.pt`` file whose zip directory (at its end, where a cut
    file loses it) is intact, or a distributed-checkpoint folder with its ``.metadata``. Saves are atomic, so this
    only rejects files damaged afterwards; reading them in full is load_checkpoint's job."""
    import zipfile

    if path.name.startswith("."):
        return False
    if path.is_dir():
        return (path / ".metadata").is_file()
    return path.suffix == ".pt" and path.is_file() and zipfile.is_zipfile(path)


def resolve_resume(spec: str, run_dir: Path, log=None) -> Path:
    """``latest`` (this run's newest checkpoint), a run folder, or a checkpoint file. ``latest.txt`` names the
    newest; when it is unreadable, empty, or names a checkpoint that is missing or damaged, the newest complete
    checkpoint is taken instead and ``log`` says why."""
    if spec == "latest":
        base = checkpoint_dir(run_dir)
    else:
        p = Path(spec)
        if p.is_file() or (p.is_dir() and (p / ".metadata").is_file()):
            return p
        if not p.is_dir():
            raise CheckpointError(f"--resume {spec}: no such checkpoint file or run folder")
        base = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    latest = base / "latest.txt"
    note = None
    if latest.exists():
        try:
            name = latest.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            name, note = None, f"{latest} cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})"
        if name is not None:
            target = base / name
            shown = repr(name[:80] + ("..." if len(name) > 80 else ""))  # one line, whatever the file holds
            try:
                if not name:
                    note = f"{latest} is empty"
                elif Path(name).name != name or name in (".", "..") or "\x00" in name or "\n" in name:
                    note = f"{latest} names {shown}, not a checkpoint in {base}"
                elif not target.exists():
                    note = f"{latest} names {shown}, which does not exist"
                elif not is_complete(target):
                    note = f"{latest} names {shown}, which is not a complete checkpoint"
                else:
                    return target
            except OSError as e:  # a name too long for the file system, or one it cannot look up
                note = f"{latest} names {shown}, which cannot be looked up ({e.strerror})"
    try:
        found = [q for q in base.iterdir() if (q.suffix == ".pt" or q.is_dir()) and is_complete(q)]
    except OSError as e:
        raise CheckpointError(f"--resume {spec}: cannot list {base} ({e.strerror})") from None
    if not found:
        raise CheckpointError(f"--resume {spec}: no complete checkpoint in {base}" + (f" ({note})" if note else ""))
    newest = max(found, key=lambda q: (q.stat().st_mtime_ns, q.name))
    if note and log is not None:
        log(f"{note}; resuming the newest complete checkpoint, {newest.name}")
    return newest


def prune(ckpt_dir: Path, keep_last: int, current_step: int | None = None) -> None:
    """Keep step 0 and the last ``keep_last`` periodic checkpoints (files or distributed-checkpoint folders) up to
    ``current_step``; clean the temporary files and folders of killed saves. Checkpoints past the current step
    (a timeline abandoned by resuming an earlier checkpoint) and the one ``latest.txt`` names are never touched."""
    import shutil

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


def check_model_state(path, saved: dict, expected: dict) -> None:
    """The checkpoint's weights fit the model: same names, every entry a tensor of the model's shape; else one
    line naming the first that does not."""
    missing = [k for k in expected if k not in saved]
    if missing:
        raise CheckpointError(f"{path}: model tensor {missing[0]!r} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = [k for k in saved if k not in expected]
    if extra:
        raise CheckpointError(f"{path}: model tensor {extra[0]!r} is not in this model"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for k, ref in expected.items():
        v = saved[k]
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: model entry {k!r} is a {type(v).__name__}, not a tensor")
        if tuple(v.shape) != tuple(ref.shape):
            raise CheckpointError(f"{path}: model tensor {k!r} has shape {list(v.shape)}, the model expects "
                                  f"{list(ref.shape)}")


def config_differences(saved: dict, current: dict) -> list[str]:
    diffs = []
    for section, keys in RESUME_KEYS.items():
        a, b = saved.get(section, {}), current.get(section, {})
        for k in keys if keys is not None else sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                diffs.append(f"{section}.{k} (checkpoint {a.get(k)!r}, now {b.get(k)!r})")
    return diffs
