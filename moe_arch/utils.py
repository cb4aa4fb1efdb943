"""Small shared helpers: atomic file writes, device selection, number formatting."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success it is fsynced and renamed onto ``path``.

    A crash at any point leaves ``path`` as it was before (the rename is atomic on POSIX), and at worst a
    stray ``.tmp`` file that the next save of the same name cleans up.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(path: str | Path, writer: Callable[[Path], None]) -> None:
    with atomic_path(path) as tmp:
        writer(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def clean_stale_temps(folder: str | Path) -> None:
    """Remove ``.NAME.*.tmp`` files a killed process left behind."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc <malloc.h>
_MALLOC_TUNED = False


def tune_cpu_malloc(cache_bytes: int = 1 << 30) -> bool:
    """Make glibc malloc behave like a caching allocator for the lifetime of this process.

    A CPU training step allocates and frees the same multi-MB activations every step. By default glibc serves
    blocks above its (dynamic, 128 KiB - 32 MiB) mmap threshold with fresh ``mmap`` calls and unmaps them on
    free, and trims the heap top above 128 KiB, so every step page-faults its working set back in: on the tiny
    preset that is ~20% of the step in kernel time (bench/RESULTS.md). Raising the mmap and trim thresholds keeps
    freed memory in the heap for reuse; the price is that the process keeps its peak footprint, as PyTorch's CUDA
    caching allocator does. The same effect as ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` in the
    environment or an LD_PRELOADed jemalloc/tcmalloc (PyTorch's CPU tuning guide), without needing either.
    Returns whether the settings took effect (False on non-glibc platforms, where nothing is changed).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        cap = min(cache_bytes, 2**31 - 1)  # mallopt takes an int
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(cap)) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(min(2 * cap, 2**31 - 1))) == 1
              and libc.mallopt(_M_TOP_PAD, ctypes.c_int(min(cap // 4, 256 << 20))) == 1)
    except (OSError, AttributeError):
        return False
    _MALLOC_TUNED = ok
    return ok


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r}: CUDA is not available on this machine; use train.device=cpu")
    return dev


def human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"
