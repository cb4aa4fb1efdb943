"""``.safetensors`` files, single or sharded with a ``.safetensors.index.json``: the header is validated entry by
entry as the format defines it, and each tensor is read on demand with one positioned read (weights only)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from moe_arch.checkpoint.readers.base import CheckpointView, LoadError, TensorInfo, strip_prefixes

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


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
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"has shape {shape!r} (must be a list of non-negative integers)")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise bad(f"has data_offsets {offsets!r} (must be [begin, end])")
    lo, hi = offsets
    if not 0 <= lo <= hi:
        raise bad(f"has data_offsets {offsets!r} (must be 0 <= begin <= end)")
    if hi > data_size:
        raise LoadError(
            f"{path}: truncated safetensors file ({name} ends at byte {hi} of the data section, which has {data_size})"
        )
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

        n = strip_prefixes(name)
        out[n] = TensorInfo(n, shape, dtype, get)
    return out, meta


def read_safetensors(paths: list[Path], root: Path) -> CheckpointView:
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
    notes.append(
        "safetensors holds weights only: no optimizer state, so optimizer and precision-rule analyses "
        "are limited to what the weights show"
    )
    return CheckpointView(root, "safetensors", tensors, [], parsed, notes)


def read_safetensors_index(path: Path) -> CheckpointView:
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
    return read_safetensors(shards, path)
