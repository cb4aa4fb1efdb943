"""Training tokens/s and MFU of a preset, against this machine's fp32 matmul peak measured in the same run.

    python bench/bench_train.py [--preset tiny] [--steps 30] [--rounds 6] [--batch 16] [--seq 128]

MFU = model training FLOPs per token (matmuls: 6 x active matmul parameters, plus attention scores and the
Mamba scan; MoD blocks at their selected fraction) x tokens/s / peak FLOP/s of a 2048^3 matmul (fp32 on a CPU,
bf16 on a GPU, where the trainer's default precision is bf16-mixed).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import header

from moe_arch.config import load_config
from moe_arch.model.params import flops_per_token
from moe_arch.training.flops import measure_matmul_peak
from moe_arch.training.trainer import Trainer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=6, help="step/peak measurement pairs (see below)")
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--seq", type=int, default=0)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--monitor", action="store_true")
    args = ap.parse_args()
    header(f"training throughput and MFU: {args.preset}")
    with tempfile.TemporaryDirectory() as tmp:
        ov = [
            "--train.out_dir",
            tmp,
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
            str(args.steps + 2),
            "--monitor.enabled",
            str(args.monitor).lower(),
            "--train.compile",
            str(args.compile).lower(),
            "--train.peak_flops",
            "1",
        ]
        if args.batch:
            ov += ["--train.batch_size", str(args.batch)]
        if args.seq:
            ov += ["--train.seq_len", str(args.seq)]
        cfg = load_config(args.preset, ov)
        trainer = Trainer(cfg, log=lambda *a, **k: None)
        trainer.train_step()  # warm-up (allocations, first-call overheads, compilation)
        trainer.train_step()
        device = trainer.device
        kind = torch.float32 if device.type == "cpu" else torch.bfloat16  # the precision each trains in by default
        fpt = flops_per_token(cfg.model, cfg.train.seq_len)
        # The machine is shared and its speed drifts over seconds: each round pairs a few steps with a fresh
        # measurement of the matmul peak (the denominator: fp32 on a CPU, bf16 on a GPU), so each round's MFU
        # is a ratio of two numbers taken moments apart; the median round is reported.
        rounds = max(1, min(args.rounds, args.steps))
        per_round = max(1, args.steps // rounds)
        times, mfus, peaks = [], [], []
        for _ in range(rounds):
            rt = []
            for _ in range(per_round):
                tokens0 = trainer.tokens_seen
                t0 = time.perf_counter()
                trainer.train_step()
                rt.append(time.perf_counter() - t0)
            tokens_per_step = trainer.tokens_seen - tokens0
            peak = measure_matmul_peak(device, kind, seconds=0.3)
            times += rt
            peaks.append(peak)
            mfus.append(fpt["train_flops_per_token"] * tokens_per_step / statistics.median(rt) / peak)
        step_s = statistics.median(times)
        tok_s = tokens_per_step / step_s
    print(
        f"# batch {cfg.train.batch_size} x seq {cfg.train.seq_len}, {rounds} rounds x {per_round} steps, "
        f"compile={args.compile}, monitor={args.monitor}"
    )
    print(f"step time (median)   {step_s * 1e3:10.1f} ms  (mean {statistics.mean(times) * 1e3:.1f} ms)")
    print(f"tokens/s             {tok_s:10,.0f}")
    print(
        f"model FLOPs/token    {fpt['train_flops_per_token'] / 1e6:10.2f} MFLOP (MoD-selected fraction "
        f"{fpt['mod_selected_fraction']:.3f})"
    )
    print(f"achieved             {fpt['train_flops_per_token'] * tok_s / 1e9:10.1f} GFLOP/s")
    name = "fp32" if device.type == "cpu" else "bf16"
    print(
        f"{name} matmul peak     {statistics.median(peaks) / 1e9:10.1f} GFLOP/s (2048^3 on {device.type}, median of "
        f"{rounds} measurements in this run, {min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f})"
    )
    print(
        f"MFU                  {statistics.median(mfus):10.1%}  (median of {rounds} rounds, each steps / peak "
        f"measured together; range {min(mfus):.1%}-{max(mfus):.1%})"
    )


if __name__ == "__main__":
    main()
