"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), resumable with any number of ranks.

A checkpoint is a folder: DCP files holding **tensors only** (``model/<fqn>`` and ``optim/<fqn>/<state key>``,
as produced by ``get_model_state_dict`` / ``get_optimizer_state_dict``, so a different world size reshards on
load) and ``meta.pt`` with everything else (step, config, data position, optimizer param groups, ...), plain
values readable with ``torch.load(weights_only=True)``. DCP would store non-tensor values as pickles and load them
with ``weights_only=False``; keeping them out of DCP means loading never unpickles code.

Saving writes into ``.<name>.partial`` and renames it to ``<name>`` only after every rank has finished, so a rank
killed mid-save leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

META = "meta.pt"


def is_dcp_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / ".metadata").is_file()


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def has_optimizer_state(optimizers: dict) -> bool:
    return any(len(o.state) for o in optimizers.values())


def flat_state(model, optimizers: dict, with_optimizer: bool = True) -> tuple[dict[str, torch.Tensor], list, dict]:
    """Flat name -> tensor dict of the model and optimizer state, the optimizers' param groups, non-tensor state.

    ``get_optimizer_state_dict`` fills an *empty* optimizer state by running a fake step with zero gradients, which
    advances Adam's step counter (its next real step would use step-2 bias correction). So before the first real
    step (e.g. the step-0 checkpoint) pass ``with_optimizer=False``.
    """
    msd = get_model_state_dict(model)
    tensors = {f"model/{k}": v for k, v in msd.items()}
    if not with_optimizer:
        return tensors, [], {}
    opts = list(optimizers.values())
    osd = get_optimizer_state_dict(model, opts)
    scalars: dict[str, Any] = {}
    for fqn, st in osd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim/{fqn}/{key}"] = val
            else:
                scalars[f"{fqn}/{key}"] = val
    return tensors, osd["param_groups"], scalars


def optimizer_layout(optimizers: dict) -> dict[str, list[dict]]:
    """Per optimizer: its param groups with parameter names and hyper-parameters (for the doctor)."""
    out = {}
    for name, opt in optimizers.items():
        sd = opt.state_dict()
        out[name] = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return out


def save_dcp(folder: Path, model, optimizers: dict, meta: dict) -> Path:
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.partial"
    if _rank() == 0:
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    with_opt = has_optimizer_state(optimizers)  # no state before the first step: save the weights alone
    tensors, groups, scalars = flat_state(model, optimizers, with_opt)
    dcp.save(tensors, checkpoint_id=str(tmp))
    _barrier()
    if _rank() == 0:
        from moe_arch.utils import atomic_path

        payload = {**meta, "optim_param_groups": groups, "optim_scalars": scalars, "has_optimizer_state": with_opt,
                   "optimizer_layout": optimizer_layout(optimizers)}
        with atomic_path(tmp / META) as p:
            torch.save(payload, p)
        trash = folder.parent / f".{folder.name}.old"
        shutil.rmtree(trash, ignore_errors=True)
        if folder.exists():
            folder.rename(trash)
        tmp.rename(folder)
        shutil.rmtree(trash, ignore_errors=True)
    _barrier()
    return folder


def read_meta(folder: Path) -> dict:
    from moe_arch.training.checkpoint import CheckpointError

    path = Path(folder) / META
    if not path.is_file():
        return {}
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read it is the same one-line error
        raise CheckpointError(f"{path}: truncated or corrupt ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:200]})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: holds a {type(meta).__name__}, not the checkpoint's meta mapping")
    return meta


def _first_error(e: BaseException) -> str:
    """DCP reports a failed read as a CheckpointException holding each rank's traceback: the innermost cause."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        e = getattr(inner, "exc_info", None) and inner.exc_info[1] or inner
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1][:200] if text else ''}"


def _read(tensors: dict, folder: Path, no_dist: bool, error: Callable[[str], Exception]) -> None:
    """dcp.load into ``tensors``; a missing, truncated or mismatched shard raises ``error(cause)`` (one line)."""
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(tensors, checkpoint_id=str(folder), no_dist=no_dist)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        raise error(_first_error(e)) from None


def load_dcp(folder: Path, model, optimizers: dict) -> dict:
    """Load a DCP checkpoint into ``model`` / ``optimizers`` (FSDP2 or not, any world size); returns its meta."""
    meta = read_meta(folder)
    if not meta:
        raise FileNotFoundError(f"{folder}: no {META}; not a moe_arch distributed checkpoint")
    with_opt = bool(meta.get("has_optimizer_state", True))
    tensors, _, _ = flat_state(model, optimizers, with_opt)  # targets with this run's shapes and sharding
    single = not (dist.is_available() and dist.is_initialized())
    from moe_arch.training.checkpoint import CheckpointError

    _read(tensors, folder, single, lambda cause: CheckpointError(
        f"{folder}: a shard is missing, truncated or does not match this model ({cause})"))
    msd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    state: dict[str, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            fqn, key = k[len("optim/"):].rsplit("/", 1)
            state.setdefault(fqn, {})[key] = v
    for k, v in meta.get("optim_scalars", {}).items():
        fqn, key = k.rsplit("/", 1)
        state.setdefault(fqn, {})[key] = v
    set_model_state_dict(model, msd)
    if with_opt:
        set_optimizer_state_dict(model, list(optimizers.values()),
                                 {"state": state, "param_groups": meta["optim_param_groups"]})
    return meta


def load_dcp_run(folder: Path, what: str = "loaded"):
    """A moe_arch distributed checkpoint folder on one process: (model, config, optimizers, meta), the model in the
    run's storage precision. ``what`` completes the error for folders that are not ours."""
    from moe_arch.config import Config
    from moe_arch.model.transformer import build_model
    from moe_arch.training.checkpoint import CheckpointError
    from moe_arch.training.optim import build_optimizers

    folder = Path(folder)
    if not is_dcp_dir(folder):
        raise CheckpointError(f"{folder}: not a distributed-checkpoint folder (no .metadata)")
    meta = read_meta(folder)
    if "config" not in meta:
        raise CheckpointError(f"{folder}: no moe_arch meta.pt; only moe_arch distributed checkpoints can be {what}")
    cfg = Config.from_dict(meta["config"], f"{folder} (config)")
    model = build_model(cfg.model, seed=0)
    if meta.get("precision") in ("bf16-pure", "bf16-compensated"):
        model.to(torch.bfloat16)
    opts = build_optimizers(model, cfg.optim)
    meta = load_dcp(folder, model, opts)
    return model, cfg, opts, meta


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The whole model state dict on rank 0's CPU (a collective: every rank must call it)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
