"""Expert parallelism's token exchange against the expert compute it feeds: one MoE layer forward+backward on
2 ranks (gloo on CPU), each holding half the experts, at the tiny preset's MoE shape and a larger one.

Measured per rank, alternately in one run, each call after a barrier so no rank's time includes waiting for a
late peer, median over rounds, then the slowest rank's median (the step waits for it):
  layer     the whole EP layer (``parallel/expert_parallel.py`` via ``apply_expert_parallel``): routing, sort,
            count all_to_all, row all_to_all out and back, local grouped GEMMs, weighting; forward+backward
  exchange  the same layer's all_to_alls alone on its measured split sizes: the counts, then four row exchanges
            (rows out and outputs back in the forward, their gradients the reverse way in the backward)
  gemm      the local grouped GEMMs alone (``experts(rows, counts)`` on the rows this rank received), fwd+bwd
  no-EP     the layer with all experts on the rank, on the same tokens (what each rank runs without EP)
``layer - exchange - gemm`` is the rest: routing, sorting and the row permutations.

    python bench/bench_expert_parallel.py [--nproc 2] [--rounds 15]   # relaunches itself under torchrun
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from common import header

from moe_arch.config import ModelConfig
from moe_arch.model.moe import MoE
from moe_arch.parallel.expert_parallel import apply_expert_parallel

# (name, d_model, n_experts, top_k, d_ff_expert, tokens per rank). tiny: its MoE layers are MoD blocks that see
# 0.75 of a 16 x 128 batch.
SHAPES = [("tiny", 128, 4, 2, 192, 1536), ("larger", 256, 8, 2, 512, 4096)]


def measure(name, d, E, k, f, n_tok, rounds: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ModelConfig(d_model=d, n_layers=1, moe_layers=[0], n_experts=E, top_k=k, d_ff_expert=f)
    moe = MoE(cfg, 0)
    moe.init_weights(0.02, 0.02, torch.Generator().manual_seed(0))
    ref = copy.deepcopy(moe)
    apply_expert_parallel(moe, init_device_mesh("cpu", (world,)))
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(n_tok, d, generator=g, requires_grad=True)
    gy = torch.randn(n_tok, d, generator=g)

    seen = {}
    moe.experts.register_forward_hook(lambda m, inp, out: seen.update(rows=inp[0].detach(), counts=inp[1]))
    moe(x).backward(gy)
    rows = seen["rows"].clone().requires_grad_(True)
    gout = torch.randn(rows.shape, generator=g)

    # the exchange's split sizes, as AllToAllExchange computes them
    with torch.no_grad():
        idx = moe.route(x)[2]
    send_counts = torch.bincount(idx.reshape(-1), minlength=E).view(world, E // world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    send, recv = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
    sent, got = torch.randn(sum(send), d), torch.randn(sum(recv), d)
    sent2, got2 = torch.empty_like(sent), torch.empty_like(got)

    def layer():
        x.grad = None
        moe(x).backward(gy)

    def exchange():
        rc = torch.empty_like(send_counts)
        dist.all_to_all_single(rc, send_counts)
        rc.sum(1).tolist()  # the host sync the exchange needs to size its buffers
        for _ in range(2):  # forward (rows out, outputs back), then backward (the same two, reversed)
            dist.all_to_all_single(got2, sent, recv, send)
            dist.all_to_all_single(sent2, got, send, recv)

    def gemm():
        rows.grad = None
        moe.experts(rows, seen["counts"]).backward(gout)

    def no_ep():
        x.grad = None
        ref(x).backward(gy)

    fns = {"layer": layer, "exchange": exchange, "gemm": gemm, "no-EP": no_ep}
    times = {n: [] for n in fns}
    for r in range(rounds + 2):  # two warm-up rounds
        for n, fn in fns.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            if r >= 2:
                times[n].append(time.perf_counter() - t0)
    med = torch.tensor([statistics.median(v) for v in times.values()], dtype=torch.float64)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    t = dict(zip(fns, (med * 1e3).tolist()))
    rows_in = torch.tensor([sum(recv)])
    dist.all_reduce(rows_in, op=dist.ReduceOp.MAX)
    if rank == 0:
        rest = t["layer"] - t["exchange"] - t["gemm"]
        print(
            f"{name:>7} {d:>4} {E:>3} {k:>2} {f:>5} {n_tok:>6} {int(rows_in):>9} {t['layer']:>9.2f} "
            f"{t['exchange']:>9.2f} {t['gemm']:>8.2f} {rest:>8.2f} {t['no-EP']:>8.2f} "
            f"{t['exchange'] / t['gemm']:>14.2f} {t['layer'] / t['no-EP']:>11.2f}"
        )


def worker(args) -> None:
    dist.init_process_group("gloo")
    if dist.get_rank() == 0:
        header(
            "expert parallelism: token exchange vs local grouped GEMM, one MoE layer fwd+bwd, "
            f"{dist.get_world_size()} gloo ranks"
        )
        print(
            f"# medians of {args.rounds} rounds after 2 warm-up, slowest rank; ms per layer forward+backward; "
            f"fp32, {torch.get_num_threads()} thread(s) per rank"
        )
        print(
            f"{'shape':>7} {'d':>4} {'E':>3} {'k':>2} {'f':>5} {'tok/rk':>6} {'rows recv':>9} {'layer ms':>9} "
            f"{'exch ms':>9} {'gemm ms':>8} {'rest ms':>8} {'no-EP ms':>8} {'exchange/gemm':>14} {'layer/no-EP':>11}"
        )
    for shape in SHAPES:
        measure(*shape, rounds=args.rounds)
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    if "RANK" in os.environ:
        worker(args)
        sys.stdout.flush()
        os._exit(0)  # no interpreter teardown racing gloo's threads (as in tests/test_replicas.py)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc)]
    cmd += [str(Path(__file__).resolve()), "--rounds", str(args.rounds)]
    raise SystemExit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
