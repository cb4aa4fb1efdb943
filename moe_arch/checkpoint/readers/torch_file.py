"""``torch.save`` files: this project's ``.pt`` checkpoints, nanoGPT's ``ckpt.pt``, Lightning's ``.ckpt``, and any file
holding a bare state dict or a dict with the model under ``model`` / ``model_state_dict`` / ``state_dict`` /
``module`` and optimizer state under ``optimizer`` / ``optimizer_state_dict`` / ``optimizers`` /
``optimizer_states`` (one state dict, a list, or a name -> state mapping). Optimizer parameters are mapped to
names by ``param_names`` when saved, else by order and state shape (see optim_map)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_arch.checkpoint.readers.base import (
    MODEL_KEYS,
    OPTIM_KEYS,
    CheckpointView,
    LoadError,
    is_state_dict,
    optimizers_from,
    tensor_infos,
    torch_load,
)

SCALER_KEYS = ("scaler", "grad_scaler", "scaler_state_dict", "MixedPrecision", "native_amp_scaling_state")
SCHEDULER_KEYS = ("schedulers", "scheduler", "lr_scheduler", "scheduler_state_dict", "lr_schedulers")


def read_torch_file(path: Path, trust_pickle: bool = False) -> CheckpointView:
    obj, mmapped = torch_load(path, trust_pickle)
    return from_torch_obj(path, obj, mmapped)


def from_torch_obj(path: Path, obj: Any, mmapped: bool) -> CheckpointView:
    notes: list[str] = []
    meta: dict[str, Any] = {}
    if not isinstance(obj, dict):
        raise LoadError(f"{path}: holds a {type(obj).__name__}, not a state dict or a checkpoint dict")
    fmt = "torch"
    if obj.get("format", "").startswith("moe_arch.checkpoint"):
        fmt = "moe_arch"
    model_sd = None
    for k in MODEL_KEYS:
        if is_state_dict(obj.get(k)):
            model_sd = obj[k]
            if k != "model" or fmt != "moe_arch":
                notes.append(f"model state read from key {k!r}")
            break
    optim_obj = None
    for k in OPTIM_KEYS:
        if k in obj:
            optim_obj = obj[k]
            break
    if model_sd is None:
        if is_state_dict(obj):
            model_sd = obj
            notes.append("a bare state dict (no optimizer state)")
        else:
            raise LoadError(
                f"{path}: no model state found (looked for a bare state dict and the keys "
                f"{list(MODEL_KEYS)}; top-level keys: {list(obj)[:10]})"
            )
    # global_step: Lightning (optimizer steps); iter_num: nanoGPT (optimizer steps, each of
    # gradient_accumulation_steps micro-batches, which its saved config names)
    for k in (
        "step",
        "global_step",
        "iter_num",
        "epoch",
        "tokens_seen",
        "config",
        "precision",
        "param_roles",
        "buffers",
        "kind",
        "version",
        "tokenizer_json",
        "tokenizer_specials",
        "precision_state",
        "nan_skips",  # batches our trainer skipped under train.nan_policy: skip (when the checkpoint records them)
        "pytorch-lightning_version",  # Lightning's .ckpt: the doctor words its fixes for Lightning
    ):
        if k in obj and not (k in ("global_step", "iter_num") and "step" in meta):
            meta["step" if k in ("global_step", "iter_num") else k] = obj[k]
    if isinstance(meta.get("config"), dict) is False and "config" in meta:
        meta.pop("config")
    # A GradScaler's state (torch.amp: scale, growth tracker; Lightning saves it under its precision plugin's name)
    # and the LR schedulers' states (one, a list: Lightning, or a name -> state mapping: ours).
    for k in SCALER_KEYS:
        if isinstance(obj.get(k), dict) and "scale" in obj[k]:
            meta["scaler"] = obj[k]
            break
    for k in SCHEDULER_KEYS:
        found = obj.get(k)
        found = list(found.values()) if isinstance(found, dict) and "last_epoch" not in found else found
        found = [found] if isinstance(found, dict) else found
        if isinstance(found, list) and found:
            meta["schedulers"] = [s for s in found if isinstance(s, dict) and "last_epoch" in s]
            break
    view = CheckpointView(
        path, fmt, tensor_infos(model_sd, notes), optimizers_from(optim_obj), meta, notes, mmapped, from_pickle=True
    )
    return view
