"""Memory planner vs measured peak memory of training steps on this CPU.

Each configuration runs in a fresh child process: it records its resident memory (VmRSS) before the model is built,
runs three training steps exactly as the trainer composes them (``memory.measure_step_peak``: precision policy,
activation checkpointing, Muon + AdamW, compensated updates, clipping, zero_grad(set_to_none)), and reports the
high-water mark (VmHWM, the kernel's own peak of this process: ru_maxrss would carry the forking parent's peak).
Two measurements: the peak of live tensor bytes from the profiler's allocation events (``profile_memory=True``: the
CPU analogue of ``torch.cuda.max_memory_allocated``, what the planner models), and the process's resident peak
(VmHWM - baseline), which adds what glibc malloc keeps and fragments (no planner models that; on a GPU the caching
allocator's reserve plays that part, hence the planner's 90% usable rule). predicted = ``plan_memory(...,
device="cpu")`` for the same config.

A second table is the planner alone (no measurement: it needs GPUs): seed-3b's per-device memory on 80 GiB GPUs
with expert parallelism (``train.expert_parallel``), against plain FSDP on as many GPUs.

    python bench/bench_memory.py                    # both tables
    python bench/bench_memory.py --json             # machine-readable rows of the measured table
    python bench/bench_memory.py --expert-parallel  # the planner's expert-parallel table alone (seconds)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import ROOT, header

# (label, preset, overrides, precision, checkpointing, batch, seq): sizes, precisions and checkpointing differ.
CONFIGS = [
    ("tiny fp32", "tiny", [], "fp32", "none", 16, 128),
    ("medium bf16-mixed full", "medium", [], "bf16-mixed", "full", 8, 256),
    ("medium bf16-compensated", "medium", [], "bf16-compensated", "none", 8, 256),
    ("medium fp32 sequence", "medium", [], "fp32", "sequence", 8, 256),
    (
        "wide fp32 selective",
        "medium",
        [
            "--model.d_model",
            "384",
            "--model.n_heads",
            "6",
            "--model.d_ff",
            "1024",
            "--model.d_ff_expert",
            "512",
            "--model.vocab_size",
            "8192",
        ],
        "fp32",
        "selective",
        4,
        512,
    ),
]


# (gpus, expert_parallel) for seed-3b on 80 GiB devices: plain FSDP next to each expert-parallel setup; EP 7 on 8
# GPUs is refused (7 does not divide 8) and the table prints the planner's own error.
EP_SETUPS = [(8, 1), (8, 2), (8, 7), (7, 1), (7, 7), (14, 1), (14, 7)]


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(preset: str, overrides: list[str], precision: str, ckpt: str, batch: int, seq: int, steps: int = 3) -> None:
    import os

    import torch

    from moe_arch.config import load_config
    from moe_arch.model.transformer import build_model
    from moe_arch.precision import resolve_policy
    from moe_arch.training.memory import measure_step_peak
    from moe_arch.training.optim import build_optimizers
    from moe_arch.utils import tune_cpu_malloc

    if os.environ.get("BENCH_TUNE_MALLOC", "1") == "1":
        tune_cpu_malloc()  # as the trainer does on CPU
    cfg = load_config(preset, overrides)
    policy = resolve_policy(precision, torch.device("cpu"))
    # One step of a miniature model first: what the first step loads once (the C kernels, optimizer modules,
    # thread pools: ~70 MB of code and buffers) is not what the planner models. Its tensors are KB-sized.
    mini = load_config(
        preset,
        overrides
        + [
            "--model.d_model",
            "32",
            "--model.n_heads",
            "2",
            "--model.n_kv_heads",
            "1",
            "--model.head_dim",
            "16",
            "--model.vocab_size",
            "64",
            "--model.d_ff",
            "32",
            "--model.d_ff_expert",
            "16",
        ],
    )
    warm = build_model(mini.model, seed=0).to(policy.param_dtype).train()
    warm_opts = build_optimizers(warm, cfg.optim)
    tokens = torch.randint(0, 64, (1, 8 + cfg.model.n_predict))
    with policy.autocast(torch.device("cpu")):
        warm(tokens[:, :8], tokens[:, 1:]).loss.backward()
    for o in warm_opts.values():
        o.step()
    del warm, warm_opts
    base = _status("VmRSS")
    tensors = measure_step_peak(cfg, precision, ckpt, batch, seq, steps)
    print(json.dumps({"tensors": tensors, "rss": _status("VmHWM") - base}))


def plan(preset, overrides, precision, ckpt, batch, seq):
    from moe_arch.config import load_config
    from moe_arch.training.memory import GiB, plan_memory

    cfg = load_config(preset, overrides)
    p = plan_memory(
        cfg, name=preset, gpus=1, batch_size=batch, seq_len=seq, checkpointing=ckpt, precision=precision, device="cpu"
    )
    return p.peak_gb * GiB, p


def expert_parallel_table(as_json: bool = False) -> list[dict]:
    from moe_arch.config import load_config
    from moe_arch.training.memory import PlanError, plan_memory

    cfg = load_config("seed-3b")
    rows = []
    if not as_json:
        header("memory planner: seed-3b per device with expert parallelism (80 GiB GPUs, bf16-mixed, FSDP)")
        print(
            f"{'GPUs':>5} {'EP':>3} {'state GiB':>10} {'activations':>12} {'fsdp gathered':>14} {'step tmp':>9} "
            f"{'all-to-all':>11} {'peak GiB':>9} {'peak phase':>11} {'max batch':>10}"
        )
    for gpus, ep in EP_SETUPS:
        try:
            p = plan_memory(cfg, name="seed-3b", gpus=gpus, gpu_memory_gb=80, expert_parallel=ep)
        except PlanError as e:
            rows.append(dict(gpus=gpus, expert_parallel=ep, error=str(e)))
            if not as_json:
                print(f"{gpus:>5} {ep:>3}  error: {e}")
            continue
        g = p.gb
        state = g["parameters"] + g["gradients"] + g["optimizer states"]
        rows.append(
            dict(
                gpus=gpus,
                expert_parallel=ep,
                state_gb=state,
                peak_gb=p.peak_gb,
                phase=p.phase,
                max_batch_size=p.max_batch_size,
                gb=g,
            )
        )
        if not as_json:
            print(
                f"{gpus:>5} {ep:>3} {state:>10.2f} {g['activations (kept)']:>12.2f} {g['fsdp gathered']:>14.2f} "
                f"{g['optimizer-step temporaries']:>9.2f} {g.get('all-to-all buffers (one layer)', 0.0):>11.3f} "
                f"{p.peak_gb:>9.2f} {p.phase:>11} {p.max_batch_size:>10}"
            )
    if not as_json:
        print(
            "state: parameters + gradients + optimizer states, sharded over all GPUs with or without expert "
            "parallelism. EP N: FSDP gathers N x fewer experts per block, Muon orthogonalises only the rank's own "
            "experts, the token all-to-all adds buffers (balanced routing assumed; up to N x under a skewed router). "
            "Micro-batch 1 x 2048 (train.batch_size); max batch: the largest micro-batch within 90% of 80 GiB."
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=argparse.REMAINDER)
    ap.add_argument("--expert-parallel", action="store_true", help="the planner's expert-parallel table alone")
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child[0])
        child(**spec)
        return
    if args.expert_parallel:
        rows = expert_parallel_table(args.json)
        if args.json:
            print(json.dumps(rows, indent=2))
        return
    rows = []
    if not args.json:
        header("memory planner vs measured peak (CPU, 3 training steps, fresh process per config)")
        print(
            f"{'config':>26} {'params':>8} {'B x T':>9} {'predicted MB':>13} {'tensors MB':>12} {'error':>7} "
            f"{'RSS MB':>10} {'peak phase':>15}"
        )
    for label, preset, ov, prec, ckpt, b, t in CONFIGS:
        spec = dict(preset=preset, overrides=ov, precision=prec, ckpt=ckpt, batch=b, seq=t)
        res = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, cwd=ROOT
        )
        if res.returncode:
            raise SystemExit(f"{label}: child failed\n{res.stderr[-3000:]}")
        got = json.loads(res.stdout.strip().splitlines()[-1])
        predicted, p = plan(preset, ov, prec, ckpt, b, t)
        err = predicted / got["tensors"] - 1
        rows.append(
            dict(
                config=label,
                parameters=p.parameters,
                batch=b,
                seq=t,
                precision=prec,
                checkpointing=ckpt,
                predicted_mb=predicted / 2**20,
                tensors_mb=got["tensors"] / 2**20,
                error=err,
                rss_mb=got["rss"] / 2**20,
                phase=p.phase,
            )
        )
        if not args.json:
            print(
                f"{label:>26} {p.parameters / 1e6:>7.1f}M {f'{b}x{t}':>9} {predicted / 2**20:>13.1f} "
                f"{got['tensors'] / 2**20:>12.1f} {err:>+7.1%} {got['rss'] / 2**20:>10.1f} {p.phase:>15}"
            )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(
            "tensors: peak live tensor bytes (profiler allocation events) = what the planner predicts; error = "
            "predicted / tensors - 1. RSS: the process's resident peak over its baseline (glibc keeps and fragments "
            "freed blocks). predicted: the planner for device=cpu (CPU kernels' activations, float32 Newton-Schulz)."
        )
        expert_parallel_table()


if __name__ == "__main__":
    main()
