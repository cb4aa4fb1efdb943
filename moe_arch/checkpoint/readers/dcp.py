"""Distributed checkpoints (``torch.distributed.checkpoint`` folders with a ``.metadata`` file): this project's
(``model/<fqn>``, ``optim/<fqn>/<key>`` and a ``meta.pt``) and other DCP writers' (``model.<fqn>``,
``optimizer.state.<fqn>.<key>``). Tensors are read one at a time; non-tensor items are never unpickled."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch

from moe_arch.checkpoint.distributed import read_into, read_meta
from moe_arch.checkpoint.readers.base import CheckpointView, LoadError, OptimizerInfo, TensorInfo


class LazyState(dict):
    """An optimizer-state dict whose tensors are read from the checkpoint only when asked for."""

    def __init__(self, loaders: dict[str, Callable[[], torch.Tensor]]):
        super().__init__()
        self._loaders = loaders

    def __contains__(self, k):
        return k in self._loaders

    def __len__(self):
        return len(self._loaders)

    def __bool__(self):
        return bool(self._loaders)

    def __iter__(self):
        return iter(self._loaders)

    def keys(self):
        return self._loaders.keys()

    def __getitem__(self, k):
        if not dict.__contains__(self, k):
            dict.__setitem__(self, k, self._loaders[k]())
        return dict.__getitem__(self, k)

    def get(self, k, default=None):
        return self[k] if k in self._loaders else default

    def values(self):
        return [self[k] for k in self._loaders]

    def items(self):
        return [(k, self[k]) for k in self._loaders]

    def release(self) -> None:
        dict.clear(self)


# Top-level keys of DCP writers' other states: never model tensors.
NOT_MODEL = ("optim/", "optimizer.", "optim.", "lr_scheduler.", "dataloader.", "train_state.")


def _safe_bytes_planner(into: dict):
    """A load planner that reads DCP's non-tensor items with ``torch.load(weights_only=True)`` into ``into``
    (DCP's own planner unpickles them with ``weights_only=False``): floats, ints, tuples and strings load, code
    never runs; an item that needs more is left out."""
    # lazy: torch.distributed.checkpoint costs ~2 s to import; only DCP folders need it
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeBytes(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            try:
                into[read_item.dest_index.fqn] = torch.load(value, weights_only=True)
            except Exception:  # noqa: BLE001 - anything beyond plain values is not read
                pass

    return SafeBytes(flatten_state_dict=False)


def _read_scalars(folder: Path, keys: list[str]) -> dict[str, object]:
    # lazy: torch.distributed.checkpoint costs ~2 s to import; only DCP folders need it
    from torch.distributed.checkpoint import FileSystemReader, load

    values: dict[str, object] = {}
    if not keys:
        return values
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            load(
                {k: None for k in keys},
                storage_reader=FileSystemReader(str(folder)),
                planner=_safe_bytes_planner(values),
                no_dist=True,
            )
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException; values are optional
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return {}
    return values


def _groups_from_flat(param_groups: dict[str, dict]) -> list[dict]:
    """``get_optimizer_state_dict(flatten_optimizer_state_dict=True)`` stores each hyper-parameter per parameter
    (``param_groups.<fqn>.lr``); parameters with the same hyper-parameters were one group."""
    groups: dict[tuple, dict] = {}
    for fqn, hp in param_groups.items():
        key = tuple(sorted((k, repr(v)) for k, v in hp.items()))
        groups.setdefault(key, {**hp, "param_names": []})["param_names"].append(fqn)
    return list(groups.values())


def read_dcp(folder: Path) -> CheckpointView:
    """A :class:`~moe_arch.checkpoint.readers.CheckpointView` of a DCP folder, reading one tensor at a time."""
    # lazy: torch.distributed.checkpoint costs ~2 s and ~50 MB to import, which every other reader would pay
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    folder = Path(folder)
    try:
        md = FileSystemReader(str(folder)).read_metadata()
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise LoadError(f"{folder}: unreadable distributed checkpoint metadata ({type(e).__name__}: {first})") from None
    meta = read_meta(folder)
    notes = [
        "distributed checkpoint (torch.distributed.checkpoint): tensors read one at a time, non-tensor items "
        "never unpickled"
    ]

    def loader(key: str, shape, dtype):
        def get():
            t = torch.empty(shape, dtype=dtype)
            read_into(
                {key: t},
                folder,
                True,
                lambda cause: LoadError(f"{folder}: cannot read {key} (a shard is missing or truncated: {cause})"),
            )
            return t

        return get

    items = md.state_dict_metadata
    prefixed = any(k.startswith(("model/", "model.")) for k in items)
    tensors: dict[str, TensorInfo] = {}
    opt_state: dict[str, dict[str, Callable]] = {}
    flat_groups: dict[str, dict] = {}
    scalar_keys: list[str] = []
    skipped = 0
    for key, item in items.items():
        if isinstance(item, BytesStorageMetadata):
            # the flattened optimizer's hyper-parameters and the trainer's step: small plain values
            if key.startswith(("optimizer.param_groups.", "train_state.")):
                scalar_keys.append(key)
            else:
                skipped += 1
            continue
        if not isinstance(item, TensorStorageMetadata):
            skipped += 1
            continue
        shape, dtype = tuple(item.size), item.properties.dtype
        if key.startswith(("optim/", "optimizer.state.", "optim.state.")):
            prefix = next(p for p in ("optim/", "optimizer.state.", "optim.state.") if key.startswith(p))
            sep = "/" if prefix.endswith("/") else "."
            fqn, sk = key[len(prefix) :].rsplit(sep, 1)
            opt_state.setdefault(fqn, {})[sk] = loader(key, shape, dtype)
        elif key.startswith(NOT_MODEL):
            if key == "train_state.step":  # torchtitan's TrainState.step, a 0-d tensor
                scalar_keys.append(key)
        elif prefixed:
            for prefix in ("model/", "model."):
                if key.startswith(prefix):
                    name = key[len(prefix) :]
                    tensors[name] = TensorInfo(name, shape, dtype, loader(key, shape, dtype))
        else:  # torchtitan: the model's state dict flattened into the top level
            tensors[key] = TensorInfo(key, shape, dtype, loader(key, shape, dtype))
    scalars = {}
    tensor_scalars = [k for k in scalar_keys if isinstance(items[k], TensorStorageMetadata)]
    for k in tensor_scalars:
        t = torch.empty(tuple(items[k].size), dtype=items[k].properties.dtype)
        read_into({k: t}, folder, True, lambda cause: LoadError(f"{folder}: cannot read {k} ({cause})"))
        scalars[k] = t.item() if t.numel() == 1 else None
    scalars.update(_read_scalars(folder, [k for k in scalar_keys if k not in tensor_scalars]))
    for k, v in scalars.items():
        if k.startswith("optimizer.param_groups."):
            fqn, hp = k[len("optimizer.param_groups.") :].rsplit(".", 1)
            flat_groups.setdefault(fqn, {})[hp] = v
    if skipped:
        notes.append(f"{skipped} non-tensor items skipped (reading them would need unpickling)")
    optimizers = []
    layout = meta.get("optimizer_layout")
    if not layout and flat_groups:
        layout = {"optimizer": _groups_from_flat(flat_groups)}
        notes.append(
            "optimizer saved flattened (get_optimizer_state_dict(flatten_optimizer_state_dict=True), as "
            "torchtitan does): state and hyper-parameters keyed by parameter name"
        )
    if layout:
        for name, groups in layout.items():
            state, pid = {}, 0
            gs = []
            for g in groups:
                params = []
                for fqn in g.get("param_names", []):
                    if fqn in opt_state:
                        state[pid] = LazyState(opt_state[fqn])
                    params.append(pid)
                    pid += 1
                gs.append({**g, "params": params})
            optimizers.append(OptimizerInfo(name, {"state": state, "param_groups": gs}))
    elif opt_state:
        names = sorted(opt_state)
        state = {i: LazyState(opt_state[n]) for i, n in enumerate(names)}
        optimizers.append(
            OptimizerInfo(
                "optimizer",
                {"state": state, "param_groups": [{"params": list(range(len(names))), "param_names": names}]},
            )
        )
        notes.append(
            "optimizer hyper-parameters (lr, betas) were not readable without unpickling; rules that need "
            "the learning rate are skipped"
        )
    view_meta = {
        k: meta[k]
        for k in (
            "step",
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
        )
        if k in meta
    }
    if "step" not in view_meta and isinstance(scalars.get("train_state.step"), (int, float)):
        view_meta["step"] = int(scalars["train_state.step"])
    fmt = "moe_arch-dcp" if meta else ("torchtitan-dcp" if not prefixed and "train_state.step" in scalars else "dcp")
    if not tensors:
        raise LoadError(f"{folder}: no model tensors found in the distributed checkpoint")
    return CheckpointView(folder, fmt, tensors, optimizers, view_meta, notes)
