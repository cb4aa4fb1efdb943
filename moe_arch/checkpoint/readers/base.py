"""What every checkpoint reader shares: the lazy view of a checkpoint, the one-line load error, safe torch.load,
and releasing memory-mapped pages after use."""

from __future__ import annotations

import ctypes
import mmap
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

MODEL_KEYS = ("model", "model_state_dict", "state_dict", "module")
OPTIM_KEYS = ("optimizers", "optimizer", "optimizer_state_dict", "optimizer_states")
BUFFER_PATTERNS = re.compile(
    r"(running_mean|running_var|num_batches_tracked|inv_freq|\.mask$|position_ids|"
    r"expert_bias|e_score_correction_bias|\.attn\.bias$)"
)


def dcp_errors() -> tuple[type[BaseException], ...]:
    """torch.distributed.checkpoint reports failed reads with CheckpointException, a BaseException. Only a
    module that was imported can raise it, so it is looked up, not imported (importing DCP costs ~2 s)."""
    api = sys.modules.get("torch.distributed.checkpoint.api")
    return (api.CheckpointException,) if api is not None else ()


class LoadError(RuntimeError):
    """The input cannot be diagnosed (missing, truncated, corrupt, unsafe). One line: path, problem, fix."""


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    get: Callable[[], torch.Tensor]  # loads (or maps) the tensor; call release() when done with it

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class OptimizerInfo:
    name: str
    state_dict: dict


@dataclass
class CheckpointView:
    path: Path
    format: str
    tensors: dict[str, TensorInfo]
    optimizers: list[OptimizerInfo] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    mmapped: bool = False
    # tensors come from torch.load, where tied weights share one storage (safetensors and DCP store each once)
    from_pickle: bool = False
    # The model's parameters as the optimizer saw them, [(name, shape)] in registration order, when they differ
    # from the saved tensors (transformers 5 trains MoE experts stacked but saves them per expert), with the
    # function that turns {in-memory name: tensor} into {saved name: tensor}.
    param_layout: list[tuple[str, tuple[int, ...]]] | None = None
    to_saved: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    # Tensors that several ranks saved, each rank's copy: {name: {rank: TensorInfo}} (DeepSpeed / Megatron-style
    # tensor parallelism: one mp_rank_XX file per rank). Copies of a replicated tensor (a LayerNorm) must be equal;
    # copies of a sharded one (a column-parallel weight) differ by design: the doctor's replicas_diverged decides
    # which is which (meta["replicated_patterns"] when the checkpoint declares them).
    replicas: dict[str, dict[int, TensorInfo]] = field(default_factory=dict)

    @property
    def step(self):
        return self.meta.get("step")


# -------------------------------------------------------------------------------------------- memory release
_libc = None
PAGE = mmap.PAGESIZE


def release(t: torch.Tensor | None) -> None:
    """Drop the resident pages of a tensor that lives in a read-only file mapping (mmap=True loads).

    Pages are re-read from the file if touched again, so this is always safe for tensors that were mapped
    from a checkpoint file and never written to. Only full pages strictly inside the tensor are released.
    """
    global _libc
    if t is None or t.device.type != "cpu" or t.numel() == 0:
        return
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _libc = False
    if not _libc:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    a = (start + PAGE - 1) // PAGE * PAGE
    b = end // PAGE * PAGE
    if b > a:
        _libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), 4)  # MADV_DONTNEED


def torch_load(path: Path, trust_pickle: bool) -> tuple[Any, bool]:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # torch.load cannot open such a name itself; it reads an open file fine
        try:
            with open(path, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=not trust_pickle), False
        except Exception as e:
            raise load_error(path, e, trust_pickle) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=True), True
    except Exception as e:
        if not (isinstance(e, RuntimeError) and "mmap" in str(e)):
            raise load_error(path, e, trust_pickle) from None
        # legacy (non-zip) torch.save format: it cannot be memory-mapped; read it whole
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle), False
    except Exception as e:
        raise load_error(path, e, trust_pickle) from None


def load_error(path: Path, e: Exception, trust_pickle: bool = False) -> LoadError:
    """A refused unpickle (unsafe content) or an unreadable file (truncated / corrupt). With --trust-pickle
    nothing was refused: an unpickling error then means the bytes are not a torch file at all."""
    if not trust_pickle and ("Weights only load failed" in str(e) or type(e).__name__ == "UnpicklingError"):
        return unsafe(path, str(e))
    return LoadError(corrupt(path, e))


def unsafe(path: Path, msg: str) -> LoadError:
    m = re.search(r"(Unsupported global: GLOBAL [^ ]+|Unsupported operand[^\n]*)", msg)
    what = m.group(1) if m else msg.splitlines()[0][:160]
    return LoadError(
        f"{path}: refusing to unpickle arbitrary code ({what}); the file stores Python objects beyond "
        "tensors and plain containers. If you trust it, re-run with --trust-pickle"
    )


def corrupt(path: Path, e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:  # the file could not be read: say why, not "corrupt"
        return f"{path}: cannot be read ({e.strerror})"
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"{path}: truncated or corrupt checkpoint ({type(e).__name__}: {first[:200]})"


def is_state_dict(d: Any) -> bool:
    return (
        isinstance(d, dict)
        and bool(d)
        and all(isinstance(k, str) for k in d)
        and sum(isinstance(v, torch.Tensor) for v in d.values()) >= max(1, len(d) // 2)
    )


def strip_prefixes(name: str) -> str:
    name = name.replace("_orig_mod.", "")
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def tensor_infos(sd: dict, notes: list[str]) -> dict[str, TensorInfo]:
    out = {}
    stripped = False
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        n = strip_prefixes(k)
        stripped |= n != k
        out[n] = TensorInfo(n, tuple(v.shape), v.dtype, (lambda v=v: v))
    if stripped:
        notes.append("stripped '_orig_mod.' / 'module.' prefixes from tensor names (torch.compile / DDP wrappers)")
    return out


def optimizers_from(obj: Any) -> list[OptimizerInfo]:
    if obj is None:
        return []
    if isinstance(obj, dict) and "state" in obj and "param_groups" in obj:
        return [OptimizerInfo("optimizer", obj)]
    if isinstance(obj, (list, tuple)):
        return [
            OptimizerInfo(f"optimizer{i}", o) for i, o in enumerate(obj) if isinstance(o, dict) and "param_groups" in o
        ]
    if isinstance(obj, dict):
        return [OptimizerInfo(str(k), o) for k, o in obj.items() if isinstance(o, dict) and "param_groups" in o]
    return []


class Inert:
    """Stands in for a library's class in a pickle: keeps the constructor arguments and the pickled attributes,
    runs no code of that library."""

    def __init__(self, *args, **kwargs):
        self.args = args


def load_with_inert_classes(path: Path, prefixes: tuple[str, ...], trust_pickle: bool = False) -> Any:
    """``torch.load(weights_only=True)`` of a file that pickles some classes of a known library (DeepSpeed's
    ``LossScaler``, transformers' ``TrainingArguments``): exactly the globals under ``prefixes`` that the file
    names are allowlisted as :class:`Inert` stand-ins, so plain fields read back and no code runs."""
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    allowed: list = []
    pattern = re.compile(r"Unsupported global: GLOBAL ((?:" + "|".join(re.escape(p) for p in prefixes) + r")[\w.]+)")
    for _ in range(64):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            m = pattern.search(str(e))
            if not m:
                raise load_error(path, e) from None
            name = m.group(1)
            allowed.append((type(name.rsplit(".", 1)[1], (Inert,), {}), name))
        except Exception as e:  # noqa: BLE001 - truncated / corrupt: one line naming the file
            raise load_error(path, e, trust_pickle) from None
    raise LoadError(f"{path}: more pickled objects than expected; re-run with --trust-pickle if you trust the file")
