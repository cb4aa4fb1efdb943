"""Run every benchmark in turn and print their outputs (used by `make bench`; numbers go into bench/RESULTS.md)."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    "bench_layers.py",
    "bench_train.py",
    "bench_moe_dispatch.py",
    "bench_expert_parallel.py",
    "bench_mamba.py",
    "bench_compile.py",
    "bench_monitor.py",
    "bench_doctor.py",
    "bench_false_alarms.py",
    "bench_history.py",
    "bench_data.py",
    "bench_checkpointing.py",
    "bench_memory.py",
    "bench_generate.py",
]

if __name__ == "__main__":
    failed = []
    for name in SCRIPTS:
        print(f"\n===== {name}", flush=True)
        if subprocess.run([sys.executable, str(HERE / name)]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {failed}")
        sys.exit(1)
