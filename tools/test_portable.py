"""Re-run the numerics-bearing tests under other CPUs' code paths (``make test-portable``; ``.ci/run`` calls it).

A test that compares two different computations bit for bit passes on the CPU it was written on and fails on
another, where MKL picks another GEMM kernel, ATen another vectorised path, or our kernels another SIMD build.
CI runs on whichever machine it gets, so it replays those paths on this one:

- run 1: ``MKL_CBWR=COMPATIBLE`` (MKL's conditional-numerical-reproducibility baseline, SSE2 kernels) and our
  kernels' ``portable`` build (no explicit SIMD);
- run 2: ``MKL_CBWR=AVX2``, ``ATEN_CPU_CAPABILITY=avx2`` (ATen's AVX2 kernels instead of AVX-512) and our
  kernels' ``avx2`` build — what an AVX2-only machine (or AMD before Zen 4) computes.

The machine's own default path is ``make test`` itself. A run whose paths this CPU cannot execute is skipped with
its reason printed (the other still runs). Extra arguments go to pytest. Exit code: pytest's worst.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The tests whose assertions depend on floating-point results: kernels, model, MoE, Mamba, generation,
# checkpointing (recomputation), parity with transformers, precision policies, optimizers, trainer determinism
# and resume, the memory planner's measured bytes, the MoD selection properties, and expert parallelism (a layer
# against its float32 bounds, training against one process).
NUMERICS_TESTS = [
    "tests/test_kernels.py",
    "tests/test_model.py",
    "tests/test_moe.py",
    "tests/test_mamba.py",
    "tests/test_generation.py",
    "tests/test_checkpointing.py",
    "tests/test_parity.py",
    "tests/test_precision.py",
    "tests/test_optim.py",
    "tests/test_trainer.py",
    "tests/test_checkpoint.py",
    "tests/test_memory.py",
    "tests/test_properties.py",
    "tests/test_triton.py",
    "tests/test_expert_parallel.py",
]

RUNS = [
    ("COMPATIBLE GEMMs, portable kernels", {"MKL_CBWR": "COMPATIBLE", "MOE_ARCH_KERNEL_ISA": "portable"}, set()),
    (
        "AVX2 GEMMs, AVX2 ATen, AVX2 kernels",
        {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MOE_ARCH_KERNEL_ISA": "avx2"},
        {"avx2", "fma"},
    ),
]


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def main(argv: list[str]) -> int:
    flags = cpu_flags()
    worst = 0
    for name, env, needs in RUNS:
        label = " ".join(f"{k}={v}" for k, v in env.items())
        missing = sorted(needs - flags) if flags else []
        if missing:
            print(f"portability: skipped {name} ({label}): this CPU lacks {', '.join(missing)}", flush=True)
            continue
        print(f"portability: {name} ({label})", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call(
            [sys.executable, "-m", "pytest", "-q", *NUMERICS_TESTS, *argv], cwd=ROOT, env={**os.environ, **env}
        )
        print(f"portability: {name}: exit {rc} in {time.monotonic() - t0:.0f} s", flush=True)
        worst = max(worst, rc)
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
