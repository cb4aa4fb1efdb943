"""The distributed format: sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), resumable with any
number of ranks.

A checkpoint is a folder: DCP files holding **tensors only** (``model/<fqn>`` and ``optim/<fqn>/<state key>``,
as produced by ``get_model_state_dict`` / ``get_optimizer_state_dict``, so a different world size reshards on
load) and ``meta.pt`` with everything else (step, config, data position, optimizer param groups, ...), plain
values readable with ``torch.load(weights_only=True)``. DCP would store non-tensor values as pickles and load them
with ``weights_only=False``; keeping them out of DCP means loading never unpickles code.

Saving writes into ``.<name>.partial`` and renames it to ``<name>`` only after every rank has finished, so a rank
killed mid-save leaves the previous checkpoint as the newest complete one.

torch.distributed.checkpoint is imported inside the functions that use it: it costs ~0.7 s, which every command
that only reads single-file checkpoints (or none) would otherwise pay.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from moe_arch.checkpoint.layout import CheckpointError
from moe_arch.utils import atomic_path

META = "meta.pt"
# meta.pt entries that only a resume into live optimizers (load_dcp) needs
OPTIMIZER_META = ("optim_param_groups", "optim_scalars", "optimizer_layout", "has_optimizer_state")


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
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict  # lazy: ~0.7 s

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
    import torch.distributed.checkpoint as dcp  # lazy: ~0.7 s

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
        payload = {
            **meta,
            "optim_param_groups": groups,
            "optim_scalars": scalars,
            "has_optimizer_state": with_opt,
            "optimizer_layout": optimizer_layout(optimizers),
        }
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
    path = Path(folder) / META
    if not path.is_file():
        return {}
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read it is the same one-line error
        raise CheckpointError(
            f"{path}: truncated or corrupt ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
        ) from None
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


def read_into(tensors: dict, folder: Path, no_dist: bool, error: Callable[[str], Exception]) -> None:
    """dcp.load into ``tensors``; a missing, truncated or mismatched shard raises ``error(cause)`` (one line)."""
    import torch.distributed.checkpoint as dcp  # lazy: ~0.7 s
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(tensors, checkpoint_id=str(folder), no_dist=no_dist)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        raise error(_first_error(e)) from None


def _shard_error(folder: Path) -> Callable[[str], CheckpointError]:
    return lambda cause: CheckpointError(
        f"{folder}: a shard is missing, truncated or does not match this model ({cause})"
    )


def load_dcp(folder: Path, model, optimizers: dict) -> dict:
    """Resume: load a DCP checkpoint into ``model`` / ``optimizers`` (FSDP2 or not, any world size); returns its
    meta."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict  # lazy: ~0.7 s

    meta = read_meta(folder)
    if not meta:
        raise FileNotFoundError(f"{folder}: no {META}; not a moe_arch distributed checkpoint")
    with_opt = bool(meta.get("has_optimizer_state", True))
    tensors, _, _ = flat_state(model, optimizers, with_opt)  # targets with this run's shapes and sharding
    single = not (dist.is_available() and dist.is_initialized())
    read_into(tensors, folder, single, _shard_error(folder))
    msd = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    set_model_state_dict(model, msd)
    if with_opt:
        set_optimizer_state_dict(
            model,
            list(optimizers.values()),
            {"state": _state_by_fqn(tensors, meta), "param_groups": meta["optim_param_groups"]},
        )
    return meta


def _state_by_fqn(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, dict]:
    """The optimizers' state keyed by parameter name: the ``optim/<fqn>/<key>`` tensors and meta's scalars."""
    state: dict[str, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            fqn, key = k[len("optim/") :].rsplit("/", 1)
            state.setdefault(fqn, {})[key] = v
    for k, v in meta.get("optim_scalars", {}).items():
        fqn, key = k.rsplit("/", 1)
        state.setdefault(fqn, {})[key] = v
    return state


def our_meta(folder: Path, what: str) -> dict:
    """meta.pt of a moe_arch distributed checkpoint; ``what`` completes the error for folders that are not ours."""
    meta = read_meta(folder)
    if "config" not in meta:
        raise CheckpointError(f"{folder}: no moe_arch meta.pt; only moe_arch distributed checkpoints can be {what}")
    return meta


def read_tensors(folder: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Every tensor whose key starts with one of ``prefixes``, whole, on the CPU, in its saved dtype: read on one
    process, with no model or optimizer to give the shapes (DCP's own metadata gives them)."""
    from torch.distributed.checkpoint import FileSystemReader  # lazy: ~0.7 s
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        items = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - an unreadable .metadata is the same one-line error
        raise CheckpointError(f"{folder}: unreadable distributed checkpoint metadata ({_first_error(e)})") from None
    tensors = {
        k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
        for k, v in items.items()
        if isinstance(v, TensorStorageMetadata) and k.startswith(prefixes)
    }
    read_into(tensors, folder, True, _shard_error(folder))
    return tensors


def load_weights(folder: Path, what: str = "loaded") -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, model state dict) of one of our distributed checkpoints, with no model or optimizer built."""
    meta = our_meta(folder, what)
    tensors = read_tensors(folder, ("model/",))
    return meta, {k[len("model/") :]: v for k, v in tensors.items()}


def to_single_file(folder: Path, what: str = "exported") -> dict:
    """The single-file payload of one of our distributed checkpoints (weights, optimizer state and the rest), with
    no model or optimizer built: each optimizer's state dict is rebuilt from the parameter names of its param
    groups (saved in meta.pt), in the order PyTorch numbers them, and its floating-point state takes the weights'
    dtype, as ``Optimizer.load_state_dict`` would have made it."""
    meta = our_meta(folder, what)
    with_opt = bool(meta.get("has_optimizer_state", True))
    tensors = read_tensors(folder, ("model/", "optim/") if with_opt else ("model/",))
    model = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    by_fqn = _state_by_fqn(tensors, meta) if with_opt else {}
    optimizers = {}
    for name, groups in meta.get("optimizer_layout", {}).items():
        state, groups_out, pid = {}, [], 0
        for g in groups:
            params = []
            for fqn in g.get("param_names", []):
                if fqn in by_fqn:
                    dtype = model[fqn].dtype if fqn in model else None
                    state[pid] = {
                        k: v.to(dtype)
                        if dtype is not None and k != "step" and isinstance(v, torch.Tensor) and v.is_floating_point()
                        else v
                        for k, v in by_fqn[fqn].items()
                    }
                params.append(pid)
                pid += 1
            groups_out.append({**g, "params": params})
        optimizers[name] = {"state": state, "param_groups": groups_out}
    keep = {k: v for k, v in meta.items() if k not in OPTIMIZER_META}
    return {**keep, "model": model, "optimizers": optimizers, "precision_state": {}}


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The whole model state dict on rank 0's CPU (a collective: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # lazy: ~0.7 s

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
