"""The memory planner against the measured per-rank peak under torchrun (2 CPU ranks, gloo): FSDP2 alone and with
expert parallelism over both ranks (tiny preset, batch 8 x 128, fp32), within test_memory.py's one-process
tolerance. This file is also the worker (``python test_memory_ep.py OUT EP`` under ``torch.distributed.run``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")


def torchrun(tmp_path: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])


@pytest.mark.parametrize("ep", [1, 2])
def test_planned_peak_matches_each_ranks_measured_peak(tmp_path, ep):
    from moe_arch.config import load_config
    from moe_arch.training.memory import GiB, plan_memory

    out = tmp_path / "peaks.json"
    torchrun(tmp_path, str(out), str(ep))
    measured = json.loads(out.read_text())
    cfg = load_config("tiny")
    plan = plan_memory(
        cfg, gpus=2, expert_parallel=ep, batch_size=8, seq_len=128, precision="fp32", checkpointing="none", device="cpu"
    )
    for rank, peak in enumerate(measured):
        assert plan.peak_gb * GiB == pytest.approx(peak, rel=0.15), (rank, measured, plan.peak_gb * GiB, plan.gb)


def worker(out: str, ep: int) -> None:
    import torch.distributed as dist

    from moe_arch.config import load_config
    from moe_arch.training.memory import measure_step_peak

    dist.init_process_group("gloo")
    peak = measure_step_peak(load_config("tiny"), "fp32", "none", 8, 128, expert_parallel=ep)
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(peaks))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    worker(sys.argv[1], int(sys.argv[2]))
    # As in test_replicas.py: no interpreter teardown after the result is written (a gloo thread aborted there once).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
