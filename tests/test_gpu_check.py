"""bench/gpu_check.py --smoke: the GPU check's code on the CPU at toy sizes (Triton under its interpreter), so the
one command prepared for the GPU machine cannot rot: every section prints its rows, none fails, the JSON holds them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_prints_the_full_table(tmp_path):
    out_json = tmp_path / "gpu_check.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MOE_ARCH_KERNEL_CACHE": os.environ.get(
            "MOE_ARCH_KERNEL_CACHE", str(Path.home() / ".cache" / "moe_arch" / "kernels")
        ),
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--json", str(out_json)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    table = proc.stdout.split("\n\n")[-1]
    for section in ("env", "tests", "correct", "kernels", "train", "parts", "mamba", "memory", "bf16", "generate"):
        assert f"\n{section} " in "\n" + table, f"no {section} rows:\n{table}"
    for row in (
        "eager MFU",
        "selective scan (+D, gate): error / float32 bound",
        "planned vs measured",
        "speculative",
        "SDPA backend",
        "grouped_mm",
    ):
        assert row in table, row
    rows = json.loads(out_json.read_text())["rows"]
    assert rows and not [r for r in rows if r["ok"] is False]
    assert not [r for r in rows if r["value"] in ("error", "skipped") and "--smoke" not in r["note"]], rows
