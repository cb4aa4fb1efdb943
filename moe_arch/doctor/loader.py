"""Read checkpoints from anywhere, lazily and safely.

Formats: our checkpoints; any ``torch.save`` file holding a bare state dict or a dict with the model under
``model`` / ``model_state_dict`` / ``state_dict`` / ``module`` and optimizer state under ``optimizer`` /
``optimizer_state_dict`` / ``optimizers`` / ``optimizer_states`` (one state dict, a list, or a name -> state
mapping); ``.safetensors`` files (single or sharded with an index); Hugging Face Trainer ``checkpoint-N/``
folders; and distributed checkpoints (``torch.distributed.checkpoint`` folders).

Safety: ``torch.load(weights_only=True)`` always, unless the caller passes ``trust_pickle`` (the CLI's
``--trust-pickle``). Memory: torch files are memory-mapped (``mmap=True``) and safetensors tensors are read
one at a time with ``pread``; :func:`release` returns a memory-mapped tensor's pages to the OS after use, so
a checkpoint larger than RAM is read with memory bounded by the largest chunk being analysed.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

MODEL_KEYS = ("model", "model_state_dict", "state_dict", "module")
OPTIM_KEYS = ("optimizers", "optimizer", "optimizer_state_dict", "optimizer_states")
BUFFER_PATTERNS = re.compile(r"(running_mean|running_var|num_batches_tracked|inv_freq|\.mask$|position_ids|"
                             r"expert_bias|e_score_correction_bias|\.attn\.bias$)")


def _dcp_errors() -> tuple[type[BaseException], ...]:
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


# -------------------------------------------------------------------------------------------- torch files
def _torch_load(path: Path, trust_pickle: bool) -> tuple[Any, bool]:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # torch.load cannot open such a name itself; it reads an open file fine
        try:
            with open(path, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=not trust_pickle), False
        except Exception as e:
            raise _load_error(path, e, trust_pickle) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=True), True
    except Exception as e:
        if not (isinstance(e, RuntimeError) and "mmap" in str(e)):
            raise _load_error(path, e, trust_pickle) from None
        # legacy (non-zip) torch.save format: it cannot be memory-mapped; read it whole
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle), False
    except Exception as e:
        raise _load_error(path, e, trust_pickle) from None


def _load_error(path: Path, e: Exception, trust_pickle: bool = False) -> LoadError:
    """A refused unpickle (unsafe content) or an unreadable file (truncated / corrupt). With --trust-pickle
    nothing was refused: an unpickling error then means the bytes are not a torch file at all."""
    if not trust_pickle and ("Weights only load failed" in str(e) or type(e).__name__ == "UnpicklingError"):
        return _unsafe(path, str(e))
    return LoadError(_corrupt(path, e))


def _unsafe(path: Path, msg: str) -> LoadError:
    m = re.search(r"(Unsupported global: GLOBAL [^ ]+|Unsupported operand[^\n]*)", msg)
    what = m.group(1) if m else msg.splitlines()[0][:160]
    return LoadError(f"{path}: refusing to unpickle arbitrary code ({what}); the file stores Python objects beyond "
                     "tensors and plain containers. If you trust it, re-run with --trust-pickle")


def _corrupt(path: Path, e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:  # the file could not be read: say why, not "corrupt"
        return f"{path}: cannot be read ({e.strerror})"
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"{path}: truncated or corrupt checkpoint ({type(e).__name__}: {first[:200]})"


def _is_state_dict(d: Any) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(k, str) for k in d) and \
        sum(isinstance(v, torch.Tensor) for v in d.values()) >= max(1, len(d) // 2)


def _strip(name: str) -> str:
    name = name.replace("_orig_mod.", "")
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def _tensor_infos(sd: dict, notes: list[str]) -> dict[str, TensorInfo]:
    out = {}
    stripped = False
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        n = _strip(k)
        stripped |= n != k
        out[n] = TensorInfo(n, tuple(v.shape), v.dtype, (lambda v=v: v))
    if stripped:
        notes.append("stripped '_orig_mod.' / 'module.' prefixes from tensor names (torch.compile / DDP wrappers)")
    return out


def _optimizers_from(obj: Any) -> list[OptimizerInfo]:
    if obj is None:
        return []
    if isinstance(obj, dict) and "state" in obj and "param_groups" in obj:
        return [OptimizerInfo("optimizer", obj)]
    if isinstance(obj, (list, tuple)):
        return [OptimizerInfo(f"optimizer{i}", o) for i, o in enumerate(obj)
                if isinstance(o, dict) and "param_groups" in o]
    if isinstance(obj, dict):
        return [OptimizerInfo(str(k), o) for k, o in obj.items() if isinstance(o, dict) and "param_groups" in o]
    return []


def _from_torch_obj(path: Path, obj: Any, mmapped: bool) -> CheckpointView:
    notes: list[str] = []
    meta: dict[str, Any] = {}
    if not isinstance(obj, dict):
        raise LoadError(f"{path}: holds a {type(obj).__name__}, not a state dict or a checkpoint dict")
    fmt = "torch"
    if obj.get("format", "").startswith("moe_arch.checkpoint"):
        fmt = "moe_arch"
    model_sd = None
    for k in MODEL_KEYS:
        if _is_state_dict(obj.get(k)):
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
        if _is_state_dict(obj):
            model_sd = obj
            notes.append("a bare state dict (no optimizer state)")
        else:
            raise LoadError(f"{path}: no model state found (looked for a bare state dict and the keys "
                            f"{list(MODEL_KEYS)}; top-level keys: {list(obj)[:10]})")
    for k in ("step", "global_step", "epoch", "tokens_seen", "config", "precision", "param_roles", "buffers", "kind",
              "version", "tokenizer_json", "precision_state"):
        if k in obj:
            meta["step" if k == "global_step" else k] = obj[k]
    if isinstance(meta.get("config"), dict) is False and "config" in meta:
        meta.pop("config")
    view = CheckpointView(path, fmt, _tensor_infos(model_sd, notes), _optimizers_from(optim_obj), meta, notes, mmapped,
                          from_pickle=True)
    return view


# -------------------------------------------------------------------------------------------- safetensors
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise LoadError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        size = path.stat().st_size
        if n > size - 8 or n > 100_000_000:
            raise LoadError(f"{path}: corrupt safetensors header (length {n} in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LoadError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise LoadError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    return header, 8 + n


def _check_entry(path: Path, name: str, info: Any, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    """One header entry validated as the safetensors format defines it: dtype, shape of non-negative ints, and
    data_offsets [begin, end] inside the data section, whose length matches shape x dtype size."""
    def bad(what: str) -> LoadError:
        return LoadError(f"{path}: corrupt safetensors header: tensor {name!r} {what}")

    if not isinstance(info, dict):
        raise bad(f"is a JSON {type(info).__name__}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise bad(f"has no {key!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise bad(f"has dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise bad(f"has shape {shape!r} (must be a list of non-negative integers)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool)
                                                                   for o in offsets)):
        raise bad(f"has data_offsets {offsets!r} (must be [begin, end])")
    lo, hi = offsets
    if not 0 <= lo <= hi:
        raise bad(f"has data_offsets {offsets!r} (must be 0 <= begin <= end)")
    if hi > data_size:
        raise LoadError(f"{path}: truncated safetensors file ({name} ends at byte {hi} of the data section, which "
                        f"has {data_size})")
    dt = _ST_DTYPES.get(dtype)
    if dt is not None:
        numel = 1
        for d in shape:
            numel *= d
        if numel * dt.itemsize != hi - lo:
            raise bad(f"has shape {shape} of {dtype} ({numel * dt.itemsize} bytes) but a byte range of {hi - lo}")
    return dtype, tuple(shape), lo, hi


def _safetensors_infos(path: Path, notes: list[str]) -> tuple[dict[str, TensorInfo], dict]:
    header, base = _read_safetensors_header(path)
    size = path.stat().st_size
    meta = header.pop("__metadata__", {}) or {}
    out = {}
    if not isinstance(meta, dict):
        raise LoadError(f"{path}: corrupt safetensors header (__metadata__ is a {type(meta).__name__})")
    for name, info in header.items():
        st_dtype, shape, lo, hi = _check_entry(path, name, info, size - base)
        dtype = _ST_DTYPES.get(st_dtype)
        if dtype is None:
            notes.append(f"skipped {name}: unsupported dtype {st_dtype}")
            continue

        def get(lo=lo, hi=hi, dtype=dtype, shape=shape, name=name):
            buf = bytearray(hi - lo)
            view = memoryview(buf)
            with open(path, "rb") as f:
                f.seek(base + lo)
                got = 0
                while got < len(buf):
                    n = f.readinto(view[got:])
                    if not n:
                        raise LoadError(f"{path}: truncated safetensors file while reading {name}")
                    got += n
            if not buf:
                return torch.empty(shape, dtype=dtype)
            return torch.frombuffer(buf, dtype=dtype).view(shape)

        n = _strip(name)
        out[n] = TensorInfo(n, shape, dtype, get)
    return out, meta


def _load_safetensors(paths: list[Path], root: Path) -> CheckpointView:
    notes: list[str] = []
    tensors: dict[str, TensorInfo] = {}
    meta: dict = {}
    for p in paths:
        t, m = _safetensors_infos(p, notes)
        tensors.update(t)
        meta.update(m)
    parsed = {}
    for k in ("step", "epoch", "tokens_seen"):
        if k in meta:
            try:
                parsed[k] = int(meta[k])
            except ValueError:
                pass
    if "config" in meta:
        try:
            parsed["config"] = json.loads(meta["config"])
        except json.JSONDecodeError:
            pass
    notes.append("safetensors holds weights only: no optimizer state, so optimizer and precision-rule analyses "
                 "are limited to what the weights show")
    return CheckpointView(root, "safetensors", tensors, [], parsed, notes)


# -------------------------------------------------------------------------------------------- folders
def _load_hf_trainer(folder: Path, trust_pickle: bool) -> CheckpointView:
    notes: list[str] = []
    shards = sorted(folder.glob("model*.safetensors"))
    if shards:
        view = _load_safetensors(shards, folder)
        view.notes = [n for n in view.notes if not n.startswith("safetensors holds")]
    elif (folder / "adapter_model.safetensors").is_file() or (folder / "adapter_model.bin").is_file():
        # PEFT (LoRA, ...): the checkpoint holds the adapters only; the base model is frozen on purpose and not saved
        st = folder / "adapter_model.safetensors"
        if st.is_file():
            view = _load_safetensors([st], folder)
            view.notes = [n for n in view.notes if not n.startswith("safetensors holds")]
        else:
            obj, mm = _torch_load(folder / "adapter_model.bin", trust_pickle)
            view = CheckpointView(folder, "peft", _tensor_infos(obj, notes), [], {}, notes, mm, from_pickle=True)
        view.notes.append("PEFT adapter checkpoint: the adapters are diagnosed; the base model is frozen on purpose and "
                          "not in the checkpoint (not a finding)")
        view.meta["peft"] = True
    else:
        bins = sorted(folder.glob("pytorch_model*.bin"))
        if not bins:
            raise LoadError(f"{folder}: a Hugging Face Trainer folder without model.safetensors, pytorch_model.bin or "
                            "adapter_model.safetensors")
        tensors: dict[str, TensorInfo] = {}
        mm = True
        for b in bins:
            obj, mm_b = _torch_load(b, trust_pickle)
            mm &= mm_b
            tensors.update(_tensor_infos(obj, notes))
        view = CheckpointView(folder, "hf-trainer", tensors, [], {}, notes, mm, from_pickle=True)
    view.format = "peft" if view.meta.get("peft") else "hf-trainer"
    # Trainer writes optimizer.pt; accelerate's save_state writes optimizer.bin, optimizer_1.bin, ... (torch.save
    # files either way) next to model.safetensors, and scheduler.bin with the schedule's base (peak) lrs.
    opt_paths = [folder / "optimizer.pt"] + sorted(folder.glob("optimizer*.bin"), key=lambda p: (len(p.name), p.name))
    opt_paths = [p for p in opt_paths if p.is_file()]
    if opt_paths and not (folder / "trainer_state.json").is_file() and opt_paths[0].suffix == ".bin":
        view.format = "accelerate"
    for opt_path in opt_paths:
        obj, _ = _torch_load(opt_path, trust_pickle)
        found = _optimizers_from(obj)
        for o in found:
            o.name = opt_path.stem if len(opt_paths) > 1 else o.name
        view.optimizers += found
    if not opt_paths:
        view.notes.append("no optimizer.pt / optimizer.bin in the folder: optimizer analyses skipped")
    for sched_path in (folder / "scheduler.pt", folder / "scheduler.bin"):
        if sched_path.is_file():
            sched, _ = _torch_load(sched_path, trust_pickle)
            if isinstance(sched, dict) and isinstance(sched.get("base_lrs"), list):
                view.meta["scheduled_peak_lrs"] = [float(x) for x in sched["base_lrs"]]
                if view.format == "accelerate":  # no trainer_state.json: the scheduler counts the steps
                    view.meta.setdefault("step", sched.get("last_epoch"))
    state = folder / "trainer_state.json"
    if state.is_file():
        ts = json.loads(state.read_text())
        view.meta["step"] = ts.get("global_step")
        view.meta["epoch"] = ts.get("epoch")
        hist = [h for h in ts.get("log_history", []) if "learning_rate" in h]
        if hist:
            view.meta["last_logged_lr"] = hist[-1]["learning_rate"]
    cfg = folder / "config.json"
    if cfg.is_file():
        view.meta["hf_config"] = json.loads(cfg.read_text())
        _hf_layout(view, view.meta["hf_config"])
    return view


def _hf_meta_model(config: dict):
    """The model class named in config.json, built on the meta device (no weights, no code from the checkpoint:
    only classes that ship with transformers); None when transformers is absent or cannot build it."""
    try:
        import transformers
    except ImportError:
        return None
    try:
        archs = config.get("architectures") or []
        klass = getattr(transformers, archs[0], None) if archs else None
        if klass is None:
            return None
        conf = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "model_type"},
                                                 model_type=config["model_type"])
        with torch.device("meta"):
            return klass(conf)
    except Exception:  # an architecture this transformers version cannot build
        return None


def _hf_layout(view: CheckpointView, config: dict) -> None:
    """Give the optimizer mapping the parameters as the model registered them.

    safetensors sorts tensor names, and the optimizer lists parameters in registration order, so the order comes
    from the model built on the meta device. Where transformers converts weights between the saved and the
    in-memory layout (v5 MoE models: per-expert ``experts.N.w1`` saved, stacked ``experts.gate_up_proj`` trained),
    the optimizer's state is in the in-memory layout; transformers' own save-time conversion
    (``revert_weight_conversion``, what ``save_pretrained`` applies) carries each state tensor to the saved names.
    """
    model = _hf_meta_model(config)
    if model is None:
        view.notes.append("Hugging Face checkpoint: the model's parameter order could not be rebuilt from config.json "
                          "(is transformers installed, and does it know this architecture?); safetensors sorts names, "
                          "so optimizer parameters may stay unmapped")
        return
    layout = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    if all(n in view.tensors and tuple(view.tensors[n].shape) == shp for n, shp in layout):
        rank = {n: i for i, (n, _) in enumerate(layout)}
        view.tensors = dict(sorted(view.tensors.items(), key=lambda kv: rank.get(kv[0], len(rank))))
        view.notes.append("Hugging Face checkpoint: parameter order rebuilt from config.json on the meta device; "
                          "optimizer parameters mapped to names by that order and their state shapes")
        return
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        view.notes.append("Hugging Face checkpoint: the model's in-memory parameters differ from the saved tensors and "
                          "this transformers version has no revert_weight_conversion; the optimizer may stay unmapped")
        return

    def to_saved(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return revert_weight_conversion(model, sd)

    view.param_layout, view.to_saved = layout, to_saved
    view.notes.append("Hugging Face checkpoint: the model trains some tensors in another layout than it saves "
                      f"({sum(1 for n, _ in layout if n not in view.tensors)} parameters differ); optimizer state "
                      "mapped to the in-memory parameters by order and shape, then to the saved tensors with "
                      "transformers' own save-time conversion")


def _load_dcp(folder: Path) -> CheckpointView:
    from moe_arch.parallel.dcp import load_dcp_view

    return load_dcp_view(folder)


def resolve_checkpoint_path(spec: str | Path) -> Path:
    p = Path(spec)
    if not p.exists():
        raise LoadError(f"{p}: no such file or folder")
    if p.is_dir():
        if (p / ".metadata").is_file() or (p / "trainer_state.json").is_file() or list(p.glob("model*.safetensors")) \
                or list(p.glob("pytorch_model*.bin")) or list(p.glob("adapter_model.*")):
            return p
        # A run folder or its checkpoints/ folder: the newest checkpoint.
        base = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        latest = base / "latest.txt"
        if latest.is_file() and (base / latest.read_text().strip()).exists():
            return base / latest.read_text().strip()
        cands = sorted(list(base.glob("*.pt")) + list(base.glob("*.safetensors")), key=lambda q: q.stat().st_mtime)
        if not cands:
            raise LoadError(f"{p}: a folder with no checkpoint in it (no .pt, .safetensors, trainer_state.json or "
                            "distributed-checkpoint .metadata)")
        return cands[-1]
    return p


def open_checkpoint(spec: str | Path, trust_pickle: bool = False) -> CheckpointView:
    """The checkpoint as a lazy view, or a one-line LoadError naming the file. Malformed input of any kind (a
    mutated header, a wrong type where a mapping belongs, a missing shard) ends in a LoadError, never another
    exception: the parsers below validate what they can name, and this boundary turns the rest into one line."""
    try:
        return _open_checkpoint(spec, trust_pickle)
    except LoadError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError, EOFError,
            OverflowError, struct.error, MemoryError, *_dcp_errors()) as e:
        raise LoadError(_corrupt(Path(spec), e)) from None


def _open_checkpoint(spec: str | Path, trust_pickle: bool = False) -> CheckpointView:
    path = resolve_checkpoint_path(spec)
    if path.is_dir():
        if (path / ".metadata").is_file():
            return _load_dcp(path)
        return _load_hf_trainer(path, trust_pickle)
    if path.stat().st_size == 0:
        raise LoadError(f"{path}: empty file (0 bytes); the save was interrupted or the file was truncated")
    if path.suffix == ".safetensors":
        return _load_safetensors([path], path)
    if path.name.endswith(".safetensors.index.json"):
        try:
            idx = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LoadError(f"{path}: corrupt safetensors index (not JSON)") from None
        if not isinstance(idx, dict) or not isinstance(idx.get("weight_map", {}), dict):
            raise LoadError(f"{path}: corrupt safetensors index (no weight_map object)")
        shards = sorted({path.parent / str(f) for f in idx.get("weight_map", {}).values()})
        missing = [s for s in shards if not s.is_file()]
        if missing:
            raise LoadError(f"{path}: shard {missing[0].name} is missing (the index names {len(shards)} shards)")
        return _load_safetensors(shards, path)
    obj, mmapped = _torch_load(path, trust_pickle)
    return _from_torch_obj(path, obj, mmapped)
