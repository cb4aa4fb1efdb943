"""Our two checkpoint formats behind one interface.

=============  ===================================  ==========================================================
format         what it is                           written by
=============  ===================================  ==========================================================
``distributed``  a DCP folder + ``meta.pt``         every rank of an FSDP2 run (resumable on any world size)
``single_file``  one ``torch.save`` ``.pt`` file    rank 0 of any other run; ``moe-arch export`` of a folder
=============  ===================================  ==========================================================

Callers never ask which format a path is in: :func:`save` / :func:`load` (resume: weights *and* optimizer state
into live objects), :func:`read_meta` (everything but the tensors, cheaply), :func:`load_weights` /
:func:`load_model` (evaluation, export, generation: the weights alone, no optimizer built) and
:func:`to_single_file` pick the format from the registry.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from moe_arch.checkpoint import distributed, single_file
from moe_arch.checkpoint.layout import SINGLE_FILE_SUFFIX, CheckpointError, is_distributed
from moe_arch.checkpoint.state import check_model_state, field, loading
from moe_arch.config import Config
from moe_arch.model.transformer import HybridLM, materialize


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str  # a checkpoint called NAME is the path NAME + suffix
    sharded: bool  # written by every rank, and loadable into a sharded (FSDP2) model
    detect: Callable[[Path], bool]
    save: Callable[..., Path]  # (path, model, optimizers, meta, extra) -> path
    read_meta: Callable[[Path], dict]
    load_weights: Callable[[Path, str], tuple[dict, dict[str, torch.Tensor]]]  # (path, what) -> (meta, model)
    load: Callable[..., dict]  # resume into live objects: see load()


# ------------------------------------------------------------------------------------------ single file
def _single_save(path: Path, model, optimizers: dict, meta: dict, extra: dict) -> Path:
    payload = {
        **meta,
        "model": model.state_dict(),
        "optimizers": {n: o.state_dict() for n, o in optimizers.items()},
        **extra,
    }
    return single_file.save_checkpoint(path, payload)


def _single_weights(path: Path, what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    state = single_file.load_checkpoint(path)
    if "config" not in state or "model" not in state:
        raise CheckpointError(
            f"{path}: not a moe_arch checkpoint (no 'config'/'model'); `moe-arch diagnose` "
            "reads other stacks' checkpoints"
        )
    return state, state["model"]


def _single_load(
    path: Path,
    model,
    optimizers: dict,
    *,
    device,
    sharded: bool,
    check: Callable[[dict], None],
    optimizer_context: Callable[[], ContextManager],
) -> dict:
    if sharded:
        raise CheckpointError(
            f"{path}: a single-file checkpoint cannot be resumed under FSDP2; resume it "
            "on one process or with --train.parallel ddp"
        )
    state = single_file.load_checkpoint(path, map_location=device)
    check(state)
    check_model_state(path, field(path, state, "model", dict), model.state_dict())
    model.load_state_dict(state["model"])
    saved = field(path, state, "optimizers", dict)
    with optimizer_context():
        for name, opt in optimizers.items():
            with loading(path, f"optimizers.{name}"):
                opt.load_state_dict(field(path, saved, name, dict, f"optimizers.{name}"))
    return state


# ------------------------------------------------------------------------------------------ distributed
def _dist_save(path: Path, model, optimizers: dict, meta: dict, extra: dict) -> Path:
    return distributed.save_dcp(path, model, optimizers, meta)  # precision_state is single-file only


def _dist_load(
    path: Path,
    model,
    optimizers: dict,
    *,
    device,
    sharded: bool,
    check: Callable[[dict], None],
    optimizer_context: Callable[[], ContextManager],
) -> dict:
    check(distributed.read_meta(path))  # before loading: a mismatch is a clear error
    return distributed.load_dcp(path, model, optimizers)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in [  # detection order: the first whose detect() matches
        Format(
            "distributed",
            "",
            True,
            is_distributed,
            _dist_save,
            distributed.read_meta,
            distributed.load_weights,
            _dist_load,
        ),
        Format(
            "single_file",
            SINGLE_FILE_SUFFIX,
            False,
            lambda p: p.is_file(),
            _single_save,
            lambda p: single_file.load_checkpoint(p, mmap=True),
            _single_weights,
            _single_load,
        ),
    ]
}


def format_of(path: str | Path) -> Format:
    """The format of the checkpoint at ``path``; the single-file one when none matches, whose loader then names
    what is wrong (no such file, a folder, ...)."""
    p = Path(path)
    return next((f for f in FORMATS.values() if f.detect(p)), FORMATS["single_file"])


# ------------------------------------------------------------------------------------------ the interface
def save(
    ckpt_dir: Path,
    name: str,
    model,
    optimizers: dict,
    meta: dict,
    *,
    sharded: bool = False,
    writer: bool = True,
    extra: Callable[[], dict] | None = None,
) -> Path | None:
    """Checkpoint ``name`` in ``ckpt_dir``: a distributed folder written by every rank when the model is
    ``sharded``, else one file written by the ``writer`` rank (None on the others). ``extra()``: more entries
    for the single-file format (the precision policy's compensation buffers)."""
    fmt = next(f for f in FORMATS.values() if f.sharded == sharded)
    if not (fmt.sharded or writer):
        return None
    return fmt.save(Path(ckpt_dir) / f"{name}{fmt.suffix}", model, optimizers, meta, extra() if extra else {})


def load(
    path: str | Path,
    model,
    optimizers: dict,
    *,
    device: str | torch.device = "cpu",
    sharded: bool = False,
    check: Callable[[dict], None] = lambda meta: None,
    optimizer_context: Callable[[], ContextManager] = nullcontext,
) -> dict:
    """Resume: the weights into ``model`` and the optimizer state into ``optimizers`` (``sharded``: an FSDP2
    model), after ``check(meta)`` accepts the checkpoint; returns the checkpoint's other entries (step, schedulers,
    data position, rng, ...). The optimizers load inside ``optimizer_context()``."""
    path = Path(path)
    return format_of(path).load(
        path, model, optimizers, device=device, sharded=sharded, check=check, optimizer_context=optimizer_context
    )


def read_meta(path: str | Path) -> dict:
    """Everything but the tensors, without reading them (the single-file format maps them lazily)."""
    return format_of(path).read_meta(Path(path))


@dataclass
class Weights:
    """A checkpoint's model weights and what describes them: no optimizer, nothing to resume."""

    path: Path
    format: str
    config: Config
    model: dict[str, torch.Tensor]
    meta: dict[str, Any]  # step, tokenizer, precision, ... (for the single-file format, the whole checkpoint)


def load_weights(path: str | Path, what: str = "loaded") -> Weights:
    """The weights and config of one of our checkpoints, either format; ``what`` completes the error for folders
    that are not ours ("evaluated", "exported")."""
    path = Path(path)
    fmt = format_of(path)
    meta, model = fmt.load_weights(path, what)
    return Weights(path, fmt.name, Config.from_dict(meta["config"], f"{path} (config)"), model, meta)


def checked_model(path: str | Path, cfg: Config, saved, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model of ``cfg`` holding the saved weights, once they are known to fit it: every state dict that
    ``eval``, ``generate``, ``lm-eval`` and ``export`` load comes through here, so a missing, extra or misshapen
    tensor is one line naming it (as on ``--resume``), not load_state_dict's multi-line RuntimeError."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: 'model' is a {type(saved).__name__}, not a state dict")
    with torch.device("meta"):  # shapes only
        expected = HybridLM(cfg.model).state_dict()
    try:
        check_model_state(path, saved, expected)
    except CheckpointError as e:
        raise CheckpointError(
            f"{e}: the weights do not fit the model the checkpoint's own config describes "
            f"(edited, or written by other code); `moe-arch diagnose {path}` reads it as it "
            "is"
        ) from None
    model, _, _ = materialize(cfg.model, saved, device)
    return model


def load_model(
    path: str | Path, device: str | torch.device = "cpu", what: str = "loaded"
) -> tuple[torch.nn.Module, Weights]:
    """One of our checkpoints, either format, as a model in its saved precision on ``device`` (no optimizer)."""
    w = load_weights(path, what)
    return checked_model(w.path, w.config, w.model, device), w


def to_single_file(path: str | Path, what: str = "exported") -> dict:
    """The single-file payload of a distributed checkpoint (weights, optimizer state, the rest), no optimizer
    built; save it with :func:`~moe_arch.checkpoint.single_file.save_checkpoint`."""
    path = Path(path)
    if not is_distributed(path):
        raise CheckpointError(f"{path}: not a distributed-checkpoint folder (no .metadata)")
    return distributed.to_single_file(path, what)
