"""Small shared helpers: atomic file writes, output paths checked before the work, the one parser of numbers
given as text, device selection, number formatting."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import math
import os
import platform
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


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
    # mkstemp creates 0600: give the file the permissions any other new file of this process gets
    os.chmod(tmp, 0o666 & ~_umask())
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


class OutputError(Exception):
    """A path a command writes cannot take the output. One line: the path, the flag, the reason and the fix."""


_REASONS = {
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EACCES: "permission denied",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder",
    errno.ENAMETOOLONG: "the name is too long",
}


def os_reason(e: OSError) -> str:
    return _REASONS.get(e.errno, e.strerror or type(e).__name__)


def prove_writable(path: Path) -> None:
    """Create the folder ``path`` if needed and write and remove a probe file in it (OSError when it cannot)."""
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-test-{os.getpid()}"
    probe.write_bytes(b"x")
    probe.unlink()


def _in_the_way(path: Path) -> str | None:
    """Why ``path`` (or an ancestor) cannot be a folder: a component that is a file, or a symbolic link that
    leads nowhere (or loops); None when nothing is in the way."""
    for p in [*reversed(path.parents), path]:
        if p.is_symlink() and not p.exists():
            return f"{p} is a symbolic link that leads nowhere (or loops)"
        if p.exists() and not p.is_dir():
            return f"{p} is a file, not a folder"
    return None


def writable_folder(path: str | Path, what: str, flag: str) -> Path:
    """Create ``path`` if needed and prove it takes a file: called before any long work writes there, so a
    read-only, full or misspelt destination is one line at once instead of a traceback after minutes."""
    path = Path(path)
    blocker = _in_the_way(path)
    if blocker is not None:
        raise OutputError(f"{flag} {path}: {blocker}; choose a folder for the {what}")
    try:
        prove_writable(path)
    except OSError as e:
        raise OutputError(
            f"{flag} {path}: cannot write the {what} there ({os_reason(e)}); choose another {flag}"
        ) from None
    return path


def writable_file(path: str | Path, what: str, flag: str, example: str = "out.json") -> Path:
    """``path`` can become a file: not a folder (or a name ending in a separator), and its folder takes files."""
    text = os.fspath(path)
    path = Path(path)
    if path.is_dir() or text.endswith((os.sep, "/")):
        raise OutputError(
            f"{flag} {text}: is a folder, not a file name for the {what}; give a file, e.g. {path / example}"
        )
    blocker = _in_the_way(path.parent)
    if blocker is not None:
        raise OutputError(f"{flag} {text}: {blocker}; choose another path for the {what}")
    writable_folder(path.parent, what, flag)
    return path


def write_output(path: str | Path, text: str, what: str, flag: str) -> Path:
    """Write a command's output file atomically; a failed write (a full disk, a folder that went read-only)
    is one line that leaves any earlier file of that name whole."""
    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise OutputError(
            f"{flag} {path}: the {what} could not be written ({os_reason(e)}); any earlier file "
            f"there is unchanged. Free space or choose another {flag}"
        ) from None
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# Numbers given as text: command-line flags, sizes. Python's float() takes "nan", "inf" and "1e999" (= inf)
# without complaint, and every comparison with nan is False, so a range check such as ``v <= 0`` lets nan
# through into arithmetic that prints nonsense. Every number parsed from text goes through here.


class NumberError(ValueError):
    """A number given as text that is not one (or not finite); ``reason`` is the message without the name."""

    def __init__(self, what: str, text, reason: str):
        super().__init__(f"{what} {text!r}: {reason}")
        self.reason = reason


def parse_number(text: str, what: str, integer: bool = False) -> float | int:
    """A finite float (or an int, with ``integer``) from text; :class:`NumberError` naming ``what`` otherwise."""
    s = str(text).strip().replace("_", "")
    if integer:
        try:
            return int(s)
        except ValueError:
            raise NumberError(what, text, "expected an integer") from None
    try:
        value = float(s)
    except (ValueError, OverflowError):
        raise NumberError(what, text, "expected a number") from None
    if not math.isfinite(value):
        raise NumberError(what, text, "must be a finite number (not nan or inf)")
    return value


SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str, what: str) -> int:
    """Bytes from ``500MB``, ``5GB``, ``1.5GiB`` or a plain number of bytes (decimal KB/MB/GB/TB, as
    huggingface_hub reads them; binary KiB/MiB/GiB/TiB); ValueError naming ``what`` otherwise."""
    m = re.fullmatch(r"\s*([0-9.eE+_-]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in SIZE_UNITS:
        raise ValueError(
            f"{what} {text!r}: expected a size such as 500MB, 5GB or 2GiB (units: B, KB, MB, GB, TB, "
            "KiB, MiB, GiB, TiB)"
        )
    n = parse_number(m.group(1), what) * SIZE_UNITS[unit]
    if not 1 <= n < 2**63:
        raise ValueError(f"{what} {text!r}: must be at least 1 byte")
    return int(n)


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
        ok = (
            libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(cap)) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(min(2 * cap, 2**31 - 1))) == 1
            and libc.mallopt(_M_TOP_PAD, ctypes.c_int(min(cap // 4, 256 << 20))) == 1
        )
    except (OSError, AttributeError):
        return False
    _MALLOC_TUNED = ok
    return ok


class DeviceError(ValueError):
    """A device name that is not one, or a device this machine does not have: one line naming the flag."""


def resolve_device(name: str | torch.device, flag: str = "train.device") -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a device this machine has. torch.device takes many more
    names (and fails late, deep in a layer's ``.to()``, with an AssertionError when CUDA is missing), so the
    name is checked here, once, for every command that takes one; a ``torch.device`` was resolved already (the
    command line resolves ``--device`` before the library runs) and is returned as it is."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or not re.fullmatch(r"cpu|cuda(:[0-9]+)?", name):
        raise DeviceError(f"{flag}={name!r}: not a device; allowed: auto, cpu, cuda, cuda:N")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{flag}={name!r}: CUDA is not available on this machine; use {flag}=cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"{flag}={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
            )
    return dev


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (through links and relative spellings): an output written over an
    input would destroy the input before (or while) it is read."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def refuse_overwriting_inputs(out: str | Path, inputs: dict[str, str | Path | None], flag: str, what: str) -> None:
    """OutputError when the output path ``out`` is one of the command's input files (``{description: path}``)."""
    for name, path in inputs.items():
        if path and same_file(out, path):
            raise OutputError(
                f"{flag} {out}: is the {name} this command reads; writing the {what} there would "
                f"destroy it: choose another {flag}"
            )


def human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"
