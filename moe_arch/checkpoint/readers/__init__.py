"""Read checkpoints from anywhere, lazily and safely: one reader per training stack.

======================  ==============================================  =========================================
reader (module)         what it reads                                   how optimizer state gets tensor names
======================  ==============================================  =========================================
``dcp``                 torch.distributed.checkpoint folders (this      ``param_names`` from meta.pt, or the
                        project's FSDP2 runs, torchtitan ``step-N``)    flattened ``optimizer.state.<fqn>`` keys
``deepspeed``           ``save_checkpoint`` folders (``latest``,         by name: ZeRO 1/2 ``param_slice_mappings``
                        ``global_stepN/``), ZeRO stages 0-2             over every rank's flat partitions
``per_rank``            a folder of per-rank ``torch.save`` files        as ``torch_file`` (the lowest rank's file;
                        (``ckpt_rank0.pt``, ``rank_1/model.pt``)        the others' copies go to ``replicas``)
``hf``                  HF Trainer ``checkpoint-N/``, accelerate        order + shape from the model class of
                        ``save_state``, PEFT adapters                   config.json on the meta device, carried
                                                                        through transformers' save conversion
``safetensors``         ``.safetensors`` files and sharded indexes      (weights only)
``torch_file``          ``torch.save`` files: this project's ``.pt``,   ``param_names`` when saved, else order +
                        nanoGPT ``ckpt.pt``, Lightning ``.ckpt``, any   state shape (optim_map)
                        state-dict container
======================  ==============================================  =========================================

The first reader whose ``accepts`` matches the path reads it (the registry is the order below, most specific
first). Safety: ``torch.load(weights_only=True)`` always, unless the caller passes ``trust_pickle`` (the CLI's
``--trust-pickle``). Memory: torch files are memory-mapped (``mmap=True``) and safetensors tensors are read one at
a time; :func:`~moe_arch.checkpoint.readers.base.release` returns a memory-mapped tensor's pages to the OS after use,
so a checkpoint larger than RAM is read with memory bounded by the largest chunk being analysed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moe_arch.checkpoint.layout import is_distributed
from moe_arch.checkpoint.readers.base import (
    BUFFER_PATTERNS,
    CheckpointView,
    LoadError,
    OptimizerInfo,
    TensorInfo,
    corrupt,
    dcp_errors,
    release,
    strip_prefixes,
)
from moe_arch.checkpoint.readers.dcp import read_dcp
from moe_arch.checkpoint.readers.deepspeed import is_deepspeed_dir, read_deepspeed
from moe_arch.checkpoint.readers.hf import read_hf_folder
from moe_arch.checkpoint.readers.per_rank import is_per_rank_dir, read_per_rank
from moe_arch.checkpoint.readers.safetensors import read_safetensors, read_safetensors_index
from moe_arch.checkpoint.readers.torch_file import read_torch_file
from moe_arch.checkpoint.resolve import newest_in, run_checkpoints

__all__ = [
    "BUFFER_PATTERNS",
    "CheckpointView",
    "LoadError",
    "OptimizerInfo",
    "READERS",
    "TensorInfo",
    "open_checkpoint",
    "release",
    "resolve_checkpoint_path",
    "strip_prefixes",
]


@dataclass(frozen=True)
class Reader:
    name: str
    accepts: Callable[[Path], bool]
    read: Callable[[Path, bool], CheckpointView]


READERS: list[Reader] = [
    Reader("dcp", is_distributed, lambda p, trust: read_dcp(p)),
    Reader("deepspeed", is_deepspeed_dir, read_deepspeed),
    Reader("per_rank", is_per_rank_dir, read_per_rank),
    Reader("hf", lambda p: p.is_dir(), read_hf_folder),
    Reader("safetensors", lambda p: p.suffix == ".safetensors", lambda p, trust: read_safetensors([p], p)),
    Reader(
        "safetensors-index",
        lambda p: p.name.endswith(".safetensors.index.json"),
        lambda p, trust: read_safetensors_index(p),
    ),
    Reader("torch_file", lambda p: p.is_file(), read_torch_file),
]


def resolve_checkpoint_path(spec: str | Path) -> Path:
    """The checkpoint a path means: a checkpoint itself, the newest one of another stack's output folder, or (a
    run folder of ours, or any folder of checkpoints) the one the shared resolver picks."""
    p = Path(spec)
    if not p.exists():
        raise LoadError(f"{p}: no such file or folder")
    if p.is_dir():
        if (
            is_deepspeed_dir(p)
            or is_distributed(p)
            or (p / "trainer_state.json").is_file()
            or list(p.glob("model*.safetensors"))
            or list(p.glob("pytorch_model*.bin"))
            or list(p.glob("adapter_model.*"))
            or is_per_rank_dir(p)
        ):
            return p
        # A Hugging Face output_dir: its newest checkpoint-N/ folder.
        hf = [q for q in p.glob("checkpoint-*") if q.is_dir() and q.name.split("-")[-1].isdigit()]
        if hf:
            return max(hf, key=lambda q: int(q.name.split("-")[-1]))
        # A Lightning log dir (lightning_logs/version_N/checkpoints/*.ckpt): the newest .ckpt.
        ckpts = sorted(p.rglob("*.ckpt"), key=lambda q: q.stat().st_mtime)
        if ckpts and not (p / "checkpoints" / "latest.txt").is_file():
            return ckpts[-1]
        # A run folder or its checkpoints/ folder: what latest.txt names, else the newest checkpoint. Damaged
        # files are taken too: diagnosing one says what is wrong with it.
        base = run_checkpoints(p)
        try:
            found = newest_in(base, _diagnosable)
        except OSError as e:
            raise LoadError(f"{p}: cannot list {base} ({e.strerror})") from None
        if found.path is None:
            raise LoadError(
                f"{p}: a folder with no checkpoint in it (no .pt, .safetensors, trainer_state.json or "
                "distributed-checkpoint .metadata)"
            )
        return found.path
    return p


def _diagnosable(p: Path) -> bool:
    return is_distributed(p) or (p.is_file() and p.suffix in (".pt", ".safetensors"))


def open_checkpoint(spec: str | Path, trust_pickle: bool = False) -> CheckpointView:
    """The checkpoint as a lazy view, or a one-line LoadError naming the file. Malformed input of any kind (a
    mutated header, a wrong type where a mapping belongs, a missing shard) ends in a LoadError, never another
    exception: the parsers below validate what they can name, and this boundary turns the rest into one line."""
    try:
        return _open_checkpoint(spec, trust_pickle)
    except LoadError:
        raise
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        IndexError,
        AttributeError,
        RuntimeError,
        EOFError,
        OverflowError,
        struct.error,
        MemoryError,
        *dcp_errors(),
    ) as e:
        raise LoadError(corrupt(Path(spec), e)) from None


def _open_checkpoint(spec: str | Path, trust_pickle: bool = False) -> CheckpointView:
    path = resolve_checkpoint_path(spec)
    if path.is_file() and path.stat().st_size == 0:
        raise LoadError(f"{path}: empty file (0 bytes); the save was interrupted or the file was truncated")
    for reader in READERS:
        if reader.accepts(path):
            return reader.read(path, trust_pickle)
    raise LoadError(f"{path}: neither a checkpoint file nor a checkpoint folder")
