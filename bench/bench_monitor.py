"""Overhead of the live monitor: tiny-preset training step time with and without it (default interval), measured
in one run with the two interleaved in blocks so machine noise hits both alike.

    python bench/bench_monitor.py [--blocks 6] [--block-steps 10]
    python bench/bench_monitor.py --replicas [--nproc 2]    # the cross-rank replica check under DDP (torchrun)

``--replicas`` relaunches itself under ``torch.distributed.run`` (gloo on CPU, NCCL on GPUs): one DDP trainer whose
monitor runs with the replica check every step, every ``monitor.replica_check_every`` steps (the default) and
off, interleaved in blocks; the ratios of step times are printed by rank 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import header

from moe_arch.config import load_config
from moe_arch.training.trainer import Trainer


def make(tmp: str, monitor: bool, *extra: str) -> Trainer:
    cfg = load_config(
        "tiny",
        [
            "--train.out_dir",
            tmp,
            "--train.run_name",
            f"m{int(monitor)}",
            "--train.progress",
            "none",
            "--train.tensorboard",
            "false",
            "--train.save_step0",
            "false",
            "--train.ckpt_every",
            "0",
            "--train.eval_every",
            "0",
            "--train.steps",
            "100000",
            "--monitor.enabled",
            str(monitor).lower(),
            "--train.peak_flops",
            "1",
            *extra,
        ],
    )
    t = Trainer(cfg, log=lambda *a, **k: None)
    if t.monitor is not None:
        t.monitor.print = lambda s: None
    return t


def block(t: Trainer, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        stats = t.train_step()
        if t.monitor is not None:
            t.monitor.after_step(t.step, stats)
    return (time.perf_counter() - t0) / n


def replicas(args) -> None:
    """Under torchrun: one DDP trainer, its monitor's replica check toggled between blocks."""
    with tempfile.TemporaryDirectory() as tmp:
        t = make(tmp, True, "--train.parallel", "ddp")
        base = t.monitor.cfg
        modes = {"off": 0, "default": base.replica_check_every or 10, "every step": 1}
        n = t.monitor._replicas.n_tensors if t.monitor._replicas is not None else 0
        times: dict[str, list[float]] = {m: [] for m in modes}
        for m, every in modes.items():  # warm-up
            t.monitor.cfg = dataclasses.replace(base, replica_check_every=every)
            block(t, 3)
        for _ in range(args.blocks):
            for m, every in modes.items():
                t.monitor.cfg = dataclasses.replace(base, replica_check_every=every)
                times[m].append(block(t, args.block_steps))
        alerts = [a for a in t.monitor.alerts if a.cause == "replicas_diverged"]
        check_s = None
        if t.monitor._replicas is not None and t.monitor._replicas.groups:  # the check alone, step noise aside
            t.monitor._replicas.check()
            t0 = time.perf_counter()
            for _ in range(20):
                t.monitor._replicas.check()
            check_s = (time.perf_counter() - t0) / 20
        if t.dist.is_main:
            med = {m: statistics.median(v) for m, v in times.items()}
            print(
                f"# DDP on {t.dist.world} ranks ({t.device.type}); {n} replicated tensors fingerprinted; "
                f"{args.blocks} interleaved blocks of {args.block_steps} steps"
            )
            for m, every in modes.items():
                print(
                    f"step time, replica check {m:<10} (every {every or '-'}) {med[m] * 1e3:8.1f} ms   "
                    f"ratio to off {med[m] / med['off']:.3f}"
                )
            if check_s is not None:
                print(f"one replica check alone: {check_s * 1e3:.2f} ms ({check_s / med['off']:.2%} of a step)")
            print(f"false alarms: {len(alerts)}")
        t.dist.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--block-steps", type=int, default=10)
    ap.add_argument("--replicas", action="store_true", help="the replica check's overhead under DDP (torchrun)")
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args()
    if args.replicas:
        if "RANK" in os.environ:
            return replicas(args)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc)]
        cmd += [str(Path(__file__).resolve()), "--replicas", "--blocks", str(args.blocks)]
        cmd += ["--block-steps", str(args.block_steps)]
        raise SystemExit(subprocess.run(cmd, env=env).returncode)
    header("monitor overhead on the tiny preset")
    with tempfile.TemporaryDirectory() as tmp:
        off, on = make(tmp, False), make(tmp, True)
        block(off, 3)
        block(on, 3)
        t_off, t_on = [], []
        for _ in range(args.blocks):
            t_off.append(block(off, args.block_steps))
            t_on.append(block(on, args.block_steps))
    a, b = statistics.median(t_off), statistics.median(t_on)
    interval = on.cfg.monitor.interval
    print(f"# {args.blocks} interleaved blocks of {args.block_steps} steps; monitor interval {interval} steps")
    print(f"step time without monitor  {a * 1e3:8.1f} ms")
    print(f"step time with monitor     {b * 1e3:8.1f} ms")
    print(f"overhead                   {b / a - 1:8.1%}")


if __name__ == "__main__":
    main()
