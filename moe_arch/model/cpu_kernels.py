"""The CPU kernels (``kernels/*.c``: the selective scan, the head's cross-entropy rows), built on first use into
one shared library and loaded with ctypes.

Why built here and not at install time: the kernels are plain C with no Python or PyTorch headers, compiled for
the instruction set of the machine that runs it, and a wheel cannot know that machine. The shared library is
cached under ``$MOE_ARCH_KERNEL_CACHE`` (default ``~/.cache/moe_arch/kernels``), keyed by the source, the compiler
and its flags, and written atomically (temp file + rename), so concurrent processes (torchrun ranks, test
workers) are safe.

Instruction sets are explicit, never ``-march=native`` (which compiles different code on every CPU): ``ISAS``
names each SIMD path the kernels ship with its exact flags. ``avx512`` and ``avx2`` contract a * b + c into FMA
(``-ffp-contract=fast``) and ``avx512`` has its own exp (vscalefps); ``portable`` (x86-64 baseline SSE2, or the
compiler's default elsewhere) has neither, so the paths differ in the last bits of a result, within the float32
error bounds the tests derive (tests/numerics.py). ``MOE_ARCH_KERNEL_ISA=auto|avx512|avx2|portable`` picks one
(auto: the widest this CPU supports); ``use_isa`` switches in-process, so one machine tests every path it can run.

No silent fallback to a different model: when no C compiler is found or the build fails, one warning names the
reason, the Mamba layers run the chunked PyTorch scan (``mamba.py``), the same function, 4.7-6x slower per Mamba
layer, and the fused head does its softmax in PyTorch ops (``losses.py``) (bench/RESULTS.md).
``MOE_ARCH_NO_KERNELS=1`` chooses those paths on purpose.

Threads: when PyTorch's parallel backend is GNU OpenMP (the Linux wheels), the library is built with ``-fopenmp``
and binds to the ``libgomp.so.1`` PyTorch already loaded, so the work items (batch row x block of 16 channels) run
on PyTorch's own intra-op threads; this is checked after loading (one OpenMP runtime mapped, else the build without
OpenMP is used). Otherwise ctypes releases the GIL while a foreign function runs and the items are split over a
small thread pool, ``torch.get_num_threads()`` wide. The pool is the slower choice next to OpenMP: PyTorch's workers
spin for a while after each parallel op and take cores from the pool's threads (1.8x on the backward, 2 cores).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from moe_arch.utils import atomic_path

KERNEL_DIR = Path(__file__).with_name("kernels")
SOURCES = [KERNEL_DIR / "selective_scan_cpu.c", KERNEL_DIR / "cross_entropy_cpu.c", KERNEL_DIR / "fused_cpu.c"]
HEADERS = [KERNEL_DIR / "simd.h"]
LANES = 16  # W in the C source: channels per work item
MAX_STATE = 64  # MAX_N in the C source
# -ffp-contract=fast: ISO C mode (-std=c11) would otherwise forbid fusing a * b + c into one FMA (1.4x on the scan)
FLAGS = ["-O3", "-std=c11", "-ffp-contract=fast", "-shared", "-fPIC", "-Wno-psabi", f"-I{KERNEL_DIR}"]

_lock = threading.RLock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> Path:
    root = os.environ.get("MOE_ARCH_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moe_arch" / "kernels"


def _compile(cc: str, flags: list[str], out: Path) -> None:
    with atomic_path(out) as tmp:
        proc = subprocess.run(
            [cc, *flags, *map(str, SOURCES), "-o", str(tmp), "-lm"], capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} exited with {proc.returncode}: {proc.stderr.strip()[-500:]}")


def _openmp_runtimes() -> set[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            return {line.split()[-1] for line in f if any(k in line for k in ("libgomp", "libiomp", "libomp"))}
    except OSError:
        return set()


def _torch_uses_gomp() -> bool:
    """PyTorch runs its intra-op parallelism on GNU OpenMP, and that runtime is the only one loaded."""
    runtimes = _openmp_runtimes()
    return (
        "parallel backend: OpenMP" in torch.__config__.parallel_info()
        and len(runtimes) == 1
        and "libgomp" in next(iter(runtimes))
    )


def _sig(lib: ctypes.CDLL, name: str, argtypes: list) -> None:
    fn = getattr(lib, name)
    fn.argtypes = argtypes
    fn.restype = None


# Each SIMD path: its compiler flags and the CPU features (as /proc/cpuinfo spells them) it needs. The flags are
# the x86-64 micro-architecture levels, so no CPU-specific tuning (-march=native) changes the generated code.
ISAS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "avx512": (
        ["-march=x86-64-v4"],
        ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma", "bmi1", "bmi2", "movbe"),
    ),
    "avx2": (["-march=x86-64-v3"], ("avx2", "fma", "bmi1", "bmi2", "f16c", "movbe")),
    "portable": (["-march=x86-64"] if platform.machine() in ("x86_64", "AMD64") else [], ()),
}


def supported_isas() -> list[str]:
    """The SIMD paths this CPU can run, widest first (``portable`` always)."""
    flags = set(_cpu_flags().split())
    return [
        name
        for name, (_, needs) in ISAS.items()
        if name == "portable" or (platform.machine() in ("x86_64", "AMD64") and set(needs) <= flags)
    ]


class KernelISAError(ValueError):
    """``MOE_ARCH_KERNEL_ISA`` names a path that does not exist or that this CPU cannot run."""


def _isa_candidates() -> list[str]:
    """The paths to try, in order: for auto every path this CPU runs, widest first (an older compiler may not
    know -march=x86-64-v4); for an explicit ``$MOE_ARCH_KERNEL_ISA`` that one, which must exist and run here."""
    want = os.environ.get("MOE_ARCH_KERNEL_ISA", "auto").strip().lower() or "auto"
    supported = supported_isas()
    if want == "auto":
        return supported
    if want not in ISAS:
        raise KernelISAError(f"MOE_ARCH_KERNEL_ISA={want!r}: must be one of auto, {', '.join(ISAS)}")
    if want not in supported:
        raise KernelISAError(
            f"MOE_ARCH_KERNEL_ISA={want}: this CPU lacks "
            f"{', '.join(sorted(set(ISAS[want][1]) - set(_cpu_flags().split())))}; "
            f"it supports {', '.join(supported)} (or unset it for auto)"
        )
    return [want]


def requested_isa() -> str:
    """``$MOE_ARCH_KERNEL_ISA`` resolved: auto is the widest path this CPU runs; an explicit name must be one this
    CPU runs (else a one-line error)."""
    return _isa_candidates()[0]


def _declare(lib: ctypes.CDLL) -> None:
    """Argument types of every entry point (ctypes would otherwise pass 64-bit integers as C ints)."""
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.moe_arch_scan_fwd.argtypes = [ptr] * 10 + [i64] * 6
    lib.moe_arch_scan_fwd.restype = None
    lib.moe_arch_scan_bwd.argtypes = [ptr] * 16 + [i64] * 6 + [ptr]
    lib.moe_arch_scan_bwd.restype = None
    lib.moe_arch_xent_rows.argtypes = [ptr] * 3 + [i64] * 3
    lib.moe_arch_xent_rows.restype = None
    f32 = ctypes.c_float
    _sig(lib, "moe_arch_rmsnorm_fwd", [ptr] * 4 + [i64, f32, i64, i64])
    _sig(lib, "moe_arch_rmsnorm_bwd", [ptr] * 6 + [i64] * 3)
    _sig(lib, "moe_arch_swiglu_fwd", [ptr] * 3 + [i64] * 2)
    _sig(lib, "moe_arch_swiglu_bwd", [ptr] * 5 + [i64] * 2)
    _sig(lib, "moe_arch_conv_silu_fwd", [ptr, i64, ptr, ptr, ptr] + [i64] * 5)
    _sig(lib, "moe_arch_conv_silu_bwd", [ptr, i64] + [ptr] * 5 + [i64] + [ptr] * 2 + [i64] * 5 + [c_int])
    _sig(lib, "moe_arch_rope", [ptr] + [i64] * 3 + [ptr] * 2 + [i64, ptr] + [i64] * 6 + [c_int] + [i64] * 2)
    lib.moe_arch_openmp.restype = c_int
    if lib.moe_arch_openmp():
        _sig(lib, "moe_arch_rmsnorm_fwd_par", [ptr] * 4 + [i64, f32, i64, c_int])
        _sig(lib, "moe_arch_rmsnorm_bwd_par", [ptr] * 6 + [i64, i64, c_int])
        _sig(lib, "moe_arch_swiglu_fwd_par", [ptr] * 3 + [i64, c_int])
        _sig(lib, "moe_arch_swiglu_bwd_par", [ptr] * 5 + [i64, c_int])
        _sig(lib, "moe_arch_conv_silu_fwd_par", [ptr, i64, ptr, ptr, ptr] + [i64] * 4 + [c_int])
        _sig(lib, "moe_arch_rope_par", [ptr] + [i64] * 3 + [ptr] * 2 + [i64, ptr] + [i64] * 6 + [c_int, i64, c_int])
        _sig(lib, "moe_arch_conv_silu_bwd_par", [ptr, i64] + [ptr] * 5 + [i64] + [ptr] * 2 + [i64] * 4 + [c_int])
        lib.moe_arch_xent_rows_par.argtypes = [ptr] * 3 + [i64] * 2 + [c_int]
        lib.moe_arch_xent_rows_par.restype = None
        lib.moe_arch_scan_fwd_par.argtypes = [ptr] * 10 + [i64] * 5 + [c_int]
        lib.moe_arch_scan_fwd_par.restype = None
        lib.moe_arch_scan_bwd_par.argtypes = [ptr] * 16 + [i64] * 5 + [c_int, ptr, i64]
        lib.moe_arch_scan_bwd_par.restype = None


def _build(isa: str) -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC or install gcc/clang)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.split("\n", 1)[0]
    source = b"\0".join(p.read_bytes() for p in SOURCES + HEADERS)
    last_err = None
    before = _openmp_runtimes()
    for openmp in [["-fopenmp"], []] if _torch_uses_gomp() else [[]]:
        flags = FLAGS + ISAS[isa][0] + openmp
        key = hashlib.sha256(
            b"\0".join([source, version.encode(), " ".join(flags).encode(), platform.machine().encode()])
        ).hexdigest()[:16]
        path = cache_dir() / f"moe_arch_cpu-{isa}-{key}.so"
        try:
            if not path.exists():
                _compile(cc, flags, path)
            lib = ctypes.CDLL(str(path))
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            last_err = e
            continue
        if openmp and _openmp_runtimes() != before:
            # the compiler linked an OpenMP runtime other than PyTorch's: two thread pools would fight for cores
            last_err = RuntimeError(f"{cc} -fopenmp loaded a second OpenMP runtime")
            continue
        _declare(lib)
        lib.moe_arch_isa = isa
        return lib
    raise RuntimeError(str(last_err))


_built: dict[str, ctypes.CDLL] = {}


def build(isa: str) -> ctypes.CDLL:
    """The library compiled for one SIMD path (cached per process); raises when it cannot be built."""
    with _lock:
        if isa not in _built:
            _built[isa] = _build(isa)
        return _built[isa]


@contextlib.contextmanager
def use_isa(isa: str):
    """Run the kernels of one SIMD path inside the block (tests: every path this CPU supports)."""
    global _lib, _error
    if isa not in supported_isas():
        raise ValueError(f"this CPU cannot run the {isa} kernels (it supports {', '.join(supported_isas())})")
    saved = _lib, _error
    _lib, _error = build(isa), None
    try:
        yield _lib
    finally:
        _lib, _error = saved


def isa() -> str | None:
    """The SIMD path of the loaded library (None without one)."""
    lib = load()
    return None if lib is None else lib.moe_arch_isa


def load() -> ctypes.CDLL | None:
    """The kernel library, or None (with one warning saying why) when it cannot be built."""
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is None and _error is None:
            if os.environ.get("MOE_ARCH_NO_KERNELS", "") not in ("", "0"):
                _error = "disabled by MOE_ARCH_NO_KERNELS"
                return None
            errors = []
            for name in _isa_candidates():
                try:
                    _lib = build(name)
                    break
                except Exception as e:  # noqa: BLE001 - any build failure means the documented slower path
                    errors.append(f"{name}: {type(e).__name__}: {e}")
            if _lib is None:
                _error = "; ".join(errors)
                warnings.warn(
                    f"moe_arch: the CPU kernels could not be built ({_error}); Mamba layers use the "
                    "chunked PyTorch scan and the output heads PyTorch's softmax instead (same results, "
                    "slower: several times for Mamba layers). Install a C compiler or set CC to enable "
                    "them.",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _lib


def available() -> bool:
    return load() is not None


def supports(*tensors: torch.Tensor, d_state: int) -> bool:
    return (
        d_state <= MAX_STATE
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and available()
    )


def _threads(n_items: int, work_per_item: int) -> int:
    """Threads for a call: torch's intra-op count, but one for calls too small to amortise the hand-off."""
    return max(1, min(torch.get_num_threads(), n_items, (n_items * work_per_item) // 200_000 or 1))


def _run(fn, n_items: int, threads: int, args_for_range) -> None:
    """Call fn over [0, n_items) split into ``threads`` contiguous ranges, each on its own thread."""
    global _pool, _pool_size
    if threads == 1:
        fn(*args_for_range(0, n_items, 0))
        return
    with _lock:
        if _pool_size < threads:
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moe_arch_kernels")
            _pool_size = threads
    bounds = [round(i * n_items / threads) for i in range(threads + 1)]
    futures = [_pool.submit(fn, *args_for_range(bounds[i], bounds[i + 1], i)) for i in range(threads)]
    for f in futures:
        f.result()


def _p(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def scan_forward(u, dt, AT, Bm, Cm, Dskip, z, h0):
    """u, dt [B, L, D]; AT [N, D]; Bm, Cm [B, L, N]; Dskip [D] or None; z [B, L, D] or None; h0 [B, D, N] or None
    (all contiguous float32 CPU) -> out [B, L, D] = (C.h + Dskip * u) * silu(z), h_last [B, D, N]."""
    lib = load()
    B, L, D = u.shape
    N = AT.shape[0]
    out = torch.empty_like(u)
    h_last = u.new_empty(B, D, N)
    n_items = B * ((D + LANES - 1) // LANES)
    threads = _threads(n_items, L * N * LANES)
    args = (_p(u), _p(dt), _p(AT), _p(Bm), _p(Cm), _p(Dskip), _p(z), _p(h0), _p(out), _p(h_last), B, L, D, N)
    if _omp(lib):
        lib.moe_arch_scan_fwd_par(*args, n_items, threads)
    else:
        _run(lib.moe_arch_scan_fwd, n_items, threads, lambda i0, i1, _: (*args, i0, i1))
    return out, h_last


def scan_backward(u, dt, AT, Bm, Cm, Dskip, z, h0, gout):
    """Gradients (du, d_dt, dAT [N, D], dB, dC, dD or None, dz or None) of sum(out * gout), the states
    recomputed block by block."""
    lib = load()
    B, L, D = u.shape
    N = AT.shape[0]
    du, ddt = torch.empty_like(u), torch.empty_like(u)
    dz = torch.empty_like(u) if z is not None else None
    n_items = B * ((D + LANES - 1) // LANES)
    threads = _threads(n_items, 3 * L * N * LANES)
    # Per-thread accumulators for the sums over channels (dB, dC) and over the batch (dAT, dD), added up below.
    dAT = AT.new_zeros(threads, N, D)
    dD = u.new_zeros(threads, D)
    dB = Bm.new_zeros(threads, B, L, N)
    dC = Cm.new_zeros(threads, B, L, N)
    per_thread = (4 * L + 1) * N * LANES  # floats; a multiple of 16, so every thread's part stays 64-byte aligned
    scratch = u.new_empty(threads * per_thread + LANES)  # + LANES: room to align the start to 64 bytes
    base = scratch.data_ptr() + (-scratch.data_ptr()) % 64
    inputs = (_p(u), _p(dt), _p(AT), _p(Bm), _p(Cm), _p(Dskip), _p(z), _p(h0), _p(gout), _p(du), _p(ddt))
    if _omp(lib):
        lib.moe_arch_scan_bwd_par(
            *inputs, _p(dAT), _p(dB), _p(dC), _p(dD), _p(dz), B, L, D, N, n_items, threads, base, per_thread
        )
    else:
        _run(
            lib.moe_arch_scan_bwd,
            n_items,
            threads,
            lambda i0, i1, k: (
                *inputs,
                _p(dAT[k]),
                _p(dB[k]),
                _p(dC[k]),
                _p(dD[k]),
                _p(dz),
                B,
                L,
                D,
                N,
                i0,
                i1,
                base + 4 * k * per_thread,
            ),
        )
    return du, ddt, dAT.sum(0), dB.sum(0), dC.sum(0), (dD.sum(0) if Dskip is not None else None), dz


def xent_rows_(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """In place: logits [R, V] (contiguous float32 CPU) become softmax - onehot(target); returns the float64 losses
    [R] = logsumexp(row) - row[target]. Targets must be in [0, V) (checked by the caller)."""
    lib = load()
    R, V = logits.shape
    loss = torch.empty(R, dtype=torch.float64)
    threads = _threads(R, V * 8)
    if _omp(lib):
        lib.moe_arch_xent_rows_par(_p(logits), _p(target), _p(loss), V, R, threads)
    else:
        _run(lib.moe_arch_xent_rows, R, threads, lambda r0, r1, _: (_p(logits), _p(target), _p(loss), V, r0, r1))
    return loss


def _omp(lib) -> bool:
    return bool(lib.moe_arch_openmp())


def rmsnorm_forward(x: torch.Tensor, w: torch.Tensor, eps: float):
    """x [R, D], w [D] (contiguous float32 CPU) -> y [R, D], rstd [R]."""
    lib = load()
    R, D = x.shape
    y, rstd = torch.empty_like(x), x.new_empty(R)
    threads = _threads(R, D * 4)
    if _omp(lib):
        lib.moe_arch_rmsnorm_fwd_par(_p(x), _p(w), _p(y), _p(rstd), D, eps, R, threads)
    else:
        _run(lib.moe_arch_rmsnorm_fwd, R, threads, lambda r0, r1, _: (_p(x), _p(w), _p(y), _p(rstd), D, eps, r0, r1))
    return y, rstd


def rmsnorm_backward(x, w, rstd, dy):
    """-> dx [R, D], dw [D]."""
    lib = load()
    R, D = x.shape
    dx = torch.empty_like(x)
    threads = _threads(R, D * 6)
    dw = x.new_zeros(threads, D)
    if _omp(lib):
        lib.moe_arch_rmsnorm_bwd_par(_p(x), _p(w), _p(rstd), _p(dy), _p(dx), _p(dw), D, R, threads)
    else:
        _run(
            lib.moe_arch_rmsnorm_bwd,
            R,
            threads,
            lambda r0, r1, k: (_p(x), _p(w), _p(rstd), _p(dy), _p(dx), _p(dw[k]), D, r0, r1),
        )
    return dx, dw.sum(0)


def swiglu_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for contiguous float32 CPU tensors of one shape."""
    lib = load()
    y = torch.empty_like(a)
    n = a.numel()
    threads = _threads(max(1, n // LANES), LANES * 8)
    if _omp(lib):
        lib.moe_arch_swiglu_fwd_par(_p(a), _p(b), _p(y), n, threads)
    else:
        _run(lib.moe_arch_swiglu_fwd, n, threads, lambda i0, i1, _: (_p(a), _p(b), _p(y), i0, i1))
    return y


def swiglu_backward(a, b, dy):
    lib = load()
    da, db = torch.empty_like(a), torch.empty_like(b)
    n = a.numel()
    threads = _threads(max(1, n // LANES), LANES * 12)
    if _omp(lib):
        lib.moe_arch_swiglu_bwd_par(_p(a), _p(b), _p(dy), _p(da), _p(db), n, threads)
    else:
        _run(lib.moe_arch_swiglu_bwd, n, threads, lambda i0, i1, _: (_p(a), _p(b), _p(dy), _p(da), _p(db), i0, i1))
    return da, db


def conv_silu_forward(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """silu(causal depthwise conv): x [B, T, D] float32 CPU with unit last stride and rows at a common stride (a
    slice of a wider tensor is fine), w [K, D], bias [D] contiguous -> [B, T, D] contiguous."""
    lib = load()
    B, T, D = x.shape
    K = w.shape[0]
    y = x.new_empty(B, T, D)
    R = B * T
    threads = _threads(R, D * K * 2)
    sx = x.stride(1)
    if _omp(lib):
        lib.moe_arch_conv_silu_fwd_par(_p(x), sx, _p(w), _p(bias), _p(y), T, D, K, R, threads)
    else:
        _run(
            lib.moe_arch_conv_silu_fwd,
            R,
            threads,
            lambda r0, r1, _: (_p(x), sx, _p(w), _p(bias), _p(y), T, D, K, r0, r1),
        )
    return y


def conv_silu_backward(x, w, bias, dy):
    """-> dx [B, T, D] contiguous, dw [K, D], dbias [D]."""
    lib = load()
    B, T, D = x.shape
    K = w.shape[0]
    R = B * T
    threads = _threads(R, D * K * 4)
    dx, dpre = x.new_empty(B, T, D), x.new_empty(B, T, D)
    dw, dbias = x.new_zeros(threads, K, D), x.new_zeros(threads, D)
    sx = x.stride(1)
    if _omp(lib):
        lib.moe_arch_conv_silu_bwd_par(
            _p(x), sx, _p(w), _p(bias), _p(dy), _p(dpre), _p(dx), D, _p(dw), _p(dbias), T, D, K, R, threads
        )
    else:
        for pass_ in (1, 2):  # every thread's pass 1 before any pass 2: dx reads dpre of later rows
            _run(
                lib.moe_arch_conv_silu_bwd,
                R,
                threads,
                lambda r0, r1, k: (
                    _p(x),
                    sx,
                    _p(w),
                    _p(bias),
                    _p(dy),
                    _p(dpre),
                    _p(dx),
                    D,
                    _p(dw[k]),
                    _p(dbias[k]),
                    T,
                    D,
                    K,
                    r0,
                    r1,
                    pass_,
                ),
            )
    return dx, dw.sum(0), dbias.sum(0)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """Rotary embedding of x [B, H, T, D] (float32 CPU, unit stride on D, any other strides) with cos/sin [T, D] or
    [B, T, D] (contiguous); ``backward`` applies the transposed rotation (the gradient). The result has x's shape,
    laid out [B, T, H, D] in memory (a transpose away from the QKV projection's layout)."""
    lib = load()
    B, H, T, D = x.shape
    y = x.new_empty(B, T, H, D).transpose(1, 2)
    cb = cos.stride(0) if cos.dim() == 3 else 0
    R = B * T
    threads = _threads(R, H * D * 4)
    args = (
        _p(x),
        x.stride(0),
        x.stride(1),
        x.stride(2),
        _p(cos),
        _p(sin),
        cb,
        _p(y),
        y.stride(0),
        y.stride(1),
        y.stride(2),
        H,
        T,
        D,
        int(backward),
    )
    if _omp(lib):
        lib.moe_arch_rope_par(*args, R, threads)
    else:
        _run(lib.moe_arch_rope, R, threads, lambda r0, r1, _: (*args, r0, r1))
    return y
