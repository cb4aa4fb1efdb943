"""Timing helpers shared by the benchmarks: every number is measured in the same run as what it is compared to."""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fwd_bwd(module_call, x: torch.Tensor, grad: torch.Tensor | None = None):
    """A no-argument callable running module_call(x) forward and backward (gradient ``grad``, default ones)."""

    def run():
        x.grad = None
        y = module_call(x)
        y.backward(torch.ones_like(y) if grad is None else grad)

    return run


def timeit(fn, warmup: int = 2, repeat: int = 5, min_time: float = 0.0) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < repeat or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timeit_pair(fn_a, fn_b, warmup: int = 2, rounds: int = 7) -> tuple[float, float]:
    """Median seconds per call of two functions measured alternately (a, b, a, b, ...), so machine drift and noise
    hit both alike."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    ta, tb = [], []
    for _ in range(rounds):
        for fn, acc in ((fn_a, ta), (fn_b, tb)):
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def machine() -> str:
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = "?"
    return (
        f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}, commit {commit or '?'}"
    )


def header(title: str) -> None:
    print(f"# {title}\n# {machine()}")
