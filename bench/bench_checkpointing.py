"""Activation checkpointing: bytes of activations kept for the backward (counted exactly with
saved_tensors_hooks) and forward+backward time, none vs full vs selective, on the tiny and medium presets, in one
run (modes alternated, medians).

    python bench/bench_checkpointing.py [--batch 8] [--seq 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import header

from moe_arch.config import load_config
from moe_arch.model.transformer import build_model

MODES = ("none", "sequence", "selective", "full")


def saved_bytes(model, tokens, targets) -> int:
    n = 0

    def pack(t):
        nonlocal n
        n += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, targets).loss
    loss.backward()
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    header("activation checkpointing: kept activations and step time")
    print(f"{'preset':>7} {'mode':>10} {'kept MB':>9} {'vs none':>8} {'step ms':>9} {'vs none':>8}")
    for preset in ("tiny", "medium"):
        cfg = load_config(preset).model
        model = build_model(cfg, seed=0).train()
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
        targets = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + cfg.n_predict - 1), generator=g)
        kept, times = {}, {m: [] for m in MODES}
        for m in MODES:
            model.set_activation_checkpointing(m)
            kept[m] = saved_bytes(model, tokens, targets)
            model.zero_grad(set_to_none=True)
        for _ in range(args.rounds):
            for m in MODES:
                model.set_activation_checkpointing(m)
                t0 = time.perf_counter()
                model(tokens, targets).loss.backward()
                times[m].append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
        for m in MODES:
            t = statistics.median(times[m])
            print(
                f"{preset:>7} {m:>10} {kept[m] / 2**20:>9.1f} {kept[m] / kept['none']:>8.2f} {t * 1e3:>9.0f} "
                f"{t / statistics.median(times['none']):>8.2f}"
            )
    print(
        "kept: bytes the autograd graph holds for the backward (outside checkpointed regions); step: forward + "
        "backward, fp32 on this CPU."
    )


if __name__ == "__main__":
    main()
