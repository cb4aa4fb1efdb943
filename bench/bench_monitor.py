"""Overhead of the live monitor: tiny-preset training step time with and without it (default interval), measured
in one run with the two interleaved in blocks so machine noise hits both alike.

    python bench/bench_monitor.py [--blocks 6] [--block-steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from common import header

from moe_arch.config import load_config
from moe_arch.training.trainer import Trainer


def make(tmp: str, monitor: bool) -> Trainer:
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--block-steps", type=int, default=10)
    args = ap.parse_args()
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
