"""The single-file format: one ``torch.save`` file per checkpoint, readable with plain PyTorch.

Everything in a checkpoint is a tensor or a plain Python value, so ``torch.load(path, weights_only=True)``
reads it without unpickling code, and ``torch.load(..., mmap=True)`` reads it lazily. Layout::

    format, version, step, epoch, tokens_seen, data_state, rng, config (dict), precision,
    model (state dict), optimizers {name: state dict}, schedulers {name: state dict},
    precision_state (compensation buffers), param_roles {name: role}, buffers [names], kind, saved_at

Every write goes to a temporary file that is fsynced and renamed, so a crash during a save leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from moe_arch import __version__
from moe_arch.checkpoint.layout import CheckpointError, is_distributed
from moe_arch.utils import atomic_path

FORMAT = "moe_arch.checkpoint/1"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    payload = {"format": FORMAT, "version": __version__, "saved_at": time.time(), **payload}
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"{path}: the checkpoint could not be written ({type(e).__name__}: {msg}); the "
            "previous checkpoint is kept. Free space or choose another --train.out_dir"
        ) from None
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    path = Path(path)
    if is_distributed(path):
        raise CheckpointError(
            f"{path}: a distributed (sharded) checkpoint folder; convert it with "
            f"`moe-arch export {path} out.pt`, or resume it with --resume"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'truncated or corrupt'})"
        ) from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a moe_arch checkpoint (no format {FORMAT!r}); `moe-arch diagnose` reads other checkpoints"
        )
    return ck
